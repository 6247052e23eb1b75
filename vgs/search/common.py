"""What every strategy shares and imports: the engine set a search runs on, the progress
hooks, and the per-item seed. A leaf module (no `vgs.search` imports), so the strategies never
import the package that dispatches to them; `vgs.search` re-exports these names."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from vgs.engine import PolicyBackend


@dataclass
class Engines:
    policy: PolicyBackend
    value: Any = None  # a vgs.value scorer (sync); searches reach it through vgs.batcher
    value_model: str | None = None  # path/id of the value model (the guidance processor loads it in-worker)


class SearchEvents:
    """Progress hooks a caller may pass (the server streams them; eval shows them)."""

    def round(self, tree: int, round: int, active: int, best_value: float | None) -> None:  # noqa: A002
        pass


def derive_seed(*parts: Any) -> int:
    """A stable 31-bit seed from any parts (base seed, benchmark, problem id, repetition, ...).
    Per-item seeds make results independent of batching and of where a resumed run restarts
    (bit-identical on CPU; on a GPU same seeds and distribution, see README "Determinism")."""
    h = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF
