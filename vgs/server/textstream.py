"""Token ids to streamed text deltas, for plain sampling with `stream: true`.

Why not vLLM's own detokenizer output: the non-streamed answer is `vgs.prompts.decode` of
all the ids (special tokens kept) cut at the first stop string, and the streamed deltas must
concatenate to exactly that text. So each sample's ids are decoded whole and only the part
that can no longer change is sent: an incomplete UTF-8 character at the end (decoded as
U+FFFD) and the last `longest stop - 1` characters (a stop string may still be forming there)
are held back until more tokens arrive or the sample ends.
"""

from __future__ import annotations

from typing import Any

from vgs.prompts import decode


class TextStream:
    """One sample's text, fed token ids as they come; `feed` returns the new safe text."""

    def __init__(self, tokenizer: Any, stops: list[str]):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already sent
        self.stopped = False  # a stop string was seen: nothing more is sent

    def feed(self, ids: list[int], finished: bool) -> str:
        if self.stopped:
            return ""
        self.ids.extend(ids)
        text = decode(self.tokenizer, self.ids)
        cut = min((text.find(s) for s in self.stops if s in text), default=-1)
        if cut >= 0:  # the engine ends the sample here; the stop string is not part of the text
            text, safe, self.stopped = text[:cut], cut, True
        elif finished:
            safe = len(text)
        else:
            safe = len(text) - self.hold
            while safe > 0 and text[safe - 1] == "\ufffd":  # an incomplete character may still complete
                safe -= 1
        if safe <= self.sent:
            return ""
        out, self.sent = text[self.sent:safe], safe
        return out
