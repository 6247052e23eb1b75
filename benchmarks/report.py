"""Result tables: per-benchmark metrics with 95% CIs from the runner's JSONL rows.

The CI is the published one (`vgs.grading.mean_ci`): over the [problems × repetitions]
matrix, within-problem variance only. The headline average is the plain mean of the
benchmark accuracies, as in the paper.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

# metric key in a row's "metrics" → column name in the summary
METRICS = {"pass1": "pass@1", "maj": "maj@n", "wmaj": "wmaj@n", "bon": "bon@n", "pass_n": "pass@n"}


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
                avg[col] = math.sqrt(float(np.nansum(summary[col] ** 2))) / len(summary)
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
        show[label] = [f"{m:5.1f} ± {h:4.1f}" if not math.isnan(m) else "-" for m, h in zip(summary[c], summary[c + " ci"])]
    show["mean tokens"] = summary["mean tokens"].map(lambda x: f"{x:,.0f}")
    show["TFLOPs/problem"] = summary["TFLOPs/problem"].map(lambda x: f"{x:.3g}")
    return show.to_string(index=False)
