"""The `deepseek_r1` reasoning split of chat answers, as vLLM's `--reasoning-parser deepseek_r1`.

An R1-style chat template opens `<think>` in the generation prompt, so the model's output is
reasoning up to `</think>` and the answer after it. The whole text splits into
(`reasoning_content`, `content`): no `</think>` yet means everything is reasoning and content
is null; nothing after `</think>` means null content. A stream splits the same way, delta by
delta (`ReasoningStream`), so the deltas concatenate to the non-streamed fields.
"""

from __future__ import annotations

from typing import Any

START, END = "<think>", "</think>"
PARSERS = ("deepseek_r1", "none", "auto")


def template_opens_think(tokenizer: Any) -> bool:
    """Whether the chat template's generation prompt ends in an open `<think>` (R1 style)."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                             add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template that cannot render a plain turn has no R1 prompt
        return False
    return isinstance(text, str) and text.rstrip().endswith(START)


def resolve(parser: str, tokenizer: Any) -> bool:
    """`--reasoning-parser`: deepseek_r1 on, none off, auto on for R1-style templates."""
    if parser == "auto":
        return template_opens_think(tokenizer)
    return parser == "deepseek_r1"


def split(text: str) -> tuple[str | None, str | None]:
    """(reasoning, content) of a whole answer."""
    head, sep, tail = text.partition(START)
    text = tail if sep else head
    if END not in text:
        return text, None
    reasoning, _, content = text.partition(END)
    return reasoning, content or None


class ReasoningStream:
    """Routes streamed text deltas to reasoning or content. `</think>` may arrive split over
    deltas, so text that could be the start of it is held back until it can be decided."""

    def __init__(self) -> None:
        self.pending = ""
        self.in_reasoning = True
        self.started = False  # a leading `<think>` has been consumed or ruled out

    def feed(self, delta: str, finished: bool = False) -> tuple[str, str]:
        """(reasoning delta, content delta); either may be empty."""
        text = self.pending + delta
        self.pending = ""
        if not self.started:
            if START.startswith(text) and not finished:
                self.pending = text
                return "", ""
            self.started = True
            if text.startswith(START):
                text = text[len(START):]
        if not self.in_reasoning:
            return "", text
        cut = text.find(END)
        if cut >= 0:
            self.in_reasoning = False
            return text[:cut], text[cut + len(END):]
        hold = 0 if finished else _partial_suffix(text, END)
        if hold:
            self.pending = text[-hold:]
            text = text[:-hold]
        return text, ""


def _partial_suffix(text: str, token: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `token`."""
    for k in range(min(len(token) - 1, len(text)), 0, -1):
        if text.endswith(token[:k]):
            return k
    return 0
