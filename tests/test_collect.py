"""Value-data collection (`vgs collect`) and Q# rounds (`vgs train-rounds`).

Control flow (labels 0/1/2, mixtures, drop filter, resume, crash between shard and manifest)
runs on a scripted fake engine whose answers the test knows; the pipeline itself runs end to
end through real vLLM on the tiny policy and real MATH-500 problems, including Q#-guided
roll-ins with a value model trained by this pipeline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vgs.engine import GenSample
from vgs.errors import VGSError
from value_models.collect import CollectConfig, RollInPolicy, collect, parse_policy, switch_point
from value_models.jobs import load_problems

EOS = 151643


def _rows(out: str | Path) -> pd.DataFrame:
    files = sorted(Path(out, "data").glob("part-*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True) if files else pd.DataFrame()


def _math500(data_dir: str, tmp_path: Path, n: int) -> str:
    """The first n MATH-500 problems as a JSONL file (a user-supplied problem file)."""
    path = tmp_path / "problems.jsonl"
    with open(os.path.join(data_dir, "math500.jsonl")) as f, open(path, "w") as g:
        for _, line in zip(range(n), f):
            g.write(line)
    return str(path)


class ScriptedEngine:
    """Roll-ins: a fixed reasoning text + EOS. Roll-outs: outcome by the child's seed, so the
    test can recompute every label: seed % 3 == 0 -> boxed gold + EOS (1), == 1 -> boxed wrong
    + EOS (0), == 2 -> no EOS, "length" (2). Problems whose id is in `always_right` always get
    the gold (their labels never vary)."""

    def __init__(self, tokenizer, golds: dict[tuple[int, ...], str], always_right=(), name="ref", always_wrong=(),
                 abort_every=0):
        self.tok, self.golds, self.always_right, self.name = tokenizer, golds, set(always_right), name
        self.always_wrong, self.abort_every = set(always_wrong), abort_every
        self.eos_ids, self.num_params = [EOS], 1
        self.calls: list[int] = []
        self.closed = False

    def _gold(self, prompt: list[int]) -> tuple[str, bool | None]:
        for p, (gold, pid) in self.golds.items():
            if tuple(prompt[: len(p)]) == p:
                return gold, True if pid in self.always_right else (False if pid in self.always_wrong else None)
        raise AssertionError("unknown prompt")

    def generate(self, requests, sampling, progress=False):
        assert not self.closed
        self.calls.append(len(requests))
        enc = lambda s: self.tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        out = []
        for r in requests:
            gold, right = self._gold(r.prompt_ids)
            samples = []
            for i in range(r.n):
                s = (r.seed or 0) + i
                if r.n == 1:  # a roll-in (these tests always ask for 2 roll-outs per prefix)
                    samples.append(GenSample(enc(f"{self.name} thinks step by step about it.") + [EOS], "stop"))
                elif self.abort_every and s % self.abort_every == 0:
                    samples.append(GenSample(enc(" and"), "abort"))
                elif right or (right is None and s % 3 == 0):
                    samples.append(GenSample(enc(f" so \\boxed{{{gold}}}") + [EOS], "stop"))
                elif right is False or s % 3 == 1:
                    samples.append(GenSample(enc(" so \\boxed{-12345}") + [EOS], "stop"))
                else:
                    samples.append(GenSample(enc(" and then")[: r.max_tokens], "length"))
            out.append(samples)
        return out

    def close(self):
        self.closed = True


@pytest.fixture
def scripted(tmp_path, data_dir, tokenizer_dir):
    from vgs.prompts import load_tokenizer, prompt_ids

    problems_file = _math500(data_dir, tmp_path, 5)
    tok = load_tokenizer(tokenizer_dir)
    cfg0 = CollectConfig(problems=problems_file, out="x", ref=tokenizer_dir)
    probs = load_problems(cfg0)
    golds = {tuple(prompt_ids(tok, p.problem)): (p.answer, p.id) for p in probs}

    def make(**kw):
        engines: list[ScriptedEngine] = []
        always_right = kw.pop("always_right", ())
        always_wrong = kw.pop("always_wrong", ())
        abort_every = kw.pop("abort_every", 0)

        def factory(model):
            e = ScriptedEngine(tok, golds, always_right, name=os.path.basename(model), always_wrong=always_wrong,
                               abort_every=abort_every)
            engines.append(e)
            return e, True

        cfg = CollectConfig(problems=problems_file, out=str(tmp_path / "out"), ref=tokenizer_dir, samples_per_problem=3,
                            roll_outs=2, max_tokens=200, chunk_size=2, progress=False)
        for k, v in kw.items():
            setattr(cfg, k, v)
        return cfg, factory, engines

    return make, probs, tok


def test_labels_prefixes_and_manifest(scripted):
    make, probs, tok = scripted
    from vgs.prompts import prompt_ids

    cfg, factory, engines = make()
    manifest = collect(cfg, factory)
    df = _rows(cfg.out)
    assert len(df) == 5 * 3 * 2 and manifest["complete"] and manifest["totals"]["rows"] == 30
    assert len(engines) == 1 and engines[0].closed  # one policy = pi_ref: one engine for both
    assert not df.duplicated(["problem_id", "roll_in_index", "roll_out_index"]).any()
    by_id = {p.id: p for p in probs}
    for r in df.itertuples():
        prompt = prompt_ids(tok, by_id[r.problem_id].problem)
        assert list(r.roll_in_ids[: r.prompt_len]) == prompt
        assert len(r.roll_in_ids) - r.prompt_len == r.switch < r.roll_in_gen_len
        assert r.roll_in_ids[-1] != EOS  # the EOS of a finished roll-in is never kept
        expected = {0: 1, 1: 0, 2: 2}[r.seed_roll_out % 3]
        assert r.label == expected, (r.label, r.pred, r.answer)
        assert (r.label == 2) == (r.roll_out_finish == "length")
        if r.label == 1:
            assert r.pred == r.answer
    assert set(df.label) == {0, 1, 2}
    assert manifest["totals"]["labels"] == [int((df.label == c).sum()) for c in range(3)]
    on_disk = json.loads(Path(cfg.out, "manifest.json").read_text())
    assert on_disk["num_chunks"] == 3 and on_disk["fingerprint"]["samples_per_problem"] == 3


def test_resume_without_duplicates_and_crash_between_shard_and_manifest(scripted, monkeypatch):
    make, _, _ = scripted
    cfg, factory, _ = make()
    m = collect(dataclass_replace(cfg, max_chunks=1), factory)
    assert not m["complete"] and len(m["chunks"]) == 1
    # crash right after chunk 1's shard is on disk but before the manifest records it
    from value_models import collect as mod

    real = mod.Manifest.record

    def crash(self, k, entry):
        if k == 1:
            raise KeyboardInterrupt
        real(self, k, entry)

    monkeypatch.setattr(mod.Manifest, "record", crash)
    with pytest.raises(KeyboardInterrupt):
        collect(cfg, factory)
    monkeypatch.setattr(mod.Manifest, "record", real)
    assert Path(cfg.out, "data", "part-00001.parquet").exists()
    m = collect(cfg, factory)
    df = _rows(cfg.out)
    assert m["complete"] and len(df) == 30
    assert not df.duplicated(["problem_id", "roll_in_index", "roll_out_index"]).any()
    # identical to an uninterrupted run
    cfg2, factory2, _ = make(out=cfg.out + "-full")
    collect(cfg2, factory2)
    cols = ["problem_id", "roll_in_index", "roll_out_index", "label", "switch"]
    full = _rows(cfg2.out)[cols].sort_values(cols[:3]).reset_index(drop=True)
    assert full.equals(df[cols].sort_values(cols[:3]).reset_index(drop=True))
    # nothing left to do; changed settings are refused
    assert collect(cfg, factory)["complete"]
    with pytest.raises(VGSError, match="different settings"):
        collect(dataclass_replace(cfg, roll_outs=3), factory)


def test_drop_filters_apply_per_problem_over_all_rounds(scripted):
    """`--drop all-wrong` (the published filter) keeps easy problems and drops a problem only
    when none of its roll-outs in any round is correct; collection keeps every row and records
    the filter, the trainer's data applies it over everything loaded together."""
    from value_models.data import ValueDataset, recorded_drop

    make, probs, _ = scripted
    easy, hard_then_solved, hopeless = probs[0].id, probs[1].id, probs[2].id
    cfg1, f1, _ = make(drop="all-wrong", always_right=(easy,), always_wrong=(hard_then_solved, hopeless))
    m1 = collect(cfg1, f1)
    cfg2, f2, _ = make(drop="all-wrong", always_right=(easy,), always_wrong=(hopeless,), round=2, out=cfg1.out + "-r2")
    collect(cfg2, f2)
    r1, r2 = _rows(cfg1.out), _rows(cfg2.out)
    assert len(r1) == len(r2) == 30  # nothing dropped at collection time
    never_right_r1 = {pid for pid, g in r1.groupby("problem_id") if not g.label.eq(1).any()}
    assert {hard_then_solved, hopeless} <= never_right_r1
    assert m1["drop"] == "all-wrong" and m1["totals"]["problems_all_wrong"] == len(never_right_r1)
    assert m1["totals"]["problems_all_correct"] == 1
    assert not r1[r1.problem_id == hard_then_solved].label.eq(1).any()  # per chunk it would be dropped
    assert r2[r2.problem_id == hard_then_solved].label.eq(1).any()
    assert recorded_drop([cfg1.out, cfg2.out]) == "all-wrong"
    ds = ValueDataset([cfg1.out, cfg2.out], drop="all-wrong")
    both = pd.concat([r1, r2])
    never_right = {pid for pid, g in both.groupby("problem_id") if not g.label.eq(1).any()}
    assert never_right == {hopeless}
    kept = set(ds.problem_ids[ds.usable()])
    assert kept == {p.id for p in probs} - {hopeless}  # easy stays, solved-in-round-2 stays
    assert (ds.problem_ids[ds.dropped] == hopeless).all() and ds.dropped.sum() == 12
    nv = ValueDataset([cfg1.out, cfg2.out], drop="no-variation")
    always_right = {pid for pid, g in both.groupby("problem_id") if g.label.eq(1).all()}
    assert always_right == {easy} and set(nv.problem_ids[nv.usable()]) == kept - {easy}
    # the deprecated flag still parses, as --drop no-variation
    import argparse

    from value_models.collect import add_arguments, config_from_args

    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    add_arguments(ap)
    args = ap.parse_args(["--problems", "x", "--out", "o", "--ref", "m", "--drop-no-variation"])
    assert config_from_args(args).drop == "no-variation"
    assert CollectConfig(problems="x", out="o", ref="m", drop_no_variation=True).validate().drop == "no-variation"
    with pytest.raises(VGSError, match="--drop"):
        CollectConfig(problems="x", out="o", ref="m", drop="some").validate()


def test_aborted_roll_outs_are_errors_not_labels(scripted):
    make, _, _ = scripted
    cfg, factory, _ = make(abort_every=7)
    with pytest.raises(VGSError, match="abort"):
        collect(cfg, factory)
    assert not list(Path(cfg.out).glob("data/*.parquet"))  # nothing recorded as label 2
    m = json.loads(Path(cfg.out, "manifest.json").read_text())
    assert m["chunks"] == {}
    cfg_ok, factory_ok, _ = make()  # the engine recovers: the same command completes
    m = collect(cfg_ok, factory_ok)
    assert m["complete"] and set(_rows(cfg.out).roll_out_finish) <= {"stop", "length"}


def test_policy_mixture_uses_engines_one_after_another(scripted, tokenizer_dir, tmp_path):
    make, _, _ = scripted
    other = tmp_path / "other-policy"
    other.mkdir()
    for f in os.listdir(tokenizer_dir):  # same tokenizer, different "model"
        os.symlink(os.path.join(tokenizer_dir, f), other / f)
    cfg, factory, engines = make(roll_in=[RollInPolicy(str(other), 3.0), RollInPolicy(tokenizer_dir, 1.0)],
                                 samples_per_problem=8, switch="sqrt")
    collect(cfg, factory)
    assert [e.name for e in engines] == ["other-policy", os.path.basename(tokenizer_dir)]
    assert engines[0].closed and engines[1].closed
    df = _rows(cfg.out)
    share = (df.policy == "other-policy").mean()
    assert 0.5 < share < 0.95  # weight 3:1
    assert len(df) == 5 * 8 * 2 and not Path(cfg.out, ".staging").exists()
    texts = {p: df[df.policy == p].roll_in_ids.iloc[0] for p in set(df.policy)}
    assert len(texts) == 2


def test_shards_share_one_output(scripted):
    make, _, _ = scripted
    cfg, factory, _ = make()
    for i in (1, 0):  # two processes (e.g. one per GPU), any order, one --out
        m = collect(dataclass_replace(cfg, num_shards=2, shard_index=i), factory)
        assert m["complete"] and m["num_chunks"] == (2 if i == 0 else 1)
    assert sorted(p.name for p in Path(cfg.out).glob("manifest*.json")) == ["manifest-000-of-002.json",
                                                                            "manifest-001-of-002.json"]
    df = _rows(cfg.out)
    cfg1, factory1, _ = make(out=cfg.out + "-one")
    collect(cfg1, factory1)
    cols = ["problem_id", "roll_in_index", "roll_out_index", "label", "switch"]
    one = _rows(cfg1.out)[cols].sort_values(cols[:3]).reset_index(drop=True)
    assert one.equals(df[cols].sort_values(cols[:3]).reset_index(drop=True))
    with pytest.raises(VGSError, match="shard-index"):
        collect(dataclass_replace(cfg, num_shards=2, shard_index=2), factory)


def test_switch_points_and_policy_parsing():
    rng = np.random.default_rng(0)
    u = [switch_point(100, "uniform", rng) for _ in range(4000)]
    s = [switch_point(100, "sqrt", rng) for _ in range(4000)]
    assert min(u) == 0 and max(u) == 99 and 0 <= min(s) and max(s) <= 99
    assert abs(np.mean(u) - 49.5) < 2.5
    w = 1 / np.sqrt(np.arange(1, 101))
    assert abs(np.mean(s) - (np.arange(100) * w).sum() / w.sum()) < 2.5  # E[p] under P(p) ~ (p+1)^-1/2
    assert switch_point(1, "uniform", rng) == 0
    assert parse_policy("/m/a=0.25") == RollInPolicy("/m/a", 0.25, "a")
    assert parse_policy("org/model").weight == 1.0
    with pytest.raises(VGSError):
        parse_policy("/m/a=x")


def test_cli_bad_arguments(tmp_path, capsys):
    from vgs.cli import main

    out = str(tmp_path / "o")
    assert main(["collect", "--problems", "/no/such.jsonl", "--out", out, "--ref", "/no/model"]) == 2
    assert main(["collect", "--problems", "x.jsonl", "--out", out, "--ref", "m", "--roll-outs", "0"]) == 2
    assert main(["collect", "--problems", "x.jsonl", "--out", out, "--roll-in", "a", "--roll-in", "b"]) == 2
    assert "--ref" in capsys.readouterr().err
    assert main(["collect", "--problems", "x.jsonl", "--out", out, "--ref", "m", "--top-p", "1.5"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err
    assert main(["train-rounds", "--problems", "x.jsonl", "--out", out, "--ref", "m", "--rounds", "0"]) == 2


def dataclass_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


# ------------------------------------------------------------------------------- real vLLM


@pytest.mark.vllm
def test_collect_end_to_end_vllm(policy_engine, tiny_policy, data_dir, tmp_path, tokenizer_dir):
    from value_models.data import ValueDataset, collate
    from vgs.prompts import load_tokenizer, prompt_ids

    problems = _math500(data_dir, tmp_path, 3)
    factory = lambda model: (policy_engine, False)  # noqa: E731 - the session engine, not closed
    cfg = CollectConfig(problems=problems, out=str(tmp_path / "c"), ref=tiny_policy, samples_per_problem=2, roll_outs=2,
                        max_tokens=24, chunk_size=2, progress=False)
    m = collect(dataclass_replace(cfg, max_chunks=1), factory)
    assert not m["complete"] and len(_rows(cfg.out)) == 2 * 2 * 2
    m = collect(cfg, factory)
    df = _rows(cfg.out)
    assert m["complete"] and len(df) == 3 * 2 * 2
    assert not df.duplicated(["problem_id", "roll_in_index", "roll_out_index"]).any()
    assert set(df.label) <= {0, 1, 2} and ((df.label == 2) == (df.roll_out_finish != "stop")).all()
    tok = load_tokenizer(tokenizer_dir)
    probs = {p.id: p for p in load_problems(cfg)}
    for r in df.itertuples():
        assert list(r.roll_in_ids[: r.prompt_len]) == prompt_ids(tok, probs[r.problem_id].problem)
        assert r.switch + r.roll_out_len <= 24 and r.roll_out_len >= 1
    # the rows train as intended: loss mask 0 on prompt + roll-in, 1 on roll-out tokens
    ds = ValueDataset(cfg.out, max_length=4096)
    assert len(ds) == len(df)
    i = int(np.argmax(ds.roll_out_lens))
    e = ds[i]
    b = collate([e], pad_id=0)
    assert b.loss_mask[0].sum() == ds.roll_out_lens[i]
    assert b.loss_mask[0, : e.out_start].sum() == 0 and e.out_start == ds.roll_in_lens[i]


@pytest.mark.vllm
def test_train_rounds_two_rounds_vllm(policy_engine, tiny_policy, data_dir, tmp_path):
    """Round 1 rolls in with pi_ref, round 2 with pi_ref guided (Q#) by round 1's model; round 2
    trains (warm start) on both rounds' data; re-running the command does nothing new."""
    from value_models.data import ValueDataset
    from value_models.rounds import RoundsConfig, round_dirs, run_rounds
    from value_models.train import TrainConfig
    from vgs.value import HFValueScorer

    problems = _math500(data_dir, tmp_path, 2)
    factory = lambda model: (policy_engine, False)  # noqa: E731
    ccfg = CollectConfig(problems=problems, out="-", ref=tiny_policy, samples_per_problem=2, roll_outs=1, max_tokens=16,
                         chunk_size=2, progress=False, guide_eta=0.01, guide_top_k=5)
    tcfg = TrainConfig(data=["-"], init=tiny_policy, out="-", steps=2, batch_size=4, micro_batch_size=2, lr=1e-3,
                       val_fraction=0.0)
    out = str(tmp_path / "rounds")
    cfg = RoundsConfig(out=out, rounds=2, collect=ccfg, train=tcfg, warm_start=True)
    summary = run_rounds(cfg, factory)
    assert [s["round"] for s in summary] == [1, 2] and summary[1]["guided_by"] == summary[0]["model"]
    r1, r2 = _rows(round_dirs(out, 1)[0]), _rows(round_dirs(out, 2)[0])
    assert len(r1) == len(r2) == 4 and (r1.policy == "policy").all() and (r2.policy == "policy+qsharp").all()
    assert set(r1["round"]) == {1} and set(r2["round"]) == {2}
    with open(os.path.join(round_dirs(out, 2)[1], "train_config.json")) as f:
        t2 = json.load(f)
    assert t2["data"] == [round_dirs(out, 1)[0], round_dirs(out, 2)[0]] and t2["init"] == summary[0]["model"]
    assert len(ValueDataset(t2["data"])) == 8  # aggregated
    scorer = HFValueScorer(summary[1]["model"])
    v = scorer.score([list(r2.roll_in_ids.iloc[0]) + list(r2.roll_out_ids.iloc[0])])
    assert 0 < v[0] < 1
    assert json.loads(Path(out, "rounds.json").read_text())[1]["model"] == summary[1]["model"]
    # guidance really steered the round-2 roll-ins: with eta = 0.01 the Q# offsets (~1/eta) confine
    # sampling to pi_ref's top-5 tokens, while the near-uniform tiny policy alone almost never
    # samples from its top 8 (8 / 151936 per token)
    import torch
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32).eval()

    def in_top8(df):
        hits = []
        for r in df.itertuples():
            ids = torch.tensor([list(r.roll_in_ids)])
            with torch.no_grad():
                top = lm(ids).logits[0].topk(8, dim=-1).indices
            hits += [int(ids[0, t]) in top[t - 1].tolist() for t in range(r.prompt_len, ids.shape[1])]
        return hits

    guided, plain = in_top8(r2), in_top8(r1)
    assert guided and all(guided), guided
    assert plain and not any(plain)
    # re-running the finished command changes nothing
    again = run_rounds(cfg, factory)
    assert [s["model"] for s in again] == [s["model"] for s in summary]


@pytest.mark.vllm
def test_collect_demo_pair_labels_match_the_texts(tmp_path):
    """Through real vLLM on the demo world's policy, which answers correctly about half the time
    (the tiny random policy never does, so label 1 never occurs there): every row's label is
    recomputed from its own text (the boxed answer against the gold, unfinished = 2) and the
    manifest's counts equal the recomputed ones; labels 0 and 1 both occur."""
    from benchmarks.demo_world import POLICY_DIR, task
    from vgs.config import EngineConfig
    from vgs.engine import PolicyEngine
    from vgs.grading import extract_answer
    from vgs.prompts import load_tokenizer

    problems = tmp_path / "demo.jsonl"
    with open(problems, "w") as f:
        for p in task.make_split("train", 12, seed=7):
            f.write(json.dumps({"id": p.id, "problem": p.problem, "answer": p.answer}) + "\n")
    engine = PolicyEngine(EngineConfig(model=str(POLICY_DIR), kv_cache_gib=0.25, max_model_len=256))
    try:
        cfg = CollectConfig(problems=str(problems), out=str(tmp_path / "c"), ref=str(POLICY_DIR), samples_per_problem=2,
                            roll_outs=2, max_tokens=48, switch="sqrt", chunk_size=6, progress=False)
        m = collect(cfg, lambda model: (engine, False))
    finally:
        engine.close()
    df = _rows(cfg.out)
    tok = load_tokenizer(str(POLICY_DIR))
    gold = {json.loads(line)["id"]: json.loads(line)["answer"] for line in open(problems)}
    expected = []
    for r in df.itertuples():
        ids = list(r.roll_in_ids[r.prompt_len:]) + list(r.roll_out_ids)
        finished = ids[-1] == tok.eos_token_id
        answer = extract_answer(tok.decode(ids, skip_special_tokens=True))
        expected.append(2 if not finished else int(answer == gold[r.problem_id]))
    assert df.label.tolist() == expected
    counts = [expected.count(c) for c in range(3)]
    assert m["totals"]["labels"] == counts
    assert counts[0] > 0 and counts[1] > 0, counts
