"""The guidance value model's decode step on CPU with vLLM's fused kernels.

Why: on CPU a guided step's value forward (B rows x (1 + k) tokens through a small trunk)
costs less in arithmetic than in the number of ops. The eager HF-module path runs ~50 ops
per layer (RMSNorm as seven, RoPE as fourteen, a mask of B x (1 + k) x (span + k) and a
concatenation of every candidate key onto the gathered prefix), each with ~5-30 µs of
dispatch on one core (docs/benchmarks_speed.md, "Q♯"). Inside vLLM's worker its CPU
kernels are loaded, so the same arithmetic can run as the few fused ops vLLM's own Qwen2
layers use:

- `rms_norm` / `fused_add_rms_norm` (residual add + norm in one op);
- `rotary_embedding` over a cos/sin table built once from the checkpoint's own rotary
  module (in place on q and k);
- attention split in two: every query of a row (its new token and its k candidates) sees
  the same cached prefix, so the prefix part is a flash-attention call that also returns its
  log-sum-exp (one per row over its own keys when rows differ much in length, else one over
  the padded span with a padding mask); each candidate's own key is one dot product; the
  two are merged exactly with the log-sum-exp (one in-place lerp; no B x (1 + k) x (span + k) mask, no
  concatenation of keys);
- a new request's prompt (forward A) runs unpadded: the rows' tokens concatenated through
  the projections, one causal attention call per row, and the last layer stops at its
  keys and values.

`CpuKernels.available(model)` says whether this path applies (CPU, vLLM's kernels loaded,
a RoPE whose angles depend on the position only, SiLU MLP); `CachedValueModel` falls back to its
module path otherwise, and `VGS_GUIDANCE_FUSED=0` turns this path off. Same fp32 arithmetic
up to summation order: `tests/test_guidance.py` checks the scores against the module path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vgs.guidance.cpu_gemm import vllm_cpu_kernels
from vgs.guidance.transfer import upload

ENV = "VGS_GUIDANCE_FUSED"
# RoPE variants whose cos/sin depend on the position alone (a table built once is exact);
# dynamic variants rescale with the sequence length and keep the module path.
STATIC_ROPE = ("default", "linear", "llama3", "yarn")
# One flash call per row (unpadded keys) when a step has at most this many rows and they fill
# less than this share of the padded span; else one masked call (docs/benchmarks_speed.md).
PER_ROW_MAX_ROWS = 32
PER_ROW_FILL = 0.75


def _c_ops() -> Any | None:
    """`torch.ops._C` when vLLM's CPU kernels this module uses are loaded, else None."""
    if os.environ.get(ENV, "1") == "0" or not vllm_cpu_kernels():
        return None
    c = torch.ops._C
    return c if all(hasattr(c, name) for name in ("rms_norm", "fused_add_rms_norm", "rotary_embedding")) else None


class CpuKernels:
    """Fused decode-step ops for one `CachedValueModel` (see the module docstring)."""

    def __init__(self, model: Any, ops: Any):
        self.ops = ops
        self.m = model
        self.eps_in = [float(layer.input_layernorm.variance_epsilon) for layer in model.layers]
        self.eps_post = [float(layer.post_attention_layernorm.variance_epsilon) for layer in model.layers]
        self.eps_final = float(model.backbone.norm.variance_epsilon)
        self.group = model.num_heads // model.num_kv_heads
        self._cos_sin = torch.empty(0, model.head_dim, dtype=model.dtype)
        self._rope_dtype = model.dtype

    @staticmethod
    def available(model: Any) -> "CpuKernels | None":
        if model.device.type != "cpu" or model.dtype not in (torch.float32, torch.bfloat16):
            return None
        rope = getattr(model.backbone.rotary_emb, "rope_type", "default")
        if rope not in STATIC_ROPE or getattr(model.hf.config, "hidden_act", "silu") != "silu":
            return None
        ops = _c_ops()
        return CpuKernels(model, ops) if ops is not None else None

    # ---- RoPE table ---------------------------------------------------------------------
    def cos_sin(self, max_pos: int) -> torch.Tensor:
        """[positions, head_dim] table (cos of each frequency, then sin), vLLM's layout, from
        the checkpoint's own rotary module (its frequencies and attention scaling); grown
        by doubling as positions grow."""
        n = self._cos_sin.shape[0]
        if max_pos <= n:
            return self._cos_sin
        n = max(2 * n, max_pos, 256)
        pos = torch.arange(n, device=self.m.device)[None, :]
        probe = torch.empty(1, dtype=torch.float32, device=self.m.device)
        cos, sin = self.m.backbone.rotary_emb(probe, pos)  # [1, n, head_dim] each (halves repeated)
        half = self.m.head_dim // 2
        self._cos_sin = torch.cat([cos[0, :, :half], sin[0, :, :half]], dim=-1).to(self._rope_dtype).contiguous()
        return self._cos_sin

    @staticmethod
    def per_row(visible: list[int], span: int) -> bool:
        """Attend one row at a time (unpadded keys, no mask) rather than over the padded span:
        worth it when a step mixes rows of very unequal length (prompts of 30 and 400 tokens)."""
        return 1 < len(visible) <= PER_ROW_MAX_ROWS and sum(visible) < PER_ROW_FILL * len(visible) * span

    # ---- the prefill forward (forward A) -------------------------------------------------
    def prefill_forward(self, ids: torch.Tensor, counts: list[int], lens: list[int], slots: torch.Tensor) -> None:
        """Forward A of `CachedValueModel.score` without padding: row b appends `counts[b]`
        tokens (`ids`, all rows' tokens concatenated) after its `lens[b]` cached ones and
        writes their keys/values to the cache; `slots` [B, span] pool slots of each row's
        positions. The projections run on the concatenated tokens (a new request's prompt
        no longer pays for the longest prompt of its step); attention is one causal call per
        row. Nothing is returned: only the cache matters here."""
        m, ops = self.m, self.ops
        dev = ids.device
        kv, d = m.num_kv_heads, m.head_dim
        counts_t = upload(counts, dev, torch.long)
        row_of = torch.repeat_interleave(torch.arange(len(counts), device=dev), counts_t)
        starts = torch.cumsum(counts_t, 0) - counts_t
        offset = torch.arange(ids.shape[0], device=dev) - starts[row_of]  # index within the row's new tokens
        positions = upload(lens, dev, torch.long)[row_of] + offset
        write = slots[row_of, positions]
        cos_sin = self.cos_sin(max(n + c for n, c in zip(lens, counts)) + 1)
        residual = m.backbone.embed_tokens(ids)
        h = torch.empty_like(residual)
        ops.rms_norm(h, residual, m.layers[0].input_layernorm.weight, self.eps_in[0])
        bounds = [0]
        for c in counts:
            bounds.append(bounds[-1] + c)
        for i, layer in enumerate(m.layers):
            if i == len(m.layers) - 1:
                # the last layer's keys/values are all the cache needs from it
                _, _, sizes = m._qkv[i]
                qkv = m._proj[i][0](h)
                _, k, v = qkv.split(sizes, dim=-1)
                k = k.contiguous()
                ops.rotary_embedding(positions, k, None, d, cos_sin, True)
                m._k[i][write] = k.view(-1, kv, d)
                m._v[i][write] = v.reshape(-1, kv, d)
                return
            qkv_proj, o_proj, gate_up_proj, down_proj = m._proj[i]
            _, _, sizes = m._qkv[i]
            q, k, v = qkv_proj(h).split(sizes, dim=-1)
            q, k = q.contiguous(), k.contiguous()
            ops.rotary_embedding(positions, q, k, d, cos_sin, True)
            kc, vc = m._k[i], m._v[i]
            kc[write] = k.view(-1, kv, d)
            vc[write] = v.reshape(-1, kv, d)
            outs = []
            for b, (n, cached) in enumerate(zip(counts, lens)):
                qb = q[bounds[b]:bounds[b + 1]].view(1, n, -1, d).transpose(1, 2)
                if cached == 0:  # a new request: its own keys, causal
                    kb = k[bounds[b]:bounds[b + 1]].view(1, n, kv, d).transpose(1, 2)
                    vb = v[bounds[b]:bounds[b + 1]].reshape(1, n, kv, d).transpose(1, 2)
                    ob = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=m.scaling,
                                                        enable_gqa=kv != m.num_heads)
                else:  # tokens after a cached prefix: new token j sees positions <= cached + j
                    sl = slots[b, :cached + n]
                    kb = kc.index_select(0, sl).view(1, cached + n, kv, d).transpose(1, 2)
                    vb = vc.index_select(0, sl).view(1, cached + n, kv, d).transpose(1, 2)
                    mask = (torch.arange(cached + n, device=dev)[None, :]
                            <= cached + torch.arange(n, device=dev)[:, None])
                    ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=m.scaling,
                                                        enable_gqa=kv != m.num_heads)
                outs.append(ob.transpose(1, 2).reshape(n, -1))
            o = o_proj(torch.cat(outs) if len(outs) > 1 else outs[0])
            ops.fused_add_rms_norm(o, residual, layer.post_attention_layernorm.weight, self.eps_post[i])
            gate, up = gate_up_proj(o).chunk(2, dim=-1)
            h = down_proj(F.silu(gate) * up)
            ops.fused_add_rms_norm(h, residual, m.layers[i + 1].input_layernorm.weight, self.eps_in[i + 1])

    # ---- the decode forward -------------------------------------------------------------
    def decode_plan(self, pages: list[list[int]], lens: list[int], page_size: int) -> "DecodePlan":
        """Host-side (numpy) bookkeeping of one decode step: where each row's new token is
        written, the pool slots of what each row sees, RoPE positions. Built with numpy and
        handed to torch without copies: in the engine a guided step runs with cold caches
        (the policy's LM head and sampler have just streamed through them), where every
        torch op costs several times its warm dispatch (docs/benchmarks_speed.md)."""
        bsz = len(lens)
        visible = [n + 1 for n in lens]  # the cached tokens and the new one
        span = max(visible)
        width = -(-span // page_size)
        table = np.zeros((bsz, width), dtype=np.int64)  # page 0 pads short rows (masked)
        for b, p in enumerate(pages):
            n = min(len(p), width)
            table[b, :n] = p[:n]
        lens_np = np.asarray(lens, dtype=np.int64)
        write = table[np.arange(bsz), lens_np // page_size] * page_size + lens_np % page_size
        slots = (table[:, :, None] * page_size + np.arange(page_size)[None, None, :]).reshape(bsz, -1)[:, :span]
        row_mode = self.per_row(visible, span)
        if row_mode:  # each row's visible slots, rows concatenated (no padding)
            flat = slots[np.arange(span)[None, :] < np.asarray(visible)[:, None]]
            key_mask = None
        else:
            flat = slots.reshape(-1)
            key_mask = np.where(np.arange(span)[None, :] < np.asarray(visible)[:, None], 0.0, -np.inf)
        return DecodePlan(visible=visible, span=span, row_mode=row_mode, lens=lens_np, write=write, flat=flat,
                          key_mask=key_mask)

    def decode_forward(self, ids: torch.Tensor, plan: "DecodePlan") -> torch.Tensor:
        """Forward B of `CachedValueModel.score`: per row one new token (written to the cache)
        and n_cand candidates at the next position. `ids` [B, 1 + n_cand]; `plan` from
        `decode_plan` (the new token of row b sits at position lens[b], its candidates at
        lens[b] + 1; every query of row b sees positions 0..lens[b], a candidate also
        itself). Returns the final-norm hidden states [B, 1 + n_cand, H]."""
        m, ops = self.m, self.ops
        dev = ids.device
        bsz, qlen = ids.shape
        n_cand = qlen - 1
        kv, g, d = m.num_kv_heads, self.group, m.head_dim
        span, visible = plan.span, plan.visible
        pos = plan.lens[:, None] + (np.arange(qlen) > 0)[None, :]
        positions = torch.from_numpy(pos.reshape(-1)).to(dev)
        write = torch.from_numpy(plan.write).to(dev)
        flat = torch.from_numpy(plan.flat).to(dev)
        cos_sin = self.cos_sin(span + 1)
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        if plan.row_mode:
            bounds = [0]
            for n in visible:
                bounds.append(bounds[-1] + n)
        else:
            key_mask = torch.from_numpy(plan.key_mask).to(device=dev, dtype=m.dtype)[:, None, None]
        residual = F.embedding(ids.reshape(-1), m.backbone.embed_tokens.weight)  # [T, H]
        h = torch.empty_like(residual)
        ops.rms_norm(h, residual, m.layers[0].input_layernorm.weight, self.eps_in[0])
        for i, layer in enumerate(m.layers):
            qkv_proj, o_proj, gate_up_proj, down_proj = m._proj[i]
            _, _, sizes = m._qkv[i]
            q, k, v = qkv_proj(h).split(sizes, dim=-1)  # strided views: vLLM's RoPE takes them as they are
            ops.rotary_embedding(positions, q, k, d, cos_sin, True)
            q5 = q.view(bsz, qlen, kv, g, d)
            k4 = k.view(bsz, qlen, kv, d)
            v4 = v.view(bsz, qlen, kv, d)
            kc, vc = m._k[i], m._v[i]
            kc[write] = k4[:, 0]
            vc[write] = v4[:, 0]
            keys, vals = kc.index_select(0, flat), vc.index_select(0, flat)
            # every query of a row sees the same prefix: fold the query heads of a KV group
            # into the query axis, one flash call for all of them
            qf = q5.permute(0, 2, 3, 1, 4).reshape(bsz, kv, g * qlen, d)
            if plan.row_mode:
                parts = [flash(qf[b:b + 1], keys[lo:hi].view(1, hi - lo, kv, d).transpose(1, 2),
                               vals[lo:hi].view(1, hi - lo, kv, d).transpose(1, 2), scale=m.scaling)
                         for b, (lo, hi) in enumerate(zip(bounds, bounds[1:]))]
                out, lse = torch.cat([o for o, _ in parts]), torch.cat([x for _, x in parts])
            else:
                out, lse = flash(qf, keys.view(bsz, span, kv, d).transpose(1, 2),
                                 vals.view(bsz, span, kv, d).transpose(1, 2), attn_mask=key_mask, scale=m.scaling)
            out = out.view(bsz, kv, g, qlen, d).permute(0, 3, 1, 2, 4)  # [B, Q, KV, G, D]
            if n_cand:
                # Each candidate also sees its own key (the new token's is in the prefix already).
                # With s its own score and L the prefix's log-sum-exp, its own value gets the weight
                # e^s / (e^L + e^s) = sigmoid(s - L): the merge is one lerp into flash's output.
                lse = lse.view(bsz, kv, g, qlen).permute(0, 3, 1, 2)  # [B, Q, KV, G]
                own = (q5[:, 1:] * k4[:, 1:, :, None]).sum(-1)  # [B, n_cand, KV, G]
                w = own.mul_(m.scaling).sub_(lse[:, 1:]).sigmoid_()
                out[:, 1:].lerp_(v4[:, 1:, :, None], w[..., None])
            o = o_proj(out.reshape(bsz * qlen, -1))
            ops.fused_add_rms_norm(o, residual, layer.post_attention_layernorm.weight, self.eps_post[i])
            gate, up = gate_up_proj(o).chunk(2, dim=-1)
            # torch's SiLU and product, not vLLM's `silu_and_mul`: 50 vs 160 µs at 168 x 384 on one core
            h = down_proj(F.silu(gate, inplace=True).mul_(up))
            if i + 1 < len(m.layers):
                ops.fused_add_rms_norm(h, residual, m.layers[i + 1].input_layernorm.weight, self.eps_in[i + 1])
            else:
                ops.fused_add_rms_norm(h, residual, m.backbone.norm.weight, self.eps_final)
        return h.view(bsz, qlen, -1)


@dataclass
class DecodePlan:
    """Host bookkeeping of one fused decode step (`CpuKernels.decode_plan`)."""

    visible: list[int]  # positions each row's queries see (cached tokens + the new one)
    span: int  # max(visible)
    row_mode: bool  # one attention call per row (unpadded) rather than one masked call
    lens: np.ndarray  # [B] the new token's position
    write: np.ndarray  # [B] pool slot of the new token
    flat: np.ndarray  # row mode: visible slots of all rows concatenated; else [B * span] padded
    key_mask: np.ndarray | None  # [B, span] 0 / -inf (masked mode)
