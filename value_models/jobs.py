"""Resumable, sharded jobs over a problem set, shared by `vgs collect` and `vgs apo-vstar`.

A job loads its problems (`load_problems`: a benchmark name, a local JSONL/JSON/Parquet file
or directory, or a Hub dataset id), renders their prompts once, cuts them into chunks of
`chunk_size` and gives shard i of N the chunks i, i+N, ... (`plan_chunks`). Each finished
chunk's Parquet file is written under a temp name and renamed (`write_parquet`) before the
shard's manifest (`Manifest`) records it, so a killed job restarts at its first unrecorded
chunk and never duplicates rows; a manifest refuses a resume with different settings. Seeds
come from the item, not the chunk (`item_seed`), so results do not depend on chunking,
sharding or restarts. What a job does with a chunk (roll-ins and roll-outs; pi_ref samples
and V*) stays in its own module.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

from vgs.errors import VGSError

MANIFEST = "manifest.json"
DATA_DIR = "data"
STAGING = ".staging"


@dataclass
class Problem:
    id: str
    problem: str
    answer: str


def load_problems(cfg: Any) -> list[Problem]:
    """A benchmark name (see `vgs.eval.datasets`), a local JSONL/JSON/Parquet file or
    directory, or a Hub dataset id. Fields: `--problem-field` (default problem/question),
    `--answer-field` (default answer; if there is none but a `solution` column, the last
    boxed answer of the solution), `--id-field` (default id/unique_id/problem_idx, else the
    row number)."""
    import pandas as pd

    from vgs.eval.datasets import BENCHMARKS, load_benchmark

    src = cfg.problems
    if src in BENCHMARKS and not os.path.exists(src):
        probs = [Problem(p.id, p.problem, p.answer) for p in load_benchmark(src, cfg.data_dir)]
        return probs[: cfg.limit] if cfg.limit else probs
    if os.path.exists(src):
        files = sorted(f for ext in ("parquet", "jsonl", "json") for f in glob.glob(os.path.join(src, f"**/*.{ext}"), recursive=True)) \
            if os.path.isdir(src) else [src]
    elif src.startswith((".", "/", "~")) or src.endswith((".jsonl", ".json", ".parquet")):
        raise VGSError(f"problems file {src!r} does not exist")
    else:
        files = _hub_files(src, cfg.split)
    if not files:
        raise VGSError(f"no .jsonl/.json/.parquet files in {src!r}")
    frames = []
    for f in files:
        try:
            frames.append(pd.read_parquet(f) if f.endswith(".parquet") else pd.read_json(f, lines=f.endswith(".jsonl"), dtype=False))
        except Exception as exc:  # noqa: BLE001
            raise VGSError(f"cannot read problems from {f!r}: {exc.__class__.__name__}: {exc}") from exc
    df = pd.concat(frames, ignore_index=True)
    return _to_problems(df, cfg, src)


def _hub_files(repo: str, split: str) -> list[str]:
    try:
        from huggingface_hub import snapshot_download

        root = snapshot_download(repo, repo_type="dataset", allow_patterns=["*.parquet", "*.jsonl", "*.json"])
    except Exception as exc:  # noqa: BLE001
        raise VGSError(f"cannot get dataset {repo!r} from the Hub ({exc.__class__.__name__}); "
                       f"pass a local JSONL/Parquet file instead") from exc
    files = [f for f in sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True))
             if f.endswith((".parquet", ".jsonl", ".json")) and not os.path.basename(f).startswith(("dataset_info", "."))]
    in_split = [f for f in files if split in os.path.relpath(f, root)]
    return in_split or files


def _to_problems(df, cfg: Any, src: str) -> list[Problem]:
    from vgs.grading import extract_answer

    lower = {c.lower(): c for c in df.columns}

    def col(explicit: str | None, *fallbacks: str) -> str | None:
        if explicit:
            if explicit not in df.columns:
                raise VGSError(f"{src}: no field {explicit!r}; fields are {', '.join(map(str, df.columns))}")
            return explicit
        return next((lower[f] for f in fallbacks if f in lower), None)

    pcol = col(cfg.problem_field, "problem", "question", "prompt")
    acol = col(cfg.answer_field, "answer", "final_answer", "gold")
    scol = None if acol else col(None, "solution")
    icol = col(cfg.id_field, "id", "unique_id", "problem_idx", "problem_id", "message_id")
    if pcol is None or (acol is None and scol is None):
        raise VGSError(f"{src}: need a problem field and an answer (or solution) field; found {', '.join(map(str, df.columns))} "
                       "(choose with --problem-field / --answer-field)")
    out, skipped = [], 0
    for k, row in enumerate(df.to_dict("records")):
        ans = row[acol] if acol else extract_answer(str(row[scol]))
        if isinstance(ans, float) and ans.is_integer():
            ans = int(ans)
        ans = "" if ans is None else str(ans).strip()
        if not ans:
            skipped += 1
            continue
        out.append(Problem(str(row[icol]) if icol else str(k), str(row[pcol]), ans))
    if skipped:
        print(f"[collect] skipped {skipped} problem(s) without a gold answer", file=sys.stderr)
    ids = [p.id for p in out]
    if len(set(ids)) != len(ids):
        raise VGSError(f"{src}: problem ids are not unique (choose another --id-field)")
    return out[: cfg.limit] if cfg.limit else out


def item_seed(*parts: Any) -> int:
    h = hashlib.sha1(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:4], "big") & 0x7FFFFFFF


def manifest_name(num_shards: int = 1, shard_index: int = 0) -> str:
    """`manifest.json`, or `manifest-III-of-NNN.json` for one of several shards."""
    return MANIFEST if num_shards == 1 else f"manifest-{shard_index:03d}-of-{num_shards:03d}.json"


def shard_chunks(num_chunks: int, num_shards: int, shard_index: int) -> list[int]:
    """The chunks a shard owns: every num_shards-th, starting at shard_index."""
    return list(range(shard_index, num_chunks, num_shards))


class Manifest:
    """What a collection (or one shard of it) has finished: its settings, and per chunk the
    shard file and counts. Saved after every chunk (temp file + rename)."""

    def __init__(self, cfg: Any, problems: list[Problem], fmt: str):
        self.path = os.path.join(cfg.out, manifest_name(cfg.num_shards, cfg.shard_index))
        fp = cfg.fingerprint()
        fp["problem_ids_sha1"] = hashlib.sha1("\n".join(p.id for p in problems).encode()).hexdigest()
        self.data: dict[str, Any]
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.data = json.load(f)
            old = dict(self.data.get("fingerprint", {}))
            old.pop("drop_no_variation", None)  # the filter moved to training time: not a data setting
            if old != fp:
                diff = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
                raise VGSError(f"{cfg.out} holds data collected with different settings ({', '.join(diff)}); "
                               "re-run with the same settings to resume, or choose a new --out")
        else:
            self.data = {"format": fmt, "fingerprint": fp, "num_problems": len(problems),
                         "chunk_size": cfg.chunk_size, "num_shards": cfg.num_shards, "shard_index": cfg.shard_index,
                         "num_chunks": len(shard_chunks(-(-len(problems) // cfg.chunk_size), cfg.num_shards,
                                                        cfg.shard_index)),
                         "round": cfg.round, "ref": cfg.ref_model, "chunks": {}, "complete": False}
        self.data["format"] = fmt  # the job's output format (collect rows, apo-vstar rows)
        self.data["drop"] = cfg.drop  # what the trainer applies (over all rounds); may change between runs
        self.out = cfg.out

    def done(self, k: int) -> bool:
        c = self.data["chunks"].get(str(k))
        return c is not None and (c["file"] is None or os.path.exists(os.path.join(self.out, c["file"])))

    def record(self, k: int, entry: dict) -> None:
        self.data["chunks"][str(k)] = entry
        chunks = self.data["chunks"].values()
        labels = [sum(c["labels"][i] for c in chunks) for i in range(3)]
        self.data["totals"] = {"rows": sum(c["rows"] for c in chunks), "labels": labels,
                               **{k: sum(c.get(k, 0) for c in chunks) for k in ("problems", "problems_all_wrong",
                                                                               "problems_all_correct")}}
        self.data["complete"] = len(self.data["chunks"]) == self.data["num_chunks"]
        self.save()

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(tmp, self.path)


def write_parquet(rows: list[dict] | dict[str, list], path: str, schema=None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=schema) if isinstance(rows, list) else pa.table(rows)
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


EngineFactory = Callable[[str], "tuple[Any, bool]"]


def default_engine_factory(cfg: Any) -> EngineFactory:
    """Build a PolicyEngine per model (returned as owned: the caller closes it). The
    guidance processor is always loaded, a no-op for unguided requests."""

    def build(model: str):
        from vgs.config import EngineConfig
        from vgs.engine import PolicyEngine

        ec = EngineConfig(model=model, dtype=cfg.dtype, max_model_len=cfg.max_model_len, kv_cache_gib=cfg.kv_cache_gib,
                          gpu_memory_utilization=cfg.gpu_memory_utilization,
                          tensor_parallel_size=cfg.tensor_parallel_size, seed=cfg.seed)
        return PolicyEngine(ec), True

    return build


def close_engine(engine: Any, owned: bool) -> None:
    if owned and hasattr(engine, "close"):
        engine.close()


def plan_chunks(cfg: Any, fmt: str) -> tuple[Manifest, Any, dict, list, list[int]]:
    """What a (resumed) run of this shard still has to do: the manifest (created or reopened;
    `fmt` tags the output format), the reference tokenizer, every problem's prompt ids, the
    problems in chunks and the indices of this shard's chunks not yet done (at most
    `max_chunks`). Shared by `vgs collect` and `vgs apo-vstar`."""
    from vgs.prompts import load_tokenizer, prompt_ids

    problems = load_problems(cfg)
    if not problems:
        raise VGSError(f"no problems in {cfg.problems!r}")
    os.makedirs(cfg.out, exist_ok=True)
    manifest = Manifest(cfg, problems, fmt)
    manifest.save()
    tok = load_tokenizer(cfg.ref_model)
    prompts = {p.id: prompt_ids(tok, p.problem, cfg.user_template) for p in problems}
    chunks = [problems[i: i + cfg.chunk_size] for i in range(0, len(problems), cfg.chunk_size)]
    todo = [k for k in shard_chunks(len(chunks), cfg.num_shards, cfg.shard_index) if not manifest.done(k)]
    if cfg.max_chunks:
        todo = todo[: cfg.max_chunks]
    return manifest, tok, prompts, chunks, todo


def progress_bar(cfg: Any, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="problem", disable=not cfg.progress, dynamic_ncols=True)
