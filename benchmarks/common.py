"""What every speed script shares: the machine line, arms run alternately `--repeats` times,
a min / median / max table per arm, the ratio of medians, and one JSON result per script.

Why: one alternation of each arm swung a goal ratio by ±25% between two runs on an idle
2-core machine (issue 24). Arms that alternate in one process see the same load drift, and
the median of several alternations is what a goal is judged on; min and max show the spread.
`benchmarks/summary.py` reads the JSON files (`--out DIR`) into one table (`make bench`).

Also the engine set-up the scripts share: the tiny random policy + value pair with the real
vocabulary (`tiny_pair`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

DEFAULT_REPEATS = 3
DEFAULT_WARMUP = 1


def add_bench_args(ap: argparse.ArgumentParser, repeats: int = DEFAULT_REPEATS) -> None:
    """`--repeats` (alternations of the arms), `--warmup` (alternations run first and not
    recorded) and `--out` (folder for the JSON result)."""
    ap.add_argument("--repeats", type=int, default=repeats,
                    help=f"alternations of the arms in this process (default {repeats}); the goal ratio is "
                         "the ratio of the arms' medians")
    ap.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                    help=f"alternations of all arms run first and not recorded (default {DEFAULT_WARMUP}): the "
                         "first pass of an arm pays one-time costs (allocations, a grader pool's processes, "
                         "cold caches) that made the first alternation the slowest in most runs")
    ap.add_argument("--out", default=None,
                    help="folder to write <script>.json into (what benchmarks/summary.py reads)")


def check_repeats(ap: argparse.ArgumentParser, repeats: int, warmup: int = 0) -> None:
    if repeats < 1:
        ap.error(f"--repeats must be >= 1, got {repeats}")
    if warmup < 0:
        ap.error(f"--warmup must be >= 0, got {warmup}")


# ---------------------------------------------------------------------------- machine

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def vllm_threads(mask: str | None = None) -> str:
    """The cores a vLLM CPU worker computes on: an explicit `VLLM_CPU_OMP_THREADS_BIND` mask,
    or vLLM's auto binding (the cores of the NUMA node minus one kept for its scheduler)."""
    mask = mask or os.environ.get("VLLM_CPU_OMP_THREADS_BIND") or "auto"
    if mask == "auto":
        try:
            n = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            n = os.cpu_count() or 1
        return f"auto ({max(1, n - 1)} of {n} cores; one kept for the scheduler)"
    return f"cores {mask}"


def machine_info(**extra: Any) -> dict[str, Any]:
    """CPU model, cores, load, torch threads of this process and vLLM's worker binding (plus
    whatever the script adds, e.g. the per-engine masks it used)."""
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    info: dict[str, Any] = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": usable,
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import vllm

        info["vllm"] = vllm.__version__
    except Exception:  # noqa: BLE001 - hf-only runs need no vLLM
        info["vllm"] = None
    info["vllm_worker_threads"] = vllm_threads()
    info["engine_malloc"] = engine_malloc_text()
    info.update(extra)
    return info


def print_machine(info: dict[str, Any]) -> None:
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)


def load_now() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


# ---------------------------------------------------------------------------- arms

@dataclass
class Runs:
    """Every measurement of every arm: one record (dict of numbers) per arm per repetition."""

    records: list[dict[str, Any]] = field(default_factory=list)

    def add(self, arm: str, rep: int, **values: Any) -> None:
        self.records.append({"arm": arm, "rep": rep, **values})

    def values(self, arm: str, metric: str) -> list[float]:
        return [float(r[metric]) for r in self.records if r["arm"] == arm]

    def median(self, arm: str, metric: str) -> float:
        import statistics

        vals = self.values(arm, metric)
        if not vals:
            raise KeyError(f"no runs of arm {arm!r}")
        return float(statistics.median(vals))

    def ratio(self, num: str, den: str, metric: str) -> float:
        """median(num) / median(den): the goal ratio."""
        return self.median(num, metric) / self.median(den, metric)

    def spread(self, metric: str, arms: list[str] | None = None) -> "Any":
        """A table with one row per arm: n, min, median, max of `metric`."""
        import pandas as pd

        df = pd.DataFrame(self.records)
        arms = arms or list(dict.fromkeys(df["arm"]))
        rows = []
        for arm in arms:
            v = df.loc[df["arm"] == arm, metric].astype(float)
            rows.append({"arm": arm, "n": len(v), f"min_{metric}": v.min(), f"median_{metric}": v.median(),
                         f"max_{metric}": v.max()})
        return pd.DataFrame(rows)

    def ratio_spread(self, num: str, den: str, metric: str) -> tuple[float, float]:
        """Min and max of the per-alternation ratios num/den (pairs of the same repetition)."""
        by = {(r["arm"], r["rep"]): float(r[metric]) for r in self.records}
        reps = sorted({r["rep"] for r in self.records})
        rs = [by[(num, k)] / by[(den, k)] for k in reps if (num, k) in by and (den, k) in by]
        return (min(rs), max(rs)) if rs else (float("nan"), float("nan"))


def alternate(arms: dict[str, Callable[[int], dict[str, Any]]], repeats: int, runs: Runs | None = None,
              label: str = "", warmup: int = 0) -> Runs:
    """Run each arm once per repetition, arms in turn (so slow spells of a shared machine hit
    them all alike); each arm returns its measurements for that repetition. The first
    `warmup` alternations run the same way but are not recorded (repetition numbers < 0)."""
    runs = runs or Runs()
    for rep in range(-warmup, repeats):
        for name, fn in arms.items():
            t0 = time.perf_counter()
            rec = fn(rep)
            tag = f"warm-up {rep + warmup + 1}/{warmup}" if rep < 0 else f"#{rep + 1}/{repeats}"
            if rep >= 0:
                runs.add(name, rep, **rec)
            print(f"[{label or 'bench'}] {name} {tag}: {time.perf_counter() - t0:.1f} s "
                  f"(load {load_now()})", file=sys.stderr, flush=True)
    return runs


def print_spread(runs: Runs, metric: str, arms: list[str] | None = None, digits: int = 3) -> None:
    """The per-arm min / median / max table of `metric`."""
    table = runs.spread(metric, arms)
    print(table.to_string(index=False, float_format=lambda x: f"{x:.{digits}f}"))


# ---------------------------------------------------------------------------- result

def script_name(path: str) -> str:
    return Path(path).stem


def write_result(out: str | None, script: str, goal_line: str, value: float, *, goal: str = "",
                 spread: tuple[float, float] | None = None, runs: Runs | None = None,
                 machine: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> None:
    """Print the final `goal_line: value` and, with `--out`, write `<out>/<script>.json`
    (the median ratio, its per-alternation spread, every record and the machine)."""
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        body = {"script": script, "metric": goal_line, "value": value, "goal": goal,
                "ratio_min": spread[0] if spread else None, "ratio_max": spread[1] if spread else None,
                "machine": machine, "records": runs.records if runs else [], **(extra or {})}
        with open(Path(out) / f"{script}.json", "w") as f:
            json.dump(body, f, indent=1, default=str)
    if spread:
        print(f"{goal_line}_spread: {spread[0]:.3f} .. {spread[1]:.3f}  (per-alternation ratios)")
    print(f"{goal_line}: {value:.3f}", flush=True)


# ---------------------------------------------------------------------------- engine set-up

def tiny_pair(workdir: str, tokenizer: str, layers: int, hidden: int, value_layers: int | None = None,
              value_hidden: int | None = None) -> tuple[str, str]:
    """A tiny random policy (seed 0) and value model (seed 1) with the real vocabulary."""
    from vgs.tiny import make_tiny

    policy = make_tiny("policy", tokenizer, os.path.join(workdir, "policy"), layers=layers, hidden=hidden, seed=0)
    value = make_tiny("value", tokenizer, os.path.join(workdir, "value"), layers=value_layers or layers,
                      hidden=value_hidden or hidden, seed=1)
    return policy, value


def vllm_cpu_kernels(head_size: int, dtype: str = "float32", block_size: int = 128) -> str:
    """Which build of vLLM's CPU kernels this CPU loads and which attention ISA the value
    engine's layers get: the pooling path's speed depends on both (AVX-512 vs AVX2)."""
    try:
        import torch

        if not torch.cpu._is_avx512_supported():
            lib = "_C_AVX2"
        elif torch.cpu._is_avx512_bf16_supported():
            lib = "_C (AVX-512 + bf16)"
        else:
            lib = "_C_AVX512"
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        isa = _get_attn_isa(getattr(torch, dtype), block_size, head_size)
        return f"{lib}, attention isa {isa!r} (block {block_size}, head {head_size})"
    except Exception as exc:  # noqa: BLE001 - informational only
        return f"unknown ({exc.__class__.__name__})"


def engine_malloc_text() -> str:
    """The allocator settings vgs starts vLLM's engine processes with (`vgs.cpu_tuning`)."""
    from vgs.cpu_tuning import engine_malloc_env

    env = engine_malloc_env()
    return " ".join(f"{k}={v}" for k, v in env.items()) if env else "as the environment has it"


def engine_masks_text() -> str:
    """The per-engine core masks `vgs.runtime.build_engines` gives a policy + value engine pair
    on this machine (`vgs.cpu_tuning`), or vLLM's own binding."""
    from vgs.cpu_tuning import engine_core_masks

    masks = engine_core_masks()
    return f"policy {masks[0]} / value {masks[1]}" if masks else "vLLM's own binding for both"
