"""CPU settings for vLLM (`vgs.cpu_tuning`): each engine worker computes on its own cores, and
its malloc keeps freed memory."""

from __future__ import annotations

import pytest

from vgs import cpu_tuning


def test_core_masks_policy_gets_every_core_value_the_last(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.delenv("VGS_CPU_SPLIT", raising=False)
    monkeypatch.setattr(cpu_tuning, "small_cpu", lambda: True)
    monkeypatch.setattr(cpu_tuning.os, "sched_getaffinity", lambda pid: {3, 1})
    assert cpu_tuning.engine_core_masks() == ("1,3", "3")
    monkeypatch.setattr(cpu_tuning.os, "sched_getaffinity", lambda pid: {0})
    assert cpu_tuning.engine_core_masks() is None  # one core: nothing to split
    monkeypatch.setattr(cpu_tuning.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setenv("VGS_CPU_SPLIT", "0")
    assert cpu_tuning.engine_core_masks() is None  # opted out
    monkeypatch.delenv("VGS_CPU_SPLIT")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")
    assert cpu_tuning.engine_core_masks() is None  # the user's binding wins
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND")
    monkeypatch.setattr(cpu_tuning, "small_cpu", lambda: False)
    assert cpu_tuning.engine_core_masks() is None  # a GPU or many cores: vLLM's binding


def test_omp_bind_restores_the_variable(monkeypatch):
    import os

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "auto")
    with cpu_tuning.omp_bind("0,1"):
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0,1"
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "auto"
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND")
    with cpu_tuning.omp_bind(None):
        assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
    with cpu_tuning.omp_bind("1"):
        pass
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ


def _no_malloc_settings(monkeypatch):
    for k in ("VGS_CPU_MALLOC", "LD_PRELOAD", *cpu_tuning._USER_MALLOC_VARS):
        monkeypatch.delenv(k, raising=False)


def test_malloc_env_on_cpu_unless_the_user_tuned_it(monkeypatch):
    import torch

    _no_malloc_settings(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cpu_tuning.engine_malloc_env() == {"MALLOC_MMAP_THRESHOLD_": str(32 << 20),
                                              "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}
    monkeypatch.setenv("VGS_CPU_MALLOC", "0")
    assert cpu_tuning.engine_malloc_env() == {}  # opted out
    monkeypatch.delenv("VGS_CPU_MALLOC")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert cpu_tuning.engine_malloc_env() == {}  # the user's allocator settings win
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")
    assert cpu_tuning.engine_malloc_env() == {}
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
    assert cpu_tuning.engine_malloc_env() == {}  # another allocator
    monkeypatch.delenv("LD_PRELOAD")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_tuning.engine_malloc_env() == {}  # a GPU: host malloc is not on the step's path


def test_scoped_env_restores(monkeypatch):
    import os

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "5")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    with cpu_tuning.scoped_env({"MALLOC_TRIM_THRESHOLD_": "7", "MALLOC_MMAP_THRESHOLD_": "9"}):
        assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "7" and os.environ["MALLOC_MMAP_THRESHOLD_"] == "9"
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "5" and "MALLOC_MMAP_THRESHOLD_" not in os.environ


def _malloc_env(worker) -> dict[str, str | None]:
    import os

    return {k: os.environ.get(k) for k in cpu_tuning.MALLOC_KEEP}


@pytest.mark.vllm
def test_build_engines_puts_each_worker_on_its_cores(monkeypatch, tiny_policy, tiny_value, tokenizer_dir):
    """Through the real engines: the policy worker computes on every usable core, the value
    worker on the last one (vLLM alone would pin both to the same core on a 2-core box); both
    workers run with malloc keeping freed memory, and this process's environment is as before."""
    import os

    import psutil

    from vgs.aio import run_sync
    from vgs.config import EngineConfig
    from vgs.runtime import build_engines, close_engines

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs 2 usable cores")
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.delenv("VGS_CPU_SPLIT", raising=False)
    monkeypatch.setattr(cpu_tuning, "small_cpu", lambda: True)
    _no_malloc_settings(monkeypatch)
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # a function sent to the workers
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    engines = build_engines(EngineConfig(model=tiny_policy, kv_cache_gib=0.25, max_model_len=1024), tiny_value,
                            needs_scorer=True, value_engine={"kv_cache_gib": 0.25, "max_model_len": 1024})
    try:
        assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
        assert not any(k in os.environ for k in cpu_tuning.MALLOC_KEEP)
        new = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        workers = {}
        for p in new:
            try:
                if "Worker" in p.name():  # vLLM pins each OpenMP thread to one core of the mask
                    workers[p.pid] = sorted(set().union(*(os.sched_getaffinity(t.id) for t in p.threads())))
            except psutil.NoSuchProcess:
                pass
        # spawned in order: the policy's worker first
        assert [workers[pid] for pid in sorted(workers)] == [cores, cores[-1:]], workers
        # the workers' own environment (/proc/<pid>/environ is overwritten by their process title)
        for engine in (engines.policy, engines.value):
            assert run_sync(engine.llm.collective_rpc(_malloc_env)) == [cpu_tuning.MALLOC_KEEP]
    finally:
        close_engines(engines)
