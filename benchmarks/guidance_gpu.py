"""The Q♯/CD guidance step at the published shape, on a GPU, without vLLM.

Why: the guidance processor runs a 1.5B value model inside the policy's vLLM worker. What
the CPU tests cannot show is what happens there on a GPU at the published shape: whether a
guided step makes the host wait for the device (each wait serialises vLLM's async
scheduling), how long a step takes for a batch of 32 requests × top-20 candidates, whether the
paged value-model KV cache stays inside its budget and fails only the requests that do not
fit, how close the paged bf16 attention is to the model's own full forward, and whether a
request's scores depend on the batch it is in. This script drives the product's own code
(`vgs.guidance.guide.Guide`, `CachedValueModel`, `Feed.from_token_table` — exactly what the MRV2
processor calls) on a random-weight value model of the chosen shape, so it needs only torch and
transformers (vLLM is not required, the GPU machine has none).

    python -m benchmarks.guidance_gpu                       # published shape on cuda
    python -m benchmarks.guidance_gpu --device cpu --shape tiny --steps 3   # a quick CPU run

Prints a table and ends with `host_syncs_per_guided_step: X` (CUDA only; goal 0).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import torch

SHAPES = {
    # DeepSeek-R1-Distill-Qwen-1.5B / VGS-AI/DeepSeek-VM-1.5B backbone.
    "published": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                      num_attention_heads=12, num_key_value_heads=2, head_dim=128),
    "tiny": dict(vocab_size=151936, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=64),
}
EOS = 151643


@dataclass
class Result:
    name: str
    value: str


def build_value_model(shape: str, out: str, device: str) -> str:
    """A random-weight value checkpoint of `shape` (initialised on `device`: fast at 1.5B)."""
    from vgs.modeling import Qwen2ForClassifier, value_model_config

    cfg = value_model_config(num_labels=3, max_position_embeddings=32768, rope_theta=10000.0,
                             rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False,
                             bos_token_id=EOS, eos_token_id=EOS, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForClassifier(cfg)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model.to(dtype).save_pretrained(out)
    del model
    return out


def sampling_params(path: str, top_k: int) -> SimpleNamespace:
    from vgs.guidance.params import GuideParams

    return SimpleNamespace(extra_args=GuideParams("qsharp", path, 0.1, top_k).to_extra_args(), n=1,
                           temperature=1.0, stop_token_ids=[EOS], all_stop_token_ids={EOS}, min_tokens=0)


class SyncCounter:
    """Counts the host↔device synchronisations PyTorch reports (CUDA's sync debug mode) and
    where in vgs code they happen."""

    def __init__(self) -> None:
        self.count = 0
        self.sites: dict[str, int] = {}

    def __enter__(self) -> "SyncCounter":
        import traceback

        self._catch = warnings.catch_warnings(record=False)
        self._catch.__enter__()
        warnings.simplefilter("always")
        self._old = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
            if "synchroniz" not in str(message):
                return self._old(message, category, filename, lineno, file, line)
            self.count += 1
            stack = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
            site = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}:{f.name}" for f in reversed(stack[-4:]))
            self.sites[site] = self.sites.get(site, 0) + 1

        torch.cuda.set_sync_debug_mode("warn")  # before the hook: switching it on is itself reported
        warnings.showwarning = show
        return self

    def __exit__(self, *exc) -> None:
        warnings.showwarning = self._old
        torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(*exc)


def run(args: argparse.Namespace) -> list[Result]:
    from vgs.guidance.guide import Guide
    from vgs.guidance.worker_model import CachedValueModel, Feed
    from vgs.modeling import load_value_model

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    out: list[Result] = []
    tmp = tempfile.mkdtemp(prefix="vgs-guidance-gpu-")
    path = build_value_model(args.shape, os.path.join(tmp, "vm"), args.device)
    g = torch.Generator(device="cpu").manual_seed(1)
    B, k, P, V = args.rows, args.top_k, args.prefix, SHAPES[args.shape]["vocab_size"]
    total = P + args.steps + 8  # warm-up, timed and profiled steps
    table = torch.randint(0, 150000, (B, total), generator=g).to(dev)  # MRV2's all_token_ids

    guide = Guide(dev, budget_gib=args.budget_gib)
    reqs = [guide.start(sampling_params(path, k)) for _ in range(B)]
    model = reqs[0].model
    out.append(Result("value model", f"{args.shape}: {model.num_params / 1e9:.2f} B params, "
                                     f"{model.dtype}, page {model.page_size} tokens, {model.page_bytes} B/page"))
    rows = list(range(B))

    base_logits = torch.randn(B, V, device=dev)

    def step(seq_len: int, counter: SyncCounter | None = None) -> None:
        spans = [(r, reqs[r].fed, seq_len) for r in rows]
        # A copy of fixed logits, not fresh random ones: drawing B x V normals costs more on a
        # CPU than the guidance step itself and would swamp its profile.
        logits = base_logits.clone()
        guide.apply(logits, rows, reqs, Feed.from_token_table(table, spans), [seq_len - P] * B)

    # Prefill: every row feeds its P-token prompt (forward A + B).
    t0 = time.perf_counter()
    step(P)
    if cuda:
        torch.cuda.synchronize()
    out.append(Result("prefill step", f"{B} rows x {P} tokens: {time.perf_counter() - t0:.2f} s (first call, incl. warm-up)"))

    # Steady decoding: one new token per row per step.
    for s in range(2):  # warm-up
        step(P + 1 + s)
    if cuda:
        torch.cuda.synchronize()
    counter = SyncCounter() if cuda else None
    t0 = time.perf_counter()
    if counter:
        with counter:
            for s in range(args.steps):
                step(P + 3 + s)
    else:
        for s in range(args.steps):
            step(P + 3 + s)
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    out.append(Result("guided decode step", f"{dt * 1e3:.1f} ms for {B} rows x (1 + {k}) value tokens "
                                            f"= {B * (1 + k) / dt:,.0f} value tokens/s"))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            for s in range(3):
                step(P + 3 + args.steps + s)
            if cuda:
                torch.cuda.synchronize()
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60))
    out.append(Result("value KV in use", f"{model.bytes_in_use / 2**30:.3f} GiB for {B} rows of ~{P + args.steps} tokens "
                                         f"(budget {model.budget_gib:g} GiB, {model.pages_in_use} pages)"))
    if cuda:
        out.append(Result("peak GPU memory", f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"))

    # Accuracy of the paged bf16 step vs the model's own full forward, and batch dependence.
    hf = load_value_model(path, device=dev)
    probe = CachedValueModel(path, device=dev, budget_gib=args.budget_gib)
    seqs = table[:4, :P // 4].tolist()
    cands = torch.randint(0, 150000, (4, k), generator=g)
    alone = []
    for i, seq in enumerate(seqs):
        row = probe.alloc_row()
        alone.append(probe.score([row], [seq], cands[i:i + 1]).success_logit[0].float())
        probe.free_row(row)
    batch_rows = [probe.alloc_row() for _ in seqs]
    batched = probe.score(batch_rows, seqs, cands).success_logit.float()
    from vgs.modeling import success_probs

    worst_full = 0.0
    with torch.inference_mode():
        for i, seq in enumerate(seqs):
            ids = torch.tensor([seq + [int(c)] for c in cands[i]], device=dev)
            p = success_probs(hf(input_ids=ids).logits[:, -1].float()).double()
            full = (torch.log(p) - torch.log1p(-p)).float()
            worst_full = max(worst_full, float((full - alone[i]).abs().max()))
    worst_batch = max(float((batched[i] - alone[i]).abs().max()) for i in range(len(seqs)))
    out.append(Result("paged step vs full forward", f"max |Δ success logit| = {worst_full:.4f}"))
    out.append(Result("alone vs in a batch of 4", f"max |Δ success logit| = {worst_batch:.2e}"))

    # Budget: room for about two rows of P tokens; four rows ask for it.
    tight = 2.5 * (-(-P // probe.page_size)) * probe.page_bytes / 2**30
    small = Guide(dev, budget_gib=tight)
    few = [small.start(sampling_params(path, k)) for _ in range(4)]
    logits = torch.randn(4, V, device=dev)
    small.apply(logits, [0, 1, 2, 3], few, Feed.from_token_table(table, [(r, 0, P) for r in range(4)]), [0] * 4)
    failed = [i for i, r in enumerate(few) if r.failed]
    ended = all(bool(torch.isinf(logits[i]).sum() == V - 1) for i in failed)
    out.append(Result("tight budget", f"{tight:.3f} GiB: {len(failed)}/4 requests ended with a clear error, "
                                      f"{4 - len(failed)} guided; failed rows stop-token only: {ended}"))
    if counter:
        per = counter.count / args.steps
        sites = ", ".join(f"{s} x{n}" for s, n in sorted(counter.sites.items(), key=lambda x: -x[1])) or "none"
        out.append(Result("host syncs in steady steps", f"{counter.count} in {args.steps} steps; sites: {sites}"))
        out.append(Result("host_syncs_per_guided_step", f"{per:g}"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="published")
    ap.add_argument("--rows", type=int, default=32, help="guided requests in the batch (published: n 16 x 2)")
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--prefix", type=int, default=2048, help="prompt + generated tokens already cached per row")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--budget-gib", type=float, default=8.0)
    ap.add_argument("--profile", action="store_true", help="print torch.profiler tables of 3 steady steps")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: pass --device cpu (the sync count is CUDA-only)")
        return 2
    import pandas as pd

    results = run(args)
    print(pd.DataFrame([r.__dict__ for r in results]).to_string(index=False, max_colwidth=120))
    for r in results:
        if r.name == "host_syncs_per_guided_step":
            print(f"host_syncs_per_guided_step: {r.value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
