"""The guidance value model's projections on CPU: vLLM's prepacked oneDNN GEMM when it is there.

Why: a guided decode step runs the value model over B x (1 + top-k) tokens (168 for 8 rows
and top-20), and its four projections per layer are most of what guidance adds to a step
on CPU (docs/benchmarks_speed.md). At those shapes vLLM's oneDNN GEMM with weights packed
once (what vLLM's own CPU linear layers use, `dispatch_cpu_unquantized_gemm`) takes half the
time of torch's fp32 `F.linear` on one AVX-512 core (168 x 128 -> 1024: 236 vs 485 µs;
168 x 512 -> 128: 114 vs 245 µs), in the same fp32 arithmetic.

The processor runs inside vLLM's worker, where those kernels are loaded. Elsewhere (no vLLM,
a build without oneDNN, a GPU, a dtype oneDNN does not pack) `make_linear` falls back to
`F.linear`, so `CachedValueModel` works the same without vLLM. `VGS_GUIDANCE_ONEDNN=0` turns
the packed path off.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

Linear = Callable[[torch.Tensor], torch.Tensor]
ENV = "VGS_GUIDANCE_ONEDNN"


def vllm_cpu_kernels() -> bool:
    """Whether vLLM's CPU kernels (`torch.ops._C`) are loaded here, loading them if this is a
    CPU platform whose vLLM has them (a no-op in a worker, where they are loaded already)."""
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return False
        current_platform.import_kernels()
        return True
    except Exception:  # noqa: BLE001 - any import problem: plain torch
        return False


def _onednn_ops():
    """vLLM's custom-op module when its oneDNN GEMM is usable on this CPU, else None."""
    if os.environ.get(ENV, "1") == "0" or not vllm_cpu_kernels():
        return None
    try:
        from vllm import _custom_ops as ops

        # Asked of the loaded ops, not `ops._supports_onednn`: that flag is fixed when
        # `_custom_ops` is first imported, which may be before the kernels were.
        return ops if hasattr(torch.ops._C, "create_onednn_mm_handler") else None
    except Exception:  # noqa: BLE001 - any import problem: plain torch
        return None


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[Linear, bool]:
    """`x -> x @ weight.T + bias` over the last dim of x, and whether it is the packed oneDNN
    GEMM (it then holds its own packed copy of `weight`)."""
    if weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16):
        ops = _onednn_ops()
        if ops is not None:
            try:
                handler = ops.create_onednn_mm(weight.t(), 32)
                n = weight.shape[0]

                def packed(x: torch.Tensor) -> torch.Tensor:
                    flat = x.reshape(-1, x.shape[-1])
                    if not flat.is_contiguous():
                        flat = flat.contiguous()
                    return ops.onednn_mm(handler, flat, bias).view(*x.shape[:-1], n)

                return packed, True
            except RuntimeError as exc:  # oneDNN could not build the primitive: torch's GEMM
                log.warning("guidance: oneDNN GEMM unavailable (%s); using torch's", exc)
    return (lambda x: F.linear(x, weight, bias)), False
