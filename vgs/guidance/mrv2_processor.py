"""Q♯ / CD guidance as a Model Runner V2 logits processor (vLLM's default runner on CUDA).

MRV2 differs from V1 in ways that matter here:
- state is keyed by request *slot*; slots are recycled through a free list and there is no
  removal callback, so `add_request` must drop whatever the slot's previous occupant left;
- `apply(logits, ctx)` gets rows that are not slots: `ctx.idx_mapping_np[i]` is the slot of
  batch position i (rows = batch positions without speculative decoding, which this processor
  refuses);
- committed tokens live on the device in `req_states.all_token_ids[slot, :total_len]`; the
  token at `pos` of a row is visible at apply time, so the prefix of row i is
  `all_token_ids[slot, :seq_len_i]` with `seq_len_i = ctx.seq_lens_upper_bound_np[i]`;
- rows of requests still in chunked prefill (`seq_len < prefill_len[slot]`) produce no token
  and are skipped; a request resumed after preemption is re-added (possibly to another slot)
  with `prefill_len` = prompt + partial output, and its new state re-feeds all of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor

from vgs.guidance.params import validate_sampling_params

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcRequestState


class QSharpMRV2Processor(LogitsProcessor):
    """Adds Q♯ (or CD) offsets to the rows of requests whose `extra_args` ask for guidance."""

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        validate_sampling_params(sampling_params)

    def __init__(self, vllm_config: "VllmConfig", req_states: "LogitsProcRequestState"):
        from vgs.guidance.guide import Guide  # torch-heavy: keep the frontend import light

        spec = getattr(vllm_config, "speculative_config", None) if vllm_config is not None else None
        if spec is not None:
            raise ValueError("Q♯/CD guidance does not support speculative decoding (rows would not be requests)")
        from vgs.guidance.budget import budget_from_config

        self.state = req_states
        self.guide = Guide(req_states.device, budget_from_config(vllm_config, req_states.device))
        self.slots: dict[int, Any] = {}  # slot → GuidedRequest

    def add_request(self, req_idx: int, sampling_params: Any) -> bool:
        old = self.slots.pop(req_idx, None)
        if old is not None:
            self.guide.stop(old)  # the slot's previous occupant has left
        req = self.guide.start(sampling_params)
        if req is None:
            return False
        self.slots[req_idx] = req
        return True

    def apply(self, logits: "torch.Tensor", ctx: "LogitsContext") -> "torch.Tensor":
        if not self.slots:
            return logits
        slots = [int(s) for s in ctx.idx_mapping_np]
        if logits.shape[0] != len(slots):
            raise RuntimeError("guidance expects one logits row per request (no speculative decoding)")
        prompt_len, prefill_len = self.state.prompt_len.np, self.state.prefill_len.np
        rows, reqs, spans = [], [], []
        for i, slot in enumerate(slots):
            req = self.slots.get(slot)
            if req is None:
                continue
            seq_len = int(ctx.seq_lens_upper_bound_np[i])
            if seq_len < int(prefill_len[slot]):
                continue  # still prefilling in chunks: this row's sample is discarded
            rows.append(i)
            reqs.append(req)
            spans.append((slot, self._start(req, seq_len), seq_len))
        if not rows:
            return logits
        positions = [seq_len - int(prompt_len[slot]) for slot, _, seq_len in spans]
        return self.guide.apply(logits, rows, reqs, self._feed(spans), positions)

    @staticmethod
    def _start(req: Any, seq_len: int) -> int:
        """First position of `all_token_ids` this step feeds to the request's value cache,
        worked out on the host from lengths alone: tokens discarded (the sequence is now
        shorter than the cache) reset it; no new token since the last step (a discarded
        sample) rolls the last one back so it is scored again."""
        if req.failed is not None:
            return max(seq_len - 1, 0)  # not scored any more (Guide ends it); keep the span trivial
        if req.fed > seq_len:
            req.reset()
        if req.fed == seq_len and seq_len > 0:
            req.model.truncate_row(req.row, seq_len - 1)
        return req.fed

    def _feed(self, spans: list[tuple[int, int, int]]) -> Any:
        """The new tokens all_token_ids[slot, start:end] of each row, gathered on the device
        (`Feed.from_token_table`): no token is copied back to the host (no GPU→CPU sync)."""
        from vgs.guidance.worker_model import Feed

        return Feed.from_token_table(self.state.all_token_ids.gpu, spans)
