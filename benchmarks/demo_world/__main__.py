"""`make demo`: search methods on the demo world's held-out problems at equal generation budget,
over several independent problem sets.

    python -m benchmarks.demo_world [--seeds 3] [--problems 200] [--n 16] [--out runs/demo_world]

Runs the shipped pair (`models/policy`, `models/value`; rebuild with
`python -m benchmarks.demo_world.build --force`) through the project's own search code
(`vgs.search.run_search`) and grading (`vgs.eval.runner.grade_results`). Per problem set
(`--seeds K` sets of `--problems` held-out problems each, disjoint from each other and, by
the hash split, from every train problem; the sets start at seed FIRST_HELDOUT_SEED, never
evaluated during development):

- one set of N independent samples per problem (temperature 1), scored by the value model:
  pass@1, majority vote, best-of-N and weighted majority at every budget 2..N all read it
  (random k-subsets);
- VGS: block-wise beam search, beam width 2, at budget 2 (one tree) and N (N/4 DVTS trees of
  budget 4; budgets 4..N/2 are its k-tree subsets, `analysis`), with one block = one step line
  (6 tokens) and with blocks that do not align with step lines (`--blocks 6,4,9`);
- Q#: N value-guided samples, majority vote at every budget.

It prints each seed's and the pooled accuracy of every method at every budget (95% CIs over
problems), generated tokens, value-model tokens and FLOPs per problem, how often some sample
is right, how VGS's pooled vote grows with trees, writes `table.csv` and
`accuracy_vs_budget.png` (CI bands), and ends with the pooled paired differences (same
problems, budget N). Each run's rows are appended to `OUT/.../seed<S>/<run>/samples.jsonl` as
they finish; a re-run resumes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict

from vgs.assets import quiet_engines

quiet_engines()

from benchmarks.demo_world import POLICY_DIR, VALUE_DIR, analysis, task  # noqa: E402
from vgs.errors import VGSError  # noqa: E402

DEV_SEED = 99  # `--split dev`: train-split problems of their own seeds (99, 100, ...), for checks before held-out
# Held-out seeds 0 and 1 were evaluated while the world and the value model were developed
# (docs/demo_world.md, "History"); the report's sets start here.
FIRST_HELDOUT_SEED = 10
BLOCK = 6  # tokens in one step line "a+b=c\n": VGS selects after every step
ABLATION_BLOCKS = (4, 9)  # blocks that cut step lines
MAX_TOKENS = 48  # 6 steps x 6 + `\boxed{d}` + EOS = 40, with room to spare


def vgs_config(total: int, block: int = BLOCK):
    """VGS at `total` generations per problem: beam width 2, 2 beams per tree (budget 4) and
    total/4 DVTS trees; total 2 is one tree of budget 2."""
    from vgs.config import SearchConfig

    if total < 4:
        return SearchConfig(method="vgs", budget=2, beam_width=2, block_size=block, trees=1).validate()
    return SearchConfig(method="vgs", budget=4, beam_width=2, block_size=block, trees=total // 4).validate()


def problem_sets(split: str, seeds: list[int], n: int):
    """`n` problems per seed, no problem in two sets (the first seed's set is `make_split`'s own)."""
    seen: set[str] = set()
    out = {}
    for s in seeds:
        name = "heldout" if split == "heldout" else "train"
        pool = task.make_split(name, n + 50, seed=s)
        chosen = [p for p in pool if p.problem not in seen][:n]
        seen.update(p.problem for p in chosen)
        out[s] = chosen
    return out


def run_method(name: str, search, problems, engines: "LazyEngines", sampling, out_dir: str, seed: int, batch: int = 100) -> list[dict]:
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
    if todo:
        engines = engines.get()
        tok = engines.policy.tokenizer
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


class LazyEngines:
    """The policy and value engines, started on first use: a re-run whose rows are all stored
    only reports (an engine start takes minutes on a busy 2-core machine)."""

    def __init__(self, args):
        self.args, self._engines = args, None

    def get(self):
        if self._engines is None:
            from vgs.config import EngineConfig
            from vgs.engine import PolicyEngine
            from vgs.search import Engines
            from vgs.value import make_value_scorer

            a = self.args
            policy = PolicyEngine(EngineConfig(model=a.policy, kv_cache_gib=0.25, max_model_len=256, seed=a.seed))
            value = make_value_scorer(a.value_model, backend="vllm", tokenizer=a.policy, kv_cache_gib=0.25,
                                      max_model_len=256)
            self._engines = Engines(policy=policy, value=value, value_model=a.value_model)
        return self._engines

    def close(self) -> None:
        if self._engines is not None:
            self._engines.value.close()
            self._engines.policy.close()


def models_fingerprint(*dirs: str) -> str:
    """8 hex digits of the models' weights: results of different models go to different folders."""
    import hashlib

    h = hashlib.sha256()
    for d in dirs:
        with open(os.path.join(d, "model.safetensors"), "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()[:8]


def parse_blocks(text: str) -> list[int]:
    try:
        blocks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise VGSError(f"--blocks must be comma-separated token counts, got {text!r}") from None
    if not blocks or any(b < 1 for b in blocks) or len(set(blocks)) != len(blocks):
        raise VGSError(f"--blocks must be distinct positive token counts, got {text!r}")
    return blocks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.demo_world", description=__doc__.split("\n\n")[0])
    p.add_argument("--problems", type=int, default=200, help="problems per seed")
    p.add_argument("--seeds", type=int, default=3, help="independent problem sets (3: the README table)")
    p.add_argument("--first-seed", type=int, default=None,
                   help=f"seed of the first set (default: {FIRST_HELDOUT_SEED} held-out, {DEV_SEED} dev)")
    p.add_argument("--split", choices=("heldout", "dev"), default="heldout",
                   help="heldout (the report) or dev: train-split problems (none of the build's) to check "
                        "settings on without ever looking at held-out")
    p.add_argument("--n", type=int, default=16, help="generation budget per problem (a power of two >= 4)")
    p.add_argument("--blocks", default=",".join(map(str, (BLOCK,) + ABLATION_BLOCKS)),
                   help="VGS block sizes in tokens; the first is the reported VGS (6 = one step line)")
    p.add_argument("--check-trees", action="store_true",
                   help="also run VGS at every budget 4..N/2 separately (first block) and compare with the "
                        "first trees of the budget-N run")
    p.add_argument("--out", default=os.path.join("runs", "demo_world"), help="results folder (default under the "
                                                                             "current directory)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--no-qsharp", dest="qsharp", action="store_false", help="skip Q#")
    p.add_argument("--policy", default=str(POLICY_DIR))
    p.add_argument("--value-model", default=str(VALUE_DIR))
    args = p.parse_args(argv)
    try:
        if args.n < 4 or args.n & (args.n - 1):
            raise VGSError(f"--n must be a power of two >= 4, got {args.n}")
        if args.problems < 2:
            raise VGSError(f"--problems must be >= 2, got {args.problems}")
        if args.seeds < 1:
            raise VGSError(f"--seeds must be >= 1, got {args.seeds}")
        args.blocks = parse_blocks(args.blocks)
        for path, what in ((args.policy, "policy"), (args.value_model, "value model")):
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise VGSError(f"demo {what} missing at {path}; build it with `python -m benchmarks.demo_world.build`")
        return evaluate(args)
    except VGSError as exc:
        print(f"demo_world: error: {exc}", file=sys.stderr)
        return 2


def evaluate(args) -> int:
    from vgs.config import SamplingConfig, SearchConfig

    t_start = time.time()
    first = args.first_seed if args.first_seed is not None else (FIRST_HELDOUT_SEED if args.split == "heldout" else DEV_SEED)
    seeds = list(range(first, first + args.seeds))
    root = os.path.join(args.out, f"{args.split}{args.problems}-n{args.n}-sampling{args.seed}-"
                        + models_fingerprint(args.policy, args.value_model))  # a rebuilt pair never resumes old rows
    sets = problem_sets(args.split, seeds, args.problems)
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, max_tokens=MAX_TOKENS, seed=args.seed).validate()
    print(f"demo_world: {args.split} problem sets of seeds {seeds} ({args.problems} problems each), budget {args.n} "
          f"generations per problem, VGS blocks {args.blocks}, policy {args.policy}, value model {args.value_model}",
          flush=True)
    runs: dict[int, dict[str, list[dict]]] = {}
    checks: dict[int, dict[str, list[dict]]] = {}
    engines = LazyEngines(args)
    try:
        for s in seeds:
            out, probs = os.path.join(root, f"seed{s}"), sets[s]
            runs[s] = {"sampling": run_method("sampling", SearchConfig(method="weighted_majority", n=args.n).validate(),
                                              probs, engines, sampling, out, args.seed)}
            for b in args.blocks:
                for k in (2, args.n):
                    runs[s][f"vgs{k}-b{b}"] = run_method(f"vgs{k}-b{b}", vgs_config(k, b), probs, engines, sampling,
                                                         out, args.seed)
            if args.check_trees:
                checks[s] = {f"vgs{k}-b{args.blocks[0]}": run_method(f"vgs{k}-b{args.blocks[0]}",
                                                                     vgs_config(k, args.blocks[0]), probs, engines,
                                                                     sampling, out, args.seed)
                             for k in analysis.budgets(args.n)[1:-1]}
            if args.qsharp:
                runs[s]["qsharp"] = run_method("qsharp", SearchConfig(method="qsharp", n=args.n).validate(),
                                               probs, engines, sampling, out, args.seed)
    finally:
        engines.close()
    report(args, seeds, runs, checks, os.path.join(root, f"seeds{seeds[0]}-{seeds[-1]}"))
    print(f"total time {time.time() - t_start:.0f} s")
    return 0


def report(args, seeds: list[int], runs, checks, out: str) -> None:
    """Print and write the table, the tree-pooling breakdown, the plot and the paired differences."""
    import pandas as pd

    os.makedirs(out, exist_ok=True)
    n, pooled_n = args.n, args.problems * len(seeds)
    es = analysis.entries(runs, n, args.blocks, args.qsharp, step_block=BLOCK)
    df = analysis.table(es)
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print()
        print(df.to_string(index=False, float_format=lambda x: f"{x:,.1f}"))
    df.to_csv(os.path.join(out, "table.csv"), index=False)
    print(f"(accuracy: each seed's mean, and pooled over {pooled_n} problems with its 95% CI; budgets below {n} "
          f"are subsets of the budget-{n} runs (sampling: random k-subsets; VGS: k-tree subsets); pass@1 and "
          "majority vote leave out the value model they do not need)")

    cover = [r["metrics"]["pass_n"] for s in seeds for r in runs[s]["sampling"]]
    print(f"\nsome of the {n} samples right (the ceiling for any selection): {100 * sum(cover) / len(cover):.1f}% "
          "of problems")

    print(f"\nVGS (block {args.blocks[0]}) by trees: the first k trees are the k-tree run (same seeds), beside the "
          "mean over all k-tree subsets")
    trees = pd.DataFrame(analysis.tree_pooling(runs, n, args.blocks[0]))
    print(trees.to_string(index=False, float_format=lambda x: f"{x:.1f}"))
    trees.to_csv(os.path.join(out, "vgs_trees.csv"), index=False)
    for s, ch in checks.items():
        for name, rows in ch.items():
            t = int(name[3:].split("-")[0]) // 4
            full = runs[s][f"vgs{n}-b{args.blocks[0]}"]
            same = sum(analysis.first_trees(f, t) == r["metrics"]["wmaj"] for f, r in zip(full, rows))
            print(f"check seed {s}: separate {name} run vs the first {t} tree(s) of vgs{n}: same outcome on "
                  f"{same}/{len(rows)} problems")

    png = os.path.join(out, "accuracy_vs_budget.png")
    split = "held-out" if args.split == "heldout" else "dev"
    analysis.plot(es, png, f"demo world, {split}: seeds {seeds[0]}-{seeds[-1]}, {pooled_n} problems")
    print(f"\ntable: {os.path.join(out, 'table.csv')}\nplot: {png}")

    def line(name: str, a: str, b: str, budget_b: int) -> None:
        m, h = analysis.paired(analysis.find(es, a, n).pooled(), analysis.find(es, b, budget_b).pooled())
        print(f"{name}: {m:+.1f} (95% CI ± {h:.1f} pp, paired over {pooled_n} {args.split} problems of seeds "
              f"{seeds[0]}-{seeds[-1]}, budget {n})")

    line("vgs_minus_majority_accuracy", "VGS block", "majority vote", n)
    line("wmv_minus_majority_accuracy", "weighted majority", "majority vote", n)
    line("bon_minus_pass1_accuracy", "best-of-N", "pass@1", 1)


if __name__ == "__main__":
    sys.exit(main())
