"""Grading: answer extraction, math-verify equivalence (process pool), voting, statistics.

``extract_answer`` pulls the final boxed answer from a generation; ``is_equivalent`` and
``Grader`` decide answer equivalence safely from any thread; ``vote`` aggregates a candidate
set (maj / wmaj / BoN / pass@N); ``mean_ci`` gives the mean and 95% CI over
problems x repetitions.
"""

from vgs.grading.equivalence import (
    DEFAULT_TIMEOUT,
    Grader,
    GradingUnavailable,
    get_grader,
    is_equivalent,
    quick_equal,
)
from vgs.grading.extract import extract_answer, strip_thinking
from vgs.grading.stats import mean_ci
from vgs.grading.vote import TIE_TOL, VoteResult, vote

__all__ = [
    "DEFAULT_TIMEOUT",
    "Grader",
    "GradingUnavailable",
    "TIE_TOL",
    "VoteResult",
    "extract_answer",
    "get_grader",
    "is_equivalent",
    "mean_ci",
    "quick_equal",
    "strip_thinking",
    "vote",
]
