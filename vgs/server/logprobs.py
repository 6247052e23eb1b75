"""Log-probabilities in the OpenAI shapes, as vLLM's server fills them.

Input: per position, vLLM's ordered `{token id: logprob}` (the chosen token first, then the
top-k by rank; `None` for the first prompt token, which has no logprob). `-inf` becomes
-9999.0 (what OpenAI sends; JSON has no infinity).
"""

from __future__ import annotations

from typing import Any, Sequence

FLOOR = -9999.0


def _lp(x: float) -> float:
    return FLOOR if x != x or x < FLOOR else float(x)  # NaN / -inf -> the floor


def token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([int(token_id)])


def completion_logprobs(tokenizer: Any, token_ids: Sequence[int], steps: Sequence[dict[int, float] | None],
                        top: int, text_offset: int = 0) -> dict[str, Any]:
    """`/v1/completions` `logprobs`: tokens, token_logprobs, top_logprobs (the chosen token plus
    the `top` best, as in OpenAI's API) and text_offset."""
    tokens: list[str] = []
    token_lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    pos = text_offset
    for tid, step in zip(token_ids, steps):
        text = token_text(tokenizer, tid)
        tokens.append(text)
        offsets.append(pos)
        pos += len(text)
        if step is None:
            token_lps.append(None)
            tops.append(None)
            continue
        token_lps.append(_lp(step[int(tid)]) if int(tid) in step else None)
        tops.append({token_text(tokenizer, t): _lp(v) for i, (t, v) in enumerate(step.items()) if i <= top})
    return {"text_offset": offsets, "token_logprobs": token_lps, "tokens": tokens, "top_logprobs": tops}


def chat_logprobs(tokenizer: Any, token_ids: Sequence[int], steps: Sequence[dict[int, float] | None],
                  top: int) -> dict[str, Any]:
    """`/v1/chat/completions` `logprobs`: `{"content": [{token, logprob, bytes, top_logprobs}]}`."""
    def entry(t: int, v: float) -> dict[str, Any]:
        s = token_text(tokenizer, t)
        return {"token": s, "logprob": _lp(v), "bytes": list(s.encode("utf-8"))}

    content = []
    for tid, step in zip(token_ids, steps):
        step = step or {}
        item = entry(tid, step.get(int(tid), FLOOR))
        item["top_logprobs"] = [entry(t, v) for i, (t, v) in enumerate(step.items()) if i < top]
        content.append(item)
    return {"content": content}
