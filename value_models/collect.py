"""`vgs collect`: roll-in / roll-out data for training a token-level value model.

For every problem, `--samples-per-problem` roll-ins are sampled to completion (or the length
cap) from a mixture of roll-in policies. Each roll-in is cut at a switch point p (its first p
generated tokens are kept) and the reference policy pi_ref continues from exactly those token
ids, `--roll-outs` times. Each roll-out is labelled from prefix + roll-out text:

    0 = finished (vLLM finish_reason "stop") with a wrong or missing answer
    1 = finished with an answer math-verify finds equivalent to the gold answer
    2 = unfinished: the `--max-tokens` cap (prefix + roll-out tokens) was reached

so the label estimates what pi_ref would do from the prefix, the value the model learns. A
roll-in or roll-out the engine aborted (finish_reason "abort": preemption, out of memory,
shutdown) is not a label: the chunk fails with an error and is retried on the next run.

Problem filters (`--drop`, recorded in the manifest and applied by the trainer per problem
over all the data it trains on, i.e. over every round, never per chunk):

    all-wrong     drop problems none of whose roll-outs is correct (the published VGS filter,
                  ~10% of OpenR1: easy problems stay, so the model sees high-value states)
    no-variation  also drop problems whose roll-outs are all correct (nothing to rank)
    none          keep everything (default)

Switch points, for a roll-in of L generated tokens (p = 0 keeps only the prompt; a finished
roll-in's EOS is never kept, so every roll-out has room to run):

    uniform:  P(p) = 1 / L                                 for p in {0, ..., L-1}
    sqrt:     P(p) = (p + 1)^(-1/2) / sum_q (q + 1)^(-1/2)  for p in {0, ..., L-1}

The published data used a "square-root weighted" choice whose formula is not public. Ours
leans toward early cuts because every roll-out token is supervised: a cut at p already
trains positions p..end, so late positions are covered by many roll-outs while early ones
are covered only by early cuts; 1/sqrt(p+1) halves that imbalance without piling cuts at 0.

Q# mode (`--guide-value-model`): roll-ins are sampled with the Q#-guided pi (the guidance
logits processor with that value model), roll-outs with unguided pi_ref (what the Q# data
collection does from its second round on).

Output: `OUT/data/part-NNNNN.parquet` shards (one row per problem x roll-in x roll-out, columns in
`value_models/data.py`) and `OUT/manifest.json`. Problems are processed in chunks; a chunk's
shard is written (temp file + rename) before the manifest records it, so a killed run
restarts at the first unrecorded chunk and never duplicates rows. `--num-shards N
--shard-index i` lets N processes (one per GPU or node) share one output: shard i owns chunks
i, i+N, ... and keeps its own `manifest-III-of-NNN.json`. Several roll-in policies
mean several engines: the others are run first, one at a time, their roll-ins staged in
`OUT/.staging/`, and pi_ref's engine last (it also does its own roll-ins); with a single
roll-in policy equal to pi_ref one engine does everything.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vgs.config import SamplingConfig
from vgs.engine import GenRequest
from vgs.errors import VGSError
from vgs.prompts import DEFAULT_USER_TEMPLATE
from value_models.data import DROP_FILTERS
from value_models.jobs import (DATA_DIR, STAGING, EngineFactory, Manifest, Problem, close_engine,  # noqa: F401
                               default_engine_factory, item_seed, plan_chunks, progress_bar,
                               write_parquet)

FORMAT = "vgs-value-data/1"
SWITCH_MODES = ("uniform", "sqrt")


@dataclass
class RollInPolicy:
    model: str
    weight: float = 1.0
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            self.name = os.path.basename(self.model.rstrip("/")) or self.model


def parse_policy(spec: str) -> RollInPolicy:
    """`PATH` or `PATH=WEIGHT` (weights are relative; they need not sum to 1)."""
    model, sep, weight = spec.rpartition("=") if "=" in spec else (spec, "", "")
    if not sep:
        return RollInPolicy(spec)
    try:
        w = float(weight)
    except ValueError:
        raise VGSError(f"bad --roll-in {spec!r}: expected PATH or PATH=WEIGHT") from None
    return RollInPolicy(model, w)


@dataclass
class CollectConfig:
    problems: str
    out: str
    roll_in: list[RollInPolicy] = field(default_factory=list)
    ref: str | None = None
    samples_per_problem: int = 4
    roll_outs: int = 1
    switch: str = "uniform"
    max_tokens: int = 16384
    temperature: float = 0.6
    top_p: float = 0.95
    seed: int = 0
    round: int = 1
    chunk_size: int = 32
    limit: int | None = None
    split: str = "train"
    data_dir: str | None = None
    problem_field: str | None = None
    answer_field: str | None = None
    id_field: str | None = None
    drop: str = "none"
    drop_no_variation: bool = False  # deprecated alias of drop="no-variation"
    guide_value_model: str | None = None
    guide_method: str = "qsharp"
    guide_eta: float = 0.1
    guide_top_k: int = 20
    user_template: str = DEFAULT_USER_TEMPLATE
    kv_cache_gib: float | None = None
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.85
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    max_chunks: int | None = None
    num_shards: int = 1
    shard_index: int = 0
    progress: bool = True

    @property
    def ref_model(self) -> str:
        return self.ref or self.roll_in[0].model

    def validate(self) -> "CollectConfig":
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise VGSError(msg)

        if self.drop_no_variation:
            print("[collect] --drop-no-variation is deprecated: use --drop no-variation (or --drop all-wrong, "
                  "the published VGS filter)", file=sys.stderr)
            self.drop, self.drop_no_variation = "no-variation", False
        need(self.drop in DROP_FILTERS, f"--drop must be one of {', '.join(DROP_FILTERS)}, got {self.drop!r}")
        need(bool(self.problems), "--problems is required")
        need(bool(self.out), "--out is required")
        need(bool(self.roll_in) or bool(self.ref), "give --ref (pi_ref) and/or --roll-in policies")
        if not self.roll_in:
            self.roll_in = [RollInPolicy(self.ref)]
        need(len(self.roll_in) == 1 or bool(self.ref), "with several --roll-in policies, name pi_ref with --ref")
        need(all(p.weight > 0 for p in self.roll_in), "roll-in mixture weights must be > 0")
        need(len({p.name for p in self.roll_in}) == len(self.roll_in), "roll-in policy names must be distinct")
        need(self.samples_per_problem >= 1, f"--samples-per-problem must be >= 1, got {self.samples_per_problem}")
        need(self.roll_outs >= 1, f"--roll-outs must be >= 1, got {self.roll_outs}")
        need(self.switch in SWITCH_MODES, f"--switch must be one of {', '.join(SWITCH_MODES)}, got {self.switch!r}")
        need(self.max_tokens >= 2, f"--max-tokens must be >= 2, got {self.max_tokens}")
        self.sampling()  # temperature / top-p / seed, checked where all sampling settings are
        need(self.round >= 1, f"--round must be >= 1, got {self.round}")
        need(self.chunk_size >= 1, f"--chunk-size must be >= 1, got {self.chunk_size}")
        need(self.limit is None or self.limit >= 1, "--limit must be >= 1")
        need(self.max_chunks is None or self.max_chunks >= 1, "--max-chunks must be >= 1")
        need(self.num_shards >= 1 and 0 <= self.shard_index < self.num_shards,
             f"--shard-index must be in [0, --num-shards) = [0, {self.num_shards}), got {self.shard_index}")
        if self.guide_value_model:
            from vgs.guidance.params import GuideParams, parse_guide_params

            try:
                parse_guide_params(GuideParams(self.guide_method, self.guide_value_model, self.guide_eta,
                                               self.guide_top_k).to_extra_args())
            except ValueError as exc:
                raise VGSError(f"bad guidance settings: {exc}") from None
        return self

    def sampling(self) -> SamplingConfig:
        """The roll-in/roll-out sampling settings, validated by `SamplingConfig`."""
        return SamplingConfig(temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens,
                              seed=self.seed).validate()

    def guidance(self) -> dict[str, Any] | None:
        if not self.guide_value_model:
            return None
        from vgs.guidance.params import GuideParams

        return GuideParams(self.guide_method, self.guide_value_model, self.guide_eta, self.guide_top_k).to_extra_args()

    def fingerprint(self) -> dict[str, Any]:
        """What determines the data: a resumed run must agree on all of it."""
        keep = ("problems", "split", "limit", "samples_per_problem", "roll_outs", "switch", "max_tokens", "temperature",
                "top_p", "seed", "round", "chunk_size", "guide_value_model", "guide_method",
                "guide_eta", "guide_top_k", "user_template", "problem_field", "answer_field", "id_field")
        d = {k: getattr(self, k) for k in keep}
        d["roll_in"] = [dataclasses.asdict(p) for p in self.roll_in]
        d["ref"] = self.ref_model
        return d


# ----------------------------------------------------------------------------------------------
# problems


# ----------------------------------------------------------------------------------------------
# sampling plan (deterministic per problem, independent of chunking and restarts)


def switch_point(length: int, mode: str, rng: np.random.Generator) -> int:
    """How many generated roll-in tokens to keep (see the module docstring for the formulas)."""
    if length <= 1:
        return 0
    if mode == "uniform":
        return int(rng.integers(0, length))
    if mode == "sqrt":
        w = 1.0 / np.sqrt(np.arange(1, length + 1, dtype=np.float64))
        return int(rng.choice(length, p=w / w.sum()))
    raise VGSError(f"unknown switch mode {mode!r}")


def assign_policies(cfg: CollectConfig, pid: str) -> list[int]:
    """Which roll-in policy samples roll-in j of this problem (a categorical draw per roll-in)."""
    w = np.array([p.weight for p in cfg.roll_in], dtype=np.float64)
    rng = np.random.default_rng(item_seed(cfg.seed, cfg.round, pid, "policy"))
    return rng.choice(len(w), size=cfg.samples_per_problem, p=w / w.sum()).tolist()


# ----------------------------------------------------------------------------------------------
# output rows


def _schema():
    import pyarrow as pa

    ids = pa.list_(pa.int32())
    return pa.schema([
        ("problem_id", pa.string()), ("round", pa.int32()), ("policy", pa.string()), ("ref", pa.string()),
        ("roll_in_index", pa.int32()), ("roll_out_index", pa.int32()), ("prompt_len", pa.int32()),
        ("roll_in_ids", ids), ("roll_out_ids", ids), ("label", pa.int8()), ("answer", pa.string()),
        ("pred", pa.string()), ("switch", pa.int32()), ("roll_in_gen_len", pa.int32()),
        ("roll_in_finish", pa.string()), ("roll_out_len", pa.int32()), ("roll_out_finish", pa.string()),
        ("seed_roll_in", pa.int64()), ("seed_roll_out", pa.int64()), ("problem", pa.string()),
    ])


# ----------------------------------------------------------------------------------------------
# the collection


def collect(cfg: CollectConfig, engine_factory: EngineFactory | None = None) -> dict:
    """Run (or resume) a collection; returns the manifest."""
    from vgs.grading import extract_answer, get_grader
    from vgs.prompts import decode

    cfg.validate()
    factory = engine_factory or default_engine_factory(cfg)
    manifest, tok, prompts, chunks, todo = plan_chunks(cfg, FORMAT)
    _check_tokenizers(cfg, tok)
    if not todo:
        _report(cfg, manifest, "nothing to do")
        return manifest.data
    plan = {p.id: assign_policies(cfg, p.id) for k in todo for p in chunks[k]}
    sampling = cfg.sampling()
    guidance = cfg.guidance()
    names = [p.name + (f"+{cfg.guide_method}" if guidance else "") for p in cfg.roll_in]
    ref = cfg.ref_model

    def roll_in_requests(chunk: list[Problem], policy: int):
        keys, reqs = [], []
        for p in chunk:
            for j, pol in enumerate(plan[p.id]):
                if pol == policy:
                    keys.append((p.id, j))
                    reqs.append(GenRequest(prompts[p.id], cfg.max_tokens, n=1, seed=item_seed(cfg.seed, cfg.round, p.id, j, "in"),
                                           extra_args=dict(guidance) if guidance else None))
        return keys, reqs

    # 1. roll-ins of the policies other than pi_ref, one engine at a time, staged on disk
    staged: dict[tuple[int, int], str] = {}
    for i, pol in enumerate(cfg.roll_in):
        if pol.model == ref:
            continue
        need = [k for k in todo if any(v == i for p in chunks[k] for v in plan[p.id])]
        paths = {k: os.path.join(cfg.out, STAGING, f"policy-{i}", f"chunk-{k:05d}.parquet") for k in need}
        staged.update({(i, k): paths[k] for k in need})
        missing = [k for k in need if not os.path.exists(paths[k])]
        if not missing:
            continue
        engine, owned = factory(pol.model)
        try:
            bar = progress_bar(cfg, sum(len(chunks[k]) for k in missing), f"roll-in {pol.name}")
            for k in missing:
                keys, reqs = roll_in_requests(chunks[k], i)
                outs = engine.generate(reqs, sampling, progress=False)
                _check_finish(k, "roll-in", [o[0].finish_reason for o in outs])  # before staging: a re-run redoes it
                os.makedirs(os.path.dirname(paths[k]), exist_ok=True)
                write_parquet({"problem_id": [a for a, _ in keys], "roll_in_index": [b for _, b in keys],
                                "ids": [o[0].token_ids for o in outs], "finish": [o[0].finish_reason for o in outs]},
                               paths[k])
                bar.update(len(chunks[k]))
            bar.close()
        finally:
            close_engine(engine, owned)

    # 2. pi_ref: its own roll-ins, then roll-outs from every cut prefix, labels, shards
    engine, owned = factory(ref)
    grader = get_grader()
    bar = progress_bar(cfg, sum(len(chunks[k]) for k in todo), f"collect round {cfg.round}")
    try:
        for k in todo:
            t0 = time.time()
            chunk = chunks[k]
            rollins: dict[tuple[str, int], tuple[list[int], str, int]] = {}
            for i, pol in enumerate(cfg.roll_in):
                if pol.model == ref:
                    keys, reqs = roll_in_requests(chunk, i)
                    if reqs:
                        for key, o in zip(keys, engine.generate(reqs, sampling, progress=False)):
                            rollins[key] = (list(o[0].token_ids), o[0].finish_reason, i)
                elif (i, k) in staged:
                    rollins.update(_read_staged(staged[(i, k)], i))
            _check_finish(k, "roll-in", [v[1] for v in rollins.values()])
            out_keys, out_reqs, cuts = [], [], {}
            for p in chunk:
                for j in range(cfg.samples_per_problem):
                    ids, _, _ = rollins[(p.id, j)]
                    cut = switch_point(len(ids), cfg.switch, np.random.default_rng(item_seed(cfg.seed, cfg.round, p.id, j, "switch")))
                    cuts[(p.id, j)] = cut
                    out_keys.append((p.id, j))
                    out_reqs.append(GenRequest(prompts[p.id] + ids[:cut], cfg.max_tokens - cut, n=cfg.roll_outs,
                                               seed=item_seed(cfg.seed, cfg.round, p.id, j, "out")))
            outs = engine.generate(out_reqs, sampling, progress=False)
            _check_finish(k, "roll-out", [s.finish_reason for samples in outs for s in samples])
            by_id = {p.id: p for p in chunk}
            rows, texts = [], []
            for key, req, samples in zip(out_keys, out_reqs, outs):
                pid, j = key
                ids, finish, pol = rollins[key]
                cut = cuts[key]
                for r, s in enumerate(samples):
                    texts.append(decode(tok, ids[:cut] + list(s.token_ids)))
                    rows.append({
                        "problem_id": pid, "round": cfg.round, "policy": names[pol], "ref": os.path.basename(ref.rstrip("/")) or ref,
                        "roll_in_index": j, "roll_out_index": r, "prompt_len": len(prompts[pid]),
                        "roll_in_ids": list(req.prompt_ids), "roll_out_ids": list(s.token_ids), "label": 2,
                        "answer": by_id[pid].answer, "pred": None, "switch": cut, "roll_in_gen_len": len(ids),
                        "roll_in_finish": finish, "roll_out_len": len(s.token_ids), "roll_out_finish": s.finish_reason,
                        "seed_roll_in": item_seed(cfg.seed, cfg.round, pid, j, "in"), "seed_roll_out": req.seed + r,
                        "problem": by_id[pid].problem})
            preds = [extract_answer(t) for t in texts]
            finished = [row["roll_out_finish"] == "stop" for row in rows]
            pairs = [(row["answer"], pr) for row, pr, fin in zip(rows, preds, finished) if fin]
            verdicts = iter(grader.equal_many(pairs) if pairs else [])
            for row, pr, fin in zip(rows, preds, finished):
                row["pred"] = pr
                row["label"] = (1 if next(verdicts) else 0) if fin else 2
            all_wrong, all_correct = _flat_problems(rows)
            fname = f"{DATA_DIR}/part-{k:05d}.parquet"
            if rows:
                os.makedirs(os.path.join(cfg.out, DATA_DIR), exist_ok=True)
                write_parquet(rows, os.path.join(cfg.out, fname), _schema())
            labels = [sum(1 for r in rows if r["label"] == c) for c in range(3)]
            manifest.record(k, {"file": fname if rows else None, "rows": len(rows), "problems": len(chunk),
                                "problems_all_wrong": all_wrong, "problems_all_correct": all_correct,
                                "labels": labels, "seconds": round(time.time() - t0, 2)})
            for (i, kk), path in staged.items():  # consumed: other shards never read it
                if kk == k and os.path.exists(path):
                    os.remove(path)
            bar.update(len(chunk))
            tot = manifest.data["totals"]
            bar.set_postfix(rows=tot["rows"], correct=tot["labels"][1], wrong=tot["labels"][0], unfinished=tot["labels"][2])
    finally:
        bar.close()
        close_engine(engine, owned)
    _remove_empty_dirs(os.path.join(cfg.out, STAGING))
    _report(cfg, manifest, "done" if manifest.data["complete"] else "partial (re-run to continue)")
    return manifest.data


def _remove_empty_dirs(root: str) -> None:
    for dirpath, _, _ in sorted(os.walk(root), key=lambda t: -len(t[0])):
        try:
            os.rmdir(dirpath)
        except OSError:
            pass


def _read_staged(path: str, policy: int) -> dict[tuple[str, int], tuple[list[int], str, int]]:
    import pyarrow.parquet as pq

    t = pq.read_table(path).to_pydict()
    return {(pid, int(j)): (list(ids), fin, policy)
            for pid, j, ids, fin in zip(t["problem_id"], t["roll_in_index"], t["ids"], t["finish"])}


def _flat_problems(rows: list[dict]) -> tuple[int, int]:
    """(problems with no correct roll-out, problems with only correct ones) in this chunk: a
    per-round count for the manifest. The `--drop` filter itself is applied by the trainer
    over all rounds (`value_models.data.problems_to_drop`)."""
    correct: dict[str, set[bool]] = {}
    for r in rows:
        correct.setdefault(r["problem_id"], set()).add(r["label"] == 1)
    return sum(s == {False} for s in correct.values()), sum(s == {True} for s in correct.values())


def _check_finish(chunk: int, what: str, reasons: list[str]) -> None:
    """Only "stop" (label 0/1) and "length" (label 2) are outcomes. An aborted request says
    nothing about pi_ref's success, so the chunk fails (nothing recorded) and a re-run retries it."""
    bad = [r for r in reasons if r not in ("stop", "length")]
    if bad:
        raise VGSError(f"chunk {chunk}: {len(bad)} of {len(reasons)} {what}s ended with finish_reason "
                       f"{sorted(set(map(str, bad)))} (aborted by the engine: preemption, out of memory or shutdown), "
                       "not a label; nothing of this chunk was recorded, re-run the same command to retry it")


def _check_tokenizers(cfg: CollectConfig, tok: Any) -> None:
    """Roll-in token ids are fed to pi_ref as they are, so every roll-in policy must share
    pi_ref's tokenizer."""
    from vgs.prompts import load_tokenizer

    for pol in cfg.roll_in:
        if pol.model == cfg.ref_model:
            continue
        other = load_tokenizer(pol.model)
        if len(other) != len(tok) or other.eos_token_id != tok.eos_token_id:
            raise VGSError(f"roll-in policy {pol.model!r} has a different tokenizer than pi_ref {cfg.ref_model!r}; "
                           "token ids must mean the same in both")


def _report(cfg: CollectConfig, manifest: Manifest, status: str) -> None:
    tot = manifest.data.get("totals", {})
    labels = tot.get("labels", [0, 0, 0])
    print(f"[collect] {status}: {cfg.out} | {tot.get('rows', 0)} rows | labels wrong/correct/unfinished = "
          f"{labels[0]}/{labels[1]}/{labels[2]} | problems {tot.get('problems', 0)}: all-wrong "
          f"{tot.get('problems_all_wrong', 0)}, all-correct {tot.get('problems_all_correct', 0)} "
          f"(--drop {cfg.drop}: applied at training, per problem over all rounds) "
          f"| chunks {len(manifest.data['chunks'])}/{manifest.data['num_chunks']}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# command line


def add_arguments(p: argparse.ArgumentParser, rounds: bool = False) -> None:
    """Collection flags (shared with `vgs train-rounds`, which sets the guidance itself)."""
    g = p.add_argument_group("collection")
    g.add_argument("--problems", required=True, help="benchmark name, JSONL/JSON/Parquet file or dir, or Hub dataset id")
    g.add_argument("--split", default="train", help="Hub split to read")
    g.add_argument("--data-dir", default=None, help="local dir for benchmark names (see `vgs eval`)")
    g.add_argument("--problem-field", default=None)
    g.add_argument("--answer-field", default=None)
    g.add_argument("--id-field", default=None)
    g.add_argument("--limit", type=int, default=None, help="first N problems only")
    g.add_argument("--ref", default=None, help="pi_ref, the roll-out policy (default: the single --roll-in)")
    if not rounds:
        g.add_argument("--roll-in", action="append", default=[], metavar="PATH[=WEIGHT]",
                       help="roll-in policy and mixture weight; repeat for a mixture (default: pi_ref)")
    g.add_argument("--samples-per-problem", type=int, default=4, help="roll-ins per problem (published: 14)")
    g.add_argument("--roll-outs", type=int, default=1, help="pi_ref roll-outs per roll-in prefix (published: 4)")
    g.add_argument("--switch", default="uniform", choices=SWITCH_MODES, help="switch-point distribution")
    g.add_argument("--max-tokens", type=int, default=16384, help="cap on generated tokens (prefix + roll-out)")
    g.add_argument("--temperature", type=float, default=0.6)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--chunk-size", type=int, default=32, help="problems per shard (the unit of resume)")
    g.add_argument("--max-chunks", type=int, default=None, help="stop after this many new chunks (job slicing)")
    if not rounds:
        g.add_argument("--num-shards", type=int, default=1,
                       help="split the chunks over N independent processes (e.g. one per GPU) writing to one --out")
        g.add_argument("--shard-index", type=int, default=0, help="which shard this process is, 0..N-1")
    if not rounds:  # train-rounds has the trainer's --drop
        g.add_argument("--drop", default="none", choices=DROP_FILTERS,
                       help="problem filter the trainer applies over all rounds' data (recorded in the manifest): "
                            "all-wrong = drop problems without a correct roll-out (published VGS), no-variation = "
                            "also drop all-correct ones, none = keep all")
        g.add_argument("--drop-no-variation", action=_DeprecatedDrop, nargs=0, dest="drop",
                       help="deprecated alias of --drop no-variation")
    if not rounds:
        g.add_argument("--round", type=int, default=1, help="round number stored in the rows")
        g.add_argument("--guide-value-model", default=None, help="Q# mode: roll in with pi guided by this value model")
    g.add_argument("--guide-method", default="qsharp", choices=("qsharp", "cd"))
    g.add_argument("--guide-eta", type=float, default=0.1)
    g.add_argument("--guide-top-k", type=int, default=20)
    e = p.add_argument_group("engine")
    e.add_argument("--kv-cache-gib", type=float, default=None, help="KV cache per engine (CPU default 2)")
    e.add_argument("--max-model-len", type=int, default=None)
    e.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    e.add_argument("--tensor-parallel-size", type=int, default=1)
    e.add_argument("--dtype", default="auto")
    e.add_argument("--no-progress", dest="progress", action="store_false")


class _DeprecatedDrop(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
        print("[collect] --drop-no-variation is deprecated: use --drop no-variation (or --drop all-wrong, "
              "the published VGS filter)", file=sys.stderr)
        setattr(namespace, "drop", "no-variation")


def config_from_args(args: argparse.Namespace, **override: Any) -> CollectConfig:
    names = {f.name for f in dataclasses.fields(CollectConfig)}
    kw = {k: v for k, v in vars(args).items() if k in names}
    kw["roll_in"] = [parse_policy(s) for s in getattr(args, "roll_in", []) or []]
    kw.update(override)
    return CollectConfig(**kw)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("collect", help="collect roll-in/roll-out data for value-model training",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output dir: data/part-*.parquet + manifest.json (resumable)")
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    collect(config_from_args(args))
    return 0
