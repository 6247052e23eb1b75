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
Each arm runs `--repeats` times (default 5, after one unrecorded warm-up) alternately in this process (load on a shared
machine hits both alike); the table gives min / median / max time per generated token and
the result is the ratio of the medians. Ends with `vgs_over_sampling_per_token: X`; the goal is
X <= 1.15 (moonshot 1.05). `--out DIR` also writes DIR/search_overhead.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.common import (add_bench_args, alternate, check_repeats, machine_info, print_machine,
                               engine_masks_text, print_spread, tiny_pair, write_result)
from vgs.assets import DATA_DIR, TOKENIZER_DIR, quiet_engines

quiet_engines()


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=8)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--tokenizer", default=str(TOKENIZER_DIR))
    ap.add_argument("--data-dir", default=str(DATA_DIR))
    add_bench_args(ap, repeats=5)
    args = ap.parse_args(argv)
    check_repeats(ap, args.repeats, args.warmup)

    from vgs.config import EngineConfig, SamplingConfig, SearchConfig
    from vgs.eval.datasets import load_benchmark
    from vgs.prompts import prompt_ids
    from vgs.runtime import build_engines, close_engines
    from vgs.search import Engines, run_search

    tmp = Path(tempfile.mkdtemp(prefix="vgs-bench-"))
    policy_dir, value_dir = tiny_pair(str(tmp), args.tokenizer, args.layers, args.hidden)
    # The product's own set-up (per-engine core masks on a small CPU), as `vgs serve` / `vgs search` get it.
    engines = build_engines(EngineConfig(model=policy_dir, tokenizer=args.tokenizer, kv_cache_gib=1.0,
                                         max_model_len=2048),
                            value_dir, needs_scorer=True,
                            value_engine={"kv_cache_gib": 1.0, "max_model_len": 2048})
    policy, value = engines.policy, engines.value
    machine = machine_info(engine_core_masks=engine_masks_text())
    print_machine(machine)

    problems = load_benchmark("aime24", args.data_dir)[: args.problems]
    prompts = [prompt_ids(policy.tokenizer, p.problem) for p in problems]
    sampling = SamplingConfig(max_tokens=256, temperature=1.0, top_p=1.0)
    vgs_arm, sample_arm = "vgs (N=8, w=2, block 64)", "sampling (n=8)"
    configs = {
        vgs_arm: SearchConfig(method="vgs", budget=8, beam_width=2, block_size=64, trees=1),
        sample_arm: SearchConfig(method="sample", n=8),
    }
    # plain sampling does not touch the value model (no scoring of its samples)
    arm_engines = {vgs_arm: engines, sample_arm: Engines(policy, None)}
    for name, cfg in configs.items():  # warm-up both paths once (first calls allocate and fill caches)
        run_search(prompts[:1], [99], arm_engines[name], cfg, SamplingConfig(max_tokens=64, temperature=1.0, top_p=1.0))

    def arm(name: str):
        def once(rep: int) -> dict:
            value.reset_prefix_cache()
            base = 1000 * rep if rep >= 0 else 10**6 - 1000 * rep  # warm-ups (rep < 0): seeds of their own
            seeds = [base + i for i in range(len(prompts))]
            t0 = time.perf_counter()
            results = run_search(prompts, seeds, arm_engines[name], configs[name], sampling)
            wall = time.perf_counter() - t0
            toks = sum(r.compute.policy_tokens for r in results)
            return {"wall_s": wall, "generated_tokens": toks,
                    "value_tokens": sum(r.compute.value_tokens for r in results),
                    "ms_per_token": 1000 * wall / max(1, toks)}
        return once

    try:
        runs = alternate({name: arm(name) for name in configs}, args.repeats, label="search_overhead",
                    warmup=args.warmup)
    finally:
        close_engines(engines)
    print(f"{args.problems} AIME 2024 problems, tiny pair ({args.layers} layers, hidden {args.hidden}), "
          f"{args.repeats} alternations (taken on a shared machine: ratios, not absolute numbers)")
    print_spread(runs, "ms_per_token", [vgs_arm, sample_arm])
    x = runs.ratio(vgs_arm, sample_arm, "ms_per_token")
    write_result(args.out, "search_overhead", "vgs_over_sampling_per_token", x, goal="<= 1.15 (moonshot 1.05)",
                 spread=runs.ratio_spread(vgs_arm, sample_arm, "ms_per_token"), runs=runs, machine=machine)
    return x


if __name__ == "__main__":
    main()
