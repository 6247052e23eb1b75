"""Value-model trainer: data/collator/sampler units, metrics on a hand example, and real
`torchrun --nproc_per_node 2` (gloo) runs: loss goes down on a learnable signal, a run killed
mid-way and resumed logs exactly the losses of an uninterrupted run, FSDP matches DDP, and
the checkpoint loads as a value model."""

from __future__ import annotations

import csv
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from value_models.data import Example, StepSampler, ValueDataset, collate, length_buckets, split_by_problem
from vgs.errors import VGSError
from vgs.modeling import token_level_loss
from value_models.train import binary_metrics, lr_at, sequence_losses, TrainConfig

REPO = Path(__file__).resolve().parents[1]


def write_synthetic(path: Path, n_problems: int = 24, per_problem: int = 4, seed: int = 0) -> Path:
    """Learnable signal: every roll-out token comes from a range that depends on the label, so
    each supervised position can see its class; roll-ins are label-independent noise."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {"problem_id": [], "roll_in_ids": [], "roll_out_ids": [], "label": []}
    for p in range(n_problems):
        prompt = rng.integers(3000, 4000, size=int(rng.integers(6, 12))).tolist()
        for _ in range(per_problem):
            label = int(rng.integers(0, 3))
            roll_in = prompt + rng.integers(3000, 4000, size=int(rng.integers(0, 8))).tolist()
            roll_out = rng.integers(1000 + 500 * label, 1500 + 500 * label, size=int(rng.integers(4, 16))).tolist()
            for k, v in (("problem_id", f"p{p}"), ("roll_in_ids", roll_in), ("roll_out_ids", roll_out), ("label", label)):
                rows[k].append(v)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path)
    return path


def _examples() -> list[Example]:
    rng = np.random.default_rng(0)
    return [Example(rng.integers(0, 500, size=n), s, lab) for n, s, lab in ((7, 3, 1), (12, 5, 0), (4, 3, 2), (9, 9, 1))]


# ------------------------------------------------------------------------------- units


def test_collate_loss_mask_and_padding():
    ex = _examples()
    b = collate(ex, pad_id=7, pad_to_multiple=8)
    assert b.input_ids.shape == (4, 16)  # longest 12 -> 16, not 1024
    for k, e in enumerate(ex):
        m = b.loss_mask[k]
        assert m[: e.out_start].sum() == 0  # prompt + roll-in unsupervised
        assert m[e.out_start: e.length].tolist() == [1.0] * (e.length - e.out_start)
        assert m[e.length:].sum() == 0 and (b.input_ids[k, e.length:] == 7).all()
        assert b.attention_mask[k].sum() == e.length
        assert b.input_ids.reshape(-1)[b.last_pos[k]] == int(e.input_ids[-1])
    assert b.num_tokens == sum(e.length for e in ex)


def test_loss_matches_reference_and_packing():
    ex = _examples()
    torch.manual_seed(0)
    padded, packed = collate(ex, 0), collate(ex, 0, pack=True)
    assert packed.input_ids.shape[0] == 1 and packed.attention_mask is None
    assert packed.input_ids.shape[1] == -(-sum(e.length for e in ex) // 8) * 8
    logits = torch.randn(padded.input_ids.shape + (3,))
    ref = token_level_loss(logits, padded.labels, padded.loss_mask)
    ours = sequence_losses(logits, padded)
    assert ours[3] == 0  # roll-in fills the window: no supervised token, contributes 0
    torch.testing.assert_close(ours.mean(), ref)
    # the same per-token logits laid out packed give the same per-sequence losses
    flat = torch.zeros(packed.input_ids.shape + (3,))
    real_p = (packed.seq_index >= 0).reshape(-1)
    real_u = (padded.seq_index >= 0).reshape(-1)
    flat.view(-1, 3)[real_p] = logits.reshape(-1, 3)[real_u]
    torch.testing.assert_close(sequence_losses(flat, packed), ours)
    # 1-label (BCE) head
    l1 = torch.randn(padded.input_ids.shape + (1,))
    torch.testing.assert_close(sequence_losses(l1, padded).mean(), token_level_loss(l1, padded.labels, padded.loss_mask))


def test_packed_forward_equals_padded(tiny_value):
    from vgs.modeling import load_value_model

    model = load_value_model(tiny_value)
    ex = _examples()
    padded, packed = collate(ex, 0), collate(ex, 0, pack=True)
    with torch.no_grad():
        lu = model(input_ids=padded.input_ids, attention_mask=padded.attention_mask, use_cache=False).logits
        lp = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).logits
    real_u, real_p = (padded.seq_index >= 0).reshape(-1), (packed.seq_index >= 0).reshape(-1)
    torch.testing.assert_close(lp.reshape(-1, 3)[real_p], lu.reshape(-1, 3)[real_u], atol=1e-5, rtol=1e-5)


def test_dataset_truncation_usable_and_split(tmp_path):
    f = write_synthetic(tmp_path / "d" / "a.parquet")
    ds = ValueDataset(str(tmp_path / "d"), max_length=14)
    assert len(ds) == 96 and (ds.lengths <= 14).all()
    i = int(np.argmax(ds.roll_in_lens + ds.roll_out_lens))
    e = ds[i]
    assert e.length == 14 and e.out_start == min(int(ds.roll_in_lens[i]), 14)
    usable = ds.usable()
    assert all(ds[j].out_start < ds[j].length for j in usable)
    tr, va = split_by_problem(ds.problem_ids, 0.25, seed=3)
    assert set(ds.problem_ids[tr]).isdisjoint(set(ds.problem_ids[va])) and len(va) > 0
    tr2, va2 = split_by_problem(ds.problem_ids[::-1], 0.25, seed=3)  # order-independent membership
    assert set(ds.problem_ids[::-1][va2]) == set(ds.problem_ids[va])
    tr3, va3 = ds.split(np.arange(len(ds)), 0.25, seed=3)  # the trainer's (hash each id once)
    assert va3.tolist() == va.tolist() and tr3.tolist() == tr.tolist()
    # prepared (memory-mapped Arrow, streamed in small batches -> several record batches): same rows
    from value_models.prepare import prepare

    meta = prepare(str(tmp_path / "d"), str(tmp_path / "prep"), batch_rows=10, progress=False)
    assert meta["rows"] == 96 and meta["labels"] == np.bincount(ds.labels, minlength=3).tolist()
    cached = ValueDataset(str(tmp_path / "prep"), max_length=14)
    assert len(cached._segs) == 10  # 96 rows in batches of 10, each a zero-copy segment
    assert all((cached[j].input_ids == ds[j].input_ids).all() and cached[j].out_start == ds[j].out_start
               for j in range(len(ds)))
    # several files: global row indices run across them; a changed source makes the prepared copy stale
    write_synthetic(tmp_path / "d" / "b.parquet", n_problems=2, seed=1)
    meta2 = prepare(str(tmp_path / "d"), str(tmp_path / "prep"), progress=False)  # sources changed: rebuilt
    assert meta2["rows"] == 104 and [p["rows"] for p in meta2["parts"]] == [96, 8]
    import pyarrow as pa

    schema = pa.ipc.open_file(str(tmp_path / "prep" / "part-00000.arrow")).schema
    assert schema.field("roll_in_ids").type == pa.large_list(pa.int32())  # int64 offsets
    two = ValueDataset(str(tmp_path / "prep"), max_length=14)
    assert len(two) == 96 + 8 and (two[96].input_ids == ValueDataset(str(tmp_path / "d" / "b.parquet"), 14)[0].input_ids).all()
    os.utime(tmp_path / "d" / "b.parquet", ns=(1, 1))
    with pytest.raises(VGSError, match="stale"):
        ValueDataset(str(tmp_path / "prep"))
    with pytest.raises(Exception, match="lacks column"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"problem_id": ["x"]}), tmp_path / "bad.parquet")
        ValueDataset(str(tmp_path / "bad.parquet"))
    assert f.exists()


def test_sampler_resume_and_sharding():
    s = StepSampler(range(50), batch_size=8, seed=5)
    seen = [s.next_global().tolist() for _ in range(9)]  # crosses an epoch boundary (6 steps/epoch)
    assert all(len(b) == 8 for b in seen) and len(set(sum(seen[:6], []))) == 48
    r = StepSampler(range(50), batch_size=8, seed=5)
    for _ in range(4):
        r.next_global()
    state = r.state_dict()
    r2 = StepSampler(range(50), batch_size=8, seed=5)
    r2.load_state_dict(state)
    assert [r2.next_global().tolist() for _ in range(5)] == seen[4:]
    # ranks split the same global batch; the global batch does not depend on the world size
    shards = [StepSampler(range(50), 8, seed=5, rank=k, world_size=2).next_indices() for k in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(seen[0])
    lengths = np.arange(50)[::-1]
    mbs = length_buckets(shards[0], lengths, 2)
    assert [len(m) for m in mbs] == [2, 2] and all(lengths[a] <= lengths[b] for a, b in zip(sum(mbs, []), sum(mbs, [])[1:]))


def test_metrics_hand_example():
    # P(correct) and 3-class labels: 0 and 2 are "not correct"
    m = binary_metrics(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 2, 1, 1]))
    assert m["acc"] == pytest.approx(0.75)
    assert m["auc"] == pytest.approx(0.75)  # pairs (pos, neg): 0.35>0.1, 0.35<0.4, 0.8>both -> 3/4
    assert m["ece"] == pytest.approx((0.1 + 0.4 + 0.65 + 0.2) / 4)
    assert m["brier"] == pytest.approx((0.01 + 0.16 + 0.4225 + 0.04) / 4)
    tie = binary_metrics(np.array([0.5, 0.5]), np.array([1, 0]))
    assert tie["auc"] == pytest.approx(0.5)
    assert math.isnan(binary_metrics(np.array([0.2, 0.9]), np.array([1, 1]))["auc"])


def test_lr_schedule():
    cfg = TrainConfig(data=["x"], init="x", out="x", lr=1.0, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg, total=20, warmup=4) for s in range(20)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert lr_at(20, cfg, 20, 4) == pytest.approx(0.1)


def test_checkpoint_tokenizer_from_local_dir_and_hub_id_offline(tmp_path, tokenizer_dir):
    """Both trainers save the tokenizer with every checkpoint (`checkpointing.save_tokenizer`),
    whether --init/--tokenizer is a local directory or a Hub id; the Hub id is resolved from
    the Hub cache with the network off (a cache laid out as huggingface_hub writes it)."""
    from value_models.checkpointing import save_tokenizer

    local = tmp_path / "local"
    local.mkdir()
    save_tokenizer(tokenizer_dir, str(local))
    assert (local / "tokenizer.json").exists() and (local / "tokenizer_config.json").exists()
    cache = tmp_path / "hub"
    snap = cache / "models--vgs-test--tiny-tokenizer" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for f in os.listdir(tokenizer_dir):
        if os.path.isfile(os.path.join(tokenizer_dir, f)):
            os.symlink(os.path.join(tokenizer_dir, f), snap / f)
    (cache / "models--vgs-test--tiny-tokenizer" / "refs").mkdir()
    (cache / "models--vgs-test--tiny-tokenizer" / "refs" / "main").write_text("0" * 40)
    code = ("import sys; from value_models.checkpointing import save_tokenizer; "
            "save_tokenizer('vgs-test/tiny-tokenizer', sys.argv[1])")
    hub = tmp_path / "from_hub"
    hub.mkdir()
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", code, str(hub)], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    from transformers import AutoTokenizer

    a, b = AutoTokenizer.from_pretrained(str(local)), AutoTokenizer.from_pretrained(str(hub))
    text = "What is 2 + 2? \\boxed{4}"
    assert a(text)["input_ids"] == b(text)["input_ids"] and a.chat_template == b.chat_template


def test_bad_arguments_exit_2(tmp_path):
    from value_models.train import main

    assert main(["--data", str(tmp_path / "missing"), "--init", "x", "--out", str(tmp_path / "o")]) == 2
    assert main(["--data", "x", "--init", "x", "--out", str(tmp_path / "o"), "--dropout", "1.5"]) == 2


def test_head_init_fan_in(tiny_policy):
    """--head-init fan_in re-draws a new head from N(0, 1/fan_in); the default keeps
    transformers' N(0, initializer_range) (0.02), ~4x smaller at hidden 128."""
    from value_models.train import build_model

    def head_stds(init: str) -> list[float]:
        cfg = TrainConfig(data=["x"], init=tiny_policy, out="x", head_init=init, seed=3)
        model = build_model(cfg, tiny_policy, main=False)
        return [float(model.score[i].weight.detach().std()) for i in (0, 2)]

    hidden = 128
    assert all(abs(s - 0.02) < 0.002 for s in head_stds("config"))
    first, second = head_stds("fan_in")
    assert abs(first - hidden**-0.5) < 0.1 * hidden**-0.5  # 128 x 128 draws
    assert abs(second - hidden**-0.5) < 0.3 * hidden**-0.5  # 3 x 128 draws
    with pytest.raises(VGSError, match="--head-init"):
        TrainConfig(data=["x"], init="x", out="x", head_init="zeros").validate()


# ------------------------------------------------------------------------------- torchrun


def _torchrun(args: list[str], log: Path, nproc: int = 2) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "value_models.train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait(p: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(p)
        raise
    assert rc == 0, log.read_text()[-4000:]


def _kill_tree(p: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers at once (workers run in sessions of their own, so
    killing torchrun's process group alone would leave them training)."""
    import psutil

    procs = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
    for proc in reversed(procs):
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    p.wait()


def _losses(out: Path) -> list[tuple[int, str]]:
    with open(out / "train_log.csv") as f:
        return [(int(r["step"]), r["loss"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def train_setup(tmp_path_factory, tokenizer_dir):
    from vgs.tiny import make_tiny

    from value_models.prepare import main as prepare_main

    root = tmp_path_factory.mktemp("train")
    init = make_tiny("policy", tokenizer_dir, str(root / "init"), layers=1, hidden=64, seed=0)
    write_synthetic(root / "data" / "part-00000.parquet")
    # prepared once before torchrun (the trainer refuses raw data under torchrun)
    assert prepare_main(["--data", str(root / "data"), "--out", str(root / "prepared"), "--no-progress"]) == 0
    common = ["--data", str(root / "prepared"), "--init", init, "--steps", "8", "--batch-size", "16",
              "--micro-batch-size", "4", "--lr", "3e-3", "--warmup-steps", "1", "--val-fraction", "0.2",
              "--eval-every", "4", "--save-every", "2", "--keep-last", "2", "--dropout", "0.1"]
    return root, common


@pytest.fixture(scope="module")
def uninterrupted(train_setup):
    root, common = train_setup
    out = root / "full"
    p = _torchrun([*common, "--out", str(out)], root / "full.log")
    _wait(p, root / "full.log")
    return out


def test_ddp_loss_decreases_and_checkpoint_loads(uninterrupted):
    from vgs.modeling import load_value_model

    losses = [float(v) for _, v in _losses(uninterrupted)]
    assert len(losses) == 8
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.05, losses
    with open(uninterrupted / "val_log.csv") as f:
        val = list(csv.DictReader(f))
    assert [int(r["step"]) for r in val] == [4, 8]
    assert all(0 <= float(r["auc"]) <= 1 and 0 <= float(r["ece"]) <= 1 for r in val)
    final = uninterrupted / "final"
    assert final.is_dir() and len(list((uninterrupted / "checkpoints").glob("step_*"))) == 2  # keep-last
    model = load_value_model(str(final))
    assert model.config.num_labels == 3 and model.config.architectures == ["Qwen2ForClassifier"]
    ids = torch.tensor([[3001, 3002, 3003, 2100, 2200], [3001, 3002, 3003, 1100, 1200]])
    v = model.predict_values(ids)
    assert torch.isfinite(v).all() and ((v > 0) & (v < 1)).all()
    assert v[0] > v[1]  # label-1 tokens (1500-2000) vs label-0 tokens (1000-1500): the signal was learned
    from vgs.value import HFValueScorer

    scored = HFValueScorer(str(final)).score(ids.tolist())
    assert scored == pytest.approx(v.tolist(), abs=1e-4)  # the scorer reads the trained checkpoint


def test_single_process_bce_head_checkpointing_and_pack_refusal(train_setup, capsys):
    """One process, no torchrun: raw Parquet data (prepared into OUT/.data_cache), 1-label
    (BCE) head, gradient checkpointing, epochs-based length, explicit validation data.
    Packing without varlen attention is refused in one line."""
    from vgs.modeling import load_value_model
    from value_models.train import Dist, TrainConfig, load_data, main, train

    root, common = train_setup
    val = write_synthetic(root / "val" / "v.parquet", n_problems=4, seed=9)
    out = root / "bce"
    ckpt = train(TrainConfig(data=[str(root / "data")], val_data=[str(val)], init=str(root / "init"), out=str(out),
                             num_labels=1, epochs=0.5, batch_size=16, micro_batch_size=8, lr=3e-3, warmup_steps=0,
                             grad_checkpointing=True))
    assert len(list((out / ".data_cache").glob("*/prepared.json"))) == 2  # train and val data, prepared here
    rows = _losses(out)
    assert len(rows) == 3 and all(math.isfinite(float(v)) for _, v in rows)  # 96 seqs / 16 * 0.5
    with open(out / "val_log.csv") as f:
        val_rows = list(csv.DictReader(f))
    assert int(val_rows[-1]["val_seqs"]) == 16 and 0 <= float(val_rows[-1]["auc"]) <= 1
    m = load_value_model(ckpt)
    assert m.config.num_labels == 1 and m.score[2].weight.shape[0] == 1
    # --pack: a dense mask over the packed row is never built; CPU / no flash-attn -> one-line refusal
    capsys.readouterr()
    assert main([*common, "--out", str(root / "pack"), "--pack"]) == 2
    err = capsys.readouterr().err
    assert "--pack needs varlen attention" in err and len(err.strip().splitlines()) == 1
    assert main([*common, "--out", str(root / "pack"), "--pack", "--attn-impl", "flash_attention_2"]) == 2
    assert "needs a CUDA GPU and the flash-attn package" in capsys.readouterr().err
    # under torchrun, unprepared data is refused (no rank-0 conversion behind a barrier)
    cfg = TrainConfig(data=[str(root / "data")], init="x", out=str(root / "o"))
    with pytest.raises(VGSError, match="not prepared; run `python -m value_models.prepare"):
        load_data(cfg, Dist(rank=1, world=2), cfg.data, "none")


def test_killed_run_resumes_with_identical_losses(train_setup, uninterrupted):
    root, common = train_setup
    out = root / "killed"
    log = root / "killed.log"
    p = _torchrun([*common, "--out", str(out)], log)
    deadline = time.time() + 600
    while time.time() < deadline:  # kill (SIGKILL, whole process group) once step 5 is logged
        rows = _losses(out) if (out / "train_log.csv").exists() else []
        if rows and rows[-1][0] >= 5 or p.poll() is not None:
            break
        time.sleep(0.2)
    assert p.poll() is None, "run finished before it could be killed:\n" + log.read_text()[-2000:]
    import psutil

    assert len(psutil.Process(p.pid).children(recursive=True)) >= 2  # the workers are there to kill
    _kill_tree(p)
    killed_at = _losses(out)[-1][0]
    assert killed_at < 8 and not (out / "final").exists()
    p = _torchrun([*common, "--out", str(out), "--resume"], root / "resume.log")
    _wait(p, root / "resume.log")
    m = re.search(r"resumed from \S+ at step (\d+)", (root / "resume.log").read_text())
    assert m and int(m.group(1)) <= killed_at < 8  # really continued mid-way
    assert _losses(out) == _losses(uninterrupted)  # exact strings: bit-identical losses
    with open(out / "val_log.csv") as a, open(uninterrupted / "val_log.csv") as b:
        assert [r["val_loss"] for r in csv.DictReader(a)] == [r["val_loss"] for r in csv.DictReader(b)]
    # re-running without --resume refuses to overwrite
    from value_models.train import main

    assert main([*common, "--out", str(out)]) == 2


def test_fsdp_sharded_checkpoints_resume_and_export(train_setup, uninterrupted):
    """FSDP matches DDP; its checkpoints are per-rank shards (nothing gathered, no full
    optimizer state anywhere), resume reads them, and export consolidates them."""
    from value_models.export import main as export_main
    from vgs.modeling import load_value_model

    root, common = train_setup
    out = root / "fsdp"
    p = _torchrun([*common, "--out", str(out), "--fsdp", "--stop-at-step", "2"], root / "fsdp.log")
    _wait(p, root / "fsdp.log")
    ckpt = out / "checkpoints" / "step_00000002"
    assert sorted(f.name for f in (ckpt / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (ckpt / "model.safetensors").exists()  # not consolidated before export
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    assert state["sharded"] and state["optimizer"] is None
    p = _torchrun([*common, "--out", str(out), "--fsdp", "--resume", "--stop-at-step", "4"], root / "fsdp2.log")
    _wait(p, root / "fsdp2.log")
    assert "resumed from" in (root / "fsdp2.log").read_text()
    fs = [float(v) for _, v in _losses(out)]
    ref = [float(v) for _, v in _losses(uninterrupted)][:4]
    assert fs == pytest.approx(ref, rel=1e-5)  # steps 3-4 need the restored Adam moments to match
    assert export_main([str(ckpt)]) == 0
    m = load_value_model(str(ckpt))
    assert m.config.architectures == ["Qwen2ForClassifier"]
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(str(root / "init"))
    moved = (m.model.embed_tokens.weight - lm.model.embed_tokens.weight).abs().max().item()
    assert 0 < moved < 0.01  # the trained weights of step 2 (2 Adam steps of lr <= 3e-3), not a fresh init
