"""The value model as the guidance processor runs it: inside the vLLM worker, with its own
KV cache per request, scoring all top-k candidates of all guided requests of an engine step
in one batched forward.

Why a hand-written attention over the HF model's modules: transformers' cache objects hold one
batch whose rows advance together, while here every request has its own length, requests come
and go every step, and the k candidates must attend to their request's prefix plus themselves
only (all at the same position id) without being written into the cache. A padded tensor cache
with one row per request ([rows, kv_heads, capacity, head_dim] per layer) and an explicit mask
does all of that with one forward per step for the whole batch. Everything except attention
(embedding, RMSNorm, projections, RoPE, MLP, head) calls the HF model's own modules, so the
numerics are the checkpoint's; `tests/test_guidance.py` checks the scores against full HF
forwards.

One step (`score`) for rows r with new prefix tokens t_r (1 in steady decoding, the whole
prompt for a new request) and candidates c_r:
  forward A (only when some row has > 1 new token): all but the last new token of those rows,
    causal, written to the cache;
  forward B (always, every row): the last new token (written to the cache) + the k candidates at
    the next position, each candidate seeing the prefix and itself. Its head output is the value
    of prefix + candidate, exactly what a full forward of prefix + candidate would give at the last
    position.
So a decode step costs one forward of B × (1 + k) query tokens regardless of batch size.

Memory: capacity grows by doubling to the longest sequence in the cache, for every row; on a
GPU with many long requests a paged cache would use less memory (not needed for the tiny CPU
models this project tests with; documented in docs/guidance.md).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vgs.guidance.offsets import CandidateScores
from vgs.guidance.params import resolve_value_model_path

log = logging.getLogger(__name__)

_MIN_CAPACITY = 256


@dataclass
class _Batch:
    rows: torch.Tensor  # [B] cache rows
    lens: torch.Tensor  # [B] tokens already in each row's cache before this forward


class CachedValueModel:
    """A `Qwen2ForClassifier` checkpoint with a per-request (per-row) KV cache."""

    def __init__(self, path: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                 histogram_atoms: torch.Tensor | None = None):
        from value_models.modeling import load_value_model

        device = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.path = path
        hf = load_value_model(resolve_value_model_path(path), dtype=dtype, device=device)
        cfg = hf.config
        if getattr(cfg, "model_type", "qwen2") != "qwen2":
            raise ValueError(f"value model {path!r}: expected a qwen2 backbone, got {cfg.model_type!r}")
        if any(t == "sliding_attention" for t in (getattr(cfg, "layer_types", None) or [])):
            raise ValueError(f"value model {path!r} uses sliding-window attention, which guidance does not support")
        self.hf = hf
        self.backbone = hf.model
        self.layers = list(hf.model.layers)
        self.device = device
        self.dtype = dtype
        self.vocab_size = int(cfg.vocab_size)
        self.num_labels = int(cfg.num_labels)
        attn = self.layers[0].self_attn
        self.head_dim = int(attn.head_dim)
        self.num_heads = int(cfg.num_attention_heads)
        self.num_kv_heads = int(cfg.num_key_value_heads)
        self.scaling = float(attn.scaling)
        self.num_params = int(sum(p.numel() for p in hf.parameters()))
        self._fuse_projections()
        # Histogram value models: num_labels atoms evenly spaced on [0, 1] (the Q♯ `mle` head).
        self.histogram = bool(getattr(cfg, "value_head", "") == "histogram") or histogram_atoms is not None
        if self.histogram:
            self.atoms = (histogram_atoms if histogram_atoms is not None
                          else torch.linspace(0.0, 1.0, self.num_labels)).to(device=device, dtype=torch.float32)
        self._k: list[torch.Tensor] = []
        self._v: list[torch.Tensor] = []
        self.capacity = 0
        self.num_rows = 0
        self._free: list[int] = []
        self.lens: list[int] = []  # tokens in each row's cache
        self.tokens_computed = 0  # every token run through the backbone, for FLOP accounting

    def _fuse_projections(self) -> None:
        """One matmul for q/k/v and one for gate/up per layer (fewer, larger ops: per-op overhead
        dominates small batches on CPU). The HF modules' weights become views of the fused
        tensors, so memory is not doubled and the HF forward still works."""
        self._qkv: list[tuple[torch.Tensor, torch.Tensor | None, list[int]]] = []
        self._gate_up: list[tuple[torch.Tensor, int]] = []
        with torch.no_grad():
            for layer in self.layers:
                a, mlp = layer.self_attn, layer.mlp
                projs = (a.q_proj, a.k_proj, a.v_proj)
                w = torch.cat([p.weight for p in projs]).contiguous()
                b = torch.cat([p.bias for p in projs]).contiguous() if all(p.bias is not None for p in projs) else None
                sizes = [p.weight.shape[0] for p in projs]
                start = 0
                for p, n in zip(projs, sizes):
                    p.weight = torch.nn.Parameter(w[start:start + n], requires_grad=False)
                    if b is not None:
                        p.bias = torch.nn.Parameter(b[start:start + n], requires_grad=False)
                    start += n
                self._qkv.append((w, b, sizes))
                gu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).contiguous()
                n = mlp.gate_proj.weight.shape[0]
                mlp.gate_proj.weight = torch.nn.Parameter(gu[:n], requires_grad=False)
                mlp.up_proj.weight = torch.nn.Parameter(gu[n:], requires_grad=False)
                self._gate_up.append((gu, n))

    # ---- cache rows -------------------------------------------------------------------
    def alloc_row(self) -> int:
        """A cache row for a new request (its cache starts empty)."""
        if not self._free:
            self._grow(rows=max(8, 2 * self.num_rows), capacity=max(self.capacity, _MIN_CAPACITY))
        row = self._free.pop()
        self.lens[row] = 0
        return row

    def free_row(self, row: int) -> None:
        """Give a row back (request finished, preempted or its slot reused)."""
        self.lens[row] = 0
        self._free.append(row)

    def reset_row(self, row: int) -> None:
        """Forget a row's cache (its request will be re-fed from its token ids)."""
        self.lens[row] = 0

    def _grow(self, rows: int, capacity: int) -> None:
        rows, capacity = max(rows, self.num_rows), max(capacity, self.capacity)
        if rows == self.num_rows and capacity == self.capacity:
            return
        shape = (rows, self.num_kv_heads, capacity, self.head_dim)
        new_k, new_v = [], []
        for i in range(len(self.layers)):
            # Zeros, not empty: masked positions still enter the score matmul, and NaN garbage there
            # would survive the mask.
            k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            v = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if self.num_rows:
                k[: self.num_rows, :, : self.capacity] = self._k[i]
                v[: self.num_rows, :, : self.capacity] = self._v[i]
            new_k.append(k)
            new_v.append(v)
        self._k, self._v = new_k, new_v
        self._free.extend(range(rows - 1, self.num_rows - 1, -1))
        self.lens.extend([0] * (rows - self.num_rows))
        self.num_rows, self.capacity = rows, capacity

    def _ensure_capacity(self, needed: int) -> None:
        if needed > self.capacity:
            cap = max(self.capacity, _MIN_CAPACITY)
            while cap < needed:
                cap *= 2
            self._grow(self.num_rows, cap)

    # ---- forward ----------------------------------------------------------------------
    def _attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: _Batch,
                   n_real: int, n_cand: int) -> torch.Tensor:
        """q/k/v: [B, H, n_real + n_cand, D] after RoPE. Writes the real tokens' k/v into the cache
        at positions lens..lens+n_real-1, then attends: real token i sees cache[: lens + i + 1];
        candidate j sees cache[: lens + n_real] and itself."""
        bsz = q.shape[0]
        kc, vc = self._k[layer], self._v[layer]
        if n_real:
            pos = (b.lens[:, None] + torch.arange(n_real, device=self.device)[None, :]).reshape(-1)
            rows = b.rows[:, None].expand(bsz, n_real).reshape(-1)
            kc[rows, :, pos] = k[:, :, :n_real].transpose(1, 2).reshape(-1, self.num_kv_heads, self.head_dim)
            vc[rows, :, pos] = v[:, :, :n_real].transpose(1, 2).reshape(-1, self.num_kv_heads, self.head_dim)
        span = int(b.lens.max().item()) + n_real
        keys = kc[:, :, :span].index_select(0, b.rows)
        vals = vc[:, :, :span].index_select(0, b.rows)
        if n_cand:
            keys = torch.cat([keys, k[:, :, n_real:]], dim=2)
            vals = torch.cat([vals, v[:, :, n_real:]], dim=2)
        mask = self._mask(b.lens, span, n_real, n_cand)
        out = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, scale=self.scaling,
                                             enable_gqa=self.num_heads != self.num_kv_heads)
        return out

    def _mask(self, lens: torch.Tensor, span: int, n_real: int, n_cand: int) -> torch.Tensor:
        """[B, 1, n_real + n_cand, span + n_cand] boolean attention mask (True = attend)."""
        key_pos = torch.arange(span, device=self.device)
        q_idx = torch.arange(n_real + n_cand, device=self.device)
        # Visible prefix length per query: real i → lens + i + 1, candidates → lens + n_real.
        visible = lens[:, None] + torch.clamp(q_idx + 1, max=n_real)[None, :]
        prefix = key_pos[None, None, :] < visible[:, :, None]  # [B, Q, span]
        own = torch.zeros((n_real + n_cand, n_cand), dtype=torch.bool, device=self.device)
        if n_cand:
            own[n_real:] = torch.eye(n_cand, dtype=torch.bool, device=self.device)
        full = torch.cat([prefix, own[None].expand(lens.shape[0], -1, -1)], dim=-1)
        return full[:, None]

    def _forward(self, ids: torch.Tensor, b: _Batch, n_real: int, n_cand: int) -> torch.Tensor:
        """Hidden states [B, n_real + n_cand, H] of real tokens then candidates."""
        bsz, qlen = ids.shape
        steps = torch.clamp(torch.arange(qlen, device=self.device), max=n_real)
        position_ids = b.lens[:, None] + steps[None, :]
        x = self.backbone.embed_tokens(ids)
        cos, sin = self.backbone.rotary_emb(x, position_ids)
        cos, sin = cos[:, None], sin[:, None]
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            w, bias, sizes = self._qkv[i]
            q, k, v = F.linear(layer.input_layernorm(x), w, bias).split(sizes, dim=-1)
            q = q.view(bsz, qlen, -1, self.head_dim).transpose(1, 2)
            k = k.view(bsz, qlen, -1, self.head_dim).transpose(1, 2)
            v = v.view(bsz, qlen, -1, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            o = self._attention(i, q, k, v, b, n_real, n_cand)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(bsz, qlen, -1))
            gu, n = self._gate_up[i]
            gate, up = F.linear(layer.post_attention_layernorm(x), gu).split([n, gu.shape[0] - n], dim=-1)
            x = x + mlp.down_proj(mlp.act_fn(gate) * up)
        return self.backbone.norm(x)

    @torch.inference_mode()
    def score(self, rows: list[int], new_tokens: list[list[int]], cand_ids: torch.Tensor) -> CandidateScores:
        """Append `new_tokens[i]` (≥ 1 token each) to row `rows[i]`'s cache and score the
        candidates `cand_ids[i]` ([B, k] token ids) after it. Returns the candidates' scores."""
        if any(len(t) == 0 for t in new_tokens):
            raise ValueError("every scored row needs at least one new token")
        dev = self.device
        cand_ids = cand_ids.to(dev).clamp(0, self.vocab_size - 1)
        n_cand = int(cand_ids.shape[1])
        # Padded rows of forward A write (finite) junk past their length, up to the widest row.
        self._ensure_capacity(max(self.lens[r] for r in rows) + max(len(t) for t in new_tokens) + 1)
        # Forward A: everything but the last new token, for rows that have more than one.
        long = [i for i, t in enumerate(new_tokens) if len(t) > 1]
        if long:
            width = max(len(new_tokens[i]) - 1 for i in long)
            ids = torch.zeros((len(long), width), dtype=torch.long)
            for j, i in enumerate(long):
                t = new_tokens[i][:-1]
                ids[j, : len(t)] = torch.tensor(t, dtype=torch.long)
            b = _Batch(torch.tensor([rows[i] for i in long], device=dev),
                       torch.tensor([self.lens[rows[i]] for i in long], device=dev))
            self._forward(ids.to(dev), b, n_real=width, n_cand=0)
            for i in long:
                self.lens[rows[i]] += len(new_tokens[i]) - 1
                self.tokens_computed += len(new_tokens[i]) - 1
        # Forward B: the last new token of every row + its candidates.
        last = torch.tensor([t[-1] for t in new_tokens], dtype=torch.long, device=dev)
        ids = torch.cat([last[:, None], cand_ids], dim=1)
        b = _Batch(torch.tensor(rows, device=dev), torch.tensor([self.lens[r] for r in rows], device=dev))
        hidden = self._forward(ids, b, n_real=1, n_cand=n_cand)
        for r in rows:
            self.lens[r] += 1
        self.tokens_computed += len(rows) * (1 + n_cand)
        logits = self.hf.score(hidden[:, 1:]).float()  # [B, k, num_labels]
        return self.head_to_scores(logits)

    def head_to_scores(self, logits: torch.Tensor) -> CandidateScores:
        """Head logits → scores: histogram log-probs, or the success logit ℓ = log p − log(1−p)
        (p = softmax[1] for the 3-class VGS head, σ(logit) for a 1-logit head)."""
        if self.histogram:
            return CandidateScores(atom_logprobs=torch.log_softmax(logits, -1), atoms=self.atoms)
        if self.num_labels == 1:
            return CandidateScores(success_logit=logits[..., 0])
        from value_models.modeling import SUCCESS_CLASS

        others = torch.cat([logits[..., :SUCCESS_CLASS], logits[..., SUCCESS_CLASS + 1:]], dim=-1)
        return CandidateScores(success_logit=logits[..., SUCCESS_CLASS] - torch.logsumexp(others, -1))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


_MODELS: dict[tuple[str, str], CachedValueModel] = {}
_LOCK = threading.Lock()


def get_model(path: str, device: torch.device | str) -> CachedValueModel:
    """The worker's value model for `path` on `device`, loaded on first use and kept."""
    key = (path, str(device))
    with _LOCK:
        if key not in _MODELS:
            log.info("loading guidance value model %s on %s", path, device)
            _MODELS[key] = CachedValueModel(path, device)
        return _MODELS[key]
