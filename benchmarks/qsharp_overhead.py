"""Decoding speed with Q♯ and CD guidance vs plain decoding, through the same vLLM engine.

    python -m benchmarks.qsharp_overhead [--batch 8 --max-tokens 96 --layers 2 --hidden 128 ...]

A tiny random policy and a tiny random value model of the same depth and width (real
151,936-token vocabulary; the value model, having no LM head, is about half the policy's
size) decode the same batch of real prompts (MATH-500 problems rendered with the chat
template) once per arm, repetition and top-p setting: plain, Q♯-guided and CD-guided (η = 0.1,
top-k = 20; `--methods`; CD runs the same value forward with a linear offset).
The runs alternate `--repeats` times (default 11, after one unrecorded warm-up) so load drift on a shared machine hits both
alike; the table gives min / median / max time per token per arm and each ratio is a ratio of
medians. Engine start and one warm-up round (which also loads the value model in the worker)
are excluded. Ends with `qsharp_over_plain_per_token: X` (time per generated token, guided /
plain, the worst over the methods and top-p settings); the goal is X <= 1.3. `--out DIR` also writes
DIR/qsharp_overhead.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from benchmarks.common import (add_bench_args, alternate, check_repeats, machine_info, print_machine,
                               print_spread, tiny_pair, write_result)
from vgs.assets import DATA_DIR as DEFAULT_DATA, TOKENIZER_DIR as DEFAULT_TOKENIZER, quiet_engines

quiet_engines()

METHODS = ("qsharp", "cd")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA))
    ap.add_argument("--workdir", default=None, help="where the tiny models go (default: a temp dir)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--value-layers", type=int, default=None, help="default: --layers")
    ap.add_argument("--value-hidden", type=int, default=None, help="default: --hidden")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--eta", type=float, default=0.1)
    ap.add_argument("--top-p", type=float, nargs="+", default=[0.95, 1.0],
                    help="sampling top-p values to time (vLLM's CPU top-p sorts the vocabulary: slow)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                    help="guidance methods timed against plain decoding (default: all)")
    ap.add_argument("--kv-cache-gib", type=float, default=1.0)
    add_bench_args(ap, repeats=11)  # short, noisy arms: more alternations (docs/benchmarks_speed.md)
    args = ap.parse_args(argv)
    check_repeats(ap, args.repeats, args.warmup)
    args.methods = list(dict.fromkeys(args.methods))  # `--methods cd cd` times CD once
    if args.batch < 1 or args.max_tokens < 1:
        ap.error("--batch and --max-tokens must be >= 1")
    return args


def load_prompts(args: argparse.Namespace, tokenizer) -> list[list[int]]:
    from vgs.eval.datasets import load_benchmark
    from vgs.prompts import prompt_ids

    problems = load_benchmark("math500", args.data_dir, limit=args.batch)
    return [prompt_ids(tokenizer, p.problem) for p in problems][: args.batch]


def param_count(path: str, value: bool) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        if value:
            from vgs.modeling import Qwen2ForClassifier

            m = Qwen2ForClassifier(cfg)
        else:
            m = AutoModelForCausalLM.from_config(cfg)
    return int(sum(p.numel() for p in m.parameters()))


def main(argv: list[str] | None = None) -> float:
    import pandas as pd

    from vgs.config import EngineConfig, SamplingConfig
    from vgs.engine import GenRequest, PolicyEngine
    from vgs.guidance.params import GuideParams

    args = parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="vgs-qsharp-bench-")
    timing = os.path.join(workdir, "guidance_timing.txt")
    os.environ["VGS_GUIDANCE_TIMING"] = timing  # read by the processor in the (spawned) worker
    policy_path, value_path = tiny_pair(workdir, args.tokenizer, args.layers, args.hidden, args.value_layers,
                                        args.value_hidden)
    n_policy, n_value = param_count(policy_path, False), param_count(value_path, True)
    if n_value > n_policy:
        raise SystemExit(f"value model ({n_value:,} params) must not be larger than the policy ({n_policy:,})")
    engine = PolicyEngine(EngineConfig(model=policy_path, kv_cache_gib=args.kv_cache_gib, max_model_len=4096))
    prompts = load_prompts(args, engine.tokenizer)
    # Times are per generated token, so a (rare) early EOS of the random policy biases nothing.
    guides = {m: GuideParams(m, value_path, args.eta, args.top_k).to_extra_args() for m in args.methods}

    def engine_cpu_seconds() -> float:
        """CPU time of this process and the engine processes it spawned (user + system)."""
        import psutil

        procs = [psutil.Process()] + psutil.Process().children(recursive=True)
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def run(method: str | None, max_tokens: int, top_p: float) -> dict:
        sampling = SamplingConfig(temperature=0.6, top_p=top_p, max_tokens=max_tokens, seed=0)
        reqs = [GenRequest(p, max_tokens, seed=i, extra_args=dict(guides[method]) if method else None)
                for i, p in enumerate(prompts)]
        open(timing, "w").close()
        c0, t0 = engine_cpu_seconds(), time.perf_counter()
        outs = engine.generate(reqs, sampling)
        secs, cpu = time.perf_counter() - t0, engine_cpu_seconds() - c0
        with open(timing) as f:  # per guided step: rows, seconds, top-k seconds, value-forward seconds
            steps = [[float(x) for x in line.split()[1:4]] for line in f if line.strip()]
        part = lambda j: sum(st[j] for st in steps if len(st) > j)  # noqa: E731
        return {"seconds": secs, "tokens": sum(len(o[0].token_ids) for o in outs), "cpu_seconds": cpu,
                "guidance_seconds": part(0), "topk_seconds": part(1), "forward_seconds": part(2),
                "guided_steps": len(steps)}

    run(None, 8, 1.0)  # warm-up: first-call allocations in the worker
    for m in args.methods:
        run(m, 8, 1.0)  # warm-up: loads the value model in the worker
    machine = machine_info()
    print_machine(machine)

    def arm(method: str | None, top_p: float):
        def once(rep: int) -> dict:
            r = run(method, args.max_tokens, top_p)
            n = max(1, r["guided_steps"])
            return {**r, "ms_per_token": 1000 * r["seconds"] / max(1, r["tokens"]),
                    "cpu_ms_per_token": 1000 * r["cpu_seconds"] / max(1, r["tokens"]),
                    "guidance_ms_per_step": 1000 * r["guidance_seconds"] / n,
                    "topk_ms_per_step": 1000 * r["topk_seconds"] / n,
                    "value_forward_ms_per_step": 1000 * r["forward_seconds"] / n,
                    "other_guidance_ms_per_step": 1000 * (r["guidance_seconds"] - r["topk_seconds"]
                                                          - r["forward_seconds"]) / n}
        return once

    names = {(top_p, mode): f"{mode} top_p={top_p}" for top_p in args.top_p for mode in ("plain", *args.methods)}
    try:
        runs = alternate({names[k]: arm(None if k[1] == "plain" else k[1], k[0]) for k in names}, args.repeats,
                         label="qsharp_overhead", warmup=args.warmup)
    finally:
        engine.close()
    prompt_lens = [len(p) for p in prompts]
    print(f"policy {n_policy:,} params ({args.layers} layers, hidden {args.hidden}); value {n_value:,} params; "
          f"batch {len(prompts)}, prompts {min(prompt_lens)}-{max(prompt_lens)} tokens, {args.max_tokens} new tokens, "
          f"temperature 0.6, top-k {args.top_k}, eta {args.eta}, methods {' '.join(args.methods)}, "
          f"{args.repeats} alternations")
    print_spread(runs, "ms_per_token", list(names.values()))
    med = pd.DataFrame(runs.records).groupby("arm", sort=False).median(numeric_only=True)
    with pd.option_context("display.float_format", "{:.3f}".format):
        print(med[["tokens", "seconds", "cpu_ms_per_token", "guidance_ms_per_step", "topk_ms_per_step",
                   "value_forward_ms_per_step", "other_guidance_ms_per_step"]].to_string())
    ratios, spreads = {}, {}
    for top_p in args.top_p:
        for method in args.methods:
            g, p = names[(top_p, method)], names[(top_p, "plain")]
            ratios[g] = runs.ratio(g, p, "ms_per_token")
            spreads[g] = runs.ratio_spread(g, p, "ms_per_token")
            cpu = runs.ratio(g, p, "cpu_ms_per_token")
            print(f"top_p={top_p}: {method} / plain time per token {ratios[g]:.3f} (median; per alternation "
                  f"{spreads[g][0]:.3f} .. {spreads[g][1]:.3f}; engine CPU time: {cpu:.3f})")
    # The headline is the worst case over the methods and sampling settings timed (top-p = 1
    # skips vLLM's costly vocabulary sort, so guidance is the largest share of the step there).
    worst = max(ratios, key=ratios.get)
    print(f"worst: {worst}")
    write_result(args.out, "qsharp_overhead", "qsharp_over_plain_per_token", ratios[worst], goal="<= 1.3",
                 spread=spreads[worst], runs=runs, machine=machine,
                 extra={"worst_arm": worst, "per_arm": ratios,
                        "per_top_p": {str(t): max(ratios[names[(t, m)]] for m in args.methods) for t in args.top_p}})
    return ratios[worst]


if __name__ == "__main__":
    main()
