"""Convert the published per-problem data (`VGS-AI/OpenR1-VM` layout) into the trainer's rows.

    python -m value_models.convert --src OpenR1-VM/data --out data/openr1-vm
    python -m value_models.prepare --data data/openr1-vm --out data/openr1-vm-prepared

Input rows (one per problem, spec §2.2): scalars `message_id`, `problem`, `solution`,
`answer`, and per-response lists of equal length (56 in OpenR1-VM): `roll_in_ids` (prompt +
roll-in prefix token ids), `roll_outs_ids` (pi_ref continuation token ids), `labels` (0 / 1 /
2 as ours), plus `reward` and `processed_answer`. Output rows (one per response, the columns
of `value_models.data`): `problem_id` (= message_id), `round` 1, `roll_in_index` (the
response's position), `roll_out_index` 0, `roll_in_ids`, `roll_out_ids`, `label`, `answer`.

Streaming: input is read `--batch-problems` problems at a time and written as one Parquet row
group each, so memory stays bounded (that batch plus one compressed row group of the input)
whatever the file size (22.7 GB for OpenR1-VM). Token
lists are written as `large_list<int32>` (int64 offsets): a row group or file with more than
2^31 tokens cannot overflow. One output file per input file, written to a temp name and
renamed, so a re-run skips finished files and redoes a half-written one.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Iterator, Sequence

import numpy as np

from value_models.command import run_command
from value_models.data import parquet_files
from vgs.errors import VGSError

ID_KEYS = ("message_id", "problem_id", "id")
IN_KEY, OUT_KEY = "roll_in_ids", "roll_outs_ids"


def output_schema():
    import pyarrow as pa

    ids = pa.large_list(pa.int32())
    return pa.schema([("problem_id", pa.string()), ("round", pa.int32()), ("roll_in_index", pa.int32()),
                      ("roll_out_index", pa.int32()), ("roll_in_ids", ids), ("roll_out_ids", ids),
                      ("label", pa.int8()), ("answer", pa.string())])


def _flatten_batch(batch, label_key: str, id_key: str, source: str):
    """One record batch of per-problem rows -> an Arrow table of per-response rows, built from
    the list columns' buffers (no per-token Python objects)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = batch.num_rows
    col = {name: batch.column(name) for name in batch.schema.names}
    outer_in, outer_out, outer_lab = col[IN_KEY], col[OUT_KEY], col[label_key]
    for name, c in ((IN_KEY, outer_in), (OUT_KEY, outer_out), (label_key, outer_lab)):
        if c.null_count:
            raise VGSError(f"{source}: column {name!r} has null rows")
    k_in = pc.list_value_length(outer_in).to_numpy(zero_copy_only=False)
    k_out = pc.list_value_length(outer_out).to_numpy(zero_copy_only=False)
    k_lab = pc.list_value_length(outer_lab).to_numpy(zero_copy_only=False)
    ids = col[id_key].to_pylist()
    bad = np.nonzero((k_in != k_out) | (k_in != k_lab))[0]
    if len(bad):
        i = int(bad[0])
        raise VGSError(f"{source}: problem {ids[i]!r} has {k_in[i]} roll-ins, {k_out[i]} roll-outs and {k_lab[i]} "
                       f"labels; they must be equal")
    ids_t = pa.large_list(pa.int32())
    roll_in = outer_in.flatten().cast(ids_t)
    roll_out = outer_out.flatten().cast(ids_t)
    labels = outer_lab.flatten().to_numpy(zero_copy_only=False)
    if labels.dtype == bool:
        raise VGSError(f"{source}: {label_key!r} holds booleans; pass --label-key labels (the 0/1/2 classes)")
    if len(labels) and (labels.min() < 0 or labels.max() > 2):
        raise VGSError(f"{source}: labels must be 0, 1 or 2; found {sorted(set(labels[(labels < 0) | (labels > 2)].tolist()))}")
    rep = np.repeat(np.arange(n), k_in)
    pos = np.arange(len(rep)) - np.repeat(np.cumsum(k_in) - k_in, k_in)
    answers = col["answer"].cast(pa.string()).take(pa.array(rep)) if "answer" in col else pa.nulls(len(rep), pa.string())
    return pa.table({
        "problem_id": pa.array([str(x) for x in ids], pa.string()).take(pa.array(rep)),
        "round": pa.array(np.ones(len(rep), dtype=np.int32)),
        "roll_in_index": pa.array(pos.astype(np.int32)),
        "roll_out_index": pa.array(np.zeros(len(rep), dtype=np.int32)),
        "roll_in_ids": roll_in, "roll_out_ids": roll_out,
        "label": pa.array(labels.astype(np.int8)), "answer": answers,
    }, schema=output_schema())


def iter_rows(path: str, batch_problems: int = 16, label_key: str = "labels") -> Iterator:
    """Per-response Arrow tables of one per-problem Parquet file, `batch_problems` problems at
    a time (streaming)."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001
        raise VGSError(f"cannot read Parquet file {path!r}: {exc}") from exc
    names = pf.schema_arrow.names
    id_key = next((k for k in ID_KEYS if k in names), None)
    missing = [k for k in (IN_KEY, OUT_KEY, label_key) if k not in names]
    if missing or id_key is None:
        raise VGSError(f"{path}: not in the OpenR1-VM per-problem layout: missing "
                       f"{', '.join(missing + ([] if id_key else ['message_id']))} (columns: {', '.join(names)})")
    cols = [id_key, IN_KEY, OUT_KEY, label_key] + (["answer"] if "answer" in names else [])
    for batch in pf.iter_batches(batch_size=batch_problems, columns=cols):
        yield _flatten_batch(batch, label_key, id_key, path)


def convert(src: str | Sequence[str], out: str, batch_problems: int = 16, label_key: str = "labels",
            progress: bool = True) -> dict:
    """Convert every per-problem Parquet file under `src` into `out/part-NNNNN.parquet`."""
    import pyarrow.parquet as pq
    from tqdm import tqdm

    if batch_problems < 1:
        raise VGSError(f"--batch-problems must be >= 1, got {batch_problems}")
    files = parquet_files(src, what="OpenR1-VM source")
    os.makedirs(out, exist_ok=True)
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    bar = tqdm(total=total, desc="convert", unit="problem", disable=not progress, dynamic_ncols=True)
    rows = problems = 0
    for k, f in enumerate(files):
        dest = os.path.join(out, f"part-{k:05d}.parquet")
        if os.path.exists(dest) and os.path.getmtime(dest) >= os.path.getmtime(f):
            md = pq.ParquetFile(dest).metadata
            rows += md.num_rows
            n = pq.ParquetFile(f).metadata.num_rows
            problems += n
            bar.update(n)
            continue
        tmp = os.path.join(out, f".part-{k:05d}.parquet.tmp")
        with pq.ParquetWriter(tmp, output_schema()) as writer:
            for table in iter_rows(f, batch_problems, label_key):
                writer.write_table(table)  # one row group per batch of problems
                rows += table.num_rows
            n = pq.ParquetFile(f).metadata.num_rows
        problems += n
        bar.update(n)
        os.replace(tmp, dest)
    bar.close()
    return {"files": len(files), "problems": problems, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m value_models.convert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", nargs="+", required=True, help="OpenR1-VM Parquet files or directories")
    p.add_argument("--out", required=True, help="output directory of trainer rows (Parquet)")
    p.add_argument("--batch-problems", type=int, default=16, help="problems read and written at a time (bounds memory)")
    p.add_argument("--label-key", default="labels", help="per-response label list column (0/1/2 classes)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)

    def work() -> str:
        r = convert(args.src, args.out, args.batch_problems, args.label_key, args.progress)
        return f"[convert] {args.out}: {r['rows']} rows from {r['problems']} problems in {r['files']} file(s)"

    return run_command("value_models.convert", work)


if __name__ == "__main__":
    sys.exit(main())
