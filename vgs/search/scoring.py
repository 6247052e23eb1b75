"""Value scoring as the searches use it: through the scorer's shared coalescing batcher,
with the tokens the value model actually computed reported per sequence (so each search's
FLOPs are its own under concurrency)."""

from __future__ import annotations

from typing import Sequence

from vgs.batcher import Score, batcher_for
from vgs.records import Compute


async def score(engines, seqs: Sequence[Sequence[int]], compute: Compute) -> list[float]:
    """Values of `seqs`; adds the calls and computed tokens to `compute`."""
    scores: list[Score] = await batcher_for(engines.value).score(seqs)
    compute.value_calls += len(scores)
    compute.value_tokens += sum(s.computed_tokens for s in scores)
    return [s.value for s in scores]
