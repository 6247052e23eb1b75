"""What `python -m benchmarks.demo_world` computes from its graded rows: per-problem accuracy of
every method at every budget, pooled over seeds, with CIs and compute. Pure functions (no
engines), so they are unit-tested on hand-made rows.

Budgets below the full one come from the stored runs, never from extra generation:
- sampling-style runs (N independent samples): the vote over random k-subsets of the N
  samples, averaged per problem (what a budget-k run would score in expectation);
- VGS with DVTS: the trees of one problem are seeded per (problem, tree), so the first k
  trees of a T-tree run are exactly a k-tree run (`first_trees`); the estimate reported is
  the mean over all k-tree subsets (`tree_subsets`), the same expectation with less noise.
  Comparing the two per budget is how the curve's shape is explained (`--split dev`
  checked the equality against separate runs, docs/demo_world.md).
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field

from vgs.grading import vote


def budgets(n: int) -> list[int]:
    """2, 4, ... up to n (n a power of two): `vgs report`'s budgets without 1."""
    from vgs.eval.report import _budgets

    return [k for k in _budgets(n) if k >= 2]


def _vote(samples: list[dict], metric: str) -> float:
    values = [s["value"] for s in samples]
    v = vote([s["answer"] for s in samples], weights=values if None not in values else None,
             correct=[bool(s["correct"]) for s in samples], classes=[s["class"] for s in samples])
    return float(getattr(v, metric))


def sample_subsets(row: dict, k: int, metric: str, subsets: int = 16, seed: int = 0) -> float:
    """Expected `metric` ("maj", "wmaj", "bon") of a budget-k vote over this problem's samples:
    the mean over `subsets` random k-subsets (the single full set when k = N). The subsets
    are seeded by the problem, so every metric sees the same ones."""
    samples = row["samples"]
    n = len(samples)
    if k >= n:
        return _vote(samples, metric)
    rng = random.Random(f"{seed}:{row['problem_id']}:{k}")
    return sum(_vote([samples[i] for i in sorted(rng.sample(range(n), k))], metric) for _ in range(subsets)) / subsets


def tree_ids(row: dict) -> list[int]:
    return sorted({int(s["tree"]) for s in row["samples"]})


def tree_subsets(row: dict, k: int, metric: str = "wmaj") -> float:
    """Mean `metric` of the pooled vote over every k-subset of the problem's DVTS trees."""
    trees = tree_ids(row)
    combos = list(itertools.combinations(trees, k))
    return sum(_vote([s for s in row["samples"] if s["tree"] in c], metric) for c in combos) / len(combos)


def first_trees(row: dict, k: int, metric: str = "wmaj") -> float:
    """`metric` of the vote over the first k trees: what a k-tree run with the same seeds gives."""
    keep = set(tree_ids(row)[:k])
    return _vote([s for s in row["samples"] if s["tree"] in keep], metric)


def mean_ci(xs: list[float]) -> tuple[float, float]:
    """Mean and 95% CI half-width over problems, in percent (`vgs.grading.mean_ci`)."""
    from vgs.grading import mean_ci as mc

    m, h = mc([[x] for x in xs])
    return 100 * m, 100 * h


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a - b over problems and the half-width of its 95% CI, in percentage points."""
    if len(a) != len(b):
        raise ValueError(f"paired: {len(a)} vs {len(b)} problems")
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    if len(d) < 2:
        return 100 * mean, float("nan")
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
    return 100 * mean, 100 * 1.96 * sd / math.sqrt(len(d))


def cost(rows: list[dict], share: float = 1.0, value: bool = True) -> dict[str, float]:
    """Compute per problem: generated tokens, value-model tokens, GFLOPs (policy + value),
    scaled by `share` (a budget-k subset of an N-sample run costs k/N of it); `value=False`
    for methods that do not read the value model (pass@1, majority vote)."""
    c = [r["compute"] for r in rows]
    n = len(c)
    flops = sum(x["policy_flops"] + (x["value_flops"] if value else 0.0) for x in c)
    return {"gen tokens": share * sum(x["policy_tokens"] for x in c) / n,
            "value tokens": share * sum(x.get("value_tokens", 0) for x in c) / n if value else 0.0,
            "GFLOPs": share * flops / n / 1e9}


@dataclass
class Entry:
    """One method at one budget: per-problem scores of each seed (same problem order as the
    rows) and its compute per problem (pooled over seeds)."""

    method: str
    budget: int
    scores: dict[int, list[float]] = field(default_factory=dict)
    compute: dict[str, float] = field(default_factory=dict)

    def pooled(self) -> list[float]:
        return [x for s in sorted(self.scores) for x in self.scores[s]]


def entries(runs: dict[int, dict[str, list[dict]]], n: int, blocks: list[int], qsharp: bool,
            step_block: int = 6) -> list[Entry]:
    """Every method at every budget from the per-seed runs (`runs[seed][run name]`, names as
    `run_names`); `step_block` is the block size of one step line (labelled as such)."""
    seeds = sorted(runs)
    out: list[Entry] = []

    def pooled_rows(name: str) -> list[dict]:
        return [r for s in seeds for r in runs[s][name]]

    def add(method: str, budget: int, fn, name: str, share: float, value: bool = True) -> None:
        out.append(Entry(method, budget, {s: [fn(r) for r in runs[s][name]] for s in seeds},
                         cost(pooled_rows(name), share, value)))

    add("pass@1", 1, lambda r: r["metrics"]["pass1"], "sampling", 1 / n, value=False)
    for metric, label, value in (("maj", "majority vote", False), ("wmaj", "weighted majority", True),
                                 ("bon", "best-of-N", True)):
        for k in budgets(n):
            add(label, k, lambda r, k=k, m=metric: sample_subsets(r, k, m), "sampling", k / n, value)
    trees = n // 4
    for b in blocks:
        label = f"VGS block {b}" + (" (= 1 step line)" if b == step_block else "")
        add(label, 2, lambda r: r["metrics"]["wmaj"], f"vgs2-b{b}", 1.0)
        for k in budgets(n)[1:]:
            add(label, k, lambda r, t=k // 4: tree_subsets(r, t), f"vgs{n}-b{b}", (k // 4) / trees)
    if qsharp:
        for k in budgets(n):
            add("Q# + majority", k, lambda r, k=k: sample_subsets(r, k, "maj"), "qsharp", k / n)
    return out


def table(es: list[Entry]):
    """One row per (method, budget): each seed's accuracy, the pooled accuracy with its 95% CI
    over problems, and compute per problem."""
    import pandas as pd

    rows = []
    for e in es:
        m, h = mean_ci(e.pooled())
        row = {"method": e.method, "budget": e.budget}
        for s in sorted(e.scores):
            row[f"seed {s} %"] = 100 * sum(e.scores[s]) / len(e.scores[s])
        row |= {"pooled %": f"{m:5.1f} ± {h:4.1f}", "problems": len(e.pooled()),
                "gen tok/prob": e.compute["gen tokens"], "value tok/prob": e.compute["value tokens"],
                "GFLOPs/prob": e.compute["GFLOPs"]}
        rows.append(row)
    return pd.DataFrame(rows)


def find(es: list[Entry], method: str, budget: int) -> Entry:
    for e in es:
        if e.method.startswith(method) and e.budget == budget:
            return e
    raise KeyError(f"{method} at budget {budget}")


def tree_pooling(runs: dict[int, dict[str, list[dict]]], n: int, block: int) -> list[dict]:
    """For the VGS curve's shape: accuracy of the first k trees (= the k-tree run with the same
    seeds) beside the mean over all k-tree subsets, and how often the pooled vote differs from
    tree 1's own, per budget."""
    rows = [r for s in sorted(runs) for r in runs[s][f"vgs{n}-b{block}"]]
    out = []
    for t in range(1, n // 4 + 1):
        first = [first_trees(r, t) for r in rows]
        mean = [tree_subsets(r, t) for r in rows]
        out.append({"budget": 4 * t, "trees": t, "first trees %": 100 * sum(first) / len(rows),
                    "all subsets %": 100 * sum(mean) / len(rows),
                    "finished beams": sum(len([x for x in r["samples"] if x["tree"] < t]) for r in rows) / len(rows)})
    return out


def plot(es: list[Entry], path: str, title: str) -> None:
    """Accuracy vs budget with 95% CI bands (pooled over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vgs.eval.report import save_budget_plot

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(e.method for e in es):
        pts = sorted((e.budget, *mean_ci(e.pooled())) for e in es if e.method == method and e.budget > 1)
        if not pts:
            continue
        xs, ms, hs = zip(*pts)
        style = "--" if "block" in method and "step line" not in method else "-"
        line, = ax.plot(xs, ms, style, marker="o", label=method, markersize=4)
        ax.fill_between(xs, [m - h for m, h in zip(ms, hs)], [m + h for m, h in zip(ms, hs)],
                        color=line.get_color(), alpha=0.12)
    p1 = find(es, "pass@1", 1)
    ax.axhline(mean_ci(p1.pooled())[0], color="gray", lw=1, ls=":", label="pass@1")
    ax.set_title(title)
    save_budget_plot(fig, ax, path, "accuracy (%), 95% CI band")
