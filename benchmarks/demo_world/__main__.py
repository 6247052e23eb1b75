"""`make demo`: search methods on the demo world's held-out split at equal generation budget.

    python -m benchmarks.demo_world [--problems 200] [--n 16] [--out runs/demo_world]

Runs the shipped pair (`models/policy`, `models/value`; rebuild with
`python -m benchmarks.demo_world.build --force`) through the project's own search code
(`vgs.search.run_search`) and grading (`vgs.eval.runner.grade_results`):

- one set of N independent samples per problem (temperature 1), scored by the value model:
  pass@1, majority vote, best-of-N and weighted majority all read it;
- VGS: block-wise beam search, one block = one step line (6 tokens), beam width 2, DVTS trees,
  at total budgets 2..N (budget x trees generations, the same count as N samples);
- Q#: N value-guided samples, majority vote.

It prints a table (accuracy with 95% CIs over problems, generated tokens, value-model tokens
and FLOPs per problem), how often some sample is right (what a selection can reach), writes `accuracy_vs_budget.png`, and ends with the paired differences against majority vote
(same problems, same budget). Each run's rows are appended to `OUT/<run>/samples.jsonl` as they
finish; a re-run resumes.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import asdict

from vgs.assets import REPO, quiet_engines

quiet_engines()

from benchmarks.demo_world import POLICY_DIR, VALUE_DIR, task  # noqa: E402
from vgs.errors import VGSError  # noqa: E402

DEV_SEED = 99  # `--split dev`: train-split problems of their own seed, for checks before held-out
BLOCK = 6  # tokens in one step line "a+b=c\n": VGS selects after every step
MAX_TOKENS = 48  # 6 steps x 6 + `\boxed{d}` + EOS = 40, with room to spare


def vgs_config(total: int):
    """VGS at `total` generations per problem: beam width 2, 2 beams per tree (budget 4) and
    total/4 DVTS trees; total 2 is one tree of budget 2."""
    from vgs.config import SearchConfig

    if total < 4:
        return SearchConfig(method="vgs", budget=2, beam_width=2, block_size=BLOCK, trees=1).validate()
    return SearchConfig(method="vgs", budget=4, beam_width=2, block_size=BLOCK, trees=total // 4).validate()


def budgets(n: int) -> list[int]:
    out, k = [], 2
    while k < n:
        out.append(k)
        k *= 2
    return out + [n]


def run_method(name: str, search, problems, engines, sampling, out_dir: str, seed: int, batch: int = 100) -> list[dict]:
    """Run (or resume) one method over the problems; returns the graded rows in problem order."""
    from tqdm import tqdm

    from vgs.eval.runner import ResultsFile, WorkItem, grade_results
    from vgs.grading import Grader
    from vgs.prompts import prompt_ids
    from vgs.search import derive_seed, run_search

    results = ResultsFile(os.path.join(out_dir, name))
    done = results.done()
    todo = [WorkItem(p, 0, derive_seed(seed, p.benchmark, p.id, 0)) for p in problems
            if ResultsFile.key(p.benchmark, p.id, 0) not in done]
    tok = engines.policy.tokenizer
    if todo:
        with Grader() as grader, tqdm(total=len(problems), initial=len(problems) - len(todo), desc=name,
                                      unit="prob", dynamic_ncols=True) as bar:
            for i in range(0, len(todo), batch):
                chunk = todo[i: i + batch]
                prompts = [prompt_ids(tok, it.problem.problem) for it in chunk]
                t0 = time.time()
                res = run_search(prompts, [it.seed for it in chunk], engines, search, sampling)
                rows = grade_results(chunk, res, tok, grader, search.method, save_text=True)
                for r in rows:
                    r["seconds"] = (time.time() - t0) / len(chunk)
                    r["search"] = asdict(search)
                results.append(rows)
                bar.update(len(chunk))
    wanted = {p.id for p in problems}
    by_id = {r["problem_id"]: r for r in results.iter_rows() if r["problem_id"] in wanted}
    return [by_id[p.id] for p in problems]


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a - b over problems and the half-width of its 95% CI, in percentage points."""
    import numpy as np

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return 100 * float(d.mean()), 100 * float(half)


def mean_ci(xs: list[float]) -> tuple[float, float]:
    from vgs.grading import mean_ci as mc

    m, h = mc([[x] for x in xs])
    return 100 * m, 100 * h


def models_fingerprint(*dirs: str) -> str:
    """8 hex digits of the models' weights: results of different models go to different folders."""
    import hashlib

    h = hashlib.sha256()
    for d in dirs:
        with open(os.path.join(d, "model.safetensors"), "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()[:8]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.demo_world", description=__doc__.split("\n\n")[0])
    p.add_argument("--problems", type=int, default=200, help="problems of --split")
    p.add_argument("--split", choices=("heldout", "dev"), default="heldout",
                   help="heldout (the report) or dev: train-split problems (seed %d, none of the build's) to "
                        "check settings on without ever looking at held-out" % DEV_SEED)
    p.add_argument("--n", type=int, default=16, help="generation budget per problem (a power of two >= 4)")
    p.add_argument("--out", default="runs/demo_world")  # relative to the current directory
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-qsharp", dest="qsharp", action="store_false", help="skip Q#")
    p.add_argument("--policy", default=str(POLICY_DIR))
    p.add_argument("--value-model", default=str(VALUE_DIR))
    args = p.parse_args(argv)
    try:
        if args.n < 4 or args.n & (args.n - 1):
            raise VGSError(f"--n must be a power of two >= 4, got {args.n}")
        if args.problems < 2:
            raise VGSError(f"--problems must be >= 2, got {args.problems}")
        for path, what in ((args.policy, "policy"), (args.value_model, "value model")):
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise VGSError(f"demo {what} missing at {path}; build it with `python -m benchmarks.demo_world.build`")
        return evaluate(args)
    except VGSError as exc:
        print(f"demo_world: error: {exc}", file=sys.stderr)
        return 2


def evaluate(args) -> int:
    import pandas as pd

    from vgs.eval.report import budget_curve
    from vgs.config import EngineConfig, SamplingConfig, SearchConfig
    from vgs.engine import PolicyEngine
    from vgs.search import Engines
    from vgs.value import make_value_scorer

    t_start = time.time()
    out = os.path.join(args.out, f"{args.split}{args.problems}-n{args.n}-seed{args.seed}")
    out += "-" + models_fingerprint(args.policy, args.value_model)  # a rebuilt pair never resumes old rows
    problems = (task.make_split("heldout", args.problems, seed=0) if args.split == "heldout"
                else task.make_split("train", args.problems, seed=DEV_SEED))
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, max_tokens=MAX_TOKENS, seed=args.seed).validate()
    print(f"demo_world: {len(problems)} {args.split} problems, budget {args.n} generations per problem, "
          f"policy {args.policy}, value model {args.value_model}", flush=True)
    policy = PolicyEngine(EngineConfig(model=args.policy, kv_cache_gib=0.25, max_model_len=256, seed=args.seed))
    value = make_value_scorer(args.value_model, backend="vllm", tokenizer=args.policy, kv_cache_gib=0.25,
                              max_model_len=256)
    engines = Engines(policy=policy, value=value, value_model=args.value_model)
    try:
        runs = {"sampling": run_method("sampling", SearchConfig(method="weighted_majority", n=args.n).validate(),
                                       problems, engines, sampling, out, args.seed)}
        for k in budgets(args.n):
            runs[f"vgs{k}"] = run_method(f"vgs{k}", vgs_config(k), problems, engines, sampling, out, args.seed)
        if args.qsharp:
            runs["qsharp"] = run_method("qsharp", SearchConfig(method="qsharp", n=args.n).validate(),
                                        problems, engines, sampling, out, args.seed)
    finally:
        value.close()
        policy.close()

    samp, vgs = runs["sampling"], runs[f"vgs{args.n}"]

    def cost(rows, share: float = 1.0) -> dict:
        c = [r["compute"] for r in rows]
        return {"gen tokens/problem": share * sum(x["policy_tokens"] for x in c) / len(c),
                "value tokens/problem": sum(x.get("value_tokens", 0) for x in c) / len(c),
                "GFLOPs/problem": sum(x["total_flops"] for x in c) / len(c) / 1e9}

    table = []

    def add(name: str, scores: list[float], budget: int, compute: dict) -> None:
        m, h = mean_ci(scores)
        table.append({"method": name, "budget": budget, "accuracy %": f"{m:5.1f} ± {h:4.1f}", **compute})

    samp_cost = cost(samp)
    add("pass@1 (sampling)", [r["metrics"]["pass1"] for r in samp], 1,
        cost(samp, 1 / args.n) | {"value tokens/problem": 0.0, "GFLOPs/problem": samp_cost["GFLOPs/problem"] / args.n})
    add("majority vote", [r["metrics"]["maj"] for r in samp], args.n, samp_cost | {"value tokens/problem": 0.0})
    add("best-of-N", [r["metrics"]["bon"] for r in samp], args.n, samp_cost)
    add("weighted majority", [r["metrics"]["wmaj"] for r in samp], args.n, samp_cost)
    add("VGS (DVTS)", [r["metrics"]["wmaj"] for r in vgs], args.n, cost(vgs))
    if "qsharp" in runs:
        add("Q# + majority", [r["metrics"]["maj"] for r in runs["qsharp"]], args.n, cost(runs["qsharp"]))
    df = pd.DataFrame(table)
    print()
    print(df.to_string(index=False, float_format=lambda x: f"{x:,.1f}"))
    df.to_csv(os.path.join(out, "table.csv"), index=False)
    print("(majority vote's GFLOPs leave out the value model it does not need; accuracy CIs: 95% over problems)")

    # what search can reach: some sample is right, but the majority is a systematic error
    cover = 100 * sum(r["metrics"]["pass_n"] for r in samp) / len(samp)
    print(f"\nsome of the {args.n} samples right (the ceiling for any selection): {cover:.1f}% of problems")

    # accuracy vs budget
    curve = budget_curve(samp, SearchConfig(method="weighted_majority", n=args.n))
    vgs_points = [(k, 100 * sum(r["metrics"]["wmaj"] for r in runs[f"vgs{k}"]) / len(problems)) for k in budgets(args.n)]
    png = os.path.join(out, "accuracy_vs_budget.png")
    plot(curve, vgs_points, png, args.split)
    print(f"\nplot: {png}")

    d_vgs = paired([r["metrics"]["wmaj"] for r in vgs], [r["metrics"]["maj"] for r in samp])
    d_wmv = paired([r["metrics"]["wmaj"] for r in samp], [r["metrics"]["maj"] for r in samp])
    print(f"total time {time.time() - t_start:.0f} s")
    print(f"vgs_minus_majority_accuracy: {d_vgs[0]:+.1f} (95% CI ± {d_vgs[1]:.1f} pp, paired over {len(problems)} "
          f"{args.split} problems, budget {args.n})")
    print(f"wmv_minus_majority_accuracy: {d_wmv[0]:+.1f} (95% CI ± {d_wmv[1]:.1f} pp, paired over {len(problems)} "
          f"{args.split} problems, budget {args.n})")
    return 0


def plot(curve, vgs_points: list[tuple[int, float]], path: str, split: str = "heldout") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vgs.eval.report import save_budget_plot

    names = {"maj": "majority vote", "wmaj": "weighted majority", "bon": "best-of-N"}
    fig, ax = plt.subplots(figsize=(6, 4))
    for metric, label in names.items():
        g = curve[curve["metric"] == metric].sort_values("budget")
        if len(g):
            ax.plot(g["budget"], g["accuracy"], marker="o", label=label)
    ax.plot([k for k, _ in vgs_points], [a for _, a in vgs_points], marker="s", label="VGS (DVTS)")
    ax.set_title("demo world")
    save_budget_plot(fig, ax, path, f"accuracy (%), {'held-out' if split == 'heldout' else split} split")


if __name__ == "__main__":
    sys.exit(main())
