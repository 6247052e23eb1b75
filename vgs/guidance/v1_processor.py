"""Q♯ / CD guidance as a V1-model-runner logits processor (the runner vLLM uses on CPU).

V1 hands the processor persistent-batch *indices*: `update_state` reports requests removed,
added (with live references to their prompt and output token lists) and moved/swapped between
indices; `apply(logits)` then gets one row per index. This adapter keeps index → request state,
works out which tokens each guided request has not yet fed to its value-model cache, and
delegates the step to `vgs.guidance.guide.Guide`.

Preemption: a preempted request is removed from the batch (its value cache row is freed) and
re-added on resumption with its partial output; the new state re-feeds prompt + output.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from vgs.guidance.guide import Guide, GuidedRequest
from vgs.guidance.params import validate_sampling_params

if TYPE_CHECKING:
    from vllm.config import VllmConfig

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    req: GuidedRequest
    prompt: list[int]
    output: list[int]  # vLLM's live list: grows as tokens are sampled


def new_tokens_for(req: GuidedRequest, prompt: list[int], output: list[int]) -> tuple[list[int], int]:
    """(tokens of prompt + output that the value cache has not seen. Trailing -1 placeholders
    (async scheduling, before vLLM fills them in) are never fed; if tokens were discarded
    (the sequence is now shorter than the cache), the cache is reset and everything re-fed), and the number of real output tokens."""
    n_out = len(output)
    while n_out and output[n_out - 1] == -1:
        n_out -= 1
    total = len(prompt) + n_out
    fed = req.fed
    if fed > total:
        req.reset()
        fed = 0
    if fed < len(prompt):
        return list(prompt[fed:]) + list(output[:n_out]), n_out
    return list(output[fed - len(prompt):n_out]), n_out


class QSharpV1Processor(LogitsProcessor):
    """Adds Q♯ (or CD) offsets to the rows of requests whose `extra_args` ask for guidance."""

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        validate_sampling_params(sampling_params)

    def __init__(self, vllm_config: "VllmConfig", device: torch.device, is_pin_memory: bool) -> None:
        from vgs.guidance.budget import budget_from_config

        self.guide = Guide(device, budget_from_config(vllm_config, device))
        self.entries: dict[int, _Entry] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # offsets reorder tokens, so greedy requests are guided too

    def _drop(self, index: int) -> None:
        entry = self.entries.pop(index, None)
        if entry is not None:
            self.guide.stop(entry.req)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._drop(index)
        for index, params, prompt, output in batch_update.added:
            self._drop(index)
            req = self.guide.start(params)
            if req is None:
                continue
            if prompt is None:
                log.warning("guidance needs prompt token ids (not prompt embeddings); request left unguided")
                self.guide.stop(req)
                continue
            self.entries[index] = _Entry(req, prompt, output)
        for a, b, direction in batch_update.moved:
            ea, eb = self.entries.pop(a, None), self.entries.pop(b, None)
            if direction == MoveDirectionality.SWAP:
                if eb is not None:
                    self.entries[a] = eb
            elif eb is not None:
                self.guide.stop(eb.req)  # overwritten by a one-way move
            if ea is not None:
                self.entries[b] = ea

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.entries:
            return logits
        rows = sorted(i for i in self.entries if i < logits.shape[0])
        reqs, news, positions = [], [], []
        for i in rows:
            e = self.entries[i]
            reqs.append(e.req)
            if e.req.failed is not None:  # guidance gave up on it: Guide ends it, nothing to feed
                n_out = len(e.output)
                while n_out and e.output[n_out - 1] == -1:
                    n_out -= 1
                news.append([])
                positions.append(n_out)
                continue
            new, n_out = new_tokens_for(e.req, e.prompt, e.output)
            news.append(new)
            positions.append(n_out)
        return self.guide.apply(logits, rows, reqs, news, positions)
