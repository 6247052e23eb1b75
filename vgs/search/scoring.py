"""Value scoring as the searches use it (`vgs.batcher.score_async`): the async vLLM scorer
awaited directly (a cancelled search aborts its value requests), a sync one through its
shared coalescing batcher, with the tokens the value model actually computed reported per
sequence (so each search's FLOPs are its own under concurrency)."""

from __future__ import annotations

from typing import Sequence

from vgs.batcher import Score, score_async
from vgs.records import Compute


async def score(engines, seqs: Sequence[Sequence[int]], compute: Compute) -> list[float]:
    """Values of `seqs`; adds the calls and computed tokens to `compute`."""
    scores: list[Score] = await score_async(engines.value, seqs)
    compute.value_calls += len(scores)
    compute.value_tokens += sum(s.computed_tokens for s in scores)
    return [s.value for s in scores]
