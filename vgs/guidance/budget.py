"""How much memory the guidance processor's value-model KV cache may use.

The Q♯/CD processor runs its own value model inside the policy engine's worker, so its cache
is memory vLLM does not know about. It is bounded by one budget per engine (GiB, per value
model), set by whoever builds the engine and passed to the worker in vLLM's
`additional_config` (`{"vgs_guidance_kv_gib": N}`; `vllm serve --additional-config` for
servers), else `$VGS_GUIDANCE_KV_GIB`, else a default (`DEFAULT_GPU_GIB` on a GPU,
`DEFAULT_CPU_GIB` on CPU).

Counted against the engine's memory split: on a GPU, `PolicyEngine` lowers the policy's
`gpu_memory_utilization` by budget + value-model weights (`split_gpu_memory`), so vLLM's
own KV cache leaves that room; with an explicit `kv_cache_gib` (CPU, or a GPU shared by
several engines) the budget comes on top of it and the caller sizes both.
"""

from __future__ import annotations

import os
from typing import Any

CONFIG_KEY = "vgs_guidance_kv_gib"
ENV = "VGS_GUIDANCE_KV_GIB"
DEFAULT_GPU_GIB = 8.0
DEFAULT_CPU_GIB = 0.5


def default_budget_gib(device: Any) -> float:
    env = os.environ.get(ENV)
    if env:
        return float(env)
    return DEFAULT_GPU_GIB if str(device).startswith("cuda") else DEFAULT_CPU_GIB


def budget_from_config(vllm_config: Any, device: Any) -> float:
    """The budget the engine was built with (`additional_config`), else the default."""
    extra = getattr(vllm_config, "additional_config", None) if vllm_config is not None else None
    if isinstance(extra, dict) and extra.get(CONFIG_KEY) is not None:
        value = float(extra[CONFIG_KEY])
        if not value > 0:
            raise ValueError(f"{CONFIG_KEY} must be > 0, got {extra[CONFIG_KEY]!r}")
        return value
    return default_budget_gib(device)


def split_gpu_memory(gpu_memory_utilization: float, budget_gib: float, value_weights_gib: float,
                     total_gib: float) -> float:
    """The policy engine's share once the guidance budget and the value weights are set aside
    out of the same split; a clear error when nothing would be left."""
    from vgs.errors import VGSError

    share = gpu_memory_utilization - (budget_gib + value_weights_gib) / total_gib
    if share <= 0.05:
        raise VGSError(f"guidance KV budget ({budget_gib:g} GiB) + value model ({value_weights_gib:.2f} GiB) leave "
                       f"nothing of gpu_memory_utilization={gpu_memory_utilization} of {total_gib:.0f} GiB for the "
                       "policy; lower --guidance-kv-gib or raise --gpu-memory-utilization")
    return share
