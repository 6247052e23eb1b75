"""Host → device uploads that do not stall the GPU queue.

Why: `torch.tensor(host_list, device="cuda")` copies from pageable memory with a blocking
copy, and PyTorch follows that copy with a stream synchronisation: the host waits until every
kernel queued before it (the policy's forward, the previous value-model layers) has finished.
Done a few times per guided step, that serialises the CPU and the GPU and defeats vLLM's
async scheduling. A pinned staging tensor and a non-blocking copy are queued on the stream
instead (PyTorch's pinned allocator keeps the staging memory alive until the copy has run).
On CPU the plain tensor is returned.
"""

from __future__ import annotations

from typing import Any

import torch


def upload(values: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`values` (a list, scalar or host tensor) as a tensor on `device`, without a device sync."""
    device = torch.device(device)
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    if device.type != "cuda":
        return t.to(device)
    if t.device.type == "cuda":
        return t.to(device, non_blocking=True)
    return t.pin_memory().to(device, non_blocking=True)
