"""Grading: extraction, math-verify equivalence on real benchmark answers, timeouts and
thread safety of the worker pool, voting rules, and the CI formula."""

from __future__ import annotations

import json
import math
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from vgs.errors import VGSError
from vgs.grading import Grader, extract_answer, get_grader, is_equivalent, mean_ci, quick_equal, vote


def _golds(data_dir: str, name: str) -> list[str]:
    rows = [json.loads(line) for line in Path(data_dir, f"{name}.jsonl").read_text().splitlines() if line.strip()]
    return [str(r["answer"]) for r in rows]


# ----------------------------------------------------------------------------- extraction
@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so $\boxed{\frac{1}{\sqrt{2}}}$.", r"\frac{1}{\sqrt{2}}"),  # nested braces
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces do not count
        (r"\boxed{ 42 }", "42"),
        (r"the answer is \fbox{7}", "7"),
        (r"the answer is $\boxed 5$.", "5"),
        (r"the answer is \boxed 5.", "5"),
        (r"\boxed {12}", "12"),
        (r"first \boxed{1}, then \boxed{2}, finally \boxed{3} done", "3"),  # last box wins
        (r"\boxed{1} and \fbox{9}", "9"),
        ("<think>maybe \\boxed{3}?</think>\n\nSo the answer is \\boxed{4}.<｜end▁of▁sentence｜>", "4"),
        ("<think>a \\boxed{1}</think> b \\boxed{2} </think> c \\boxed{7}", "7"),  # last </think>
        ("<think>maybe \\boxed{3}?</think>\n\nI could not finish.", None),  # box only in thinking
        ("<think>long reasoning ... \\boxed{12} ... and so on", "12"),  # truncated, no </think>
        (r"\boxed{\frac{1}{2}", None),  # unbalanced
        (r"\boxed{5} then \boxed{\frac{1", None),  # the last box never closes
        (r"\boxed{}", None),
        (r"\boxed{  }", None),
        ("no box at all: 42", None),
        (r"\boxedx{3}", None),  # another macro, not \boxed
        (r"\boxed", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# ----------------------------------------------------------------------------- equivalence
def test_quick_path_needs_no_worker():
    g = Grader(workers=1)
    try:
        assert g.equal("073", "73") and g.equal("27.0", "27") and g.equal(" 5 ", "5")
        assert not g.equal("29", "30") and not g.equal("5", None) and not g.equal("5", "  ")
        assert not g._workers, "plain integers must not start math-verify workers"
    finally:
        g.close()
    assert quick_equal(r"\frac12", "0.5") is None  # needs math-verify


@pytest.mark.parametrize("name", ["aime_2024", "aime_2025"])
def test_aime_golds(data_dir, name):
    golds = _golds(data_dir, name)
    assert len(golds) == 30
    grader = get_grader()
    for g in golds:
        n = int(g)
        assert is_equivalent(g, g) and is_equivalent(g, f"{n:03d}") and is_equivalent(f"{n:03d}", g)
        assert not is_equivalent(g, str(n + 1)) and not is_equivalent(g, None) and not is_equivalent(g, "")
    # The same golds through math-verify (not the integer fast path).
    assert all(grader.correct(g, [rf"\frac{{{2 * int(g)}}}{{2}}"])[0] for g in golds)
    assert not any(grader.correct(g, [rf"\frac{{{2 * int(g) + 1}}}{{2}}"])[0] for g in golds)


def _split_top_level(s: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += ch in "{([" 
        depth -= ch in "})]"
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return parts + [cur.strip()]


def _rewrite(g: str) -> str:
    """A different spelling of the same answer, as a model might write it."""
    if g.isdigit():
        return rf"\frac{{{2 * int(g)}}}{{2}}"
    items = _split_top_level(g)
    if len(items) > 1:
        return ", ".join(reversed(items))
    out = g.replace(r"\dfrac", "FRAC").replace(r"\frac", r"\dfrac").replace("FRAC", r"\frac")
    out = out.replace("(", r"\left(").replace(")", r"\right)")
    out = re.sub(r"(\d)\\sqrt", r"\1 \\cdot \\sqrt", out)  # 8\sqrt{11} -> 8 \cdot \sqrt{11}
    out = out.replace(" ", "") if " " in out else out.replace("+", " + ").replace("-", " - ")
    return out if out != g else rf"\left({g}\right)"


def _wrong(g: str) -> str:
    """A nearby wrong answer: drop a list element, or shift a value by one."""
    items = _split_top_level(g)
    return ", ".join(items[:-1]) if len(items) > 1 else f"{g}+1"


@pytest.mark.parametrize("name", ["hmmt_feb_2024", "hmmt_feb_2025"])
def test_hmmt_golds(data_dir, name):
    golds = _golds(data_dir, name)
    assert len(golds) == 30
    grader = get_grader()
    rewritten = [_rewrite(g) for g in golds]
    assert sum(r != g for r, g in zip(rewritten, golds)) == 30
    pairs = [(g, g) for g in golds] + list(zip(golds, rewritten))
    pairs_wrong = [(g, _wrong(g)) for g in golds]
    pairs_wrong += [(golds[i], golds[i + 1]) for i in range(len(golds) - 1)]
    ok = grader.equal_many(pairs)
    assert all(ok), [p for p, e in zip(pairs, ok) if not e]
    bad = grader.equal_many(pairs_wrong)
    assert not any(bad), [p for p, e in zip(pairs_wrong, bad) if e]
    # Both argument orders, through the public single-pair function.
    for g, r in zip(golds, rewritten):
        assert is_equivalent(r, g)


@pytest.mark.parametrize(
    "gold, pred",
    [
        (r"-\dfrac{13}{96}, \dfrac{13}{40}", r"\frac{13}{40},-\frac{13}{96}"),
        (r"0,i\sqrt{6},-i\sqrt{6}", r"-i\sqrt{6}, 0, i\sqrt{6}"),
        (r"0,i\sqrt{6},-i\sqrt{6}", r"i\sqrt6,-\sqrt{6}i,0"),
        (r"\dfrac{4^{2024}}{\binom{4048}{2024}}-2", r"-2+\frac{2^{4048}}{\binom{4048}{2024}}"),
        (r"\frac{-1+\sqrt{17}}{2}, \frac{-1-\sqrt{17}}{2}", r"\frac{-1-\sqrt{17}}{2},\frac{-1+\sqrt{17}}{2}"),
        (r"64(2-\sqrt{3})", r"128-64\sqrt{3}"),
        (r"\sqrt{\frac{95}{24}}", r"\frac{\sqrt{570}}{12}"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
        (r"90^\circ", "90"),
        (r"864 \mbox{ inches}^2", "864"),
        (r"\frac{270}7\text{ degrees}", r"\frac{270}{7}"),
        (r"10,\!080", "10080"),
        (r"\frac{1}{2}", "0.5"),
        (r"\text{Evelyn}", r"\text{Evelyn }"),
        ("1.25", r"\frac{5}{4}"),
    ],
)
def test_equivalent_forms(gold, pred):
    assert is_equivalent(gold, pred)
    assert is_equivalent(pred, gold)


@pytest.mark.parametrize(
    "gold, pred",
    [
        (r"0,i\sqrt{6},-i\sqrt{6}", r"0, i\sqrt{6}"),  # a missing root
        (r"-\dfrac{13}{96}, \dfrac{13}{40}", r"\frac{13}{96}, \frac{13}{40}"),  # a sign
        (r"\dfrac{4^{2024}}{\binom{4048}{2024}}-2", r"\frac{4^{2024}}{\binom{4048}{2024}}-3"),
        (r"\frac{4}{9}", "0.4444"),  # beyond the 5-digit tolerance
        ("(3,4]", "(3,4)"),
        (r"\sqrt{23}-2 \sqrt{3}", r"\sqrt{23}+2\sqrt{3}"),
        (r"\text{Evelyn}", r"\text{Bob}"),
        (r"2^{25} \cdot 26!", r"2^{25} \cdot 25!"),
        (r"\frac{1}{2}", "this is not math {{{"),
    ],
)
def test_not_equivalent(gold, pred):
    assert not is_equivalent(gold, pred)
    assert not is_equivalent(pred, gold)


def test_amc_float_golds(data_dir):
    rows = [json.loads(line) for line in Path(data_dir, "amc_2023.jsonl").read_text().splitlines() if line.strip()]
    golds = [r["answer"] for r in rows]
    assert any(isinstance(g, float) for g in golds)
    for g in golds:
        n = int(g)
        assert is_equivalent(str(g), str(n)) and is_equivalent(g, str(n))
        assert not is_equivalent(str(g), str(n + 1))
    assert get_grader().correct(str(golds[0]), [r"\frac{54}{2}", "26.5", None]) == [True, False, False]


# ----------------------------------------------------------------------------- timeouts, threads
def test_pathological_expression_times_out():
    get_grader().equal(r"\frac{3}{6}", "0.5")  # warm: the pool is up, so we time only the comparison
    t0 = time.monotonic()
    assert not is_equivalent(r"9^{9^{9^{9}}}", r"\frac{7}{3}", timeout=0.5)
    assert time.monotonic() - t0 < 10
    t0 = time.monotonic()  # math-verify's own alarm, with the default budget
    assert not is_equivalent(r"10^{10^{10}} + 1", r"\frac{5}{7}")
    assert time.monotonic() - t0 < 30
    assert is_equivalent(r"\frac{1}{4}", "0.25")  # the pool still works


def test_hung_worker_is_replaced():
    with Grader(workers=1, timeout=0.5) as g:
        assert g.equal(r"\frac12", "0.5")
        first = next(iter(g._workers)).proc
        assert not g.equal(r"9^{9^{9^{9}}}", "5")
        assert g.timeouts == 1
        assert first.poll() is not None, "the stuck worker must be killed"
        assert g.equal(r"\frac{2}{3}", r"\dfrac{4}{6}")  # a fresh worker took over
        assert g.equal(r"9^{9^{9^{9}}}", "5") is False and g.timeouts == 1  # cached, no new hang


def test_dead_worker_does_not_cost_an_answer():
    with Grader(workers=1) as g:
        assert g.equal(r"\frac12", "0.5")
        w = next(iter(g._workers))
        w.proc.kill()
        w.proc.wait()
        assert g.equal(r"\frac{1}{3}", r"\dfrac{2}{6}")  # retried on a replacement
        assert g.timeouts == 0
    assert g.closed and not g._workers


def test_is_equivalent_from_threads(data_dir):
    golds = _golds(data_dir, "hmmt_feb_2025")
    cases = [(g, _rewrite(g), True) for g in golds] + [(g, _wrong(g), False) for g in golds]
    cases += [("073", "73", True), (r"\frac{1}{2}", "0.5", True), ("1", "2", False)]
    thread_names = set()

    def check(case):
        thread_names.add(threading.current_thread().name)
        return is_equivalent(case[0], case[1]) == case[2]

    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(check, cases))
    assert all(results)
    assert threading.main_thread().name not in thread_names


def test_math_verify_alone_fails_in_a_thread():
    """Why the pool exists: math-verify with timeouts on refuses to run off the main thread."""
    from math_verify import parse

    errors = []

    def run():
        try:
            parse(r"$\frac{1}{2}$", parsing_timeout=1)
        except ValueError as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert errors


def test_classes_merge_equivalent_forms():
    answers = [r"\frac{1}{2}", "0.5", "3", None, r"\dfrac12", "", "3.0", "003", "x"]
    assert get_grader().classes(answers) == [0, 0, 1, 2, 0, 3, 1, 1, 4]


# ----------------------------------------------------------------------------- voting
def test_majority_tie_expected_accuracy():
    answers = ["1", "1", "2", "2", "3"]
    r = vote(answers, correct=[True, True, False, False, False])
    assert r.num_classes == 3 and r.maj_ties == 2
    assert r.maj == pytest.approx(0.5)  # two tied classes, one correct
    assert r.maj_answer == "1"  # first tied class in order of appearance
    assert r.pass_at_n == 1.0 and r.pass_at_1 == pytest.approx(0.4)
    assert r.wmaj is None and r.bon is None and r.wmaj_ties is None


def test_weighted_and_unweighted_disagree():
    answers = ["5", "5", "5", "7", "7"]
    weights = [0.1, 0.1, 0.1, 0.9, 0.8]
    r = vote(answers, weights=weights, correct=[False, False, False, True, True])
    assert (r.maj_answer, r.maj, r.maj_ties) == ("5", 0.0, 1)
    assert (r.wmaj_answer, r.wmaj, r.wmaj_ties) == ("7", 1.0, 1)
    assert (r.bon_index, r.bon_answer, r.bon) == (3, "7", 1.0)


def test_weighted_tie_within_tolerance_and_bon_first_index():
    answers = ["a", "a", "b", "c"]
    weights = [0.1 + 0.2, 0.3, 0.6, 0.6]  # 0.30000000000000004 + 0.3 vs 0.6: a tie
    r = vote(answers, weights=weights, correct=[True, True, False, False], classes=[0, 0, 1, 2])
    assert r.wmaj_ties == 3 and r.wmaj == pytest.approx(1 / 3)
    assert r.bon_index == 2 and r.bon == 0.0  # equal top weights: the first index wins
    assert r.maj_ties == 1 and r.maj == 1.0


def test_vote_merges_equivalent_answers_with_grader():
    answers = [r"\frac{1}{2}", "0.5", "3", r"\dfrac{1}{2}", "3", None]
    r = vote(answers, weights=[0.2, 0.2, 0.5, 0.2, 0.5, 0.99], correct=[1, 1, 0, 1, 0, 0])
    assert r.classes == [0, 0, 1, 0, 1, 2] and r.num_classes == 3
    assert (r.maj_answer, r.maj, r.maj_ties) == (r"\frac{1}{2}", 1.0, 1)
    assert (r.wmaj_answer, r.wmaj) == ("3", 0.0)  # 1.0 vs 0.6 vs 0.99
    assert r.bon_index == 5 and r.bon_answer is None and r.bon == 0.0


def test_missing_answers_are_singletons():
    r = vote([None, None, ""], weights=[0.5, 0.5, 0.5], correct=[False, False, False])
    assert r.num_classes == 3 and r.maj_ties == 3 and r.wmaj_ties == 3
    assert r.maj == 0.0 and r.pass_at_n == 0.0


def test_single_answer_all_metrics_agree():
    r = vote(["12"], weights=[0.3], correct=[True])
    assert r.maj == r.wmaj == r.bon == r.pass_at_n == r.pass_at_1 == 1.0


def test_vote_rejects_bad_input():
    with pytest.raises(VGSError):
        vote([])
    with pytest.raises(VGSError):
        vote(["1", "2"], weights=[0.5])
    with pytest.raises(VGSError):
        vote(["1", "2"], correct=[True])
    with pytest.raises(VGSError):
        vote(["1"], weights=[math.nan])


# ----------------------------------------------------------------------------- mean and CI
def test_mean_ci_by_hand():
    y = [[1, 0, 1, 1], [0, 0, 1, 0], [1, 1, 1, 1]]
    mean, half = mean_ci(y)
    # Per-problem unbiased variances 0.25, 0.25, 0 -> mean 1/6; / (P*M = 12) = 1/72.
    assert mean == pytest.approx(8 / 12)
    assert half == pytest.approx(1.96 * math.sqrt(1 / 72))
    # Adding between-problem variance: var(0.75, 0.25, 1.0; ddof=1) = 0.1458333 / P = 0.0486111.
    _, half_b = mean_ci(y, include_between_problem_variance=True)
    assert half_b == pytest.approx(1.96 * math.sqrt(1 / 72 + 0.4375 / 3 / 3))
    assert half_b == pytest.approx(0.49)


def test_mean_ci_single_column():
    mean, half = mean_ci([[1], [0], [1], [1]])
    # Unbiased variance 0.75 / 3 = 0.25, / P = 0.0625, sqrt = 0.25.
    assert mean == pytest.approx(0.75) and half == pytest.approx(1.96 * 0.25)
    assert math.isnan(mean_ci([[1]])[1])
    with pytest.raises(VGSError):
        mean_ci([])
    with pytest.raises(VGSError):
        mean_ci([[1, float("nan")]])
