"""The end of every `python -m value_models.X` command: a user error (`VGSError`) is one line
on stderr and exit 2, never a traceback; success prints the command's one-line summary."""

from __future__ import annotations

import sys
from typing import Callable

from vgs.errors import VGSError


def run_command(prog: str, work: Callable[[], str]) -> int:
    """Run `work()` (which returns the summary line) as command `prog`; returns the exit code."""
    try:
        summary = work()
    except VGSError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    print(summary, flush=True)
    return 0
