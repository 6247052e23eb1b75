"""Server throughput under concurrency: 16 VGS requests at once vs the same 16 one at a time.

    python -m benchmarks.server_load [--requests 16 --layers 2 --hidden 128]
    python -m benchmarks.server_load --models demo

One `vgs serve` app (in this process, on 127.0.0.1) over a tiny policy and value model.
`--models tiny` (default): random-weight models with the real 152k-entry vocabulary (head
size 64), each request a chat completion of a real AIME 2024 problem. `--models demo`: the
demo-world pair (`benchmarks/demo_world/models`, a Qwen2 policy and value model with their
own 384-entry vocabulary and 256-token context), each request a held-out demo-world problem;
on a CPU the 152k-entry LM head and sampler dominate the per-token cost of the tiny pair,
which caps what batching can save, and the demo pair shows the server without that cap.
Every request is sent with `search = {"method": "vgs", "budget": 4, "beam_width": 2, "block_size": 32}`,
`max_tokens = 128`, temperature 1 and top-p 1 (top-p < 1 sorts the 152k-entry vocabulary for
every token, a per-token cost on CPU that would hide what batching saves), sent over HTTP by
client threads. Both arms send the same requests (same
seeds); the prefix caches are reset before each arm. Throughput = generated tokens
(`usage.completion_tokens`, all candidates) per second of wall time; latency is per request.
Ends with `concurrent_over_sequential_throughput: X`; the goal is X >= 4 on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.local_files import DATA_DIR, TOKENIZER_DIR, quiet_engines

quiet_engines()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", choices=("tiny", "demo"), default="tiny",
                    help="tiny: random models, real 152k vocabulary, AIME prompts; demo: the demo-world pair")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--tokenizer", default=str(TOKENIZER_DIR))
    ap.add_argument("--data-dir", default=str(DATA_DIR))
    args = ap.parse_args()

    import httpx
    import numpy as np
    import pandas as pd

    from benchmarks.datasets import load_benchmark
    from vgs.aio import run_sync
    from vgs.config import EngineConfig
    from vgs.runtime import build_engines, close_engines
    from vgs.server import build_state, start_server
    from vgs.tiny import make_tiny

    if args.models == "demo":
        from benchmarks.demo_world import task

        models = Path(__file__).parent / "demo_world" / "models"
        policy_dir, value_dir, tokenizer, context = str(models / "policy"), str(models / "value"), str(models / "policy"), 256
        texts = [p.problem for p in task.make_split("heldout", args.requests, seed=0)]
    else:
        tmp = Path(tempfile.mkdtemp(prefix="vgs-bench-"))
        policy_dir = make_tiny("policy", args.tokenizer, str(tmp / "policy"), layers=args.layers, hidden=args.hidden,
                               seed=0)
        value_dir = make_tiny("value", args.tokenizer, str(tmp / "value"), layers=args.layers, hidden=args.hidden,
                              seed=1)
        tokenizer, context = args.tokenizer, 2048
        problems = load_benchmark("aime24", args.data_dir)
        texts = [problems[i % len(problems)].problem for i in range(args.requests)]
    engines = build_engines(EngineConfig(model=policy_dir, tokenizer=tokenizer, kv_cache_gib=1.0,
                                         max_model_len=context),
                            value_dir, needs_scorer=True,
                            value_engine={"kv_cache_gib": 1.0, "max_model_len": context})
    state = build_state(engines, "tiny", max_budget=64, max_sequences=256)
    handle = start_server(state)
    url = f"http://127.0.0.1:{handle.port}/v1/chat/completions"
    bodies = [{"model": "tiny", "messages": [{"role": "user", "content": texts[i]}],
               "max_tokens": args.max_tokens, "temperature": 1.0, "top_p": 1.0, "seed": i,
               "search": {"method": "vgs", "budget": 4, "beam_width": 2, "block_size": 32}}
              for i in range(args.requests)]

    def send(client: httpx.Client, body: dict) -> tuple[float, int]:
        t0 = time.perf_counter()
        r = client.post(url, json=body, timeout=600)
        r.raise_for_status()
        return time.perf_counter() - t0, int(r.json()["usage"]["completion_tokens"])

    def reset() -> None:
        run_sync(engines.policy.llm.reset_prefix_cache())
        engines.value.reset_prefix_cache()

    rows = []
    try:
        with httpx.Client() as client:
            send(client, bodies[0])  # warm-up (first requests pay one-time costs)
            reset()
            t0 = time.perf_counter()
            seq = [send(client, b) for b in bodies]
            seq_wall = time.perf_counter() - t0
        print(f"[server_load] sequential: {seq_wall:.1f} s", file=sys.stderr, flush=True)
        reset()
        with ThreadPoolExecutor(len(bodies)) as pool, httpx.Client(limits=httpx.Limits(max_connections=64)) as client:
            t0 = time.perf_counter()
            conc = list(pool.map(lambda b: send(client, b), bodies))
            conc_wall = time.perf_counter() - t0
    finally:
        handle.stop()
        state.grader.close()
        close_engines(engines)

    for name, res, wall in (("sequential", seq, seq_wall), ("concurrent", conc, conc_wall)):
        lat = np.array([r[0] for r in res])
        toks = sum(r[1] for r in res)
        rows.append({"models": args.models, "arm": name, "requests": len(res), "generated_tokens": toks, "wall_s": round(wall, 2),
                     "tokens_per_s": round(toks / wall, 1), "p50_latency_s": round(float(np.percentile(lat, 50)), 3),
                     "p95_latency_s": round(float(np.percentile(lat, 95)), 3)})
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    ratio = table.loc[1, "tokens_per_s"] / table.loc[0, "tokens_per_s"]
    print(f"concurrent_over_sequential_throughput: {ratio:.2f}")


if __name__ == "__main__":
    main()
