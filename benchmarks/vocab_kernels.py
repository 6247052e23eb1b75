"""Per-row cost of the vocabulary-sized kernels of a decode step on CPU, at small and large batch.

    python -m benchmarks.vocab_kernels [--vocab 151936 --hidden 128 --threads 2]

Why: `benchmarks.server_load` compares 16 concurrent VGS requests with the same 16 sent one at
a time. Batching amortizes per-step work (reading the weights, scheduling), not per-row work.
For a model whose vocabulary dominates (the random tiny pair: 152k entries, hidden 128) two
kernels are per-row: the LM-head gemm through vLLM's CPU path (oneDNN, as
`dispatch_cpu_unquantized_gemm` sets it up) and vLLM's CPU sampler (`fused_gumbel_argmax`:
Gumbel noise for every vocabulary entry of every row). Their per-row time at the burst's
batch is a floor under the concurrent arm's time per token, so
`sequential time per token / floor` bounds the ratio that `server_load` can reach on that pair.

Prints milliseconds per row for both kernels at each batch size and ends with
`per_row_floor_ms_at_batch_64: X` (LM head + sampler at batch 64).
"""

from __future__ import annotations

import argparse
import time


def per_row_ms(fn, rows: int, repeats: int = 20) -> float:
    fn()  # warm-up: oneDNN primitive creation, first-touch allocations
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1e3 / rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the policy worker's cores)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    args = ap.parse_args()

    import pandas as pd
    import torch
    from vllm import _custom_ops as ops
    from vllm.platforms import current_platform

    current_platform.import_kernels()  # loads the AVX2 / AVX-512 build of vLLM's CPU ops
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weight = torch.randn(args.vocab, args.hidden)
    handler = ops.create_onednn_mm(weight.t(), 32)
    rows = []
    for b in args.batches:
        x = torch.randn(b, args.hidden)
        logits = torch.randn(b, args.vocab)
        seeds = torch.randint(0, 2**31, (b,), dtype=torch.long)
        lm = per_row_ms(lambda: ops.onednn_mm(handler, x, None), b)
        sampler = per_row_ms(lambda: torch.ops._C.fused_gumbel_argmax(logits, seeds), b)
        rows.append({"batch": b, "lm_head_ms_per_row": round(lm, 3), "sampler_ms_per_row": round(sampler, 3),
                     "sum_ms_per_row": round(lm + sampler, 3)})
    table = pd.DataFrame(rows)
    print(f"vocab {args.vocab}, hidden {args.hidden}, {args.threads} torch threads")
    print(table.to_string(index=False))
    big = table[table.batch == max(args.batches)].iloc[0]
    print(f"per_row_floor_ms_at_batch_{int(big.batch)}: {big.sum_ms_per_row:.2f}")


if __name__ == "__main__":
    main()
