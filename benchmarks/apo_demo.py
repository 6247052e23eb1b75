"""A*-PO on the demo world: does RL raise held-out accuracy over pi_ref, and at what KL?

    python -m benchmarks.apo_demo --out runs/apo_demo            # stage 1, stage 2, evaluation

1. stage 1 (`vgs apo-vstar`'s `estimate`): 8 samples per training problem from pi_ref (the
   shipped demo policy, `benchmarks/demo_world/models/policy`), V* at beta1 = 0.5;
2. stage 2 (`python -m value_models.apo`, a subprocess, resumable): `--steps` A*-PO steps;
3. evaluation on held-out problems (the task's hash split, never seen in training), for pi_ref
   and the trained policy, side by side: accuracy of `--eval-samples` samples per problem at
   temperature 1 (the distribution RL optimises) and of greedy decoding, each with its 95% CI
   (`vgs.grading.mean_ci`), the paired difference with its CI, and KL(pi || pi_ref) estimated
   on the policy's own held-out samples (sum over tokens of log pi - log pi_ref, transformers).

Every stage resumes: re-running the command continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from vgs.assets import quiet_engines

quiet_engines()


def write_problems(problems, path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        for p in problems:
            f.write(json.dumps({"id": p.id, "problem": p.problem, "answer": p.answer}) + "\n")
    os.replace(path + ".tmp", path)
    return path


def sample_eval(model: str, problems, k: int, max_tokens: int, kv_gib: float, seed: int = 1234):
    """[P x k] sampled rewards (temperature 1), [P] greedy rewards, and the sampled token ids."""
    import numpy as np

    from value_models.apo_vstar import grade_responses
    from value_models.collect import item_seed
    from vgs.config import EngineConfig, SamplingConfig
    from vgs.engine import GenRequest, PolicyEngine
    from vgs.prompts import load_tokenizer, prompt_ids

    tok = load_tokenizer(model)
    prompts = [prompt_ids(tok, p.problem) for p in problems]
    answers = [p.answer for p in problems]
    engine = PolicyEngine(EngineConfig(model=model, kv_cache_gib=kv_gib, max_model_len=256), logits_processors=[])
    try:
        outs = engine.generate([GenRequest(ids, max_tokens, n=k, seed=item_seed(seed, p.id)) for ids, p in
                                zip(prompts, problems)], SamplingConfig(temperature=1.0, top_p=1.0, max_tokens=max_tokens))
        flat = [s for o in outs for s in o]
        sampled, _ = grade_responses(tok, [a for a in answers for _ in range(k)], flat)
        greedy_out = engine.generate([GenRequest(ids, max_tokens) for ids in prompts],
                                     SamplingConfig(temperature=0.0, top_p=1.0, max_tokens=max_tokens))
        greedy, _ = grade_responses(tok, answers, [o[0] for o in greedy_out])
    finally:
        engine.close()
    return (np.asarray(sampled).reshape(len(problems), k), np.asarray(greedy), prompts,
            [[list(s.token_ids) for s in o] for o in outs], [[s.stopped for s in o] for o in outs])


def kl_to_ref(policy: str, ref: str, prompts, responses) -> "list[float]":
    """Per-sample sum_t log pi(y_t) - log pi_ref(y_t) on the policy's own samples: an unbiased
    estimate of the sequence-level KL(pi || pi_ref)."""
    import torch

    from value_models.apo import _module, collate, load_causal_lm, sequence_sums

    LP = _module()
    out = []
    models = [LP(load_causal_lm(m, m).eval(), 512) for m in (policy, ref)]
    flat = [(p, r) for p, rs in zip(prompts, responses) for r in rs]
    with torch.no_grad():
        for s in range(0, len(flat), 64):
            b = collate([p for p, _ in flat[s: s + 64]], [r for _, r in flat[s: s + 64]], pad_id=0)
            lp = [sequence_sums(m(b.input_ids, b.attention_mask, b.rows, b.cols, b.targets)[0], b) for m in models]
            out += (lp[0] - lp[1]).tolist()
    return out


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import pandas as pd

    from benchmarks.demo_world import POLICY_DIR, task
    from value_models.apo_vstar import VStarConfig, estimate
    from vgs.grading import mean_ci

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/apo_demo")
    ap.add_argument("--policy", default=str(POLICY_DIR), help="pi_ref (default: the shipped demo policy)")
    ap.add_argument("--train-problems", type=int, default=512)
    ap.add_argument("--heldout-problems", type=int, default=300)
    ap.add_argument("--samples", type=int, default=8, help="stage-1 samples per problem")
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--mini-batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-5,
                    help="published 1e-6 is for 1.5B-7B models and 725 steps; 2e-4 collapsed here after ~45 steps")
    ap.add_argument("--beta2", type=float, default=1e-3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--eval-samples", type=int, default=8)
    ap.add_argument("--kv-cache-gib", type=float, default=0.25)
    args = ap.parse_args(argv)
    t0 = time.time()
    out = os.path.abspath(args.out)
    train = write_problems(task.make_split("train", args.train_problems, seed=0), os.path.join(out, "train.jsonl"))
    heldout = task.make_split("heldout", args.heldout_problems, seed=0)
    # 1. V* under pi_ref
    estimate(VStarConfig(problems=train, ref=args.policy, out=os.path.join(out, "vstar"),
                         samples_per_problem=args.samples, max_tokens=args.max_tokens, kv_cache_gib=args.kv_cache_gib,
                         max_model_len=256, chunk_size=256))
    t1 = time.time()
    # 2. A*-PO
    run = os.path.join(out, "apo")
    cmd = [sys.executable, "-m", "value_models.apo", "--data", os.path.join(out, "vstar"), "--init", args.policy,
           "--out", run, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--mini-batch-size", str(args.mini_batch_size), "--micro-batch-size", str(args.mini_batch_size),
           "--lr", str(args.lr), "--beta2", str(args.beta2), "--max-tokens", str(args.max_tokens),
           "--kv-cache-gib", str(args.kv_cache_gib), "--max-model-len", "256", "--save-every", "50", "--resume"]
    print("[apo_demo] " + " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        print("[apo_demo] stage 2 failed", file=sys.stderr)
        return 1
    t2 = time.time()
    trained = os.path.join(run, "final")
    # 3. held-out evaluation, both models in one run
    res = {}
    for name, model in (("pi_ref", args.policy), ("A*-PO", trained)):
        res[name] = sample_eval(model, heldout, args.eval_samples, args.max_tokens, args.kv_cache_gib)
    kl = {"pi_ref": [0.0], "A*-PO": kl_to_ref(trained, args.policy, res["A*-PO"][2], res["A*-PO"][3])}
    rows = []
    for name, (sampled, greedy, _, resp, fin) in res.items():
        m, h = mean_ci(sampled)
        g, gh = mean_ci(greedy)
        km, kh = mean_ci(np.asarray(kl[name])) if len(kl[name]) > 1 else (0.0, 0.0)
        rows.append({"policy": name, "acc@T=1": f"{m:.3f} ± {h:.3f}", "greedy acc": f"{g:.3f} ± {gh:.3f}",
                     "KL(pi||pi_ref)": f"{km:.3f} ± {kh:.3f}",
                     "len": f"{np.mean([len(x) for r in resp for x in r]):.1f}",
                     "finished": f"{np.mean([f for r in fin for f in r]):.3f}"})
    diff_s = res["A*-PO"][0].mean(1) - res["pi_ref"][0].mean(1)  # paired by problem
    diff_g = res["A*-PO"][1] - res["pi_ref"][1]
    ds, dsh = mean_ci(diff_s)
    dg, dgh = mean_ci(diff_g)
    rows.append({"policy": "difference (paired)", "acc@T=1": f"{ds:+.3f} ± {dsh:.3f}", "greedy acc": f"{dg:+.3f} ± {dgh:.3f}",
                 "KL(pi||pi_ref)": "", "len": "", "finished": ""})
    table = pd.DataFrame(rows).set_index("policy")
    with open(os.path.join(run, "apo_log.csv")) as f:
        log = pd.read_csv(f)
    print(f"\nA*-PO on the demo world: {args.train_problems} train problems, {args.steps} steps x {args.batch_size} "
          f"prompts, lr {args.lr}, beta2 {args.beta2}; held-out: {len(heldout)} problems x {args.eval_samples} samples "
          f"(95% CI; difference CI is paired by problem)\n")
    print(table.to_string())
    first, last = log.head(20), log.tail(20)
    print(f"\ntraining reward (first/last 20 steps): {first.reward.mean():.3f} -> {last.reward.mean():.3f}; "
          f"KL estimate {last.kl.mean():.3f}; entropy {first.entropy.mean():.3f} -> {last.entropy.mean():.3f}")
    print(f"weight sync (bf16/fp32 staging in /dev/shm + vLLM reload): median {log.sync_s.median():.3f} s per step "
          f"(max {log.sync_s.max():.3f}); step median {log.step_s.median():.2f} s")
    print(f"time: stage 1 {t1 - t0:.0f} s, stage 2 {t2 - t1:.0f} s, eval {time.time() - t2:.0f} s")
    table.to_csv(os.path.join(out, "result.csv"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
