"""The guidance value step on CPU with warm and with cold caches, one core.

    python -m benchmarks.guidance_cold_step [--layers 2 --hidden 128 --steps 60]

Why: in the engine a Q♯ step's value forward takes ~40% longer than the same forward timed
alone (docs/benchmarks_speed.md, "Q♯"). Between two guided steps the policy computes its LM
head (152k x hidden weights, 78 MB at hidden 128) and samples over the vocabulary, which
streams every cache level; the value step then starts with its code and data evicted.

This script times `CachedValueModel.score` (the fused CPU path, vLLM's kernels loaded) in
the `qsharp_overhead` shape (8 rows of 33-358 cached tokens, 20 candidates) on one thread,
each decode step preceded by one of:

- `nothing` (warm: the previous step left everything in cache);
- `lm_head`: an [8, H] x [H, 152k] GEMM over a separate 78 MB weight, what the policy does;
- `stream`: a read of 78 MB (the same bytes without the GEMM);
- `compute`: 200 small in-cache matmuls (as long as the GEMM, no memory traffic), which
  separates cache effects from the core's clock.

It also times a fixed sequence of 17 small distinct torch ops after `nothing` and after
`lm_head`, which shows the per-op cost of cold caches apart from the value model, and one
`torch.sum` over 4 KB to 1 MB after each: what a cold op costs beyond its warm time barely
grows with the bytes it reads, so the cost is the op's own code and bookkeeping being fetched
again, not its data (the step's cold cost scales with its number of ops, not its FLOPs).
Every number is the median over `--steps` steps; the rows alternate `--repeats` times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Callable

from benchmarks.common import machine_info, print_machine
from vgs.assets import TOKENIZER_DIR

# prompt lengths of the 8 MATH-500 prompts qsharp_overhead decodes (chat template applied)
ROW_LENGTHS = [68, 117, 358, 97, 33, 86, 141, 59]
VOCAB = 151936


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--candidates", type=int, default=20)
    args = ap.parse_args(argv)
    if min(args.steps, args.repeats, args.candidates, args.layers, args.hidden) < 1:
        ap.error("--steps, --repeats, --candidates, --layers and --hidden must be >= 1")

    import pandas as pd
    import torch

    from vgs.guidance.cpu_gemm import vllm_cpu_kernels
    from vgs.guidance.worker_model import CachedValueModel
    from vgs.tiny import make_tiny

    torch.set_num_threads(1)  # the policy worker computes on one core here
    if not vllm_cpu_kernels():
        raise SystemExit("vLLM's CPU kernels are not available: this measures the fused CPU value step")
    tmp = tempfile.TemporaryDirectory(prefix="vgs-cold-")
    path = make_tiny("value", str(TOKENIZER_DIR), os.path.join(tmp.name, "value"), layers=args.layers,
                     hidden=args.hidden, seed=1)
    print_machine(machine_info())

    head = torch.randn(VOCAB, args.hidden)  # a policy LM head of this width (its own memory)
    hidden = torch.randn(len(ROW_LENGTHS), args.hidden)
    small_a, small_b = torch.randn(64, 64), torch.randn(64, 64)
    before: dict[str, Callable[[], object] | None] = {
        "nothing": None,
        "lm_head": lambda: hidden @ head.T,
        "stream": lambda: head.sum(),
        "compute": lambda: [torch.mm(small_a, small_b) for _ in range(200)],
    }

    def value_step(prep: Callable[[], object] | None) -> float:
        g = torch.Generator().manual_seed(0)
        m = CachedValueModel(path, "cpu", budget_gib=0.5)
        rows = [m.alloc_row() for _ in ROW_LENGTHS]
        prompts = [torch.randint(0, VOCAB - 1000, (n,), generator=g).tolist() for n in ROW_LENGTHS]
        m.score(rows, prompts, torch.randint(0, VOCAB - 1000, (len(rows), args.candidates), generator=g))
        times = []
        for _ in range(args.steps):
            if prep is not None:
                prep()
            new = [[int(x)] for x in torch.randint(0, VOCAB - 1000, (len(rows),), generator=g)]
            cand = torch.randint(0, VOCAB - 1000, (len(rows), args.candidates), generator=g)
            t0 = time.perf_counter()
            m.score(rows, new, cand)
            times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times)

    a, b = torch.randn(168, 128), torch.randn(168, 128)
    idx = torch.arange(100)

    def seventeen_ops() -> None:
        x = a + b
        y = x * 2.0
        z = torch.exp(y)
        w = torch.sigmoid(z)
        u = torch.nn.functional.silu(w)
        v = torch.cat([u, a])
        r = v.index_select(0, idx)
        s = r.sum(-1)
        torch.logaddexp(s, s)
        q = a.view(8, 21, 2, 64).permute(0, 2, 1, 3).reshape(8, 2, 1344)
        torch.topk(q.amax(-1), 1)
        a.clamp(0, 1)
        torch.where(a > 0, a, b)
        a.lerp(b, 0.3)
        torch.softmax(a, -1)
        a @ b.T

    def after(fn: Callable[[], object], prep: Callable[[], object] | None) -> float:
        """Median seconds of `fn` over `--steps` calls, each preceded by `prep` (untimed)."""
        times = []
        for _ in range(args.steps):
            if prep is not None:
                prep()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def one_sum(kib: int, prep: Callable[[], object] | None) -> float:
        x = torch.randn(kib * 256)  # kib KiB of fp32
        return 1e6 * after(x.sum, prep)

    sizes = []
    rows = []
    for rep in range(args.repeats):
        for kib in (4, 64, 256, 1024):
            sizes.append({"rep": rep, "KiB read": kib, "warm us": one_sum(kib, None),
                          "after lm_head us": one_sum(kib, before["lm_head"])})
        for name, prep in before.items():
            rows.append({"rep": rep, "before each step": name, "value step ms": value_step(prep),
                         "17 small ops ms": 1e3 * after(seventeen_ops, prep) if name in ("nothing", "lm_head") else float("nan")})
    df = pd.DataFrame(rows).groupby("before each step", sort=False).median(numeric_only=True).drop(columns="rep")
    warm = df.loc["nothing", "value step ms"]
    df["vs warm"] = df["value step ms"] / warm
    print(f"value model: {args.layers} layers, hidden {args.hidden}; {len(ROW_LENGTHS)} rows of "
          f"{min(ROW_LENGTHS)}-{max(ROW_LENGTHS)} cached tokens, {args.candidates} candidates; one thread; "
          f"median of {args.steps} steps, median over {args.repeats} repeats")
    print(df.to_string(float_format=lambda x: f"{x:.3f}"))
    sz = pd.DataFrame(sizes).groupby("KiB read").median().drop(columns="rep")
    sz["extra us"] = sz["after lm_head us"] - sz["warm us"]
    print("one torch.sum over N KiB (median over steps and repeats):")
    print(sz.to_string(float_format=lambda x: f"{x:.1f}"))
    print(f"cold_over_warm_value_step: {df.loc['lm_head', 'value step ms'] / warm:.3f}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
