"""Search strategies. Each is a short function over shared configs and engines, taking a
whole batch of problems (one vLLM call per round for all of them) and returning one
`SearchResult` per prompt. The CLI and the server both call `run_search`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable

from vgs.config import GUIDED_METHODS, SamplingConfig, SearchConfig
from vgs.engine import PolicyBackend
from vgs.errors import VGSError
from vgs.records import SearchResult

# methods that score candidates with a `ValueScorer` (Q#/CD load the value model in-worker instead)
SCORED_METHODS = ("best_of_n", "weighted_majority", "vgs")


@dataclass
class Engines:
    policy: PolicyBackend
    value: Any = None  # a vgs.value.ValueScorer, when the method uses one
    value_model: str | None = None  # path/id of the value model (the guidance processor loads it in-worker)


def derive_seed(*parts: Any) -> int:
    """A stable 31-bit seed from any parts (base seed, benchmark, problem id, repetition, ...).
    Per-item seeds make results independent of batching and of where a resumed run restarts."""
    h = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def run_search(prompts: list[list[int]], seeds: list[int], engines: Engines, search: SearchConfig,
               sampling: SamplingConfig, on_round: Callable[[int, int], None] | None = None) -> list[SearchResult]:
    """Run `search.method` on every prompt; `seeds[i]` seeds everything random for prompt i."""
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    if search.method in SCORED_METHODS and engines.value is None:
        raise VGSError(f"method {search.method!r} needs a value model (--value-model)")
    if search.method == "vgs":
        from vgs.search.beam import beam_search

        return beam_search(prompts, seeds, engines, search, sampling, on_round=on_round)
    if search.method in GUIDED_METHODS:
        from vgs.search.guided import guided_sample

        if not engines.value_model:
            raise VGSError(f"method {search.method!r} needs a value model (--value-model)")
        return guided_sample(prompts, seeds, engines, search, sampling)
    from vgs.search.sample import sample_n

    return sample_n(prompts, seeds, engines, search, sampling)
