"""vLLM on a small CPU: which cores each engine's worker computes on, and how vLLM's
processes wait for each other.

**Cores (`engine_core_masks`, on by default).** vLLM pins each CPU worker's OpenMP threads
to the cores of its NUMA node minus one core it reserves for the scheduler. Two engines in one
process (policy and value model, as VGS runs them) therefore land on the *same* core on a
2-core machine, and the policy's LM head and sampler (per-token work over the whole
vocabulary) get one core however idle the other is. With both vLLM engines on a small CPU,
vgs binds the policy worker to every usable core and the value worker to the last one (the
value model runs once per block, the policy every token). `python -m benchmarks.server_load`
on the idle 2-core box, sequential / 16 concurrent requests: vLLM's binding 102 / 234
tokens/s (the day before); each worker on one core of its own 111 / 240; this binding 139 /
370. `VGS_CPU_SPLIT=0` restores vLLM's binding, and a set `VLLM_CPU_OMP_THREADS_BIND` always
wins. A single engine keeps vLLM's binding.

**Waiting (`no_busy_wait`, opt-in).** vgs runs two vLLM engines in one process (policy and value model); each is an engine-core
process (scheduler) plus a worker process (the model). The scheduler waits for its worker's
result (and the worker for the next step) by spinning on `sched_yield` over shared memory
for up to a second after each message. A py-spy profile of 16 concurrent VGS requests on the
2-core CI box showed the policy scheduler spinning 98% of the time while its worker
computed: one of the two cores went to waiting. `no_busy_wait()` makes those readers sleep on
the queue's existing ZeroMQ notification instead (vLLM's own idle path), at the cost of one
wake-up per step (tens of µs). Measured side by side on the tiny pair: sequential decoding
103 -> 109 tokens/s, a 64-sequence batch 246 -> 251 tokens/s (within noise), and a core
freed for everything else on the machine.

What did not help: `VLLM_CPU_OMP_THREADS_BIND=nobind` (unpinned OpenMP threads in both
workers) made decoding 1.3-10x slower on the shared machine: OpenMP barriers stall whenever a
thread is descheduled. The pinned split above does not have that problem. The same run with
and without busy waiting gave the same throughput (139.8 / 369.8 vs 139.1 / 372.6 tokens/s).

Opt-in (`VGS_CPU_BUSY_WAIT=0`), and only with at most `SMALL_CPU_CORES` usable cores and no
GPU: the measured gain is within noise, and a slow low-batch test under heavy machine load was
not ruled out as a side effect, so vLLM's default stays until it is measured on an idle box.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

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


def engine_core_masks() -> tuple[str, str] | None:
    """`VLLM_CPU_OMP_THREADS_BIND` masks (policy worker, value worker) for two vLLM engines on
    a small CPU, or None to keep vLLM's own binding (a GPU, many cores, one core, the variable
    already set, or `VGS_CPU_SPLIT=0`)."""
    if os.environ.get("VLLM_CPU_OMP_THREADS_BIND") or os.environ.get("VGS_CPU_SPLIT", "1") == "0":
        return None
    if not small_cpu():
        return None
    try:
        cores = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
    if len(cores) < 2:
        return None
    return ",".join(map(str, cores)), str(cores[-1])


@contextlib.contextmanager
def omp_bind(mask: str | None) -> Iterator[None]:
    """Start an engine with `VLLM_CPU_OMP_THREADS_BIND=mask` (its processes read it at spawn);
    the variable is restored afterwards. No-op for None."""
    if mask is None:
        yield
        return
    old = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = mask
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = old
