"""Prepare training data once, before `torchrun`: Parquet rows -> memory-mappable Arrow files.

    python -m value_models.prepare --data runs/r1 runs/r2 --out data/prepared
    torchrun --nnodes 16 --nproc_per_node 8 -m value_models.train --data data/prepared ...

Why a separate command: converting ~100 GB of Parquet takes longer than NCCL's barrier
timeout (10 minutes by default). Done inside the trainer on rank 0, every other rank would
wait in that barrier and the job would die; done here, every rank of the training job only
memory-maps finished files and starts at once. Under torchrun the trainer refuses
unprepared data (one line); a single-process run prepares into `OUT/.data_cache/` itself.

The output is a directory of Arrow IPC files (`part-NNNNN.arrow`, one per input file, the
trainer's four columns, token lists with int64 offsets) plus `prepared.json` (written last:
its presence means complete) recording each source's size and mtime, so the trainer refuses
a prepared copy whose sources changed since. Input is streamed in record batches, so memory
stays bounded by `--batch-rows`, whatever the data size. A killed run resumes: finished parts
whose source is unchanged are kept.

The `--drop` problem filter is not applied here (the trainer applies it over everything it
loads, all rounds together); the filter named by the collection manifests is recorded so the
trainer's `--drop auto` finds it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from value_models.command import run_command
from vgs.errors import VGSError
from value_models.data import (PREPARED_FILE, PREPARED_FORMAT, check_columns, columns_schema, is_prepared,
                               parquet_files, recorded_drop, REQUIRED_COLUMNS)


def _source_meta(f: str) -> dict:
    st = os.stat(f)
    return {"path": os.path.abspath(f), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def prepare(paths: str | Sequence[str], out: str, batch_rows: int = 1024, progress: bool = True) -> dict:
    """Convert (or finish converting) `paths` into the prepared directory `out`; returns its
    metadata. Idempotent: an up-to-date `out` is left as it is."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    if isinstance(paths, str):
        paths = [paths]
    if batch_rows < 1:
        raise VGSError(f"--batch-rows must be >= 1, got {batch_rows}")
    for p in paths:
        if os.path.isdir(p) and is_prepared(p):
            raise VGSError(f"{p} is already prepared; pass it to the trainer as it is")
    files = parquet_files(paths)
    sources = [_source_meta(f) for f in files]
    drop = recorded_drop(paths)
    meta_path = os.path.join(out, PREPARED_FILE)
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        if old.get("complete") and old.get("sources") == sources and old.get("drop") == drop:
            return old
        os.remove(meta_path)  # different or changed sources: rebuild (finished parts are checked below)
    os.makedirs(out, exist_ok=True)
    schema = columns_schema()
    total_rows = 0
    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except Exception as exc:  # noqa: BLE001 - a corrupt file is a user problem
            raise VGSError(f"cannot read Parquet file {f!r}: {exc}") from exc
        check_columns(f, pf.schema_arrow.names)
        total_rows += pf.metadata.num_rows
    parts, labels, tokens = [], [0, 0, 0], 0
    bar = tqdm(total=total_rows, desc="prepare", unit="row", disable=not progress, dynamic_ncols=True)
    for k, (f, src) in enumerate(zip(files, sources)):
        name = f"part-{k:05d}.arrow"
        path = os.path.join(out, name)
        stamp = json.dumps(src, sort_keys=True).encode()
        done = _finished_part(path, stamp)
        if done is None:
            tmp = os.path.join(out, f".{name}.{os.getpid()}.tmp")
            with pa.OSFile(tmp, "wb") as sink, \
                    pa.ipc.new_file(sink, schema.with_metadata({b"vgs_source": stamp})) as writer:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=list(REQUIRED_COLUMNS)):
                    batch = pa.Table.from_batches([batch]).select(list(REQUIRED_COLUMNS)).cast(schema)
                    writer.write_table(batch)
                    bar.update(batch.num_rows)
            os.replace(tmp, path)
            done = _finished_part(path, stamp)
        else:
            bar.update(done["rows"])
        parts.append({"file": name, "source": src["path"], **done})
        labels = [a + b for a, b in zip(labels, done["labels"])]
        tokens += done["tokens"]
    bar.close()
    meta = {"format": PREPARED_FORMAT, "complete": True, "sources": sources, "drop": drop, "parts": parts,
            "rows": sum(p["rows"] for p in parts), "tokens": tokens, "labels": labels}
    tmp = meta_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, meta_path)
    return meta


def _finished_part(path: str, stamp: bytes) -> dict | None:
    """Row/token/label counts of a finished part made from this exact source, else None."""
    import numpy as np
    import pyarrow as pa

    if not os.path.exists(path):
        return None
    try:
        reader = pa.ipc.open_file(pa.memory_map(path, "r"))
    except Exception:  # noqa: BLE001 - unreadable: rebuild it
        return None
    if (reader.schema.metadata or {}).get(b"vgs_source") != stamp:
        return None
    rows, tokens, labels = 0, 0, np.zeros(3, dtype=np.int64)
    for i in range(reader.num_record_batches):
        b = reader.get_batch(i)
        rows += b.num_rows
        for c in ("roll_in_ids", "roll_out_ids"):
            off = b.column(c).offsets
            tokens += int(off[-1].as_py() - off[0].as_py()) if len(off) else 0
        lab = b.column("label").to_numpy(zero_copy_only=False)
        labels += np.bincount(lab[(lab >= 0) & (lab < 3)].astype(np.int64), minlength=3)
    return {"rows": rows, "tokens": tokens, "labels": labels.tolist()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m value_models.prepare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True, help="Parquet files or directories (e.g. every round's collect dir)")
    p.add_argument("--out", required=True, help="prepared directory to write (pass it as the trainer's --data)")
    p.add_argument("--batch-rows", type=int, default=1024, help="rows read and written at a time (bounds memory)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def work() -> str:
        meta = prepare(args.data, args.out, args.batch_rows, args.progress)
        return (f"[prepare] {args.out}: {meta['rows']} rows, {meta['tokens']} tokens, labels wrong/correct/unfinished "
                f"{'/'.join(map(str, meta['labels']))} from {len(meta['sources'])} file(s); drop filter recorded: "
                f"{meta['drop'] or 'none'}")

    return run_command("value_models.prepare", work)


if __name__ == "__main__":
    sys.exit(main())
