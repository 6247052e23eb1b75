"""Engine processes die with the process that started them.

vLLM runs each engine core (and, with several GPUs, each worker) in a child process it
spawns. When the parent exits normally it shuts them down, but a parent killed outright
(`kill -9`, the OOM killer, a SLURM job step cancelled) leaves them running: reparented to
init, still spinning and, on a GPU, still holding its memory, so the resumed run cannot
start. `die_with_parent()` asks the kernel (Linux `prctl(PR_SET_PDEATHSIG)`) to SIGKILL the
calling process as soon as its parent dies. It runs inside every vLLM process through the
`vllm.general_plugins` entry point (`vgs/vllm_plugin.py`), and acts only in vLLM's
own children (engine cores, workers), never in the user's process.

Caveat: Linux delivers the signal when the *thread* that spawned the child exits, so an
engine must be started from a thread that lives as long as the engine (the main thread, or
the server's event-loop thread), which is how vgs starts them.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
# vLLM's names for the processes it spawns (vllm/v1/engine/utils.py, v1/executor/multiproc_executor.py)
ENGINE_PROCESS_PREFIXES = ("EngineCore", "VllmWorker")


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """In a vLLM engine/worker process on Linux: have the kernel send `sig` when the parent
    dies. Returns whether it was armed. Safe to call more than once."""
    if not sys.platform.startswith("linux"):
        return False
    proc = multiprocessing.current_process()
    parent = multiprocessing.parent_process()
    if parent is None or not proc.name.startswith(ENGINE_PROCESS_PREFIXES):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent.pid:  # the parent died before the signal was armed
        os._exit(1)
    return True
