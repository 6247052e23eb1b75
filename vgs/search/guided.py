"""Token-level guided sampling (`--method qsharp|cd`): `search.n` independent samples per
problem, each decoded with the value model's offsets added at every token by the guidance
logits processor the policy engine loads (`vgs.guidance`). Voting over the n samples (maj@n,
pass@1) is the caller's job, exactly as for plain sampling.

Each sample is its own vLLM request (n = 1, all in flight together) with seed `seed + j` — the seeds vLLM gives the
children of an n-sample request, so guided and unguided runs with the same seeds are
comparable — and its own `vgs_report_key`, through which the worker reports the sample's KL and
value-model tokens (see `vgs.guidance.report`).
"""

from __future__ import annotations

import asyncio
import os
import uuid

from vgs.config import SamplingConfig, SearchConfig
from vgs.engine import GenRequest
from vgs.errors import VGSError
from vgs.guidance.params import GuideParams, parse_guide_params
from vgs.guidance.report import read_report, report_path
from vgs.records import Candidate, Compute, SearchResult


def value_model_params(path: str) -> int:
    """Parameter count of a value-model checkpoint (built on the meta device, nothing read)."""
    try:
        import torch

        from vgs.modeling import Qwen2ForClassifier
        from vgs.guidance.params import resolve_value_model_path

        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(resolve_value_model_path(path))
        with torch.device("meta"):
            model = Qwen2ForClassifier(cfg)
        return int(sum(p.numel() for p in model.parameters()))
    except Exception:  # noqa: BLE001 - accounting must never stop a run
        return 0


def guide_params(search: SearchConfig, value_model: str, report_key: str | None = None) -> GuideParams:
    """The per-request guidance a search config asks for, validated as the worker will."""
    try:
        params = parse_guide_params({"vgs_guidance": search.method, "vgs_value_model": value_model,
                                     "vgs_eta": float(search.eta), "vgs_top_k": int(search.top_k)})
    except ValueError as exc:
        raise VGSError(str(exc)) from None
    assert params is not None
    return GuideParams(params.method, params.value_model, params.eta, params.top_k, report_key)


async def guided_sample(prompt: list[int], seed: int, engines, search: SearchConfig, sampling: SamplingConfig,
                        events=None) -> SearchResult:
    """`search.n` guided samples of one prompt, each its own vLLM request (run concurrently)."""
    from vgs.aio import gather_or_cancel

    if search.method not in ("qsharp", "cd"):
        raise VGSError(f"guided_sample runs qsharp or cd, not {search.method!r}")
    if not engines.value_model:
        raise VGSError(f"method {search.method!r} needs a value model (--value-model)")
    policy = engines.policy
    base = guide_params(search, engines.value_model)
    run = uuid.uuid4().hex
    keys = [f"{run}-{j}" for j in range(search.n)]
    reqs = [GenRequest(list(prompt), sampling.max_tokens, n=1, seed=seed + j,
                       extra_args=GuideParams(base.method, base.value_model, base.eta, base.top_k, key).to_extra_args())
            for j, key in enumerate(keys)]
    try:
        outs = await gather_or_cancel(*(policy.agenerate(r, sampling) for r in reqs))
    except BaseException:
        for key in keys:  # a cancelled or failed search leaves no report file behind
            drop_report(key)
        raise
    # off the engine loop: the first call builds the value model on the meta device, and report
    # files are parsed per sample (a long sample's report is one line per token)
    comp = Compute(policy_params=policy.num_params,
                   value_params=await asyncio.to_thread(_value_params, engines.value_model))
    cands = []
    error = None
    for j, (key, samples) in enumerate(zip(keys, outs)):
        sample = samples[0]
        rep = await asyncio.to_thread(read_report, key, len(sample.token_ids))
        if rep is None and sample.token_ids:
            raise VGSError("the policy engine did not apply guidance (no report from the worker); build it "
                           "with the guidance logits processor (PolicyEngine's default)")
        info = {"eta": base.eta, "top_k": base.top_k}
        if rep is not None and rep.error and error is None:
            error = f"sample {j}: {rep.error}"  # the worker gave up guiding it (value-model KV budget)
        if rep is not None:
            info["value_tokens"] = rep.value_tokens
            if search.report_kl:
                info.update(kl=rep.kl, kl_t1=rep.kl_t1)
            comp.value_tokens += rep.value_tokens
            comp.value_calls += rep.steps * base.top_k
        comp.policy_tokens += len(sample.token_ids)
        comp.prefill_tokens += sample.prefill_tokens
        cands.append(Candidate(token_ids=sample.token_ids, finish_reason=sample.finish_reason, info=info))
    return SearchResult(cands, comp, error=error)


def drop_report(key: str) -> None:
    """Remove a report the worker may have written for an aborted request."""
    try:
        os.remove(report_path(key))
    except OSError:
        pass


_PARAMS: dict[str, int] = {}


def _value_params(path: str) -> int:
    if path not in _PARAMS:
        _PARAMS[path] = value_model_params(path)
    return _PARAMS[path]
