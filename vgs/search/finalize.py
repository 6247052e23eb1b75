"""The label-free end of every search: decode, extract answers, equivalence classes, vote,
and the method's chosen answer and candidate (`SearchResult.answer/chosen/votes`). The eval
runner adds gold grading on top; the server returns it as is. Runs math-verify through the
grading process pool, so call it off the event loop (`asyncio.to_thread`).
"""

from __future__ import annotations

from typing import Any

from vgs.grading import TIE_TOL, extract_answer, vote
from vgs.prompts import decode
from vgs.records import SearchResult
from vgs.search.methods import get_method


def _winning_class(classes: list[int], scores_of: Any) -> int:
    """The class a vote picks: best score, first by appearance on ties (as `vote` does)."""
    order: list[int] = []
    for c in classes:
        if c not in order:
            order.append(c)
    scores = [scores_of(c) for c in order]
    best = max(scores)
    return next(c for c, s in zip(order, scores) if abs(s - best) < TIE_TOL)


def finalize(result: SearchResult, tokenizer: Any, grader: Any, method: str) -> SearchResult:
    """Fill text, answer per candidate and the chosen answer/candidate/votes; returns `result`."""
    cands = result.candidates
    if not cands:
        return result
    for c in cands:
        c.text = decode(tokenizer, c.token_ids)
        c.answer = extract_answer(c.text)
    answers = [c.answer for c in cands]
    values = [c.value for c in cands]
    weights = values if all(v is not None for v in values) else None
    classes = grader.classes(answers)
    votes = vote(answers, weights=weights, classes=classes)
    rule = get_method(method).vote
    if rule == "pass1":
        chosen = 0
    elif rule == "bon" and votes.bon_index is not None:
        chosen = votes.bon_index
    else:
        if rule == "wmaj" and weights is not None:
            win = _winning_class(classes, lambda k: sum(w for w, c in zip(weights, classes) if c == k))
        else:
            win = _winning_class(classes, lambda k: float(sum(1 for c in classes if c == k)))
        members = [i for i, c in enumerate(classes) if c == win]
        chosen = max(members, key=lambda i: (values[i] if values[i] is not None else 0.0, -i))
    result.chosen = chosen
    result.answer = answers[chosen]
    result.votes = votes
    return result
