"""`vgs eval`: argument errors, resume bookkeeping, and the end-to-end CLI through real vLLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from vgs.eval.datasets import BENCHMARKS, load_benchmark
from vgs.eval.runner import ResultsFile
from vgs.cli import main

REPO = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(args)
    except SystemExit as exc:  # argparse errors
        code = int(exc.code)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--benchmark", "aime2099"], "unknown benchmark 'aime2099'"),
    (["--benchmark", "aime24", "--n", "0"], "n must be >= 1"),
    (["--benchmark", "aime24", "--method", "beam"], "unknown method 'beam'"),
    (["--benchmark", "aime24", "--method", "vgs"], "needs --value-model"),
    (["--benchmark", "aime24", "--method", "vgs", "--value-model", "/nonexistent/vm", "--budget", "3"],
     "multiple of beam width"),
    (["--benchmark", "aime24", "--temperature", "-1"], "temperature must be >= 0"),
])
def test_bad_arguments_exit_2_with_one_line(extra, message, tiny_policy, data_dir, tmp_path, capsys):
    code, err = run_cli(["eval", "--policy", tiny_policy, "--out", str(tmp_path / "o"), "--data-dir", data_dir] + extra,
                        capsys)
    assert code == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_model_and_missing_flags(data_dir, tmp_path, capsys):
    code, err = run_cli(["eval", "--benchmark", "aime24", "--policy", "/no/such/model", "--out", str(tmp_path),
                         "--data-dir", data_dir], capsys)
    assert code == 2 and "does not exist" in err
    code, err = run_cli(["eval", "--benchmark", "aime24", "--out", str(tmp_path)], capsys)
    assert code == 2 and "--policy" in err


def test_all_registered_benchmarks_load_locally(data_dir):
    sizes = {name: len(load_benchmark(name, data_dir)) for name in BENCHMARKS}
    assert sizes == {"aime24": 30, "aime25": 30, "hmmt_feb24": 30, "hmmt_feb25": 30, "math500": 500, "amc23": 40}
    amc = load_benchmark("amc23", data_dir)
    assert amc[0].answer == "27"  # float 27.0 → "27"


def test_results_file_drops_torn_line(tmp_path):
    rf = ResultsFile(str(tmp_path))
    rf.append([{"benchmark": "aime24", "problem_id": "1", "repetition": 0}])
    with open(rf.path, "a") as f:
        f.write('{"benchmark": "aime24", "problem_id": "2", "rep')  # killed mid-write
    again = ResultsFile(str(tmp_path))
    assert again.done() == {("aime24", "1", 0)}
    assert open(rf.path).read().count("\n") == 1


@pytest.mark.vllm
def test_eval_majority_cli_end_to_end_and_resume(tiny_policy, data_dir, tmp_path):
    """The issue's acceptance run: 30 complete lines + summary, then a second identical run
    that generates nothing; then a config change is refused."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "vgs.cli", "eval", "--benchmark", "aime24", "--policy", tiny_policy,
           "--method", "majority", "--n", "4", "--max-tokens", "48", "--out", str(out), "--data-dir", data_dir,
           "--kv-cache-gib", "0.5", "--max-model-len", "1024", "--batch-size", "16"]
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING")
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert len(rows) == 30 and len({r["problem_id"] for r in rows}) == 30
    for r in rows:
        assert len(r["samples"]) == 4
        assert all(s["num_tokens"] <= 48 and s["finish_reason"] in ("stop", "length") for s in r["samples"])
        assert set(r["metrics"]) >= {"pass1", "maj", "pass_n", "accuracy"}
        assert r["compute"]["policy_tokens"] == sum(s["num_tokens"] for s in r["samples"])
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["benchmark"]) == ["aime24"] and summary["problems"][0] == 30
    assert "aime24" in first.stdout and "maj@n" in first.stdout

    before = (out / "samples.jsonl").read_bytes()
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "nothing to generate" in second.stderr
    assert (out / "samples.jsonl").read_bytes() == before

    changed = subprocess.run(cmd[:cmd.index("--n") + 1] + ["8"] + cmd[cmd.index("--n") + 2:],
                             capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert changed.returncode == 2 and "different configuration" in changed.stderr
    assert "Traceback" not in changed.stderr


# ---------------------------------------------------------------- checks before any engine starts

def test_wrong_models_and_unwritable_out_fail_before_engines(tiny_policy, tiny_value, data_dir, tmp_path, capsys,
                                                             monkeypatch):
    import vgs.eval.runner as runner

    def no_engines(cfg):
        raise AssertionError("an engine was started before the arguments were checked")

    monkeypatch.setattr(runner, "build_engines", no_engines)
    base = ["eval", "--benchmark", "aime24", "--data-dir", data_dir, "--limit", "1"]
    cases = [
        (["--policy", tiny_value, "--out", str(tmp_path / "a")], "is a value model"),
        (["--policy", tiny_policy, "--method", "vgs", "--value-model", tiny_policy, "--out", str(tmp_path / "b")],
         "is not a value model"),
        (["--policy", tiny_policy, "--method", "qsharp", "--value-model", tiny_policy, "--out", str(tmp_path / "c")],
         "is not a value model"),
        (["--policy", tiny_policy, "--out", "/proc/no-such-dir/out"], "cannot be created"),
        (["--policy", tiny_policy, "--out", str(tmp_path / "d"), "--num-shards", "2", "--shard-index", "2"],
         "--shard-index must be in [0, 2)"),
    ]
    for extra, message in cases:
        code, err = run_cli(base + extra, capsys)
        assert code == 2, err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = run_cli(base + ["--policy", tiny_policy, "--out", str(blocker / "sub")], capsys)
    assert code == 2 and "cannot be created" in err


# ---------------------------------------------------------------- shards and the results file

def test_shards_are_disjoint_balanced_and_stable():
    from vgs.eval.runner import shard_of

    items = [(b, i, r) for b in ("aime24", "math500") for i in range(30) for r in range(3)]
    for k in (1, 2, 3, 7):
        parts = [[it for it in items if shard_of(*it, k) == s] for s in range(k)]
        assert sorted(sum(parts, [])) == sorted(items)  # every item in exactly one shard
        assert max(map(len, parts)) - min(map(len, parts)) <= 2 * 3  # round-robin: near equal sizes
    assert {shard_of("aime24", i, 0, 2) for i in range(2)} == {0, 1}


def test_results_file_keeps_keys_only_and_streams_rows(tmp_path):
    rf = ResultsFile(str(tmp_path))
    rows = [{"benchmark": "aime24", "problem_id": str(i), "repetition": 0, "trace": [1],
             "samples": [{"text": "x" * 1000, "answer": "1"}]} for i in range(3)]
    rf.append(rows)
    assert not hasattr(rf, "rows")  # no copy of the rows in memory
    again = ResultsFile(str(tmp_path))
    assert again.done() == {("aime24", str(i), 0) for i in range(3)}
    light = list(again.iter_rows(light=True))
    assert [r["problem_id"] for r in light] == ["0", "1", "2"]
    assert light[0]["samples"] == [{"answer": "1"}] and "trace" not in light[0]
    assert list(again.iter_rows())[2]["samples"][0]["text"] == "x" * 1000


def test_default_budgets_are_comparable():
    """Default VGS total budget (budget x trees) equals the default majority n, in the config
    and on the command line."""
    from vgs.eval.runner import config_from_args
    from vgs.cli import build_parser
    from vgs.config import SearchConfig

    assert SearchConfig(method="vgs").total_budget == SearchConfig(method="majority").total_budget == 16
    parse = lambda m: config_from_args(build_parser().parse_args(  # noqa: E731
        ["eval", "--benchmark", "aime24", "--policy", "p", "--out", "o", "--method", m]))
    assert parse("vgs").search.total_budget == parse("majority").search.total_budget == 16
