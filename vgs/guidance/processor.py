"""Which guidance processor to load, and one that works under either model runner.

vLLM 0.32 has two logits-processor interfaces (V1 runner: CPU, `VLLM_USE_V2_MODEL_RUNNER=0`;
Model Runner V2: the default on CUDA) and each runner rejects the other's classes at engine
start. `GuidanceProcessor` subclasses both adapters and dispatches on how vLLM calls it
(`__init__(config, device, pin_memory)` + `apply(logits)` for V1, `__init__(config,
req_states)` + `apply(logits, ctx)` for MRV2), so one class path is right on every install —
that is what `PolicyEngine` loads, and what we recommend for `vllm serve --logits-processors`.
`processor_class_path()` also names the runner-specific adapter for those who want it.
"""

from __future__ import annotations

import os
from typing import Any

from vgs.guidance.mrv2_processor import QSharpMRV2Processor
from vgs.guidance.v1_processor import QSharpV1Processor

GUIDANCE_PROCESSOR = "vgs.guidance.processor:GuidanceProcessor"
V1_PROCESSOR = "vgs.guidance.v1_processor:QSharpV1Processor"
MRV2_PROCESSOR = "vgs.guidance.mrv2_processor:QSharpMRV2Processor"


class GuidanceProcessor(QSharpV1Processor, QSharpMRV2Processor):
    """The V1 adapter under the V1 runner, the MRV2 adapter under Model Runner V2."""

    def __init__(self, vllm_config: Any, *args: Any) -> None:
        if len(args) == 2:  # V1: (device, is_pin_memory)
            QSharpV1Processor.__init__(self, vllm_config, *args)
        else:  # MRV2: (req_states,)
            QSharpMRV2Processor.__init__(self, vllm_config, *args)

    def apply(self, logits: Any, ctx: Any = None) -> Any:
        if ctx is None:
            return QSharpV1Processor.apply(self, logits)
        return QSharpMRV2Processor.apply(self, logits, ctx)


def detect_runner() -> str:
    """'mrv2' or 'v1': vLLM's own rule for a plain config (env override, else MRV2 wherever
    Triton and CUDA are usable). Configs with features MRV2 lacks fall back to V1 in vLLM but
    not here — one more reason to load `GuidanceProcessor`, which needs no guess."""
    env = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
    if env is not None and env.strip() != "":
        return "mrv2" if env.strip().lower() in ("1", "true", "yes") else "v1"
    try:
        import torch
        from vllm.triton_utils import HAS_TRITON

        return "mrv2" if HAS_TRITON and torch.cuda.is_available() else "v1"
    except Exception:  # noqa: BLE001
        return "v1"


def processor_class_path(runner: str | None = "auto") -> str:
    """`module:Class` of the guidance processor: `GuidanceProcessor` for "auto" (works under
    both runners), the V1 or MRV2 adapter for "v1" / "mrv2", or for None the adapter of the
    runner `detect_runner()` expects."""
    if runner == "auto":
        return GUIDANCE_PROCESSOR
    runner = runner or detect_runner()
    if runner not in ("v1", "mrv2"):
        raise ValueError(f"runner must be 'auto', 'v1' or 'mrv2', got {runner!r}")
    return V1_PROCESSOR if runner == "v1" else MRV2_PROCESSOR
