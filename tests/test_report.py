"""Result tables and accuracy-vs-budget curves from runner rows (no engines)."""

from __future__ import annotations

import random

import pytest

from vgs.eval.report import budget_curve, format_table, plot_accuracy_vs_budget, summarize
from vgs.config import SearchConfig
from vgs.grading import vote


def make_rows(seed: int = 0, n: int = 8) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for bench in ("aime24", "hmmt_feb25"):
        for pid in range(6):
            for rep in range(2):
                answers = [rng.choice(["1", "2", "3", None]) for _ in range(n)]
                correct = [a == "1" for a in answers]
                classes = [{"1": 0, "2": 1, "3": 2}.get(a, 10 + i) for i, a in enumerate(answers)]
                values = [rng.random() for _ in range(n)]
                v = vote(answers, weights=values, correct=correct, classes=classes)
                samples = [{"answer": a, "correct": c, "class": k, "value": w, "num_tokens": 10}
                           for a, c, k, w in zip(answers, correct, classes, values)]
                rows.append({"benchmark": bench, "problem_id": str(pid), "repetition": rep, "samples": samples,
                             "metrics": {"accuracy": v.maj, "pass1": v.pass_at_1, "maj": v.maj, "wmaj": v.wmaj,
                                         "bon": v.bon, "pass_n": v.pass_at_n},
                             "mean_tokens": 10.0, "compute": {"total_flops": 2e9}})
    return rows


def test_summary_means_match_rows():
    rows = make_rows()
    s = summarize(rows).set_index("benchmark")
    for bench in ("aime24", "hmmt_feb25"):
        sub = [r for r in rows if r["benchmark"] == bench]
        assert s.loc[bench, "maj@n"] == pytest.approx(100 * sum(r["metrics"]["maj"] for r in sub) / len(sub))
        assert s.loc[bench, "problems"] == 6 and s.loc[bench, "repetitions"] == 2
        assert s.loc[bench, "maj@n ci"] > 0
    assert s.loc["average", "pass@1"] == pytest.approx((s.loc["aime24", "pass@1"] + s.loc["hmmt_feb25", "pass@1"]) / 2)
    table = format_table(summarize(rows), "majority")
    assert "majority acc" in table and "average" in table and "±" in table


def test_budget_curve_endpoints(tmp_path):
    rows = make_rows(1)
    curve = budget_curve(rows, SearchConfig(method="majority", n=8), subsets=64).set_index(["budget", "metric"])
    assert sorted({b for b, _ in curve.index}) == [1, 2, 4, 8]
    full_maj = 100 * sum(r["metrics"]["maj"] for r in rows) / len(rows)
    assert curve.loc[(8, "maj"), "accuracy"] == pytest.approx(full_maj)
    # one random sample: expected accuracy is pass@1 (up to subset noise)
    pass1 = 100 * sum(r["metrics"]["pass1"] for r in rows) / len(rows)
    assert curve.loc[(1, "maj"), "accuracy"] == pytest.approx(pass1, abs=6)
    # pass@k grows with k
    passes = [curve.loc[(k, "pass"), "accuracy"] for k in (1, 2, 4, 8)]
    assert passes == sorted(passes)
    assert plot_accuracy_vs_budget({"maj": (curve.reset_index(), None)}, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_vgs_run_is_one_point_at_total_budget():
    rows = make_rows(2)
    curve = budget_curve(rows, SearchConfig(method="vgs", budget=4, beam_width=2, trees=2))
    assert set(curve["budget"]) == {8}
    assert set(curve["metric"]) == {"wmaj", "maj", "bon"}
