"""Value scoring as the searches use it: one batched call, with the tokens the value model
actually computed attributed to each sequence (for per-problem FLOP accounting)."""

from __future__ import annotations

from typing import Any


def score_batch(scorer: Any, seqs: list[list[int]]) -> tuple[list[float], list[int]]:
    """Values and per-sequence computed tokens. Uses the scorer's per-sequence counts when it
    reports them (`last_tokens_computed`); otherwise splits its cumulative counter in
    proportion to sequence length."""
    if not seqs:
        return [], []
    before = scorer.tokens_computed
    values = [float(v) for v in scorer.score(seqs)]
    per_seq = getattr(scorer, "last_tokens_computed", None)
    if per_seq is None or len(per_seq) != len(seqs):
        spent = scorer.tokens_computed - before
        total = sum(len(s) for s in seqs) or 1
        per_seq = [round(spent * len(s) / total) for s in seqs]
    return values, [int(t) for t in per_seq]
