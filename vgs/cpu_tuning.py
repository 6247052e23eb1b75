"""vLLM on a small CPU: how vLLM's processes wait for each other.

vgs runs two vLLM engines in one process (policy and value model); each is an engine-core
process (scheduler) plus a worker process (the model). The scheduler waits for its worker's
result (and the worker for the next step) by spinning on `sched_yield` over shared memory
for up to a second after each message. A py-spy profile of 16 concurrent VGS requests on the
2-core CI box showed the policy scheduler spinning 98% of the time while its worker
computed: one of the two cores went to waiting. `no_busy_wait()` makes those readers sleep on
the queue's existing ZeroMQ notification instead (vLLM's own idle path), at the cost of one
wake-up per step (tens of µs). Measured side by side on the tiny pair: sequential decoding
103 -> 109 tokens/s, a 64-sequence batch 246 -> 251 tokens/s (within noise), and a core
freed for everything else on the machine.

What did not help: `VLLM_CPU_OMP_THREADS_BIND=nobind` (two OpenMP threads per worker instead
of vLLM's one pinned thread on a 2-core box) made decoding 1.3-10x slower on the shared
machine: OpenMP barriers stall whenever a thread is descheduled. vLLM's binding stays.

Opt-in (`VGS_CPU_BUSY_WAIT=0`), and only with at most `SMALL_CPU_CORES` usable cores and no
GPU: the measured gain is within noise, and a slow low-batch test under heavy machine load was
not ruled out as a side effect, so vLLM's default stays until it is measured on an idle box.
"""

from __future__ import annotations

import os

SMALL_CPU_CORES = 4


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def small_cpu() -> bool:
    """No GPU and few cores (the engine processes inherit the answer from their parent)."""
    if usable_cores() > SMALL_CPU_CORES:
        return False
    try:
        import torch

        return not torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return True


def no_busy_wait() -> None:
    """In every vLLM process (through the vgs vLLM plugin): with VGS_CPU_BUSY_WAIT=0 on a
    small CPU, shared-memory queue readers sleep until notified instead of spinning."""
    if os.environ.get("VGS_CPU_BUSY_WAIT", "1") != "0" or not small_cpu():
        return
    try:
        from vllm.distributed.device_communicators import shm_broadcast
    except ImportError:
        return
    cls = getattr(shm_broadcast, "SpinCondition", None)
    if cls is None or getattr(cls, "_vgs_no_busy_wait", False):
        return
    original = cls.__init__

    def __init__(self, is_reader, context, notify_address, busy_loop_s: float = 1):  # noqa: N807
        original(self, is_reader, context, notify_address, busy_loop_s=0)

    cls.__init__ = __init__
    cls._vgs_no_busy_wait = True
