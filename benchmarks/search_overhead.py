"""Search overhead of VGS over plain sampling, per generated token.

    python -m benchmarks.search_overhead [--problems 8 --layers 2 --hidden 128]

Same problems (real AIME 2024 prompts), same tiny policy and value model (real vocabulary,
head size 64), measured side by side in one process with one policy engine and one value
engine:

  (a) VGS: budget 8, beam width 2 (4 beams), block 64, max 256 tokens — 4 rounds per problem,
      all problems concurrently on the async core (one vLLM request per beam per round, value
      calls coalesced across problems);
  (b) plain sampling: n = 8, max 256 tokens — one vLLM request per problem.

A random tiny model rarely emits EOS, so both arms generate close to the same number of
tokens; the ratio is per generated token anyway.
Each arm runs `--repeats` times (default 1) alternately and the fastest run counts (load on a shared
machine hits both alike). Ends with `vgs_over_sampling_per_token: X`; the goal is X <= 1.15.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from vgs.assets import DATA_DIR, TOKENIZER_DIR, quiet_engines

quiet_engines()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=8)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--tokenizer", default=str(TOKENIZER_DIR))
    ap.add_argument("--data-dir", default=str(DATA_DIR))
    args = ap.parse_args()

    import pandas as pd

    from vgs.eval.datasets import load_benchmark
    from vgs.config import EngineConfig, SamplingConfig, SearchConfig
    from vgs.engine import PolicyEngine
    from vgs.prompts import prompt_ids
    from vgs.search import Engines, run_search
    from vgs.tiny import make_tiny
    from vgs.value import VllmValueScorer

    tmp = Path(tempfile.mkdtemp(prefix="vgs-bench-"))
    policy_dir = make_tiny("policy", args.tokenizer, str(tmp / "policy"), layers=args.layers, hidden=args.hidden, seed=0)
    value_dir = make_tiny("value", args.tokenizer, str(tmp / "value"), layers=args.layers, hidden=args.hidden, seed=1)
    policy = PolicyEngine(EngineConfig(model=policy_dir, kv_cache_gib=1.0, max_model_len=2048))
    value = VllmValueScorer(EngineConfig(model=value_dir, tokenizer=args.tokenizer, kv_cache_gib=1.0, max_model_len=2048))
    engines = Engines(policy, value, value_dir)

    problems = load_benchmark("aime24", args.data_dir)[: args.problems]
    prompts = [prompt_ids(policy.tokenizer, p.problem) for p in problems]
    sampling = SamplingConfig(max_tokens=256, temperature=1.0, top_p=1.0)
    arms = {
        "vgs (N=8, w=2, block 64)": SearchConfig(method="vgs", budget=8, beam_width=2, block_size=64, trees=1),
        "sampling (n=8)": SearchConfig(method="sample", n=8),
    }
    # warm-up both paths once (first calls allocate and fill caches)
    for cfg in arms.values():
        run_search(prompts[:1], [99], engines if cfg.method == "vgs" else Engines(policy, None), cfg, SamplingConfig(max_tokens=64, temperature=1.0, top_p=1.0))

    best: dict[str, dict] = {}
    for rep in range(args.repeats):
        for name, cfg in arms.items():
            value.reset_prefix_cache()
            seeds = [1000 * rep + i for i in range(len(prompts))]
            t0 = time.perf_counter()
            # plain sampling does not touch the value model (no scoring of its samples)
            arm_engines = engines if cfg.method == "vgs" else Engines(policy, None)
            results = run_search(prompts, seeds, arm_engines, cfg, sampling)
            wall = time.perf_counter() - t0
            toks = sum(r.compute.policy_tokens for r in results)
            rec = {"method": name, "wall_s": wall, "generated_tokens": toks,
                   "value_tokens": sum(r.compute.value_tokens for r in results),
                   "ms_per_token": 1000 * wall / max(1, toks)}
            if name not in best or rec["ms_per_token"] < best[name]["ms_per_token"]:
                best[name] = rec
    df = pd.DataFrame(list(best.values()))
    base = df.loc[df["method"].str.startswith("sampling"), "ms_per_token"].item()
    df["per_token_vs_sampling"] = df["ms_per_token"] / base
    print(df.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    x = df.loc[df["method"].str.startswith("vgs"), "per_token_vs_sampling"].item()
    print(f"vgs_over_sampling_per_token: {x:.3f}")
    value.close()
    policy.close()


if __name__ == "__main__":
    main()
