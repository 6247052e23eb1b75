"""Config validation shared by the trainers' and collectors' `validate()` methods."""

from __future__ import annotations

from vgs.errors import VGSError


def need(cond: bool, msg: str) -> None:
    """Raise the user-facing error `msg` (one line, exit 2 at the CLI) unless `cond` holds."""
    if not cond:
        raise VGSError(msg)
