"""Engine sets and admission, shared by `vgs eval` and `vgs serve`.

- `build_engines`: the policy engine first, then the value scorer a method set needs (two
  engines start one after the other), each with explicit KV sizes.
- `Admission`: a weighted limit on *live sequences*, not requests. One VGS search at budget
  64 x 4 trees holds 256 sequences per round, a sampling request with n = 16 holds 16. The
  limit is sized so the policy's KV cache (and with it the prefix cache every block
  continuation and value call relies on) keeps the working set; past it, vLLM would preempt
  and re-prefill. The eval runner waits for room; the server queues up to `max_queued`
  sequences and refuses more (HTTP 429 with Retry-After).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any, AsyncIterator

from vgs.config import EngineConfig
from vgs.errors import VGSError


class Busy(VGSError):
    """More work is queued than the server admits; retry later."""


def build_engines(policy: EngineConfig, value_model: str | None = None, *, needs_scorer: bool = False,
                  value_backend: str = "vllm", value_engine: dict[str, Any] | None = None):
    """Policy engine (guidance processor loaded), then the value scorer when `needs_scorer`.
    `value_model` is also what Q#/CD load in-worker. Returns `vgs.search.Engines`."""
    from vgs.cpu_tuning import engine_core_masks, omp_bind
    from vgs.engine import PolicyEngine
    from vgs.search import Engines
    from vgs.value import make_value_scorer

    if needs_scorer and not value_model:
        raise VGSError("this method needs a value model (--value-model)")
    # two vLLM engines on a small CPU: each worker on its own cores (vgs.cpu_tuning)
    masks = engine_core_masks() if needs_scorer and value_backend == "vllm" else None
    with omp_bind(masks and masks[0]):
        pol = PolicyEngine(policy)
    scorer = None
    try:
        if needs_scorer:
            if value_backend == "vllm":
                with omp_bind(masks and masks[1]):
                    scorer = make_value_scorer(value_model, backend="vllm", tokenizer=policy.tokenizer or policy.model,
                                               **(value_engine or {}))
            else:  # transformers: bf16 on GPU, fp32 on CPU; engine knobs do not apply
                scorer = make_value_scorer(value_model, backend="hf")
    except BaseException:
        pol.close()
        raise
    return Engines(policy=pol, value=scorer, value_model=value_model)


def close_engines(engines: Any) -> None:
    for e in (getattr(engines, "value", None), getattr(engines, "policy", None)):
        if e is not None and hasattr(e, "close"):
            e.close()


def kv_capacity_tokens(policy: Any) -> int | None:
    """Tokens the policy's KV cache holds (vLLM's block count x block size), if known."""
    try:
        cc = policy.llm.vllm_config.cache_config
        return int(cc.num_gpu_blocks) * int(cc.block_size) if cc.num_gpu_blocks else None
    except AttributeError:
        return None


def default_max_sequences(policy: Any, max_tokens: int, prompt_tokens: int = 512) -> int:
    """Live sequences whose full length fits the policy's KV cache at once (at least 1)."""
    cap = kv_capacity_tokens(policy)
    if not cap:
        return 256
    return max(1, cap // max(1, max_tokens + prompt_tokens))


class Admission:
    """FIFO weighted semaphore over live sequences. A search heavier than the whole limit is
    admitted alone (clamped), so nothing is refused for being big; the server caps size with
    --max-budget instead."""

    def __init__(self, max_sequences: int, max_queued: int | None = None):
        if max_sequences < 1:
            raise VGSError(f"max sequences must be >= 1, got {max_sequences}", param="max_sequences")
        self.capacity = max_sequences
        self.max_queued = max_sequences if max_queued is None else max_queued
        self.in_use = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    @property
    def queued(self) -> int:
        """Sequences waiting for admission."""
        return sum(w for w, f in self._waiters if not f.done())

    def _grant(self) -> None:
        while self._waiters:
            w, fut = self._waiters[0]
            if fut.done():  # cancelled while waiting
                self._waiters.popleft()
                continue
            if self.in_use + w > self.capacity and self.in_use > 0:
                return
            self._waiters.popleft()
            self.in_use += w
            fut.set_result(None)

    def would_refuse(self, weight: int) -> bool:
        """Whether `acquire(weight)` would raise Busy now."""
        w = max(1, min(int(weight), self.capacity))
        if not self._waiters and (self.in_use + w <= self.capacity or self.in_use == 0):
            return False
        return self.queued + w > self.max_queued

    async def acquire(self, weight: int, wait: bool = True) -> int:
        w = max(1, min(int(weight), self.capacity))
        if not self._waiters and (self.in_use + w <= self.capacity or self.in_use == 0):
            self.in_use += w
            return w
        if not wait or self.queued + w > self.max_queued:
            raise Busy(f"server busy: {self.in_use} sequences in flight and {self.queued} queued "
                       f"(limit {self.capacity}); retry later")
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._waiters.append((w, fut))
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():  # granted just as we were cancelled
                self.release(w)
            raise
        return w

    def release(self, w: int) -> None:
        self.in_use -= w
        self._grant()

    @contextlib.asynccontextmanager
    async def slot(self, weight: int, wait: bool = True) -> AsyncIterator[None]:
        w = await self.acquire(weight, wait)
        try:
            yield
        finally:
            self.release(w)
