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
from vgs.guidance.transfer import upload
from vgs.guidance.worker_model import CachedValueModel, Feed, GuidanceMemoryError, get_model

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
    stop_token: int | None = None  # a stop token of the request (to end it when guidance fails)
    min_tokens: int = 0
    failed: str | None = None  # why guidance gave up on this request (it is then ended, or left unguided)

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
    def __init__(self, device: torch.device | str, budget_gib: float | None = None):
        self.device = torch.device(device)
        self.budget_gib = budget_gib  # value-model KV budget (None: vgs.guidance.budget default)
        self._reports = _writes_reports()
        # Optional profiling: `VGS_GUIDANCE_TIMING=/path` appends "rows seconds topk_s forward_s"
        # per guided step (what benchmarks/qsharp_overhead.py reads to split the step time; on
        # CUDA the parts are host time, the total is synchronised).
        self._timing = os.environ.get("VGS_GUIDANCE_TIMING") or None
        self._phases: dict[str, float] = {}

    # ---- request lifecycle --------------------------------------------------------------
    def start(self, sampling_params: Any) -> GuidedRequest | None:
        """State for a request entering the batch, or None when it is not guided."""
        params = validate_sampling_params(sampling_params)
        if params is None:
            return None
        model = get_model(params.value_model, self.device, self.budget_gib)
        temp = float(getattr(sampling_params, "temperature", 1.0) or 0.0)
        report = ReportWriter(params.report_key) if params.report_key and self._reports else None
        stops = sorted(getattr(sampling_params, "all_stop_token_ids", None) or
                       getattr(sampling_params, "stop_token_ids", None) or [])
        return GuidedRequest(params, model, model.alloc_row(), temp if temp >= 1e-5 else 1.0, report,
                             stop_token=int(stops[0]) if stops else None,
                             min_tokens=int(getattr(sampling_params, "min_tokens", 0) or 0))

    def fail(self, req: GuidedRequest, message: str) -> None:
        """Give up guiding `req` (its cache cannot fit): free its cache, tell the caller
        through its report (`vgs.guidance.report`) and the worker log. From the next logits
        on, the request is ended with its stop token where it has one (else left unguided),
        so it costs no more compute; every other request goes on unaffected."""
        req.failed = message
        req.model.reset_row(req.row)
        log.error("guided request ended: %s", message)
        if req.report is not None:
            req.report.write_error(message)
            req.report.flush()

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
              new_tokens: "list[list[int]] | Feed", positions: list[int]) -> torch.Tensor:
        """Add the guidance offsets to `logits[rows]` in place (other rows untouched).
        `new_tokens`: per row, the tokens its cache has not seen (host lists; an empty list
        means "no new token since the last step": the last one is rolled back and re-scored),
        or a `Feed` whose rows each have ≥ 1 token (the adapter did the roll-back)."""
        if not rows:
            return logits
        t0 = time.perf_counter() if self._timing else 0.0
        failed = [i for i, r in enumerate(reqs) if r.failed is not None]
        if failed:
            self._end_failed(logits, [rows[i] for i in failed], [reqs[i] for i in failed],
                             [positions[i] for i in failed])
            keep = [i for i in range(len(reqs)) if reqs[i].failed is None]
            rows, reqs, positions = [rows[i] for i in keep], [reqs[i] for i in keep], [positions[i] for i in keep]
            new_tokens = (new_tokens.select(keep) if isinstance(new_tokens, Feed)
                          else [new_tokens[i] for i in keep])
        if rows:
            self._apply(logits, rows, reqs, new_tokens, positions)
        if self._timing:
            if logits.device.type == "cuda":
                torch.cuda.synchronize(logits.device)
            total = time.perf_counter() - t0
            ph = self._phases
            with open(self._timing, "a") as f:  # rows, step, then its parts (top-k, value forward)
                f.write(f"{len(rows)} {total:.6f} {ph.get('topk', 0.0):.6f} {ph.get('forward', 0.0):.6f}\n")
            ph.clear()
        return logits

    def _tick(self, phase: str, t0: float) -> float:
        """With VGS_GUIDANCE_TIMING: add the time since t0 to `phase` (CPU: no device sync)."""
        now = time.perf_counter()
        if self._timing:
            self._phases[phase] = self._phases.get(phase, 0.0) + now - t0
        return now

    def _end_failed(self, logits: torch.Tensor, rows: list[int], reqs: list[GuidedRequest],
                    positions: list[int]) -> None:
        """Rows of requests guidance gave up on: only their stop token stays possible."""
        for row, req, pos in zip(rows, reqs, positions):
            if req.stop_token is None or pos < req.min_tokens or req.stop_token >= logits.shape[1]:
                continue  # cannot end it here: it goes on unguided
            logits[row] = float("-inf")
            logits[row, req.stop_token] = 0.0

    def _apply(self, logits: torch.Tensor, rows: list[int], reqs: list[GuidedRequest],
               new_tokens: "list[list[int]] | Feed", positions: list[int]) -> None:
        if isinstance(new_tokens, Feed):
            feed = new_tokens
        else:
            lists = []
            for req, new in zip(reqs, new_tokens):
                if not new:
                    # Nothing new since the last step (its sample was discarded, e.g. a chunked
                    # prefill): roll the last token back out of the cache and score again.
                    if req.last_token is None or req.fed == 0:
                        raise RuntimeError("guided request with no tokens to condition on")
                    req.model.truncate_row(req.row, req.fed - 1)
                    new = [req.last_token]
                req.last_token = int(new[-1])
                lists.append(new)
            feed = Feed.from_lists(lists)

        dev = logits.device
        all_rows = len(rows) == logits.shape[0] and rows == list(range(len(rows)))
        rows_t = None if all_rows else upload(rows, dev, torch.long)
        ref = logits if all_rows else logits.index_select(0, rows_t)
        ks = [r.params.top_k for r in reqs]
        kmax = min(max(ks), logits.shape[1])
        t = time.perf_counter()
        cand = core.top_k_candidates(ref, kmax)  # [B, kmax]
        self._tick("topk", t)
        # `valid` [B, kmax] masks candidates that get no offset (a row's k below kmax, a token the
        # value model cannot embed, a row whose cache could not fit); built only when needed,
        # since in the engine every extra op costs tens of µs (docs/benchmarks_speed.md).
        valid: torch.Tensor | None = None

        def mask() -> torch.Tensor:
            nonlocal valid
            if valid is None:
                valid = (torch.arange(kmax, device=dev)[None, :] < upload(ks, dev, torch.long)[:, None]
                         if min(ks) < kmax else torch.ones(cand.shape, dtype=torch.bool, device=dev))
            return valid

        if min(ks) < kmax:
            mask()
        offs: torch.Tensor | None = None

        groups: dict[int, list[int]] = {}
        for i, r in enumerate(reqs):
            groups.setdefault(id(r.model), []).append(i)
        value_tokens = [n + kmax for n in feed.lengths]  # padded candidates are computed too
        for idx in groups.values():
            model = reqs[idx[0]].model
            while idx:
                whole = len(idx) == len(reqs)
                sel = None if whole else upload(idx, dev, torch.long)
                c = cand if whole else cand.index_select(0, sel)
                try:
                    t = time.perf_counter()
                    scores = model.score([reqs[i].row for i in idx], feed.select(idx) if not whole else feed, c)
                    self._tick("forward", t)
                except GuidanceMemoryError as exc:
                    # Those rows cannot be cached within the budget: end them; score the rest.
                    out = set(exc.rows)
                    for i in idx:
                        if reqs[i].row in out:
                            self.fail(reqs[i], str(exc))
                            mask()[i] = False
                            value_tokens[i] = 0
                    idx = [i for i in idx if reqs[i].row not in out]
                    continue
                etas = {reqs[i].params.eta for i in idx}
                methods = {reqs[i].params.method for i in idx}
                # one eta / method for the group (the usual case): scalars, one offset form computed
                o = core.compute_offsets(
                    scores, etas.pop() if len(etas) == 1 else upload([reqs[i].params.eta for i in idx], model.device, torch.float32),
                    methods.pop() if len(methods) == 1 else [reqs[i].params.method for i in idx]).to(dev).float()
                if model.vocab_size < logits.shape[1]:
                    ok = c < model.vocab_size  # tokens the value model cannot embed: no offset
                    if whole:
                        mask().logical_and_(ok)
                    else:
                        mask()[sel] &= ok
                if whole:
                    offs = o
                else:
                    if offs is None:
                        offs = torch.zeros(cand.shape, dtype=torch.float32, device=dev)
                    offs[sel] = o
                break
        if offs is None:  # no row could be scored
            offs = torch.zeros(cand.shape, dtype=torch.float32, device=dev)
            mask()
        if valid is not None:
            offs = offs.masked_fill(~valid, 0.0)

        rep = [i for i, r in enumerate(reqs) if r.report is not None and r.failed is None]
        if rep:
            sel = upload(rep, dev, torch.long)
            temps = upload([reqs[i].temperature for i in rep], dev, torch.float32)
            sub, c, o, v = ref.index_select(0, sel), cand.index_select(0, sel), offs.index_select(0, sel), None if valid is None else valid.index_select(0, sel)
            # One device→host read for both KLs (reports must be written before this step's
            # token can reach the caller, so this read cannot be deferred).
            kl, kl1 = torch.stack([core.guided_kl(sub, c, o, temps, v), core.guided_kl(sub, c, o, 1.0, v)]).tolist()
            for j, i in enumerate(rep):
                reqs[i].report.write(positions[i], kl[j], kl1[j], value_tokens[i])
                reqs[i].report.flush()

        if all_rows:
            core.add_offsets(logits, cand, offs)
        else:
            logits.index_put_((rows_t[:, None].expand_as(cand), cand), offs.to(logits.dtype), accumulate=True)
        now_failed = [i for i, r in enumerate(reqs) if r.failed is not None]
        if now_failed:  # end them from this very step
            self._end_failed(logits, [rows[i] for i in now_failed], [reqs[i] for i in now_failed],
                             [positions[i] for i in now_failed])
