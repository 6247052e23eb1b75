"""Benchmark registry: the competition-math sets the toolkit reports on.

Default source is the Hugging Face Hub (the same ids the published results use). When the Hub
does not answer (offline, no network) the copy shipped in `vgs/data/benchmarks/` is used, with one
line on stderr saying so. With a data dir (`--data-dir DIR` or `VGS_DATA_DIR`) each set is read
from `DIR/<file>.jsonl` (fields `id`, `problem`, `answer`, as in the shipped copy). Every loader
returns the same `Problem` records, so nothing downstream knows where a set came from.
"""

from __future__ import annotations

import glob
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from vgs.errors import VGSError

DATA_DIR_ENV = "VGS_DATA_DIR"
SHIPPED_DATA_DIR = str(Path(__file__).resolve().parents[1] / "data" / "benchmarks")


@dataclass(frozen=True)
class Problem:
    benchmark: str
    id: str
    problem: str
    answer: str


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    hub_id: str
    split: str
    local_file: str  # file name in a data dir
    problem_field: str = "problem"
    answer_field: str = "answer"
    id_field: str | None = "id"


BENCHMARKS: dict[str, BenchmarkSpec] = {
    s.name: s
    for s in [
        BenchmarkSpec("aime24", "Maxwell-Jia/AIME_2024", "train", "aime_2024.jsonl", "Problem", "Answer", "ID"),
        BenchmarkSpec("aime25", "yentinglin/aime_2025", "train", "aime_2025.jsonl", "problem", "answer", "id"),
        BenchmarkSpec("hmmt_feb24", "MathArena/hmmt_feb_2024", "train", "hmmt_feb_2024.jsonl", "problem", "answer", "problem_idx"),
        BenchmarkSpec("hmmt_feb25", "MathArena/hmmt_feb_2025", "train", "hmmt_feb_2025.jsonl", "problem", "answer", "problem_idx"),
        BenchmarkSpec("math500", "HuggingFaceH4/MATH-500", "test", "math500.jsonl", "problem", "answer", "unique_id"),
        BenchmarkSpec("amc23", "math-ai/amc23", "test", "amc_2023.jsonl", "question", "answer", "id"),
    ]
}


def _answer_str(value: object) -> str:
    """Answers as strings; floats that are whole numbers (AMC's 27.0) become "27"."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _records(df: pd.DataFrame, name: str, problem_field: str, answer_field: str, id_field: str | None) -> list[Problem]:
    cols = {c.lower(): c for c in df.columns}

    def col(field: str | None, *fallbacks: str) -> str | None:
        for f in (field, *fallbacks):
            if f and f in df.columns:
                return f
            if f and f.lower() in cols:
                return cols[f.lower()]
        return None

    pcol, acol = col(problem_field, "problem", "question"), col(answer_field, "answer")
    icol = col(id_field, "id", "unique_id", "problem_idx")
    if pcol is None or acol is None:
        raise VGSError(f"benchmark {name}: expected fields {problem_field!r} and {answer_field!r}, found {list(df.columns)}")
    out = []
    for k, row in enumerate(df.to_dict("records")):
        pid = str(row[icol]) if icol else str(k)
        out.append(Problem(name, pid, str(row[pcol]), _answer_str(row[acol])))
    ids = [p.id for p in out]
    if len(set(ids)) != len(ids):
        raise VGSError(f"benchmark {name}: problem ids are not unique")
    return out


def load_local(name: str, data_dir: str) -> list[Problem]:
    spec = BENCHMARKS[name]
    path = os.path.join(data_dir, spec.local_file)
    if not os.path.isfile(path):
        raise VGSError(f"benchmark {name}: {path} not found (expected {spec.local_file} in --data-dir)")
    df = pd.read_json(path, lines=True, dtype=False)
    return _records(df, name, "problem", "answer", "id")


def load_hub(name: str) -> list[Problem]:
    """Download the set's data files from the Hub (parquet/jsonl/json) and read the split."""
    spec = BENCHMARKS[name]
    try:
        from huggingface_hub import snapshot_download

        root = snapshot_download(spec.hub_id, repo_type="dataset", allow_patterns=["*.parquet", "*.jsonl", "*.json"])
    except Exception as exc:  # noqa: BLE001
        raise VGSError(f"benchmark {name}: cannot download {spec.hub_id} from the Hub ({exc.__class__.__name__}); "
                       f"pass --data-dir DIR with {spec.local_file} or set {DATA_DIR_ENV}") from exc
    files = [f for f in sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True))
             if f.endswith((".parquet", ".jsonl", ".json")) and not os.path.basename(f).startswith(("dataset_info", "."))]
    split_files = [f for f in files if spec.split in os.path.relpath(f, root)] or files
    if not split_files:
        raise VGSError(f"benchmark {name}: no data files in {spec.hub_id}")
    frames = [pd.read_parquet(f) if f.endswith(".parquet") else pd.read_json(f, lines=f.endswith(".jsonl"))
              for f in split_files]
    return _records(pd.concat(frames, ignore_index=True), name, spec.problem_field, spec.answer_field, spec.id_field)


def load_benchmark(name: str, data_dir: str | None = None, limit: int | None = None) -> list[Problem]:
    """Problems of one benchmark: from `data_dir` (or $VGS_DATA_DIR) if given, else the Hub,
    else (the Hub does not answer) the copy shipped in `vgs/data/benchmarks/`."""
    if name not in BENCHMARKS:
        raise VGSError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    data_dir = data_dir or os.environ.get(DATA_DIR_ENV)
    if data_dir:
        problems = load_local(name, data_dir)
    else:
        try:
            problems = load_hub(name)
        except VGSError as exc:
            if not os.path.isfile(os.path.join(SHIPPED_DATA_DIR, BENCHMARKS[name].local_file)):
                raise
            print(f"vgs: {exc.__cause__.__class__.__name__ if exc.__cause__ else 'Hub unavailable'} "
                  f"loading {BENCHMARKS[name].hub_id}; using the shipped copy in {SHIPPED_DATA_DIR}",
                  file=sys.stderr)
            problems = load_local(name, SHIPPED_DATA_DIR)
    return problems[:limit] if limit else problems
