"""Mean and 95% confidence interval over a [problems x repetitions] score matrix."""

from __future__ import annotations

import numpy as np

from vgs.errors import VGSError

Z95 = 1.96


def mean_ci(matrix, include_between_problem_variance: bool = False) -> tuple[float, float]:
    """Mean over all cells and the half-width of its 95% CI (the published VGS estimator).

    ``matrix[p][m]`` is the score of problem p in independent repetition m (P x M).

    - M > 1: half-width = 1.96 * sqrt(mean_p(s_p^2) / (P*M)), with s_p^2 the unbiased
      (ddof=1) variance of problem p over its repetitions. This is the uncertainty from
      sampling only: the problem set is treated as fixed, so between-problem variance is
      left out unless ``include_between_problem_variance`` adds var_p(mean_p) / P (ddof=1).
    - M = 1: half-width = 1.96 * sqrt(s^2 / P), with s^2 the unbiased variance across
      problems (nothing else is estimable from one column).

    The half-width is NaN when the variance is undefined (a single cell).
    """
    y = np.asarray(matrix, dtype=float)
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2 or y.size == 0:
        raise VGSError(f"mean_ci needs a non-empty [problems x repetitions] matrix, got shape {y.shape}")
    if not np.all(np.isfinite(y)):
        raise VGSError("mean_ci: the matrix has missing or non-finite values")
    p, m = y.shape
    mean = float(y.mean())
    if m == 1:
        if p < 2:
            return mean, float("nan")
        return mean, float(Z95 * np.sqrt(y[:, 0].var(ddof=1) / p))
    var = y.var(axis=1, ddof=1).mean() / (p * m)
    if include_between_problem_variance:
        var += (y.mean(axis=1).var(ddof=1) / p) if p > 1 else 0.0
    return mean, float(Z95 * np.sqrt(var))
