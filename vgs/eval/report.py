"""Result tables: per-benchmark metrics with 95% CIs from the runner's JSONL rows.

The CI is the published one (`vgs.grading.mean_ci`): over the [problems × repetitions]
matrix, within-problem variance only. The headline average is the plain mean of the
benchmark accuracies, as in the paper.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd

# metric key in a row's "metrics" → column name in the summary
METRICS = {"pass1": "pass@1", "maj": "maj@n", "wmaj": "wmaj@n", "bon": "bon@n", "pass_n": "pass@n"}


def sort_rows(rows: list[dict], benchmarks: list[str] | None = None) -> list[dict]:
    """Rows in one canonical order (benchmark as listed, else by first appearance; problem;
    repetition), so a summary or curve does not depend on the order rows were written — a
    single run and merged shards give the same tables."""
    order = {b: i for i, b in enumerate(benchmarks or [])}
    for r in rows:
        order.setdefault(r["benchmark"], len(order))
    return sorted(rows, key=lambda r: (order[r["benchmark"]], str(r["problem_id"]), int(r["repetition"])))


def rows_to_frame(rows: list[dict]) -> pd.DataFrame:
    flat = []
    for r in rows:
        d = {"benchmark": r["benchmark"], "problem_id": r["problem_id"], "repetition": r["repetition"],
             "accuracy": r["metrics"].get("accuracy"), "mean_tokens": r["mean_tokens"],
             "total_flops": r["compute"].get("total_flops", 0.0)}
        d.update({k: r["metrics"].get(k) for k in METRICS})
        flat.append(d)
    return pd.DataFrame(flat)


def _ci(df: pd.DataFrame, col: str) -> tuple[float, float]:
    from vgs.grading import mean_ci

    if df[col].isna().all():
        return float("nan"), float("nan")
    mat = df.pivot_table(index="problem_id", columns="repetition", values=col, aggfunc="mean").to_numpy(dtype=float)
    if np.isnan(mat).any():
        # An incomplete matrix (one shard of a run, or a run still in progress): the mean of
        # what is there, no CI (merge the shards with `vgs report` for the full table).
        return 100.0 * float(np.nanmean(mat)), float("nan")
    mean, half = mean_ci(mat)
    return 100.0 * mean, 100.0 * half


def summarize(rows: list[dict]) -> pd.DataFrame:
    """One row per benchmark plus an `average` row; accuracies in percent."""
    df = rows_to_frame(rows)
    out = []
    for name, g in df.groupby("benchmark", sort=False):
        rec: dict = {"benchmark": name, "problems": g["problem_id"].nunique(), "repetitions": g["repetition"].nunique()}
        for col, label in [("accuracy", "accuracy")] + list(METRICS.items()):
            m, h = _ci(g, col)
            rec[label if col == "accuracy" else METRICS[col]] = m
            rec[(label if col == "accuracy" else METRICS[col]) + " ci"] = h
        rec["mean tokens"] = float(g["mean_tokens"].mean())
        rec["TFLOPs/problem"] = float(g["total_flops"].mean()) / 1e12
        out.append(rec)
    summary = pd.DataFrame(out)
    if len(summary) > 1:
        avg: dict = {"benchmark": "average", "problems": int(summary["problems"].sum()),
                     "repetitions": int(summary["repetitions"].max())}
        for col in summary.columns:
            if col in avg or col == "benchmark":
                continue
            if col.endswith(" ci"):
                cis = summary[col].astype(float)
                avg[col] = (float("nan") if cis.isna().any()
                            else math.sqrt(float(np.sum(cis ** 2))) / len(summary))
            else:
                avg[col] = float(summary[col].mean())
        summary = pd.concat([summary, pd.DataFrame([avg])], ignore_index=True)
    return summary


def format_table(summary: pd.DataFrame, method: str) -> str:
    """Readable table: `mean ± ci` per metric, metrics that were not computed left out."""
    cols = ["accuracy"] + list(METRICS.values())
    show = pd.DataFrame({"benchmark": summary["benchmark"], "problems": summary["problems"],
                         "reps": summary["repetitions"]})
    for c in cols:
        if summary[c].isna().all():
            continue
        label = f"{method} acc" if c == "accuracy" else c
        show[label] = [("-" if math.isnan(m) else f"{m:5.1f}" if math.isnan(h) else f"{m:5.1f} ± {h:4.1f}")
                       for m, h in zip(summary[c], summary[c + " ci"])]
    show["mean tokens"] = summary["mean tokens"].map(lambda x: f"{x:,.0f}")
    show["TFLOPs/problem"] = summary["TFLOPs/problem"].map(lambda x: f"{x:.3g}")
    return show.to_string(index=False)


# ----------------------------------------------------------------------------- accuracy vs budget

def _budgets(n: int) -> list[int]:
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def budget_curve(rows: list[dict], search, subsets: int = 16, seed: int = 0) -> pd.DataFrame:
    """Accuracy vs budget (generations per problem), averaged over benchmarks, in percent.

    Sampling-style runs (N samples per problem) give a whole curve: for each k ≤ N (powers of
    two and N) the votes are recomputed on `subsets` random k-subsets of the stored samples
    (equivalence classes were stored with them, so no re-grading). A VGS run is one point per
    metric at its total budget N × trees.
    """
    import random

    from vgs.grading import vote

    rng = random.Random(seed)
    recs = []
    for r in rows:
        samples = r["samples"]
        n = len(samples)
        if search.method == "vgs":
            for m in ("wmaj", "maj", "bon"):
                if r["metrics"].get(m) is not None:
                    recs.append({"benchmark": r["benchmark"], "budget": search.total_budget, "metric": m,
                                 "accuracy": r["metrics"][m]})
            continue
        classes = [s.get("class", i) for i, s in enumerate(samples)]
        answers = [s["answer"] for s in samples]
        correct = [bool(s["correct"]) for s in samples]
        values = [s["value"] for s in samples]
        weighted = all(v is not None for v in values)
        for k in _budgets(n):
            acc: dict[str, list[float]] = {}
            for _ in range(subsets if k < n else 1):
                idx = sorted(rng.sample(range(n), k))
                v = vote([answers[i] for i in idx], weights=[values[i] for i in idx] if weighted else None,
                         correct=[correct[i] for i in idx], classes=[classes[i] for i in idx])
                for m, val in (("maj", v.maj), ("wmaj", v.wmaj), ("bon", v.bon), ("pass", v.pass_at_n)):
                    if val is not None:
                        acc.setdefault(m, []).append(val)
            for m, vals in acc.items():
                recs.append({"benchmark": r["benchmark"], "budget": k, "metric": m, "accuracy": float(np.mean(vals))})
    if not recs:
        return pd.DataFrame(columns=["budget", "metric", "accuracy"])
    df = pd.DataFrame(recs)
    per_bench = df.groupby(["benchmark", "budget", "metric"], as_index=False)["accuracy"].mean()
    return per_bench.groupby(["budget", "metric"], as_index=False)["accuracy"].mean().assign(
        accuracy=lambda d: 100.0 * d["accuracy"])


def plot_accuracy_vs_budget(curves: dict, path: str) -> bool:
    """One line per (run, metric): accuracy (mean over benchmarks) vs generations per problem."""
    if not any(len(c) for c, _ in curves.values()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (curve, _search) in curves.items():
        for metric, g in curve.groupby("metric"):
            if metric == "pass":
                continue
            g = g.sort_values("budget")
            ax.plot(g["budget"], g["accuracy"], marker="o", label=f"{name} {metric}")
    save_budget_plot(fig, ax, path, "accuracy (%), mean over benchmarks")
    return True


def save_budget_plot(fig, ax, path: str, ylabel: str) -> None:
    """The axes every accuracy-vs-budget plot shares (log2 budget), then an atomic save, so a
    reader never sees half a PNG."""
    import matplotlib.pyplot as plt

    ax.set_xscale("log", base=2)
    ax.set_xlabel("generations per problem (budget)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- `vgs report`

def _read_run_config(out_dir: str) -> dict:
    import json

    from vgs.errors import VGSError

    cfg_path, rows_path = os.path.join(out_dir, "config.json"), os.path.join(out_dir, "samples.jsonl")
    if not (os.path.isfile(cfg_path) and os.path.isfile(rows_path)):
        raise VGSError(f"{out_dir} is not a `vgs eval` output directory (needs config.json and samples.jsonl)")
    with open(cfg_path) as f:
        return json.load(f)


def load_run(out_dir: str) -> tuple[list[dict], "object"]:
    """Rows (texts and traces left out) and SearchConfig of a finished (or partial) `vgs eval`
    output directory."""
    from vgs.config import SearchConfig

    saved = _read_run_config(out_dir)
    search = SearchConfig(**saved["fingerprint"]["search"])
    return sort_rows(_read_rows(out_dir), saved.get("benchmarks")), search


def _read_rows(out_dir: str) -> list[dict]:
    """Complete lines only, file untouched (a shard may still be running and appending)."""
    import json

    rows = []
    with open(os.path.join(out_dir, "samples.jsonl"), encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n") and line.strip():
                row = json.loads(line)
                row.pop("trace", None)
                for smp in row.get("samples", ()):
                    smp.pop("text", None)
                rows.append(row)
    return rows


def merge_runs(dirs: list[str]) -> list[tuple[str, list[dict], "object"]]:
    """Group output directories by configuration: directories with the same fingerprint (the
    shards of one evaluation, or a run split over jobs) become one run whose rows are the
    union. An item present in two of them means the shards overlap: an error, not a silent
    double count."""
    import json

    from vgs.errors import VGSError

    groups: dict[str, list[str]] = {}
    for d in dirs:
        fp = json.dumps(_read_run_config(d)["fingerprint"], sort_keys=True)
        groups.setdefault(fp, []).append(d)
    runs = []
    for members in groups.values():
        rows, seen, search, benchmarks = [], {}, None, []
        for d in members:
            part, search = load_run(d)
            for b in _read_run_config(d).get("benchmarks") or []:
                if b not in benchmarks:
                    benchmarks.append(b)
            for r in part:
                key = (r["benchmark"], str(r["problem_id"]), int(r["repetition"]))
                if key in seen:
                    raise VGSError(f"{key[0]} problem {key[1]} repetition {key[2]} is in both {seen[key]} and {d}: "
                                   "these runs overlap (shards of one run must use the same --num-shards and "
                                   "different --shard-index)")
                seen[key] = d
                rows.append(r)
        names = [os.path.basename(os.path.normpath(d)) for d in members]
        runs.append(("+".join(names), sort_rows(rows, benchmarks), search))
    return runs


def register(sub) -> None:
    p = sub.add_parser("report", help="compare finished `vgs eval` runs: one table and an accuracy-vs-budget plot")
    p.add_argument("runs", nargs="+", help="output directories of `vgs eval`; directories with the same "
                                           "configuration (e.g. the shards of one run) are merged into one")
    p.add_argument("--separate", action="store_true", help="do not merge same-configuration directories")
    p.add_argument("--plot", default=None, help="write the accuracy-vs-budget plot here (PNG)")
    p.add_argument("--csv", default=None, help="write the combined summary here")
    p.set_defaults(func=run_report)


def run_report(args) -> int:
    frames, curves = [], {}
    if getattr(args, "separate", False):
        runs = []
        for d in args.runs:
            rows, search = load_run(d)
            runs.append((os.path.basename(os.path.normpath(d)), rows, search))
    else:
        runs = merge_runs(args.runs)
    for base, rows, search in runs:
        name = f"{base} ({search.method}, N={search.total_budget})"
        s = summarize(rows)
        s.insert(0, "run", name)
        frames.append(s)
        curves[name] = (budget_curve(rows, search), search)
        print(f"== {name}")
        print(format_table(s.drop(columns=["run"]), search.method))
    if args.csv:
        pd.concat(frames, ignore_index=True).to_csv(args.csv, index=False)
    if args.plot and plot_accuracy_vs_budget(curves, args.plot):
        print(f"plot: {args.plot}")
    return 0
