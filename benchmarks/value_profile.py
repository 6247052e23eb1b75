"""Where the value-scoring time goes: torch-profiler op tables of the vLLM pooling path (in its
worker) and of the transformers paths (in this process), on `benchmarks.value_scoring`'s workload.

    python -m benchmarks.value_profile [--layers 4 --hidden 128 --top 15]

Why: issue 24 saw the vLLM pooling path compute at ~60% of a batch-1 transformers forward's
FLOP rate on one 2-core machine. Wall time alone cannot say whether that is per-request
overhead (scheduling, IPC, the pooler) or the kernels, so this script splits each path's
busy time by operator class (attention, GEMMs, the rest) and divides the analytic FLOPs of
each class (`benchmarks.flops`) by its kernel time: attention GFLOP/s, GEMM GFLOP/s, and
the share of the wall time no kernel accounts for (Python, scheduling, IPC).

Arms, one search each after a warm-up:
  reprefill  transformers, batch 1, whole sequence (the published baseline);
  hf         `HFValueScorer` (KV reuse, batched);
  vllm       `VllmValueScorer` with vLLM's torch profiler on in its worker
             (`ProfilerConfig(profiler="torch")`: the table vLLM writes is read back).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import tempfile
import time

from benchmarks.common import machine_info, print_machine, vllm_cpu_kernels
from benchmarks.value_scoring import SHAPES, BeamSearch, make_workload
from vgs.assets import TOKENIZER_DIR, quiet_engines

quiet_engines()

ATTENTION = re.compile(r"attention|attn|sdpa|scaled_dot_product|softmax", re.I)
GEMM = re.compile(r"\b(aten::)?(mm|addmm|bmm|matmul|linear)\b|onednn|gemm|mkldnn", re.I)
UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


def classify(name: str) -> str:
    if ATTENTION.search(name):
        return "attention"
    if GEMM.search(name):
        return "gemm"
    return "other"


def parse_table(text: str) -> list[tuple[str, float, int]]:
    """(op name, self CPU seconds, calls) from a `key_averages().table()` text."""
    rows = []
    lines = text.splitlines()
    header = next((ln for ln in lines if "Self CPU" in ln and "Name" in ln), None)
    if header is None:
        return rows
    cols = [c.strip() for c in re.split(r"\s{2,}", header.strip())]
    for ln in lines:
        parts = [p.strip() for p in re.split(r"\s{2,}", ln.strip())]
        if len(parts) != len(cols) or parts[0] == "Name" or set(ln.strip()) <= {"-", " "}:
            continue
        rec = dict(zip(cols, parts))
        m = re.fullmatch(r"([\d.]+)(s|ms|us|ns)", rec.get("Self CPU", ""))
        if not m:
            continue
        rows.append((rec["Name"], float(m.group(1)) * UNITS[m.group(2)], int(rec.get("# of Calls", "0") or 0)))
    return rows


def summarise(name: str, ops: list[tuple[str, float, int]], wall: float, flops: dict[str, float]) -> dict:
    by = {"attention": 0.0, "gemm": 0.0, "other": 0.0}
    for op, secs, _ in ops:
        if op.startswith(("ProfilerStep", "execute_", "## ")):  # record_function ranges, not kernels
            continue
        by[classify(op)] += secs
    busy = sum(by.values())
    return {"arm": name, "wall_s": wall, "profiled_busy_s": busy, "attention_s": by["attention"],
            "gemm_s": by["gemm"], "other_ops_s": by["other"],
            "attention_gflop_per_s": flops["attention"] / by["attention"] / 1e9 if by["attention"] else float("nan"),
            "gemm_gflop_per_s": flops["gemm"] / by["gemm"] / 1e9 if by["gemm"] else float("nan"),
            "total_gflop_per_s": (flops["attention"] + flops["gemm"]) / wall / 1e9}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", default=str(TOKENIZER_DIR))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="torch threads here (default: cores - 1, as vLLM's worker)")
    ap.add_argument("--top", type=int, default=12, help="rows of each op table to print")
    args = ap.parse_args(argv)

    import pandas as pd
    import torch
    from torch.profiler import ProfilerActivity, profile
    from vllm.config.profiler import ProfilerConfig

    from benchmarks.flops import ModelShape, reprefill_work, reuse_work
    from vgs.config import EngineConfig
    from vgs.modeling import success_probs
    from vgs.tiny import make_tiny
    from vgs.value import HFValueScorer, VllmValueScorer, _read_config

    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) - 1))
    tmp = tempfile.TemporaryDirectory(prefix="vgs-profile-")
    model = make_tiny("value", args.tokenizer, os.path.join(tmp.name, "value"), layers=args.layers,
                      hidden=args.hidden, seed=0)
    shape = ModelShape.from_config(_read_config(model))
    dims = SHAPES["today"]
    wl = make_workload(151936 - 1000, dims["prompt"], dims["beams"], dims["rounds"], dims["width"], dims["block"], 0)
    print_machine(machine_info(vllm_kernels=vllm_cpu_kernels(shape.head_dim)))

    trace_dir = os.path.join(tmp.name, "trace")
    vllm_scorer = VllmValueScorer(EngineConfig(
        model=model, tokenizer=args.tokenizer, kv_cache_gib=1.0,
        extra={"profiler_config": ProfilerConfig(profiler="torch", torch_profiler_dir=trace_dir,
                                                 torch_profiler_with_stack=False, torch_profiler_use_gzip=True,
                                                 ignore_frontend=True)}))
    hf = HFValueScorer(model, device="cpu", dtype="float32")
    net = hf.model

    def reprefill(seqs: list[list[int]]) -> list[float]:
        out = []
        for s in seqs:
            with torch.no_grad():
                logits = net(input_ids=torch.tensor([s]), use_cache=True).logits
            out.append(float(success_probs(logits[0, -1])))
        return out

    def search(score) -> BeamSearch:
        s = BeamSearch(score, wl)
        for r in range(dims["rounds"]):
            s.round(r)
        return s

    warm = [[1, 2, 3, 4, 5] * 40]
    for fn in (vllm_scorer.score, hf.score, reprefill):
        fn(warm)
    vllm_scorer.reset_prefix_cache()
    hf.reset_prefix_cache()

    rows, tables = [], {}
    seqs = None
    for name, fn in (("reprefill", reprefill), ("hf", hf.score)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            s = search(fn)
        seqs = s.scored
        tables[name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
        ops = [(e.key, e.self_cpu_time_total * 1e-6, e.count) for e in prof.key_averages()]
        work = reprefill_work(seqs) if name == "reprefill" else reuse_work(seqs)
        flops = {"attention": work.pairs * shape.per_pair, "gemm": work.tokens * shape.per_token}
        rows.append(summarise(name, ops, s.wall, flops))

    from vgs.aio import run_sync

    run_sync(vllm_scorer.llm.start_profile())
    s = search(vllm_scorer.score)
    run_sync(vllm_scorer.llm.stop_profile())
    files: list[str] = []
    for _ in range(120):  # the worker writes its table after stop_profile returns
        files = sorted(glob.glob(os.path.join(trace_dir, "**", "*profiler_out*.txt"), recursive=True))
        if files:
            break
        time.sleep(0.5)
    # One table per profiled process: keep the worker's (the one with the most op time).
    texts = [open(f).read() for f in files]
    text = max(texts, key=lambda t: sum(sec for _, sec, _ in parse_table(t)), default="")
    if not text:
        print(f"(no profiler table from the vLLM worker under {trace_dir})")
    tables["vllm"] = "\n".join(text.splitlines()[: args.top + 4])
    work = reuse_work(s.scored)
    flops = {"attention": work.pairs * shape.per_pair, "gemm": work.tokens * shape.per_token}
    rows.append(summarise("vllm", parse_table(text), s.wall, flops))
    vllm_scorer.close()

    for name, t in tables.items():
        print(f"\n== {name}: top ops by self CPU time ==\n{t}")
    df = pd.DataFrame(rows)
    df["unaccounted_s"] = df["wall_s"] - df["profiled_busy_s"]
    print(f"\n{shape.layers} layers, hidden {shape.hidden}, head {shape.head_dim}; "
          f"attention FLOPs / GEMM FLOPs from benchmarks/flops.py; times are self CPU time of the ops "
          f"(vllm: in its worker process)")
    print(df.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
