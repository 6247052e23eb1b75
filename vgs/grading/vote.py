"""Aggregating N candidate answers into one: majority, weighted majority, best-of-N.

The rules are the published VGS ones (spec §3.3), so numbers are comparable with the paper:

- answers are partitioned into equivalence classes (``Grader.classes``: greedy, against each
  class's first member); a missing answer is a class of its own;
- majority scores a class by its size, weighted majority by the sum of its members' weights
  (value-model success probabilities);
- ties: every class whose score is within ``TIE_TOL`` of the best counts, and the reported
  accuracy is the *expected* accuracy under uniform tie-breaking, i.e. the mean correctness
  of the tied classes (a class's correctness is the mean of its members', which is 0 or 1
  whenever the grader is consistent);
- best-of-N takes the single highest-weight answer (first index on ties);
- pass@N (any answer correct) is an oracle bound, pass@1 the mean correctness.

The reported ``*_answer`` of a vote is the representative of the first tied class in order
of first appearance, so it is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from vgs.errors import VGSError
from vgs.grading.equivalence import Grader, get_grader

TIE_TOL = 1e-5


@dataclass
class VoteResult:
    """Outcome of aggregating one candidate set. Accuracies are None without ``correct``;
    weighted results are None without ``weights``."""

    classes: list[int]
    num_classes: int
    maj_answer: str | None
    maj_ties: int
    maj: float | None = None
    wmaj_answer: str | None = None
    wmaj_ties: int | None = None
    wmaj: float | None = None
    bon_index: int | None = None
    bon_answer: str | None = None
    bon: float | None = None
    pass_at_n: float | None = None
    pass_at_1: float | None = None


def _check_len(name: str, values: Sequence | None, n: int) -> None:
    if values is not None and len(values) != n:
        raise VGSError(f"vote: {name} has {len(values)} entries but there are {n} answers")


def _winners(scores: list[float]) -> list[int]:
    best = max(scores)
    return [c for c, s in enumerate(scores) if abs(s - best) < TIE_TOL]


def vote(answers: Sequence[str | None], weights: Sequence[float] | None = None,
         correct: Sequence[bool] | None = None, classes: Sequence[int] | None = None,
         grader: Grader | None = None) -> VoteResult:
    """Majority / weighted majority / best-of-N / pass@N over one set of answers.

    Args:
        answers: extracted answers (None = no answer).
        weights: one score per answer (e.g. final value-model P(correct)); enables
            ``wmaj`` and ``bon``.
        correct: correctness of each answer; enables the accuracy fields.
        classes: precomputed equivalence-class ids (e.g. from ``Grader.classes``); computed
            with ``grader`` (default: the shared one) when omitted.
    """
    n = len(answers)
    if n == 0:
        raise VGSError("vote: no answers to aggregate")
    _check_len("weights", weights, n)
    _check_len("correct", correct, n)
    _check_len("classes", classes, n)
    if weights is not None:
        weights = [float(w) for w in weights]
        if not all(math.isfinite(w) for w in weights):
            raise VGSError("vote: weights must be finite numbers")

    if classes is None:
        classes = (grader or get_grader()).classes(answers)
    cls = [int(c) for c in classes]
    # Class ids in order of first appearance, with their members.
    order: list[int] = []
    members: dict[int, list[int]] = {}
    for i, c in enumerate(cls):
        if c not in members:
            members[c] = []
            order.append(c)
        members[c].append(i)
    groups = [members[c] for c in order]

    def acc_of(tied: list[int]) -> float | None:
        if correct is None:
            return None
        per_class = [sum(bool(correct[i]) for i in groups[g]) / len(groups[g]) for g in tied]
        return sum(per_class) / len(per_class)

    maj_tied = _winners([float(len(g)) for g in groups])
    res = VoteResult(
        classes=cls,
        num_classes=len(groups),
        maj_answer=answers[groups[maj_tied[0]][0]],
        maj_ties=len(maj_tied),
        maj=acc_of(maj_tied),
    )
    if weights is not None:
        wmaj_tied = _winners([sum(weights[i] for i in g) for g in groups])
        res.wmaj_answer = answers[groups[wmaj_tied[0]][0]]
        res.wmaj_ties = len(wmaj_tied)
        res.wmaj = acc_of(wmaj_tied)
        best = max(range(n), key=lambda i: weights[i])  # max() keeps the first on ties
        res.bon_index = best
        res.bon_answer = answers[best]
        if correct is not None:
            res.bon = float(bool(correct[best]))
    if correct is not None:
        res.pass_at_n = float(any(bool(c) for c in correct))
        res.pass_at_1 = sum(bool(c) for c in correct) / n
    return res
