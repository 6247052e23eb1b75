"""The guidance step shared by the V1 and MRV2 processors.

The adapters translate their runner's bookkeeping (V1: persistent-batch indices with
add/remove/move updates and live output-token lists; MRV2: recycled slots and a per-step row
→ slot mapping over an on-device token table) into one call per engine step:

    guide.apply(logits, rows, requests, new_tokens, positions)

where `rows` are the logits rows of guided requests, `new_tokens[i]` the tokens of request i
not yet in its value-model cache, and `positions[i]` the index of the output token this step
samples. Everything else — top-k, the batched value-model forward, offsets, KL, reports —
happens here once for both runners.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from vgs.guidance import offsets as core
from vgs.guidance.params import GuideParams, validate_sampling_params
from vgs.guidance.report import ReportWriter
from vgs.guidance.worker_model import CachedValueModel, get_model

log = logging.getLogger(__name__)


@dataclass
class GuidedRequest:
    """Worker-side state of one guided request (one persistent-batch index / slot)."""

    params: GuideParams
    model: CachedValueModel
    row: int  # value-model cache row
    temperature: float  # for the reported KL (1.0 for greedy requests)
    report: ReportWriter | None = None
    last_token: int | None = None  # last token fed, to re-score after a step with no new token
    stopped: bool = False

    @property
    def fed(self) -> int:
        """Tokens (prompt + output) already in this request's value-model cache."""
        return self.model.lens[self.row]

    def reset(self) -> None:
        """Drop the cache (tokens were discarded or changed); the next step re-feeds them."""
        self.model.reset_row(self.row)
        self.last_token = None


def _writes_reports() -> bool:
    """Only one rank writes reports: every TP rank runs the processor on identical data."""
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank() == 0
    except Exception:  # noqa: BLE001 - not initialised (unit tests, single process)
        return True


class Guide:
    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._reports = _writes_reports()
        # Optional profiling: `VGS_GUIDANCE_TIMING=/path` appends "rows seconds" per guided step
        # (what benchmarks/qsharp_overhead.py reads to split the step time).
        self._timing = os.environ.get("VGS_GUIDANCE_TIMING") or None

    # ---- request lifecycle --------------------------------------------------------------
    def start(self, sampling_params: Any) -> GuidedRequest | None:
        """State for a request entering the batch, or None when it is not guided."""
        params = validate_sampling_params(sampling_params)
        if params is None:
            return None
        model = get_model(params.value_model, self.device)
        temp = float(getattr(sampling_params, "temperature", 1.0) or 0.0)
        report = ReportWriter(params.report_key) if params.report_key and self._reports else None
        return GuidedRequest(params, model, model.alloc_row(), temp if temp >= 1e-5 else 1.0, report)

    def stop(self, req: GuidedRequest) -> None:
        """The request left the batch (finished, aborted, preempted) or its slot was reused."""
        if req.stopped:
            return
        req.stopped = True
        req.model.free_row(req.row)
        if req.report is not None:
            req.report.close()

    # ---- one engine step ----------------------------------------------------------------
    def apply(self, logits: torch.Tensor, rows: list[int], reqs: list[GuidedRequest],
              new_tokens: list[list[int]], positions: list[int]) -> torch.Tensor:
        """Add the guidance offsets to `logits[rows]` in place (other rows untouched)."""
        if not rows:
            return logits
        t0 = time.perf_counter() if self._timing else 0.0
        self._apply(logits, rows, reqs, new_tokens, positions)
        if self._timing:
            if logits.device.type == "cuda":
                torch.cuda.synchronize(logits.device)
            with open(self._timing, "a") as f:
                f.write(f"{len(rows)} {time.perf_counter() - t0:.6f}\n")
        return logits

    def _apply(self, logits: torch.Tensor, rows: list[int], reqs: list[GuidedRequest],
               new_tokens: list[list[int]], positions: list[int]) -> None:
        feed = []
        for req, new in zip(reqs, new_tokens):
            if not new:
                # Nothing new since the last step (its sample was discarded, e.g. a chunked
                # prefill): roll the last token back out of the cache and score again.
                if req.last_token is None or req.fed == 0:
                    raise RuntimeError("guided request with no tokens to condition on")
                req.model.lens[req.row] -= 1
                new = [req.last_token]
            req.last_token = int(new[-1])
            feed.append(new)

        dev = logits.device
        all_rows = len(rows) == logits.shape[0] and rows == list(range(len(rows)))
        rows_t = None if all_rows else torch.tensor(rows, device=dev)
        ref = logits if all_rows else logits.index_select(0, rows_t)
        ks = [r.params.top_k for r in reqs]
        kmax = min(max(ks), logits.shape[1])
        cand = core.top_k_candidates(ref, kmax)  # [B, kmax]
        valid = torch.arange(kmax, device=dev)[None, :] < torch.tensor(ks, device=dev)[:, None]
        offs = torch.zeros(cand.shape, dtype=torch.float32, device=dev)

        groups: dict[int, list[int]] = {}
        for i, r in enumerate(reqs):
            groups.setdefault(id(r.model), []).append(i)
        value_tokens = [len(f) + kmax for f in feed]  # padded candidates are computed too
        for idx in groups.values():
            model = reqs[idx[0]].model
            sel = torch.tensor(idx, device=dev)
            c = cand.index_select(0, sel) if len(idx) != len(reqs) else cand
            scores = model.score([reqs[i].row for i in idx], [feed[i] for i in idx], c)
            o = core.compute_offsets(scores, [reqs[i].params.eta for i in idx],
                                     [reqs[i].params.method for i in idx]).to(dev)
            if model.vocab_size < logits.shape[1]:
                valid[sel] &= c < model.vocab_size  # tokens the value model cannot embed: no offset
            offs[sel] = o.float()
        offs = offs.masked_fill(~valid, 0.0)

        rep = [i for i, r in enumerate(reqs) if r.report is not None]
        if rep:
            sel = torch.tensor(rep, device=dev)
            temps = torch.tensor([reqs[i].temperature for i in rep], dtype=torch.float32, device=dev)
            sub, c, o, v = ref.index_select(0, sel), cand.index_select(0, sel), offs.index_select(0, sel), valid.index_select(0, sel)
            kl = core.guided_kl(sub, c, o, temps, v).tolist()
            kl1 = core.guided_kl(sub, c, o, 1.0, v).tolist()
            for j, i in enumerate(rep):
                reqs[i].report.write(positions[i], kl[j], kl1[j], value_tokens[i])
                reqs[i].report.flush()

        if all_rows:
            core.add_offsets(logits, cand, offs)
        else:
            logits.index_put_((rows_t[:, None].expand_as(cand), cand), offs.to(logits.dtype), accumulate=True)
