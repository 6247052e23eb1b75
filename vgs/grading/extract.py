"""Final-answer extraction from a generated solution.

Follows the published VGS rule (spec §3.4): drop the reasoning up to the *last* ``</think>``,
then take the content of the *last* ``\\boxed`` in what remains. A generation cut off before
``</think>`` is searched whole, because the only answer it has may sit inside the thinking.
Beyond the published code we also accept ``\\fbox{...}`` and the brace-less ``\\boxed 5``
form, both of which R1-style models do emit.
"""

from __future__ import annotations

import re

THINK_END = "</think>"

# `\boxed` / `\fbox` as a whole control word: `\boxedx` is some other macro.
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# The argument of the brace-less form runs to the next space, `$` or closing delimiter.
_BARE_ARG_RE = re.compile(r"[^\s$]+")


def strip_thinking(text: str) -> str:
    """The text after the last ``</think>``, or all of it when the model never closed it."""
    head, sep, tail = text.rpartition(THINK_END)
    return tail if sep else text


def _braced(text: str, open_idx: int) -> str | None:
    """Content of the group whose ``{`` is at ``open_idx``; None if it never closes.

    Escaped braces (``\\{``, ``\\}``) are literal characters in LaTeX, so they do not
    change the depth: ``\\boxed{\\{1,2\\}}`` yields ``\\{1,2\\}``.
    """
    depth = 0
    i = open_idx
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2  # skip the escaped character, whatever it is
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_idx + 1 : i]
        i += 1
    return None


def extract_answer(text: str | None) -> str | None:
    """The last boxed answer of a generation, stripped; None when there is none.

    - everything up to the last ``</think>`` is ignored (the final answer follows it);
    - the *last* ``\\boxed``/``\\fbox`` wins; its braces are matched, so nested groups such as
      ``\\boxed{\\frac{1}{2}}`` come out whole;
    - if that last box never closes (truncated output) the result is None, as in the
      published code: an earlier box is a draft, not the answer being written;
    - an empty box is None.
    """
    if not text:
        return None
    body = strip_thinking(text)
    matches = list(_BOX_RE.finditer(body))
    if not matches:
        return None
    pos = matches[-1].end()
    # LaTeX allows spaces between a macro and its argument.
    while pos < len(body) and body[pos].isspace():
        pos += 1
    if pos >= len(body):
        return None
    if body[pos] == "{":
        content = _braced(body, pos)
    else:
        bare = _BARE_ARG_RE.match(body, pos)
        content = bare.group(0) if bare else None
        if content is not None:
            # `\boxed 5.` at the end of a sentence: the period is prose, not the answer.
            content = content.rstrip(".,;")
    if content is None:
        return None
    content = content.strip()
    return content or None
