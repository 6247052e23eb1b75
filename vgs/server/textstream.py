"""Token ids to streamed text deltas, for plain sampling with `stream: true`.

Why not vLLM's own detokenizer output: the non-streamed answer is `vgs.prompts.decode` of
all the ids (special tokens skipped unless the request keeps them) cut at the first stop
string, and the streamed deltas must concatenate to exactly that text. So each sample's ids are decoded whole and only the part
that can no longer change is sent: an incomplete UTF-8 character at the end (decoded as
U+FFFD) and the last `longest stop - 1` characters (a stop string may still be forming there)
are held back until more tokens arrive or the sample ends.
"""

from __future__ import annotations

from typing import Any

from vgs.prompts import decode


class TextStream:
    """One sample's text, fed token ids as they come; `feed` returns the new safe text.

    Cost per token is constant: only the new ids are decoded, with a few earlier ids as
    context (as vLLM's incremental detokenizer does, so tokenizers that drop a leading space
    when decoding a fragment still join correctly), and stop strings are searched only where
    a new occurrence can start. Decoding the whole sample and searching all of it for every
    token was quadratic in the length (16k-token samples)."""

    CONTEXT = 6  # earlier ids decoded with the new ones

    def __init__(self, tokenizer: Any, stops: list[str], skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.read = 0  # ids[:read] are decoded into `text`
        self.text = ""
        self.searched = 0  # text[:searched] holds no stop string
        self.sent = 0  # characters of the text already sent
        self.stopped = False  # a stop string was seen: nothing more is sent

    def _decode_new(self, finished: bool) -> None:
        """Append the text of ids[read:] unless it ends in an incomplete character (kept
        pending until the next token completes it, or the sample ends)."""
        start = max(0, self.read - self.CONTEXT)
        prefix = decode(self.tokenizer, self.ids[start:self.read], self.skip)
        full = decode(self.tokenizer, self.ids[start:], self.skip)
        if not full.startswith(prefix):  # the new ids changed earlier text: decode all once
            self.text, self.read = decode(self.tokenizer, self.ids, self.skip), len(self.ids)
            self.searched = min(self.searched, self.sent)
            return
        new = full[len(prefix):]
        if new.endswith("\ufffd") and not finished:
            return
        self.text += new
        self.read = len(self.ids)

    def feed(self, ids: list[int], finished: bool) -> str:
        if self.stopped:
            return ""
        self.ids.extend(ids)
        self._decode_new(finished)
        text = self.text
        begin = max(0, self.searched - self.hold)  # an occurrence ending in new text starts here or later
        hits = [text.find(s, begin) for s in self.stops]
        cut = min((h for h in hits if h >= 0), default=-1)
        self.searched = len(text)
        if cut >= 0:  # the engine ends the sample here; the stop string is not part of the text
            safe, self.stopped = cut, True
        elif finished:
            safe = len(text)
        else:
            safe = len(text) - self.hold
        if safe <= self.sent:
            return ""
        out, self.sent = text[self.sent:safe], safe
        return out
