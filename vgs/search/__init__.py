"""Search strategies: one `async` per-problem implementation of each method, over an async
policy backend (`PolicyEngine.agenerate`) and the coalescing value batcher
(`vgs.batcher`). `search(prompt, seed, engines, ...)` is the one entry point: the eval runner
runs every problem's search concurrently on the engine loop, the server runs it per request.
Problems advance at their own pace (no global round barrier); vLLM's continuous batching
merges the requests of all problems in flight.

`run_search(prompts, seeds, ...)` is the small sync facade for sync callers (collect,
speed scripts, tests): it runs the same per-problem searches concurrently on the engine loop
and waits. There is no second implementation.
"""

from __future__ import annotations

from typing import Callable

from vgs.config import SamplingConfig, SearchConfig
from vgs.errors import VGSError
from vgs.records import SearchResult
from vgs.search.common import Engines, SearchEvents, derive_seed

__all__ = ["Engines", "SearchEvents", "derive_seed", "search", "check_engines", "check_lengths", "run_search"]


async def search(prompt: list[int], seed: int, engines: Engines, cfg: SearchConfig, sampling: SamplingConfig,
                 events: SearchEvents | None = None) -> SearchResult:
    """Run `cfg.method` on one prompt; `seed` seeds everything random. Must run on the engine
    loop (`vgs.aio`). Cancelling it aborts its vLLM requests and drops its queued value calls."""
    from vgs.search.methods import get_method

    method = get_method(cfg.validate().method)
    sampling.validate()
    check_engines(method.name, engines)
    check_lengths(len(prompt), engines, cfg, sampling)
    return await method.run(list(prompt), seed, engines, cfg, sampling, events)


def check_engines(method_name: str, engines: Engines) -> None:
    from vgs.search.methods import get_method

    m = get_method(method_name)
    if (m.needs_scorer and engines.value is None) or (m.needs_guidance_model and not engines.value_model):
        raise VGSError(f"method {method_name!r} needs a value model (--value-model)", param="search.method")


def check_lengths(prompt_len: int, engines: Engines, cfg: SearchConfig, sampling: SamplingConfig) -> None:
    """Admission: prompt + max_tokens must fit the policy's context and, for scored methods,
    the value model's (it reads the full sequence), so nothing fails mid-search."""
    from vgs.search.methods import get_method

    total = prompt_len + sampling.max_tokens
    limit = getattr(engines.policy, "max_model_len", None)
    if limit and total > limit:
        raise VGSError(f"prompt ({prompt_len} tokens) + max_tokens ({sampling.max_tokens}) exceeds the policy's "
                       f"context of {limit} tokens; lower max_tokens or raise --max-model-len", param="max_tokens")
    method = get_method(cfg.method)
    vlimit = getattr(engines.value, "max_model_len", None) if method.needs_scorer else None
    if vlimit and total > vlimit:
        raise VGSError(f"prompt ({prompt_len} tokens) + max_tokens ({sampling.max_tokens}) exceeds the value "
                       f"model's context of {vlimit} tokens; lower max_tokens or raise the value model's "
                       "--max-model-len", param="max_tokens")
    if method.needs_guidance_model and engines.value_model:
        from vgs.guidance.params import value_model_context

        try:
            glimit = value_model_context(engines.value_model)
        except ValueError as exc:
            raise VGSError(str(exc), param="search.method") from None
        if glimit and total > glimit:
            raise VGSError(f"prompt ({prompt_len} tokens) + max_tokens ({sampling.max_tokens}) exceeds the guidance "
                           f"value model's context of {glimit} tokens (max_position_embeddings); lower max_tokens",
                           param="max_tokens")


def run_search(prompts: list[list[int]], seeds: list[int], engines: Engines, search_cfg: SearchConfig,
               sampling: SamplingConfig, on_round: Callable[[int, int], None] | None = None) -> list[SearchResult]:
    """Sync facade: `search` for every prompt, concurrently on the engine loop; `seeds[i]` seeds
    prompt i. `on_round(round, active)` is called (from the engine loop) after each tree round."""
    from vgs.aio import gather_or_cancel, run_sync

    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    events = None
    if on_round is not None:
        class _Rounds(SearchEvents):
            def round(self, tree, round, active, best_value):  # noqa: A002
                on_round(round + 1, active)
        events = _Rounds()
    search_cfg.validate()
    for p in prompts:  # every error before any work starts
        check_engines(search_cfg.method, engines)
        check_lengths(len(p), engines, search_cfg, sampling)
    return run_sync(gather_or_cancel(*(search(p, s, engines, search_cfg, sampling, events)
                                       for p, s in zip(prompts, seeds))))
