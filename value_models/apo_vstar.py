"""`vgs apo-vstar`: A*-PO stage 1, the optimal value V*(x) of every training problem under pi_ref.

For each problem, N responses (default 8, temperature 1, top-p 1, the published settings) are
sampled from pi_ref through `PolicyEngine`; a response earns r = 1 only if it ended on EOS
(vLLM finish reason "stop") and its boxed answer is math-verify-equivalent to the gold answer
(`vgs.grading`), else 0. The KL-regularised optimal value with coefficient beta1 is

    V*(x) = beta1 * ln E_{y ~ pi_ref}[exp(r(x, y) / beta1)]

estimated from the N samples in the stable form

    V^*(x) = beta1 * (logsumexp_i(r_i / beta1) - ln N)       (beta1 = 0: the mean reward)

(1 of 8 correct at beta1 = 0.5 gives 0.294, 4 of 8 give 0.717). The naive
beta1 * ln(mean(exp(r / beta1))) of the published code overflows once 1/beta1 > ~710.

Cheap stand-in (`--value-model VM`): no sampling; p = the value model's P(correct) at the end
of the prompt, and V* = beta1 * ln(1 - p + p e^{1/beta1}), the closed form the Q# guidance
offsets use (`vgs.guidance.offsets`), evaluated there in the softplus form.

Prompt format (`--prompt-format`): `raw` is what the paper feeds its base models, the problem
text followed by the instruction of its MATH preprocessing (`PAPER_INSTRUCTION`), no chat
template, tokenized as the tokenizer does by default; a sample ends on the tokenizer's EOS
(`<|endoftext|>` for Qwen2.5 base). `chat` is the tokenizer's chat template around
`vgs.prompts.DEFAULT_USER_TEMPLATE` (R1-style models). The default (`auto`) is `raw` when the
tokenizer has no chat template or is a base model's: one whose template does not end an
assistant turn with the EOS token (Qwen2.5 base ships ChatML, whose `<|im_end|>` is not its
EOS, so chat-format samples would never stop). The format is recorded per row
(`prompt_format`) and in the manifest; stage 2 uses the prompts as recorded.

Output, one row per problem: `OUT/data/part-NNNNN.parquet` + `OUT/manifest.json`. Problem
loading, chunks, the manifest (resume after a crash, refusal of changed settings), shards
(`--num-shards/--shard-index`) and seeds are those of `vgs collect` (`value_models.collect`).
Stage 2 (`python -m value_models.apo --data OUT`) reads it.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from value_models.collect import CollectConfig
from value_models.jobs import (DATA_DIR, EngineFactory, Manifest, Problem, close_engine, default_engine_factory,
                               item_seed, plan_chunks, progress_bar, write_parquet)
from vgs.engine import GenRequest, GenSample
from vgs.errors import VGSError

FORMAT = "vgs-apo-vstar/1"
PROMPT_FORMATS = ("auto", "raw", "chat")
PAPER_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."


def default_prompt_format(tokenizer: Any) -> str:
    """`raw` for a tokenizer without a chat template or with a base model's template (one that
    does not close an assistant turn with the EOS token), else `chat`."""
    if not getattr(tokenizer, "chat_template", None) or not tokenizer.eos_token:
        return "raw"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}],
                                             tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render a turn is not a chat model's
        return "raw"
    return "chat" if tokenizer.eos_token in text[text.rfind("2") + 1:] else "raw"


def resolve_prompt_format(tokenizer: Any, fmt: str) -> str:
    if fmt not in PROMPT_FORMATS:
        raise VGSError(f"--prompt-format must be one of {', '.join(PROMPT_FORMATS)}, got {fmt!r}")
    return default_prompt_format(tokenizer) if fmt == "auto" else fmt


def format_prompt_ids(tokenizer: Any, problem: str, fmt: str) -> list[int]:
    """Prompt token ids of one problem in `fmt` (raw or chat)."""
    from vgs.prompts import prompt_ids

    if fmt == "raw":
        return list(tokenizer(f"{problem} {PAPER_INSTRUCTION}")["input_ids"])
    return prompt_ids(tokenizer, problem)


def v_star(rewards: Sequence[float], beta1: float) -> float:
    """beta1 * (logsumexp(r / beta1) - ln N): the soft-max value of N sampled rewards, stable
    for any beta1 > 0; beta1 = 0 is its limit, the mean; no rewards give 0 (the published
    convention for prompts without samples)."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.size == 0:
        return 0.0
    if beta1 < 0:
        raise VGSError(f"beta1 must be >= 0, got {beta1}")
    if beta1 == 0:
        return float(r.mean())
    z = r / beta1
    m = float(z.max())
    return float(beta1 * (m + math.log(np.exp(z - m).sum()) - math.log(r.size)))


def v_star_from_prob(p: Sequence[float], beta1: float) -> list[float]:
    """V* for binary rewards with success probability p: beta1 * ln(1 - p + p e^{1/beta1}),
    through the guidance offset core (softplus(l + 1/beta1) - softplus(l), l = logit p)."""
    import torch

    from vgs.guidance.offsets import CandidateScores, compute_offsets

    probs = torch.as_tensor(list(p), dtype=torch.float64).reshape(1, -1)
    if beta1 == 0:
        return probs[0].tolist()
    off = compute_offsets(CandidateScores.from_probs(probs), eta=beta1, method="qsharp")
    return (beta1 * off[0].double()).tolist()


def grade_responses(tokenizer: Any, answers: Sequence[str], samples: Sequence[GenSample], grader: Any = None
                    ) -> tuple[list[float], list[str | None]]:
    """Rewards (1.0 = ended on EOS with an answer equivalent to the gold one, else 0.0) and the
    extracted answers, for response i against answers[i]. Shared by both A*-PO stages so
    V* and the training reward use the same verifier (the published code did not)."""
    from vgs.grading import extract_answer, get_grader
    from vgs.prompts import decode

    grader = grader or get_grader()
    preds = [extract_answer(decode(tokenizer, list(s.token_ids))) for s in samples]
    pairs = [(a, p) for a, p, s in zip(answers, preds, samples) if s.stopped]
    verdicts = iter(grader.equal_many(pairs) if pairs else [])
    rewards = [(1.0 if next(verdicts) else 0.0) if s.stopped else 0.0 for s in samples]
    return rewards, preds


@dataclass
class VStarConfig(CollectConfig):
    """Stage-1 settings: `vgs collect`'s problem/chunk/shard/engine settings with the
    published A*-PO sampling defaults, plus beta1 and the optional value-model stand-in."""

    samples_per_problem: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 1024
    beta1: float = 0.5
    value_model: str | None = None
    prompt_format: str = "auto"

    def validate(self) -> "VStarConfig":
        if self.ref is None and not self.roll_in:
            raise VGSError("--policy (pi_ref) is required")
        super().validate()
        if self.beta1 < 0 or not math.isfinite(self.beta1):
            raise VGSError(f"--beta1 must be a finite number >= 0, got {self.beta1}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise VGSError(f"--prompt-format must be one of {', '.join(PROMPT_FORMATS)}, got {self.prompt_format!r}")
        return self

    def fingerprint(self) -> dict[str, Any]:
        d = super().fingerprint()
        for k in ("roll_in", "roll_outs", "switch", "drop_no_variation", "guide_value_model", "guide_method",
                  "guide_eta", "guide_top_k"):
            d.pop(k, None)
        d.update(format=FORMAT, beta1=self.beta1, value_model=self.value_model, prompt_format=self.prompt_format)
        return d


def _schema():
    import pyarrow as pa

    return pa.schema([
        ("problem_id", pa.string()), ("problem", pa.string()), ("answer", pa.string()), ("ref", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())), ("n", pa.int32()), ("rewards", pa.list_(pa.float32())),
        ("finish", pa.list_(pa.string())), ("preds", pa.list_(pa.string())),
        ("response_ids", pa.list_(pa.list_(pa.int32()))), ("response_lens", pa.list_(pa.int32())),
        ("pass_rate", pa.float64()), ("value_prob", pa.float64()), ("v_star", pa.float64()),
        ("beta1", pa.float64()), ("seed", pa.int64()), ("source", pa.string()), ("prompt_format", pa.string()),
    ])


def estimate(cfg: VStarConfig, engine_factory: EngineFactory | None = None, scorer: Any = None) -> dict:
    """Run (or resume) stage 1; returns the manifest. `scorer` (a `vgs.value.ValueScorer`)
    overrides the one built for `--value-model`."""
    import dataclasses

    from vgs.prompts import load_tokenizer

    cfg.validate()
    if cfg.prompt_format == "auto":  # resolved before the manifest records the settings
        cfg = dataclasses.replace(cfg, prompt_format=default_prompt_format(load_tokenizer(cfg.ref_model)))
    manifest, tok, prompts, chunks, todo = plan_chunks(cfg, FORMAT)
    if cfg.prompt_format == "raw":
        prompts = {p.id: format_prompt_ids(tok, p.problem, "raw") for k in todo for p in chunks[k]}
    if not todo:
        _report(cfg, manifest, "nothing to do")
        return manifest.data
    owned = False
    engine = None
    if cfg.value_model:
        if scorer is None:
            from vgs.value import HFValueScorer

            scorer, owned = HFValueScorer(cfg.value_model), True
    else:
        engine, owned = (engine_factory or default_engine_factory(cfg))(cfg.ref_model)
    sampling = cfg.sampling()
    ref_name = os.path.basename(cfg.ref_model.rstrip("/")) or cfg.ref_model
    bar = progress_bar(cfg, sum(len(chunks[k]) for k in todo), "apo-vstar")
    try:
        for k in todo:
            t0 = time.time()
            rows = (_score_chunk if cfg.value_model else _sample_chunk)(cfg, chunks[k], prompts, engine or scorer, tok,
                                                                         sampling)
            for r in rows:
                r["ref"] = ref_name
                r["prompt_format"] = cfg.prompt_format
            fname = f"{DATA_DIR}/part-{k:05d}.parquet"
            os.makedirs(os.path.join(cfg.out, DATA_DIR), exist_ok=True)
            write_parquet(rows, os.path.join(cfg.out, fname), _schema())
            correct = sum(int(sum(r["rewards"])) for r in rows)
            unfinished = sum(sum(f != "stop" for f in r["finish"]) for r in rows)
            wrong = sum(len(r["rewards"]) for r in rows) - correct - unfinished
            manifest.record(k, {"file": fname, "rows": len(rows), "problems": len(rows), "problems_kept": len(rows),
                                "problems_dropped": 0, "labels": [wrong, correct, unfinished],
                                "mean_v_star": float(np.mean([r["v_star"] for r in rows])),
                                "seconds": round(time.time() - t0, 2)})
            bar.update(len(rows))
            bar.set_postfix(v_star=f"{np.mean([r['v_star'] for r in rows]):.3f}")
    finally:
        bar.close()
        if engine is not None:
            close_engine(engine, owned)
        elif owned and hasattr(scorer, "close"):
            scorer.close()
    _report(cfg, manifest, "done" if manifest.data["complete"] else "partial (re-run to continue)")
    return manifest.data


def _sample_chunk(cfg: VStarConfig, chunk: list[Problem], prompts: dict, engine: Any, tok: Any, sampling) -> list[dict]:
    """N samples per problem in one engine call (one request with n = N and a per-problem
    seed derived like collect's), graded, reduced to V*."""
    seeds = [item_seed(cfg.seed, cfg.round, p.id, "vstar") for p in chunk]
    reqs = [GenRequest(prompts[p.id], cfg.max_tokens, n=cfg.samples_per_problem, seed=s) for p, s in zip(chunk, seeds)]
    outs = engine.generate(reqs, sampling, progress=False)
    flat = [s for o in outs for s in o]
    answers = [p.answer for p, o in zip(chunk, outs) for _ in o]
    rewards, preds = grade_responses(tok, answers, flat)
    rows, i = [], 0
    for p, seed, o in zip(chunk, seeds, outs):
        r = rewards[i: i + len(o)]
        rows.append({"problem_id": p.id, "problem": p.problem, "answer": p.answer, "prompt_ids": prompts[p.id],
                     "n": len(o), "rewards": r, "finish": [s.finish_reason for s in o], "preds": preds[i: i + len(o)],
                     "response_ids": [list(s.token_ids) for s in o], "response_lens": [len(s.token_ids) for s in o],
                     "pass_rate": float(np.mean(r)), "value_prob": None, "v_star": v_star(r, cfg.beta1),
                     "beta1": cfg.beta1, "seed": seed, "source": "samples"})
        i += len(o)
    return rows


def _score_chunk(cfg: VStarConfig, chunk: list[Problem], prompts: dict, scorer: Any, tok: Any, sampling) -> list[dict]:
    """The stand-in: the value model's P(correct) at the end of each prompt, closed-form V*."""
    probs = scorer.score([prompts[p.id] for p in chunk])
    vs = v_star_from_prob(probs, cfg.beta1)
    return [{"problem_id": p.id, "problem": p.problem, "answer": p.answer, "prompt_ids": prompts[p.id], "n": 0,
             "rewards": [], "finish": [], "preds": [], "response_ids": [], "response_lens": [],
             "pass_rate": float(pr), "value_prob": float(pr), "v_star": float(v), "beta1": cfg.beta1, "seed": 0,
             "source": "value_model"} for p, pr, v in zip(chunk, probs, vs)]


def _report(cfg: VStarConfig, manifest: Manifest, status: str) -> None:
    import sys

    chunks = manifest.data["chunks"].values()
    n = sum(c["rows"] for c in chunks)
    mean = sum(c.get("mean_v_star", 0.0) * c["rows"] for c in chunks) / max(1, n)
    tot = manifest.data.get("totals", {"labels": [0, 0, 0]})
    print(f"[apo-vstar] {status}: {cfg.out} | {n} problems | mean V* {mean:.4f} (beta1 {cfg.beta1}) | samples "
          f"wrong/correct/unfinished = {tot['labels'][0]}/{tot['labels'][1]}/{tot['labels'][2]} | chunks "
          f"{len(manifest.data['chunks'])}/{manifest.data['num_chunks']}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# command line


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("apo-vstar", help="A*-PO stage 1: estimate V*(x) per problem from pi_ref samples",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--problems", required=True, help="benchmark name, JSONL/JSON/Parquet file or dir, or Hub dataset id")
    p.add_argument("--policy", required=True, dest="ref", help="pi_ref (its tokenizer renders the prompts)")
    p.add_argument("--out", required=True, help="output dir: data/part-*.parquet + manifest.json (resumable)")
    p.add_argument("--samples", type=int, default=8, dest="samples_per_problem", help="N responses per problem")
    p.add_argument("--beta1", type=float, default=0.5, help="KL coefficient of V* (0: plain mean reward)")
    p.add_argument("--value-model", default=None,
                   help="stand-in: V* from this value model's P(correct) at the prompt instead of sampling")
    p.add_argument("--prompt-format", default="auto", choices=PROMPT_FORMATS,
                   help="raw: problem text + the paper's instruction, no chat template (base models, as published); "
                        "chat: the tokenizer's chat template; auto: raw for a tokenizer without a chat template or "
                        "whose template does not end an assistant turn with its EOS (a base model), else chat")
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--problem-field", default=None)
    p.add_argument("--answer-field", default=None)
    p.add_argument("--id-field", default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--chunk-size", type=int, default=32, help="problems per shard file (the unit of resume)")
    p.add_argument("--max-chunks", type=int, default=None)
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--shard-index", type=int, default=0)
    e = p.add_argument_group("engine")
    e.add_argument("--kv-cache-gib", type=float, default=None)
    e.add_argument("--max-model-len", type=int, default=None)
    e.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    e.add_argument("--tensor-parallel-size", type=int, default=1)
    e.add_argument("--dtype", default="auto")
    e.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    names = {f.name for f in dataclasses.fields(VStarConfig)}
    estimate(VStarConfig(**{k: v for k, v in vars(args).items() if k in names}))
    return 0
