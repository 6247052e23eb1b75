"""`vgs eval` at scale, through real vLLM: shards merged by `vgs report` equal one run, and a
`kill -9` mid-run leaves no engine process and resumes without lost or duplicated rows.
(Kept apart from tests/test_eval.py, which the clean-clone check runs a second time.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.vllm
def test_two_shards_merged_equal_one_run(policy_engine, tiny_policy, data_dir, tmp_path, monkeypatch, capsys):
    """Same seeds: shard 0 + shard 1 merged by `vgs report` give the single run's rows and table."""
    import vgs.eval.runner as runner
    from vgs.eval.report import merge_runs, run_report, summarize
    from vgs.eval.runner import EvalConfig, run_eval
    from vgs.config import SamplingConfig, SearchConfig
    from vgs.search import Engines

    monkeypatch.setattr(runner, "build_engines", lambda cfg: Engines(policy=policy_engine))

    def cfg(out, k=1, i=0):
        return EvalConfig(benchmarks=["aime24", "amc23"], policy=tiny_policy, out=str(tmp_path / out),
                          data_dir=data_dir, limit=3, repetitions=2, batch_size=5, num_shards=k, shard_index=i,
                          search=SearchConfig(method="majority", n=3),
                          sampling=SamplingConfig(max_tokens=24, temperature=1.0, top_p=1.0, seed=7))

    single = run_eval(cfg("single"))
    a, b = run_eval(cfg("s0", 2, 0)), run_eval(cfg("s1", 2, 1))
    assert 0 < a["problems"].sum() and 0 < b["problems"].sum()

    def rows(d):
        return {(r["benchmark"], r["problem_id"], r["repetition"]): r
                for r in map(json.loads, open(tmp_path / d / "samples.jsonl"))}

    one, s0, s1 = rows("single"), rows("s0"), rows("s1")
    assert len(one) == 12 and not set(s0) & set(s1) and set(s0) | set(s1) == set(one)
    for key, r in {**s0, **s1}.items():  # identical generations, not only identical totals
        assert [s["text"] for s in r["samples"]] == [s["text"] for s in one[key]["samples"]]
    [(name, merged_rows, _)] = merge_runs([str(tmp_path / "s0"), str(tmp_path / "s1")])
    pd.testing.assert_frame_equal(summarize(merged_rows), single.drop(columns=["method"]))
    capsys.readouterr()
    assert run_report(type("A", (), {"runs": [str(tmp_path / "s0"), str(tmp_path / "s1")], "separate": False,
                                     "plot": None, "csv": None})()) == 0
    out = capsys.readouterr().out
    assert "s0+s1" in out and out.count("== ") == 1
    # a shard directory refuses another shard's items
    with pytest.raises(Exception, match="holds shard 0 of 2"):
        run_eval(cfg("s0", 2, 1))


@pytest.mark.vllm
def test_sigkill_leaves_no_engine_and_resume_completes(tiny_policy, data_dir, tmp_path):
    """kill -9 of `vgs eval` mid-run: within 10 s no process it started is left (the engine
    core used to keep running, reparented to init); the resumed run completes with every
    item exactly once. Also: a normal run prints no engine INFO/WARNING lines."""
    import signal
    import time

    import psutil

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "vgs.cli", "eval", "--benchmark", "aime24", "--policy", tiny_policy,
           "--method", "majority", "--n", "2", "--max-tokens", "64", "--out", str(out), "--data-dir", data_dir,
           "--kv-cache-gib", "0.25", "--max-model-len", "1024", "--batch-size", "2", "--limit", "12"]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_LOGGING_LEVEL"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=REPO,
                            start_new_session=True)
    rows_path = out / "samples.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if rows_path.exists() and rows_path.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed mid-run"
    children = psutil.Process(proc.pid).children(recursive=True)
    assert any("EngineCore" in " ".join(c.cmdline() + [c.name()]) for c in children if c.is_running()), \
        [c.name() for c in children]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left running 10 s after the kill: {[(p.pid, p.name()) for p in alive]}"
    done_before = rows_path.read_bytes().count(b"\n")
    assert 2 <= done_before < 12

    resumed = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    keys = [(r["benchmark"], r["problem_id"], r["repetition"]) for r in map(json.loads, open(rows_path))]
    assert len(keys) == 12 and len(set(keys)) == 12
    assert f"{12 - done_before} of 12" in resumed.stderr
    noisy = [ln for ln in resumed.stderr.replace("\r", "\n").splitlines() if " INFO " in ln or " WARNING " in ln]
    assert not noisy, noisy[:5]
