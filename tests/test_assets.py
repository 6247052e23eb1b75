"""The repository is self-contained: the tokenizer and the benchmark files ship inside it, the
Hub falls back to the shipped copy, and a missing asset is one clear line."""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

import pytest

from vgs import assets as local_files
from vgs.eval import datasets
from vgs.eval.datasets import BENCHMARKS, load_benchmark
from vgs.errors import VGSError

REPO = Path(__file__).resolve().parents[1]


def test_tokenizer_ships_and_loads():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(local_files.tokenizer_dir())
    ids = tok.apply_chat_template([{"role": "user", "content": "1+1?"}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[:2] == [151646, 151644] and tok.eos_token_id == 151643
    assert tok.decode(ids).endswith("<｜Assistant｜><think>\n")


def test_shipped_benchmark_files_match_their_checksums():
    readme = (REPO / "vgs" / "data" / "benchmarks" / "README.md").read_text()
    sums = dict((name, digest) for digest, name in re.findall(r"^([0-9a-f]{64})  (\S+)$", readme, re.M))
    assert sorted(sums) == sorted(spec.local_file for spec in BENCHMARKS.values())
    for name, digest in sums.items():
        assert hashlib.sha256((REPO / "vgs" / "data" / "benchmarks" / name).read_bytes()).hexdigest() == digest, name


def test_hub_failure_falls_back_to_shipped_copy(monkeypatch, capsys):
    def offline(name):
        raise VGSError("cannot download") from ConnectionError("no network")

    monkeypatch.delenv("VGS_DATA_DIR", raising=False)
    monkeypatch.setattr(datasets, "load_hub", offline)
    problems = load_benchmark("aime25")
    assert len(problems) == 30 and problems[0].answer == "70"
    err = capsys.readouterr().err
    assert "using the shipped copy" in err and len(err.strip().splitlines()) == 1


def test_missing_asset_is_one_clear_line(tmp_path, monkeypatch):
    missing = tmp_path / "nothing-here"
    monkeypatch.setattr(local_files, "TOKENIZER_DIR", missing)
    with pytest.raises(VGSError, match="missing tokenizer directory at .*nothing-here"):
        local_files.tokenizer_dir()
    with pytest.raises(VGSError, match="not found"):
        datasets.load_local("aime24", str(tmp_path))


def test_nothing_reads_outside_the_repository():
    """No tracked code points at a development-only shared folder beside the clone."""
    files = subprocess.run(["git", "ls-files", "*.py", "Makefile", "scripts/*", ".ci/*", "pyproject.toml"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    pattern = re.compile(r"\.\./shared|parents?\[?\d?\]? ?/ ?[\"']shared[\"']|VGS_SHARED_DIR")
    offenders = [f for f in files if f != "tests/test_assets.py" and pattern.search((REPO / f).read_text())]
    assert offenders == []
