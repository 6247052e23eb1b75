"""vLLM on a CPU: which cores each engine's worker computes on, how its allocator keeps memory,
and how vLLM's processes wait for each other.

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

**Waiting: vLLM's own.** vLLM's shared-memory queue readers spin on `sched_yield` for a
second after each message, then sleep on a ZeroMQ notification. A py-spy profile of 16
concurrent VGS requests on the 2-core box showed the policy scheduler spinning 98% of the time
while its worker computed. An opt-in that made readers sleep at once (busy loop of 0 s) was
measured neutral (139.8 / 369.8 vs 139.1 / 372.6 tokens/s) and was removed on 2026-12-05:
with both engines running, the policy scheduler's wake-ups were lost every step and each step
waited out vLLM's 5 s recheck (a demo-pair `server_load` run made no progress in 400 s; the
DEBUG log shows "Poller timed out" once per step), even with stale notifications drained after
each read. vLLM's default (spin for a second) does not have that problem: a VGS request after
0-3 s of idle engines takes the same 0.2-0.6 s.

**Allocator (`engine_malloc_env`, on by default on CPU).** Each engine's processes start with
glibc's malloc told to keep freed memory: `MALLOC_MMAP_THRESHOLD_` 32 MiB (glibc's maximum)
and `MALLOC_TRIM_THRESHOLD_` 256 MiB. Without them glibc's *dynamic* mmap threshold decides,
per process, which of the worker's per-step buffers are fresh `mmap`s that are unmapped again
on free; the next step page-faults them back in. Where that threshold settles depends on the
order of the first allocations, so it is a lottery of each engine start: the same value-scoring
search on twelve engines started one after the other in one process took medians of 0.46-0.77 s
with 25k-450k minor page faults in the worker per five searches, and the slow starts were the
faulting ones (this is what made `benchmarks/value_scoring.py` bimodal between runs). With the
two settings (alone or with a 64 MiB top pad) every start faulted 11k-15k times and took
0.45-0.57 s; six `make bench` runs since then agree within 4% on value scoring (6.56-6.81).
(vLLM's CPU guide suggests preloading tcmalloc for the same reason; glibc's knobs need no
library.) Settings the user made win: nothing is changed when any `MALLOC_*_` variable,
`GLIBC_TUNABLES` or an `LD_PRELOAD`ed allocator is set, and `VGS_CPU_MALLOC=0` turns it off.

What did not help: `VLLM_CPU_OMP_THREADS_BIND=nobind` (unpinned OpenMP threads in both
workers) made decoding 1.3-10x slower on the shared machine: OpenMP barriers stall whenever a
thread is descheduled. The pinned split above does not have that problem.
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


def on_cpu() -> bool:
    """No CUDA device (or no torch): vLLM runs its CPU backend."""
    try:
        import torch

        return not torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return True


def small_cpu() -> bool:
    """No GPU and few cores (the engine processes inherit the answer from their parent)."""
    return usable_cores() <= SMALL_CPU_CORES and on_cpu()


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
    with scoped_env({} if mask is None else {"VLLM_CPU_OMP_THREADS_BIND": mask}):
        yield


# glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX); a larger value is ignored
MALLOC_KEEP = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}
_USER_MALLOC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                     "MALLOC_MMAP_MAX_", "MALLOC_ARENA_MAX", "GLIBC_TUNABLES")


def engine_malloc_env() -> dict[str, str]:
    """Environment for a vLLM engine's processes on a CPU: glibc malloc keeps freed memory
    (see the module docstring), or {} on a GPU, with `VGS_CPU_MALLOC=0`, or when the user
    already tuned the allocator (a `MALLOC_*` variable, `GLIBC_TUNABLES`, or tcmalloc /
    jemalloc / mimalloc in `LD_PRELOAD`)."""
    if os.environ.get("VGS_CPU_MALLOC", "1") == "0":
        return {}
    if any(k in os.environ for k in _USER_MALLOC_VARS):
        return {}
    if any(lib in os.environ.get("LD_PRELOAD", "") for lib in ("tcmalloc", "jemalloc", "mimalloc")):
        return {}
    return dict(MALLOC_KEEP) if on_cpu() else {}


@contextlib.contextmanager
def scoped_env(env: dict[str, str]) -> Iterator[None]:
    """Set `env` while an engine starts (its processes copy the environment at spawn), then
    restore what was there, so this process and engines started later are not affected."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
