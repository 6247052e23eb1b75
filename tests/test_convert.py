"""The OpenR1-VM converter: a small file written by the test in the published per-problem
layout becomes the trainer's rows, streamed in batches, with int64 offsets."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from value_models.convert import convert, main
from value_models.data import ValueDataset
from vgs.errors import VGSError


def write_openr1_vm(path, n_problems: int = 5, seed: int = 0) -> list[dict]:
    """Rows as in VGS-AI/OpenR1-VM (spec §2.2): scalars plus equal-length per-response lists."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_problems):
        k = int(rng.integers(2, 5))
        prompt = rng.integers(100, 200, size=4).tolist()
        rows.append({
            "message_id": f"m{p}", "problem": f"problem {p}", "solution": "\\boxed{1}", "answer": str(p),
            "reward": [bool(x) for x in rng.integers(0, 2, size=k)],
            "roll_in_ids": [prompt + rng.integers(200, 300, size=int(rng.integers(0, 6))).tolist() for _ in range(k)],
            "roll_outs_ids": [rng.integers(300, 400, size=int(rng.integers(1, 8))).tolist() for _ in range(k)],
            "processed_answer": ["x"] * k,
            "labels": rng.integers(0, 3, size=k).tolist(),
        })
    pq.write_table(pa.Table.from_pylist(rows), path)
    return rows


def test_convert_streams_per_problem_rows_into_trainer_rows(tmp_path):
    src = tmp_path / "openr1-vm"
    src.mkdir()
    rows = write_openr1_vm(src / "train-00000-of-00001.parquet")
    out = tmp_path / "rows"
    r = convert(str(src), str(out), batch_problems=2, progress=False)
    n = sum(len(x["labels"]) for x in rows)
    assert r == {"files": 1, "problems": 5, "rows": n}
    f = pq.ParquetFile(out / "part-00000.parquet")
    assert f.metadata.num_row_groups == 3  # 5 problems, 2 at a time: streamed, never all in memory
    assert f.schema_arrow.field("roll_in_ids").type == pa.large_list(pa.int32())  # int64 offsets
    got = f.read().to_pylist()
    want = [(x["message_id"], k, x["roll_in_ids"][k], x["roll_outs_ids"][k], x["labels"][k], x["answer"])
            for x in rows for k in range(len(x["labels"]))]
    assert [(g["problem_id"], g["roll_in_index"], g["roll_in_ids"], g["roll_out_ids"], g["label"], g["answer"])
            for g in got] == want
    # the trainer reads them: loss on the roll-out tokens only, problems keyed by message_id
    ds = ValueDataset(str(out), max_length=64)
    e = ds[3]
    assert e.input_ids.tolist() == want[3][2] + want[3][3] and e.out_start == len(want[3][2])
    assert set(ds.problem_names) == {f"m{p}" for p in range(5)}
    # re-running skips the finished file
    assert convert(str(src), str(out), progress=False)["rows"] == n


def test_convert_rejects_bad_rows(tmp_path, capsys):
    rows = write_openr1_vm(tmp_path / "a.parquet", n_problems=2)
    rows[1]["labels"] = rows[1]["labels"][:-1]
    (tmp_path / "bad").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad" / "b.parquet")
    with pytest.raises(VGSError, match="must be equal"):
        convert(str(tmp_path / "bad"), str(tmp_path / "o"), progress=False)
    assert main(["--src", str(tmp_path / "a.parquet"), "--out", str(tmp_path / "o2"), "--label-key", "reward",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "booleans" in err[0]
    pq.write_table(pa.table({"message_id": ["x"], "problem": ["p"]}), tmp_path / "c.parquet")
    assert main(["--src", str(tmp_path / "c.parquet"), "--out", str(tmp_path / "o3"), "--no-progress"]) == 2
    assert "not in the OpenR1-VM per-problem layout" in capsys.readouterr().err
