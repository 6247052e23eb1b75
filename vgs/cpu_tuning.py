"""vLLM on a small CPU: where the compute threads run and how vLLM's processes wait.

vgs runs two vLLM engines in one process (policy and value model); each is an engine-core
process (scheduler) plus a worker process (the model). vLLM's CPU defaults assume one engine
on a large machine, and on a small one (this project's 2-core CI box) they waste half of it:

- Thread binding: vLLM's auto binding keeps one core per engine for the scheduler and pins
  the worker's OpenMP threads to the others. Both engines got the same cores: on 2 cores
  both workers ran one thread each, pinned to core 0, while core 1 held only the schedulers.
  `cpu_thread_binding()` asks for `nobind` instead: one thread per core in each worker, and
  the OS shares the cores between whichever engine has work.
- Busy waiting: the scheduler waits for its worker's result (and the worker for the next
  step) by spinning on `sched_yield` over shared memory for up to a second after each
  message, so under load a scheduler burns a whole core while its worker computes.
  `no_busy_wait()` makes those readers sleep on the queue's existing ZeroMQ notification
  instead (vLLM's own idle path), at the cost of one wake-up per step (tens of µs).

Both apply only with at most `SMALL_CPU_CORES` usable cores, and never override an
explicit VLLM_CPU_OMP_THREADS_BIND / VGS_CPU_BUSY_WAIT=1. Measured by
`benchmarks/server_load.py` (README, "Speed").
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

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


def cpu_thread_binding() -> None:
    """Before an engine starts (in the user's process): `nobind` on a small CPU."""
    if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ and usable_cores() <= SMALL_CPU_CORES:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"


def no_busy_wait() -> None:
    """In every vLLM process (through the vgs vLLM plugin): shared-memory queue readers
    sleep until notified instead of spinning, on a small CPU."""
    if os.environ.get("VGS_CPU_BUSY_WAIT") == "1" or not small_cpu():
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
