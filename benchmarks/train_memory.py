"""Per-GPU memory of value-model training: an analytic estimate, checked against a measurement.

    python -m benchmarks.train_memory            # tables for the published run and the defaults
    python -m benchmarks.train_memory --gpu-gib 80 --world 128
    python -m benchmarks.train_memory --apo      # A*-PO (value_models.apo) at the published shapes

Prints (1) the analytic per-GPU estimate (weights, gradients, optimizer, activations, masks)
for the published configuration (1.5B, micro-batch 8, 16,384 tokens, 128 GPUs) and for this
trainer's defaults, with and without gradient checkpointing, DDP and FSDP; and (2) for a tiny
model on CPU, the measured peak of live tensor memory during real training steps (the
trainer's own model, collator, loss and fused AdamW; measured with torch's MemTracker, which
sees every tensor storage allocated and freed) beside the same formula's estimate, with the
ratio. The formula counts, per token and decoder layer, the tensors autograd saves for the
backward pass (see `layer_bytes_per_token`), so the CPU check also validates the activation
model behind the GPU table.

What the trainer keeps (value_models/train.py): fp32 master weights, fp32 gradients, fp32
AdamW moments; on GPU the forward runs under bf16 autocast (bf16 activations, bf16 weight
copies cached for the forward); the residual stream stays fp32 (weights are fp32).

A*-PO (`--apo`, value_models/apo.py) adds a frozen pi_ref (bf16 on GPU by default), computes
log-probs of the response tokens only, in checkpointed chunks of `--logprob-chunk` rows of
the vocabulary-wide logits, and shares each GPU with a vLLM engine that reserves
`--gpu-memory-utilization` of it. The table covers Qwen2.5-1.5B/3B/7B at the published shapes
(256 + 1024 tokens), DDP and FSDP, checkpointing on/off, and flags what does not fit; the CPU
check measures one real A*-PO step of a tiny model against the same formula.
"""

from __future__ import annotations

import argparse
import resource
import sys
from dataclasses import dataclass, replace

GIB = 1024**3
FIT_SHARE = 0.9  # of the GPU for tensors; the rest: CUDA context, NCCL buffers, allocator fragmentation


@dataclass
class Setup:
    """One training configuration, as far as memory is concerned."""

    name: str
    micro_batch: int
    seq_len: int
    world: int = 1
    fsdp: bool = False
    grad_ckpt: bool = True
    compute_bytes: int = 2  # 2: bf16 autocast (GPU); 4: fp32 (CPU)
    padding_mask: bool = True  # padded micro-batches: transformers builds a bool [B, 1, T, T] mask for SDPA
    packed_sdpa: bool = False  # the refused case: one packed row with a dense mask
    attn_dropout: bool = False  # CPU SDPA with dropout saves the attention probabilities (math path)
    gpu: bool = True


def model_shape(config, causal_lm: bool = False) -> dict:
    """Parameter counts from the real module built on the meta device (no memory; tied weights
    once): the value model (`Qwen2ForClassifier`), or with `causal_lm` the policy."""
    import torch
    from transformers import Qwen2ForCausalLM

    from vgs.modeling import Qwen2ForClassifier

    with torch.device("meta"):
        m = (Qwen2ForCausalLM if causal_lm else Qwen2ForClassifier)(config)
    total = sum(p.numel() for p in m.parameters())
    layer = sum(p.numel() for p in m.model.layers[0].parameters())
    return {"params": total, "layer_params": layer, "L": config.num_hidden_layers, "H": config.hidden_size,
            "Hkv": config.num_key_value_heads * (config.hidden_size // config.num_attention_heads),
            "I": config.intermediate_size, "heads": config.num_attention_heads, "V": config.vocab_size}


def layer_bytes_per_token(s: dict, a: int, r: int = 4, repeat_kv: bool = False) -> float:
    """Bytes autograd saves per token in one Qwen2 decoder layer (transformers' eager ops).

    a: activation (matmul output) bytes, r: residual / RMSNorm bytes (fp32: weights are fp32).
    - input RMSNorm: x * rsqrt (r*H) and the normalised output; under autocast each of the
      three q/k/v linears saves its own bf16 cast of it (3*a*H), in fp32 they share it (r*H)
    - q, k, v (a*(H + 2*Hkv)); RoPE: rotate_half(q), rotate_half(k), q_embed, k_embed
    - attention output (saved by SDPA) and its contiguous copy (o_proj input): 2*a*H
    - post-attention residual (r*H), its RMSNorm (r*H + normalised: 2 casts or 1 shared)
    - MLP: gate, silu(gate), up, silu*up (4*a*I)
    """
    H, Hkv, I = s["H"], s["Hkv"], s["I"]
    cast = a != r
    norm1 = r * H + (3 * a * H if cast else r * H)
    qkv = a * (H + 2 * Hkv)
    rope = a * (2 * H + 2 * Hkv)
    attn = 2 * a * H + (2 * a * H if repeat_kv else 0)
    norm2 = r * H + r * H + (2 * a * H if cast else r * H)
    mlp = 4 * a * I
    return norm1 + qkv + rope + attn + norm2 + mlp


def estimate(s: dict, u: Setup) -> dict[str, float]:
    """Bytes per GPU at the peak of a step (after the first, when the AdamW moments exist):
    weights + optimizer + max(activations + backward transients, all gradients)."""
    P, Pl, L, H, I = s["params"], s["layer_params"], s["L"], s["H"], s["I"]
    a = u.compute_bytes
    n = u.micro_batch * u.seq_len  # tokens per micro-batch
    shard = u.world if u.fsdp else 1
    weights = 4 * P / shard
    if u.fsdp:  # all-gathered params of the current and the prefetched layer (+ the root's), compute dtype
        weights += a * (2 * Pl + (P - L * Pl))
    elif a != 4:  # autocast caches a bf16 copy of every weight during the forward
        weights += a * P
    grads = 4 * P / shard
    ddp_buckets = 4 * P if (u.world > 1 and not u.fsdp) else 0  # DDP's flat reduction buckets
    optimizer = 8 * P / shard
    repeat = u.padding_mask and u.gpu and s["Hkv"] != H  # a mask disables SDPA's native GQA on CUDA
    per_layer = layer_bytes_per_token(s, a, repeat_kv=repeat)
    if u.attn_dropout:  # probabilities + dropout mask per head, [T x T] per sequence
        per_layer_seq = s["heads"] * u.seq_len * (4 + 1 + 4)
        per_layer += per_layer_seq
    head = 4 * H + 4 * H + H + 2 * a * H  # final norm, dropout output + mask, score.0 output (relu)
    if u.grad_ckpt:  # checkpointed layer inputs (fp32 residual) + one layer recomputed in backward
        acts = n * (L * 4 * H + per_layer + head)
    else:
        acts = n * (L * per_layer + head + 4 * H)
    transient = n * (3 * a * I + 2 * 4 * H)  # gradients flowing through one MLP in backward
    # transformers' bool mask [B, 1, T, T] (lives through the forward) plus the copy SDPA converts
    # it to (compute dtype, per layer call: one live at a time with checkpointing)
    mask = 0.0
    if u.packed_sdpa:
        mask = float(n) * n * (1 + a)  # one packed row: a dense [N, N] mask
    elif u.padding_mask:
        mask = float(u.micro_batch) * u.seq_len * u.seq_len * (1 + a)
    peak = weights + optimizer + ddp_buckets + mask + max(acts + transient, grads)
    return {"weights": weights, "grads": grads + ddp_buckets, "optimizer": optimizer, "activations": acts,
            "mask": mask, "peak": peak}


def published_config():
    """DeepSeek-R1-Distill-Qwen-1.5B's architecture with the value head (3 labels)."""
    from vgs.modeling import value_model_config

    return value_model_config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                              num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=131072,
                              rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, num_labels=3)


def tiny_config():
    """The test suite's tiny model shape (head size 64, GQA), with a vocabulary small enough
    that activations, not the embedding, are a real share of the peak."""
    from vgs.modeling import value_model_config

    return value_model_config(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                              num_labels=3)


def measure_cpu(config, micro_batch: int, seq_len: int, grad_ckpt: bool, dropout: float = 0.0,
                steps: int = 2) -> dict[str, float]:
    """Peak live tensor bytes over `steps` real training steps of the trainer's pieces on CPU."""
    import numpy as np
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker

    from value_models.data import Example, collate
    from vgs.modeling import Qwen2ForClassifier
    from value_models.train import TrainConfig, param_groups, sequence_losses

    torch.manual_seed(0)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cfg = replace(config)
    cfg.attention_dropout = dropout
    cfg.head_dropout = dropout
    model = Qwen2ForClassifier(cfg).float()
    model.config._attn_implementation = "sdpa"
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    tc = TrainConfig(data=["-"], init="-", out="-")
    opt = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=1e-4, betas=(tc.beta1, tc.beta2), eps=tc.eps,
                            fused=True)
    rng = np.random.default_rng(0)
    tracker = MemTracker()
    tracker.track_external(model, opt)
    with tracker:
        for _ in range(steps):
            tracker.reset_mod_stats()  # per-module stats only; the peak snapshot spans all steps
            ex = [Example(rng.integers(0, cfg.vocab_size, size=seq_len), seq_len // 4, int(rng.integers(0, 3)))
                  for _ in range(micro_batch)]
            batch = collate(ex, pad_id=0)
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            loss = sequence_losses(out.logits.float(), batch).sum() / micro_batch
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            del out, loss, batch
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    return {"peak": float(peak), "rss_growth": float(rss)}


def measure_gpu(config, micro_batch: int, seq_len: int, steps: int = 2, device: str = "cuda") -> dict[str, float]:
    """Peak allocated device memory and step time of real training steps of the trainer's own
    pieces (fp32 weights, bf16 autocast through `value_models.train._forward`, gradient
    checkpointing, fused AdamW, the trainer's loss) at `micro_batch` x `seq_len` tokens, one
    sequence 1,000 tokens shorter so the batch is padded (the mask case the estimate counts)."""
    import time
    from types import SimpleNamespace

    import numpy as np
    import torch

    from value_models.data import Example, collate
    from vgs.modeling import Qwen2ForClassifier
    from value_models.train import TrainConfig, _forward, param_groups, sequence_losses

    dev = torch.device(device)
    torch.manual_seed(0)
    with dev:
        model = Qwen2ForClassifier(replace(config)).float()
    model.config._attn_implementation = "sdpa"
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    tc = TrainConfig(data=["-"], init="-", out="-", dtype="bf16" if dev.type == "cuda" else "fp32")
    opt = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=1e-5, betas=(tc.beta1, tc.beta2), eps=tc.eps,
                            fused=True)
    d = SimpleNamespace(device=dev)
    rng = np.random.default_rng(0)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for _ in range(steps):
        lens = [seq_len] * (micro_batch - 1) + [seq_len - min(1000, seq_len // 2)]
        batch = collate([Example(rng.integers(0, config.vocab_size, size=n), n // 4, int(rng.integers(0, 3)))
                         for n in lens], pad_id=0).to(dev)
        t0 = time.perf_counter()
        loss = sequence_losses(_forward(model, batch, tc, d), batch).sum() / micro_batch
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
        del loss, batch
    peak = float(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else float("nan")
    del model, opt
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {"peak": peak, "step_s": times[-1]}


def gpu_check_rows(micro_batches: list[int], seq_len: int = 16384, device: str = "cuda") -> list[dict]:
    """Measured vs estimated peak for the published 1.5B shape on one GPU (world 1, no DDP)."""
    cfg = published_config()
    shape = model_shape(cfg)
    rows = []
    for mb in micro_batches:
        est = estimate(shape, Setup(f"mb {mb} x {seq_len}", mb, seq_len, world=1))
        got = measure_gpu(cfg, mb, seq_len, device=device)
        tokens = mb * seq_len
        rows.append({"config": f"1.5B, 1 GPU, mb {mb} x {seq_len}, ckpt, bf16 autocast", "estimate_GiB": est["peak"] / GIB,
                     "measured_GiB": got["peak"] / GIB, "ratio": est["peak"] / got["peak"],
                     "step_s": got["step_s"], "tokens_per_s": tokens / got["step_s"]})
    return rows


def check_rows(micro_batch: int = 4, seq_len: int = 512) -> list[dict]:
    """Measured vs estimated peak for the tiny model on CPU (fp32), with and without gradient
    checkpointing, no padding (equal lengths: SDPA gets no mask on CPU)."""
    cfg = tiny_config()
    shape = model_shape(cfg)
    rows = []
    for ckpt in (False, True):
        u = Setup(f"tiny, CPU fp32, dropout 0, ckpt {'on' if ckpt else 'off'}", micro_batch, seq_len, grad_ckpt=ckpt,
                  compute_bytes=4, padding_mask=False, gpu=False)
        est = estimate(shape, u)
        got = measure_cpu(cfg, micro_batch, seq_len, ckpt)
        rows.append({"config": u.name, "tokens": micro_batch * seq_len, "params_M": shape["params"] / 1e6,
                     "estimate_MiB": est["peak"] / 2**20, "measured_MiB": got["peak"] / 2**20,
                     "ratio": est["peak"] / got["peak"], "rss_growth_MiB": got["rss_growth"] / 2**20})
    return rows


def gpu_rows(world: int, gpu_gib: float) -> list[dict]:
    shape = model_shape(published_config())
    setups = [
        Setup("published: mb 8 x 16k, ckpt, DDP", 8, 16384, world=world),
        Setup("published: mb 8 x 16k, ckpt, FSDP", 8, 16384, world=world, fsdp=True),
        Setup("published: mb 8 x 16k, no ckpt, FSDP", 8, 16384, world=world, fsdp=True, grad_ckpt=False),
        Setup("published: mb 8 x 16k, ckpt, FSDP, --pack with SDPA (refused)", 8, 16384, world=world, fsdp=True,
              padding_mask=False, packed_sdpa=True),
        Setup("defaults: mb 4 x 16k, ckpt (auto on GPU), DDP", 4, 16384, world=world),
        Setup("defaults: mb 4 x 16k, ckpt, 1 GPU", 4, 16384, world=1),
    ]
    rows = []
    for u in setups:
        e = estimate(shape, u)
        rows.append({"config": u.name, **{k + "_GiB": v / GIB for k, v in e.items()},
                     f"fits_{gpu_gib:g}GiB": "yes" if e["peak"] <= FIT_SHARE * gpu_gib * GIB else "no"})
    return rows


# ----------------------------------------------------------------------------------------------
# A*-PO


@dataclass
class ApoSetup(Setup):
    """One A*-PO configuration per GPU: a `Setup` at the published shapes plus pi_ref, the
    log-prob chunk and the vLLM engine's share of the GPU."""

    micro_batch: int = 8
    seq_len: int = 256 + 1024  # published prompt + response lengths
    world: int = 8
    ref_bytes: int = 2  # pi_ref weights: 2 = bf16 (new GPU default), 4 = fp32 (the old default)
    chunk: int = 512  # --logprob-chunk
    vllm_share: float = 0.4  # --gpu-memory-utilization of the engine beside the trainer


def qwen25_config(size: str):
    """Qwen2.5 base architectures (the published A*-PO policies), from their Hub configs."""
    from transformers import Qwen2Config

    shapes = {"1.5B": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                           num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
              "3B": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                         num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True),
              "7B": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)}
    return Qwen2Config(**shapes[size], max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=10000.0)


def causal_lm_shape(config) -> dict:
    return model_shape(config, causal_lm=True)


def apo_estimate(s: dict, u: ApoSetup, gpu_gib: float = 80.0) -> dict[str, float]:
    """Bytes per GPU at the peak of an A*-PO optimizer step (policy forward/backward of one
    micro-batch after the first step), plus the vLLM engine's reservation.

    Policy: as `estimate` (fp32 master weights, grads, AdamW; autocast copies or FSDP-gathered
    layers; DDP buckets). pi_ref: its weights only (its log-probs are computed once per batch
    under no_grad, before the updates, so its activations are gone at the peak). Activations:
    the decoder's (same per-layer model), then the log-prob head: the final hidden states and
    their gathered response rows (fp32), and one checkpointed chunk of [chunk x vocab] logits
    recomputed in backward: the matmul output (compute dtype), its fp32 copy (autocast only),
    softmax, softmax * logits, and the fp32 gradient flowing back."""
    P, Pl, L, H, I, V = s["params"], s["layer_params"], s["L"], s["H"], s["I"], s["V"]
    a = u.compute_bytes
    n = u.micro_batch * u.seq_len
    shard = u.world if u.fsdp else 1
    weights = 4 * P / shard
    if u.fsdp:
        weights += a * (2 * Pl + (P - L * Pl))
    elif a != 4:
        weights += a * P
    grads = 4 * P / shard
    ddp_buckets = 4 * P if (u.world > 1 and not u.fsdp) else 0
    optimizer = 8 * P / shard
    ref = u.ref_bytes * P / shard
    repeat = u.padding_mask and u.gpu and s["Hkv"] != H
    per_layer = layer_bytes_per_token(s, a, repeat_kv=repeat)
    head = n * (4 * H + 4 * H) + n * 4 * H  # final norm input + output (fp32), gathered response rows
    if u.grad_ckpt:
        acts = n * (L * 4 * H + per_layer) + head
    else:
        acts = n * (L * per_layer + 4 * H) + head
    chunk = min(u.chunk, n) * V * (a + (4 if a != 4 else 0) + 4 + 4 + 4)
    transient = max(n * (3 * a * I + 2 * 4 * H), chunk)
    mask = float(u.micro_batch) * u.seq_len * u.seq_len * (1 + a) if u.padding_mask else 0.0
    peak = weights + optimizer + ddp_buckets + ref + mask + max(acts + transient, grads)
    vllm = u.vllm_share * gpu_gib * GIB
    return {"weights": weights, "ref": ref, "grads": grads + ddp_buckets, "optimizer": optimizer, "activations": acts,
            "logits_chunk": chunk, "trainer_peak": peak, "vllm": vllm, "total": peak + vllm}


def apo_rows(world: int, gpu_gib: float) -> list[dict]:
    """The published shapes (Qwen2.5-1.5B/3B/7B, micro-batch 8 x (256 + 1024) tokens, vLLM at
    0.4 of the GPU) under the new defaults (checkpointing on, pi_ref bf16) and the old ones."""
    rows = []
    for size in ("1.5B", "3B", "7B"):
        shape = causal_lm_shape(qwen25_config(size))
        setups = [ApoSetup(f"{size} FSDP, ckpt, ref bf16 (defaults + --fsdp)", world=world, fsdp=True),
                  ApoSetup(f"{size} DDP, ckpt, ref bf16 (defaults)", world=world),
                  ApoSetup(f"{size} FSDP, no ckpt, ref bf16", world=world, fsdp=True, grad_ckpt=False),
                  ApoSetup(f"{size} DDP, no ckpt, ref fp32 (old defaults)", world=world, grad_ckpt=False, ref_bytes=4)]
        for u in setups:
            e = apo_estimate(shape, u, gpu_gib)
            rows.append({"config": u.name, **{k + "_GiB": v / GIB for k, v in e.items()},
                         f"fits_{gpu_gib:g}GiB": "yes" if e["total"] <= FIT_SHARE * gpu_gib * GIB else "no"})
    return rows


def tiny_lm_config():
    """A tiny Qwen2 causal LM (head size 64, GQA) whose vocabulary makes the log-prob chunk a
    real share of the peak."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                       tie_word_embeddings=False, use_cache=False)


def measure_apo_cpu(config, micro_batch: int, seq_len: int, prompt_len: int, grad_ckpt: bool, chunk: int,
                    steps: int = 2) -> dict[str, float]:
    """Peak live tensor bytes over `steps` real A*-PO steps on CPU (MemTracker): the trainer's
    own log-prob module, loss, pi_ref forward and AdamW, one micro-batch per step."""
    import numpy as np
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers import Qwen2ForCausalLM

    from value_models.apo import ApoConfig, _module, apo_sequence_loss, collate, sequence_sums
    from value_models.train import param_groups

    torch.manual_seed(0)
    LP = _module()
    policy = Qwen2ForCausalLM(replace(config)).float()
    # pi_ref: frozen by running it under no_grad (MemTracker cannot hook parameters without grad)
    ref = Qwen2ForCausalLM(replace(config)).float().eval()
    for m in (policy, ref):
        m.config._attn_implementation = "sdpa"
    if grad_ckpt:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.train()
    model, ref_model = LP(policy, chunk), LP(ref, chunk)
    ac = ApoConfig(data=["-"], init="-", out="-")
    opt = torch.optim.AdamW(param_groups(policy, ac.weight_decay), lr=1e-6, betas=(ac.adam_beta1, ac.adam_beta2),
                            eps=ac.eps)
    rng = np.random.default_rng(0)
    tracker = MemTracker()
    tracker.track_external(model, ref_model, opt)
    with tracker:
        for _ in range(steps):
            tracker.reset_mod_stats()
            prompts = [rng.integers(0, config.vocab_size, size=prompt_len).tolist() for _ in range(micro_batch)]
            responses = [rng.integers(0, config.vocab_size, size=seq_len - prompt_len).tolist()
                         for _ in range(micro_batch)]
            b = collate(prompts, responses, pad_id=0)
            with torch.no_grad():
                ref_lp = sequence_sums(ref_model(b.input_ids, b.attention_mask, b.rows, b.cols, b.targets)[0], b)
            lp_tok, ent = model(b.input_ids, b.attention_mask, b.rows, b.cols, b.targets)
            lp = sequence_sums(lp_tok, b)
            r = torch.tensor(rng.integers(0, 2, size=micro_batch), dtype=torch.float32)
            loss = apo_sequence_loss(lp, ref_lp, r, torch.full_like(r, 0.5), ac.beta2).mean() - ac.entropy_coeff * ent.mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            del lp_tok, ent, lp, loss, b, ref_lp
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    return {"peak": float(peak)}


def apo_check_rows(micro_batch: int = 4, seq_len: int = 512, prompt_len: int = 128, chunk: int = 256) -> list[dict]:
    """Measured vs estimated A*-PO peak for the tiny causal LM on CPU (fp32 everywhere, pi_ref
    fp32, one process, no vLLM share, equal lengths: no padding mask)."""
    cfg = tiny_lm_config()
    shape = causal_lm_shape(cfg)
    rows = []
    for ckpt in (False, True):
        u = ApoSetup(f"tiny A*-PO, CPU fp32, ckpt {'on' if ckpt else 'off'}", micro_batch, seq_len, world=1,
                     grad_ckpt=ckpt, ref_bytes=4, chunk=chunk, compute_bytes=4, vllm_share=0.0, padding_mask=False,
                     gpu=False)
        est = apo_estimate(shape, u, 0.0)
        got = measure_apo_cpu(cfg, micro_batch, seq_len, prompt_len, ckpt, chunk)
        rows.append({"config": u.name, "tokens": micro_batch * seq_len, "params_M": shape["params"] / 1e6,
                     "estimate_MiB": est["trainer_peak"] / 2**20, "measured_MiB": got["peak"] / 2**20,
                     "ratio": est["trainer_peak"] / got["peak"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    import pandas as pd

    p = argparse.ArgumentParser(prog="python -m benchmarks.train_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=128, help="GPUs of the published run (16 nodes x 8)")
    p.add_argument("--gpu-gib", type=float, default=80,
                   help="GPU memory (GiB) to check the fit against (fits: estimate <= 90%% of it)")
    p.add_argument("--micro-batch", type=int, default=4, help="tiny CPU check: sequences per micro-batch")
    p.add_argument("--seq-len", type=int, default=512, help="tiny CPU check: tokens per sequence")
    p.add_argument("--skip-measure", action="store_true", help="only the analytic GPU table")
    p.add_argument("--measure-gpu", type=int, nargs="*", metavar="MB",
                   help="on a CUDA GPU: measure the published shape at these micro-batches x 16,384 tokens "
                        "against the estimate (e.g. --measure-gpu 1 4 8)")
    p.add_argument("--apo", action="store_true",
                   help="A*-PO instead: Qwen2.5-1.5B/3B/7B at the published shapes, DDP/FSDP, checkpointing "
                        "on/off, with the vLLM engine's share (--world default 8 here)")
    args = p.parse_args(argv)
    pd.set_option("display.width", 220)
    pd.set_option("display.max_columns", 20)
    if args.apo:
        return apo_main(args, pd)
    shape = model_shape(published_config())
    print(f"value model 1.5B: {shape['params'] / 1e9:.3f}B params ({shape['L']} layers, H {shape['H']}, "
          f"I {shape['I']}); per GPU, bf16 autocast, fp32 weights/grads/AdamW, world {args.world}")
    print(pd.DataFrame(gpu_rows(args.world, args.gpu_gib)).round(2).to_string(index=False))
    if args.measure_gpu:
        rows = gpu_check_rows(args.measure_gpu)
        print("\npublished shape on this GPU: measured peak (torch.cuda.max_memory_allocated) vs the estimate")
        print(pd.DataFrame(rows).round(3).to_string(index=False))
    if args.skip_measure:
        return 0
    rows = check_rows(args.micro_batch, args.seq_len)
    print("\ntiny model on CPU (fp32): measured peak of live tensors vs the same estimate")
    print(pd.DataFrame(rows).round(3).to_string(index=False))
    ok = all(0.8 <= r["ratio"] <= 1.2 for r in rows)
    print(f"estimate within 20% of the measurement: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


def apo_main(args, pd) -> int:
    world = args.world if args.world != 128 else 8  # the value-model default is the published 128-GPU run
    print(f"A*-PO per GPU: Qwen2.5 base, micro-batch 8 x (256 + 1024) tokens, bf16 autocast, fp32 policy "
          f"weights/grads/AdamW, world {world}, vLLM engine at 0.4 of a {args.gpu_gib:g} GiB GPU; fits: trainer + "
          f"vLLM <= {FIT_SHARE:.0%} of the GPU")
    print(pd.DataFrame(apo_rows(world, args.gpu_gib)).round(2).to_string(index=False))
    if args.skip_measure:
        return 0
    rows = apo_check_rows()
    print("\ntiny causal LM, one real A*-PO step on CPU (fp32): measured peak of live tensors vs the same estimate")
    print(pd.DataFrame(rows).round(3).to_string(index=False))
    ok = all(0.8 <= r["ratio"] <= 1.2 for r in rows)
    print(f"estimate within 20% of the measurement: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
