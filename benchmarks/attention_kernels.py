"""vLLM's CPU attention kernel at each KV block size against torch's SDPA, on the value-scoring
workload's shapes, timed in CPU seconds (so a loaded machine does not bend the comparison).

    python -m benchmarks.attention_kernels [--blocks 32 64 128 256 --reps 5]

Why: `benchmarks/value_profile.py` showed the vLLM pooling path spending most of its worker
time in `_C::cpu_attention_with_kv_cache`, and far more of it with vLLM's AVX2 kernel build
than with its AVX-512 one. This script calls that kernel directly (the same op and scheduler
metadata vLLM's `CPUAttentionBackendImpl` builds) for one round of `benchmarks.value_scoring`:
16 requests each attending 256 new query tokens causally over prefixes of 768..1536 tokens
(2 query heads, 1 KV head, head size 64, fp32, one thread), once per block size, and the same
attention with `torch.nn.functional.scaled_dot_product_attention` per request. Prints GFLOP/s
per variant and ends with `best_block_size: N`.

It runs on whatever kernel build vLLM loads on this CPU (`_C` / `_C_AVX512` / `_C_AVX2`): run
it on an AVX2 machine to see that build.
"""

from __future__ import annotations

import argparse
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--reps", type=int, default=5, help="timed calls per variant (min CPU time counts)")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--query", type=int, default=256, help="new tokens per request (the block being scored)")
    ap.add_argument("--prefix", type=int, nargs="+", default=[512, 768, 1024, 1280],
                    help="cached tokens before the new ones, cycled over the requests")
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--head-dim", type=int, default=64)
    args = ap.parse_args(argv)

    import pandas as pd
    import torch
    import torch.nn.functional as F
    from vllm import _custom_ops as ops
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from benchmarks.common import machine_info, print_machine, vllm_cpu_kernels

    current_platform.import_kernels()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    H, KVH, D, Q = args.heads, args.kv_heads, args.head_dim, args.query
    prefixes = [args.prefix[i % len(args.prefix)] for i in range(args.requests)]
    seq_lens = [p + Q for p in prefixes]
    n_req, total_q = len(seq_lens), Q * len(seq_lens)
    # FLOPs: QK^T and PV over the causal (query, key) pairs of every head.
    pairs = sum(sum(p + i + 1 for i in range(Q)) for p in prefixes)
    flops = pairs * H * D * 2 * 2
    scale = D ** -0.5
    print_machine(machine_info(vllm_kernels=vllm_cpu_kernels(D, block_size=args.blocks[0])))

    q = torch.randn(total_q, H, D)
    keys = [torch.randn(s, KVH, D) for s in seq_lens]
    vals = [torch.randn(s, KVH, D) for s in seq_lens]
    qsl = torch.tensor([0] + [Q * (i + 1) for i in range(n_req)], dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)

    def cpu_seconds(fn) -> float:
        fn()  # warm-up
        best = float("inf")
        for _ in range(args.reps):
            t0 = time.process_time()
            fn()
            best = min(best, time.process_time() - t0)
        return best

    rows, outs = [], {}
    for bs in args.blocks:
        isa = _get_attn_isa(torch.float32, bs, D)
        per_req = [-(-s // bs) for s in seq_lens]
        table = torch.zeros(n_req, max(per_req), dtype=torch.int32)
        cache = torch.zeros(sum(per_req) + 1, KVH, bs * 2, D)  # block 0 unused
        key_cache, value_cache = cache.chunk(2, dim=2)
        nxt = 1
        for r, s in enumerate(seq_lens):  # written by vLLM's own cache op (its layout is the ISA's)
            table[r, : per_req[r]] = torch.arange(nxt, nxt + per_req[r], dtype=torch.int32)
            nxt += per_req[r]
            pos = torch.arange(s)
            slots = (table[r, pos // bs].long() * bs + pos % bs)
            ops.cpu_attn_reshape_and_cache(keys[r], vals[r], key_cache, value_cache, slots, isa)
        meta = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=n_req, num_heads=H, num_kv_heads=KVH, head_dim=D, seq_lens=lens, dtype=torch.float32,
            query_start_loc=qsl, causal=True, sliding_window_size=-1, isa=isa, enable_kv_split=False)
        out = torch.empty_like(q)

        def run() -> None:
            ops.cpu_attention_with_kv_cache(
                query=q, key_cache=key_cache, value_cache=value_cache, output=out, query_start_loc=qsl,
                seq_lens=lens, scale=scale, causal=True, alibi_slopes=None, sliding_window=-1,
                block_table=table, softcap=0.0, scheduler_metadata=meta, s_aux=None)

        secs = cpu_seconds(run)
        outs[bs] = out.clone()
        rows.append({"kernel": f"vllm cpu_attention_with_kv_cache (block {bs}, isa {isa})", "block": bs,
                     "cpu_ms": secs * 1e3, "gflop_per_s": flops / secs / 1e9})

    def sdpa() -> torch.Tensor:
        res = []
        for r, (p, s) in enumerate(zip(prefixes, seq_lens)):
            qr = q[Q * r: Q * (r + 1)].transpose(0, 1)[None]  # [1, H, Q, D]
            kr, vr = keys[r].transpose(0, 1)[None], vals[r].transpose(0, 1)[None]
            mask = torch.arange(s)[None, :] <= (p + torch.arange(Q))[:, None]  # bottom-right causal
            res.append(F.scaled_dot_product_attention(qr, kr, vr, attn_mask=mask, scale=scale,
                                                      enable_gqa=H != KVH)[0].transpose(0, 1))
        return torch.cat(res)

    secs = cpu_seconds(sdpa)
    ref = sdpa()
    rows.append({"kernel": "torch scaled_dot_product_attention (per request, mask)", "block": None,
                 "cpu_ms": secs * 1e3, "gflop_per_s": flops / secs / 1e9})
    worst = max(float((o - ref).abs().max()) for o in outs.values())
    print(f"{n_req} requests x {Q} new tokens over prefixes {sorted(set(prefixes))}; {H} heads, {KVH} KV heads, "
          f"head {D}, fp32, 1 thread; {flops / 1e9:.2f} GFLOP per call; min CPU time of {args.reps} calls")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:.1f}"))
    print(f"max |vllm - sdpa| over block sizes: {worst:.1e}")
    best = min((r for r in rows if r["block"]), key=lambda r: r["cpu_ms"])
    print(f"best_block_size: {best['block']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
