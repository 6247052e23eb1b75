"""How searches reach a value model: `score_async`, with a `Score` per sequence.

An async scorer (`VllmValueScorer`, anything with `ascore`) is awaited directly on the
engine loop: it submits one vLLM request per sequence, vLLM's scheduler batches the
requests of all searches in flight, and cancelling a search aborts its requests inside the
engine. A sync scorer (`HFValueScorer`) sits behind a `ValueBatcher`:

Concurrent searches each ask for a handful of values per round. `ValueBatcher.score` queues
the call; a single drain task waits a few milliseconds for more calls (bounded by
`max_wait_ms` and `max_batch` sequences), then sends them to the model as one batch on the
scorer's own worker thread (the transformers scorer is sync and not thread-safe; one thread
keeps it that way and keeps the event loop free). A caller cancelled before its batch is
sent is dropped from it; a batch already sent runs to its end.

Either way each caller gets back a `Score` per sequence with the tokens the model actually
computed for *that* sequence, so compute is attributed to the right request under
concurrency (no shared counters).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

from vgs.errors import VGSError


@dataclass(frozen=True)
class Score:
    value: float
    computed_tokens: int  # tokens run through the model for this sequence (after prefix reuse)


class ValueBatcher:
    """Async, coalescing front of a sync scorer (`HFValueScorer`, or any object with
    `score(seqs) -> list[float]`; without `score_with_cost` every token counts). An async
    scorer does not need one: `score_async` awaits it directly."""

    def __init__(self, scorer: Any, max_batch: int = 512, max_wait_ms: float = 3.0):
        self.scorer = scorer
        self.num_params = int(getattr(scorer, "num_params", 0))
        self.max_model_len = int(getattr(scorer, "max_model_len", 1 << 30))
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.batches = 0  # model calls made (for tests and /metrics)
        self._pending: list[tuple[list[list[int]], asyncio.Future]] = []
        self._drain: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="vgs-value")

    async def score(self, sequences: Sequence[Sequence[int]]) -> list[Score]:
        if not sequences:
            return []
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending.append(([list(s) for s in sequences], fut))
        if self._drain is None or self._drain.done():
            self._drain = asyncio.ensure_future(self._run())
        return await fut

    def _call(self, seqs: list[list[int]]) -> tuple[list[float], list[int]]:
        if hasattr(self.scorer, "score_with_cost"):
            return self.scorer.score_with_cost(seqs)
        return list(self.scorer.score(seqs)), [len(s) for s in seqs]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            if sum(len(s) for s, _ in self._pending) < self.max_batch:
                await asyncio.sleep(self.max_wait)  # let concurrent searches join this batch
            batch, size = [], 0
            while self._pending and (not batch or size + len(self._pending[0][0]) <= self.max_batch):
                seqs, fut = self._pending.pop(0)
                if fut.done():  # cancelled while queued: its sequences are dropped
                    continue
                batch.append((seqs, fut))
                size += len(seqs)
            if not batch:
                continue
            flat = [s for seqs, _ in batch for s in seqs]
            try:
                values, costs = await loop.run_in_executor(self._pool, self._call, flat)
                self.batches += 1
            except Exception:  # noqa: BLE001 - one bad call must not fail its batch-mates
                for seqs, fut in batch:  # retry alone, so the error lands on the caller that caused it
                    await self._alone(loop, seqs, fut)
                continue
            i = 0
            for seqs, fut in batch:
                if not fut.done():
                    fut.set_result([Score(float(v), int(c)) for v, c in zip(values[i:i + len(seqs)],
                                                                               costs[i:i + len(seqs)])])
                i += len(seqs)

    async def _alone(self, loop: asyncio.AbstractEventLoop, seqs: list[list[int]], fut: asyncio.Future) -> None:
        try:
            values, costs = await loop.run_in_executor(self._pool, self._call, seqs)
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            if not fut.done():
                fut.set_exception(exc)
            return
        if not fut.done():
            fut.set_result([Score(float(v), int(c)) for v, c in zip(values, costs)])

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def batcher_for(scorer: Any) -> ValueBatcher | None:
    """The (one, cached) batcher of a sync scorer, so every search sharing it shares its batches."""
    if scorer is None:
        return None
    if isinstance(scorer, ValueBatcher):
        return scorer
    b = getattr(scorer, "_vgs_batcher", None)
    if b is None:
        b = ValueBatcher(scorer)
        try:
            scorer._vgs_batcher = b
        except AttributeError:  # a scorer with __slots__: no sharing, still correct
            pass
    return b


def is_async_scorer(scorer: Any) -> bool:
    """True for a scorer searches await directly (it has `ascore`), not through a batcher."""
    return callable(getattr(scorer, "ascore", None))


async def score_async(scorer: Any, sequences: Sequence[Sequence[int]]) -> list[Score]:
    """Values of `sequences` with per-sequence cost, from any scorer: an async one awaited
    directly (so cancellation reaches its model requests), a sync one through its shared
    `ValueBatcher`."""
    if is_async_scorer(scorer):
        return await scorer.ascore(sequences)
    b = batcher_for(scorer)
    if b is None:
        raise VGSError("this method needs a value model (--value-model)")
    return await b.score(sequences)
