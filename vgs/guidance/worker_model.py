"""The value model as the guidance processor runs it: inside the vLLM worker, with its own
KV cache per request, scoring all top-k candidates of all guided requests of an engine step
in one batched forward.

Why a hand-written attention over the HF model's modules: transformers' cache objects hold one
batch whose rows advance together, while here every request has its own length, requests come
and go every step, and the k candidates must attend to their request's prefix plus themselves
only (all at the same position id) without being written into the cache. A paged cache (a
page table per request over one pool per layer) and an explicit mask do all of that with one
forward per step for the whole batch. Everything except attention (embedding, RMSNorm,
projections, RoPE, MLP, head) calls the HF model's own modules, so the numerics are the
checkpoint's; `tests/test_guidance.py` checks the scores against full HF
forwards. On CPU with vLLM's kernels loaded (inside the worker) the same steps run fused and
unpadded instead (`vgs.guidance.cpu_kernels`), with the same scores.

One step (`score`) for rows r with new prefix tokens t_r (1 in steady decoding, the whole
prompt for a new request) and candidates c_r:
  forward A (only when some row has > 1 new token): all but the last new token of those rows,
    causal, written to the cache;
  forward B (always, every row): the last new token (written to the cache) + the k candidates at
    the next position, each candidate seeing the prefix and itself. Its head output is the value
    of prefix + candidate, exactly what a full forward of prefix + candidate would give at the last
    position.
So a decode step costs one forward of B × (1 + k) query tokens regardless of batch size.

Memory: the cache is paged. One pool of `page_size`-token pages per layer, shared by all
rows, grows by doubling up to a fixed budget (`budget_gib`, the engine's guidance share:
see `vgs.guidance.budget`), and each row holds a page table. A row takes pages as its
request grows and gives them all back when the request ends, is preempted or its slot is
reused, so memory follows the tokens actually cached instead of rows × the longest
sequence. A row that needs a page when the budget is spent raises `GuidanceMemoryError`
for that row only (`Guide` then ends that request with a clear error; the others go on).
Page 0 is never handed out: padded positions write to it and masked positions read it.

Host/device traffic: lengths, spans and page tables are kept on the host and uploaded once
per forward; no value is read back from the device inside a forward (the old per-layer
`lens.max().item()` is gone), so a guided step adds no device→host synchronisation of its own.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vgs.guidance.cpu_gemm import Linear, make_linear
from vgs.guidance.cpu_kernels import CpuKernels
from vgs.guidance.offsets import CandidateScores
from vgs.guidance.params import resolve_value_model_path
from vgs.guidance.transfer import upload

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 64
_MIN_PAGES = 16


class GuidanceMemoryError(RuntimeError):
    """A row needs more value-model cache than the guidance budget has left."""

    def __init__(self, rows: list[int], message: str):
        super().__init__(message)
        self.rows = rows


@dataclass
class _Batch:
    lens: torch.Tensor  # [B] tokens already in each row's cache before this forward (device)
    slots: torch.Tensor  # [B, span] pool slot of each cached position 0..span-1 (0 = padding page)
    write: torch.Tensor | None  # [B * n_real] pool slot each real token is written to (0 = padding)
    mask: torch.Tensor  # [B, 1, n_real + n_cand, span + n_cand]
    span: int


class CachedValueModel:
    """A `Qwen2ForClassifier` checkpoint with a per-request (per-row) KV cache."""

    def __init__(self, path: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                 histogram_atoms: torch.Tensor | None = None, budget_gib: float | None = None,
                 page_size: int = DEFAULT_PAGE_SIZE):
        from vgs.modeling import load_value_model

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
        # vLLM's fused CPU kernels for the decode step (None: the module path below)
        self.kernels = CpuKernels.available(self)
        # Histogram value models: num_labels atoms evenly spaced on [0, 1] (the Q♯ `mle` head).
        self.histogram = bool(getattr(cfg, "value_head", "") == "histogram") or histogram_atoms is not None
        if self.histogram:
            self.atoms = (histogram_atoms if histogram_atoms is not None
                          else torch.linspace(0.0, 1.0, self.num_labels)).to(device=device, dtype=torch.float32)
        self.page_size = int(page_size)
        self.page_bytes = 2 * len(self.layers) * self.num_kv_heads * self.page_size * self.head_dim * dtype.itemsize
        if budget_gib is None:
            from vgs.guidance.budget import default_budget_gib

            budget_gib = default_budget_gib(device)
        self.budget_gib = float(budget_gib)
        self.max_pages = int(self.budget_gib * (1 << 30)) // self.page_bytes  # page 0 (padding) included
        if self.max_pages < 2:
            raise ValueError(f"guidance KV budget of {self.budget_gib:g} GiB holds less than one "
                             f"{self.page_size}-token page ({self.page_bytes} bytes) of value model {path!r}")
        self._k: list[torch.Tensor] = []  # per layer: [num_pages * page_size, kv_heads, head_dim]
        self._v: list[torch.Tensor] = []
        self.num_pages = 0  # pages allocated in the pool (<= max_pages)
        self._free_pages: list[int] = []
        self.num_rows = 0
        self._free: list[int] = []
        self.lens: list[int] = []  # tokens in each row's cache
        self.pages: list[list[int]] = []  # each row's page table (host)
        self.tokens_computed = 0  # every token run through the backbone, for FLOP accounting

    def _fuse_projections(self) -> None:
        """One matmul for q/k/v and one for gate/up per layer (fewer, larger ops: per-op overhead
        dominates small batches on CPU). The HF modules' weights become views of the fused
        tensors, so memory is not doubled and the HF forward still works.

        On CPU inside vLLM's worker the four projections of each layer then run as vLLM's
        prepacked oneDNN GEMMs (`vgs.guidance.cpu_gemm`: half the time of torch's fp32 GEMM
        at guidance shapes). Those hold their own packed weights, so the HF projection
        weights are released (`self.packed`): this instance's `hf` keeps embedding, norms and
        head only, which is all the guidance forward uses."""
        self._qkv: list[tuple[torch.Tensor, torch.Tensor | None, list[int]]] = []
        self._gate_up: list[tuple[torch.Tensor, int]] = []
        self._proj: list[tuple[Linear, Linear, Linear, Linear]] = []  # qkv, o, gate_up, down per layer
        self.packed = False
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
                made = [make_linear(w, b), make_linear(a.o_proj.weight, a.o_proj.bias), make_linear(gu),
                        make_linear(mlp.down_proj.weight, mlp.down_proj.bias)]
                self._proj.append(tuple(f for f, _ in made))  # type: ignore[arg-type]
                if all(p for _, p in made):
                    self.packed = True
                    empty = torch.nn.Parameter(torch.empty(0, dtype=w.dtype, device=w.device), requires_grad=False)
                    for mod in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                        mod.weight = empty
                    self._qkv[-1] = (empty, b, sizes)
                    self._gate_up[-1] = (empty, n)

    # ---- cache rows and pages --------------------------------------------------------
    def alloc_row(self) -> int:
        """A cache row for a new request (its cache starts empty; pages come as it grows)."""
        if not self._free:
            grow = max(8, self.num_rows)
            self._free.extend(range(self.num_rows + grow - 1, self.num_rows - 1, -1))
            self.lens.extend([0] * grow)
            self.pages.extend([] for _ in range(grow))
            self.num_rows += grow
        row = self._free.pop()
        self.lens[row] = 0
        return row

    def free_row(self, row: int) -> None:
        """Give a row and its pages back (request finished, preempted or its slot reused)."""
        self.reset_row(row)
        self._free.append(row)

    def reset_row(self, row: int) -> None:
        """Forget a row's cache (its request will be re-fed from its token ids); pages go back."""
        self.lens[row] = 0
        self._free_pages.extend(self.pages[row])
        self.pages[row] = []

    def truncate_row(self, row: int, length: int) -> None:
        """Keep the first `length` cached tokens of a row (a rolled-back step)."""
        self.lens[row] = min(self.lens[row], length)

    @property
    def pages_in_use(self) -> int:
        return self.num_pages - len(self._free_pages) - (1 if self.num_pages else 0)

    @property
    def bytes_in_use(self) -> int:
        return self.pages_in_use * self.page_bytes

    def _grow_pool(self, pages: int) -> None:
        """Pool of `pages` pages (copying the old one), at most `max_pages`."""
        pages = min(pages, self.max_pages)
        if pages <= self.num_pages:
            return
        shape = (pages * self.page_size, self.num_kv_heads, self.head_dim)
        new_k, new_v = [], []
        for i in range(len(self.layers)):
            # Zeros, not empty: masked positions still enter the score matmul, and NaN garbage there
            # would survive the mask.
            k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            v = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if self.num_pages:
                k[: self.num_pages * self.page_size] = self._k[i]
                v[: self.num_pages * self.page_size] = self._v[i]
            new_k.append(k)
            new_v.append(v)
        self._k, self._v = new_k, new_v
        first = max(self.num_pages, 1)  # page 0 is the padding page, never handed out
        self._free_pages.extend(range(pages - 1, first - 1, -1))
        self.num_pages = pages

    def reserve(self, rows: list[int], lengths: list[int]) -> None:
        """Make sure row `rows[i]` has pages for `lengths[i]` tokens. Rows that cannot get
        them (budget spent) keep what they had and are named in one `GuidanceMemoryError`
        after every other row was served."""
        ps = self.page_size
        need = {r: -(-n // ps) - len(self.pages[r]) for r, n in zip(rows, lengths)}
        total = sum(max(0, n) for n in need.values())
        if total > len(self._free_pages) and self.num_pages < self.max_pages:
            short = total - len(self._free_pages) + (0 if self.num_pages else 1)  # + page 0 of a new pool
            self._grow_pool(max(2 * self.num_pages, self.num_pages + short, _MIN_PAGES))
        failed = []
        for r, n in need.items():
            if n <= 0:
                continue
            if n > len(self._free_pages):
                failed.append(r)
                continue
            self.pages[r].extend(self._free_pages.pop() for _ in range(n))
        if failed:
            longest = max(lengths[rows.index(r)] for r in failed)
            raise GuidanceMemoryError(failed, (
                f"guidance KV budget exhausted: {len(failed)} request(s) need value-model cache for up to "
                f"{longest} tokens, and the {self.budget_gib:g} GiB budget ({self.max_pages - 1} pages of "
                f"{ps} tokens) is in use by other requests; raise it (vgs: --guidance-kv-gib, vLLM: "
                f"--additional-config '{{\"vgs_guidance_kv_gib\": N}}') or lower the batch size / max_tokens"))

    def _slot_table(self, rows: list[int], span: int) -> torch.Tensor:
        """[B, span] pool slots of positions 0..span-1 of each row (padding page past its pages)."""
        ps = self.page_size
        width = max(1, -(-span // ps))
        padded = [(self.pages[r] + [0] * width)[:width] for r in rows]  # one host tensor, not one per row
        table = upload(padded, self.device, torch.long)
        pos = torch.arange(span, device=self.device)
        return table[:, pos // ps] * ps + pos % ps

    def _batch(self, rows: list[int], lens: list[int], n_real: list[int], width: int, n_cand: int) -> _Batch:
        """Everything a forward needs about its rows, built once on the host and uploaded:
        `n_real[i]` real tokens of row i (padded to `width`) follow its `lens[i]` cached ones."""
        dev = self.device
        # On CUDA, keys padded to whole pages (masked past each row's length): the attention shapes
        # then repeat for a page's worth of steps, so cuDNN's SDPA reuses its execution plan instead
        # of building one for every new length (~1.5 ms of host time per layer per step on an H200).
        # A CPU has no plan to reuse, and the padding would be computed and masked for nothing.
        span = max(lens) + width
        if dev.type == "cuda":
            span = -(-span // self.page_size) * self.page_size
        slots = self._slot_table(rows, span)
        lens_t = upload(lens, dev, torch.long)
        write = None
        if width:
            pos = lens_t[:, None] + torch.arange(width, device=dev)[None, :]
            real = torch.arange(width, device=dev)[None, :] < upload(n_real, dev, torch.long)[:, None]
            write = torch.where(real, slots.gather(1, pos), torch.zeros_like(pos)).reshape(-1)
        return _Batch(lens_t, slots, write, self._mask(lens_t, span, width, n_cand), span)

    # ---- forward ----------------------------------------------------------------------
    def _attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: _Batch,
                   n_real: int, n_cand: int) -> torch.Tensor:
        """q/k/v: [B, H, n_real + n_cand, D] after RoPE. Writes the real tokens' k/v into their
        pages, then attends: real token i sees cache[: lens + i + 1]; candidate j sees
        cache[: lens + n_real] and itself."""
        bsz = q.shape[0]
        kc, vc = self._k[layer], self._v[layer]
        if n_real:
            kc[b.write] = k[:, :, :n_real].transpose(1, 2).reshape(-1, self.num_kv_heads, self.head_dim)
            vc[b.write] = v[:, :, :n_real].transpose(1, 2).reshape(-1, self.num_kv_heads, self.head_dim)
        flat = b.slots.reshape(-1)
        keys = kc.index_select(0, flat).view(bsz, b.span, self.num_kv_heads, self.head_dim).transpose(1, 2)
        vals = vc.index_select(0, flat).view(bsz, b.span, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if n_cand:
            keys = torch.cat([keys, k[:, :, n_real:]], dim=2)
            vals = torch.cat([vals, v[:, :, n_real:]], dim=2)
        out = F.scaled_dot_product_attention(q, keys, vals, attn_mask=b.mask, scale=self.scaling,
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
            mlp = layer.mlp
            qkv_proj, o_proj, gate_up_proj, down_proj = self._proj[i]
            _, _, sizes = self._qkv[i]
            q, k, v = qkv_proj(layer.input_layernorm(x)).split(sizes, dim=-1)
            q = q.view(bsz, qlen, -1, self.head_dim).transpose(1, 2)
            k = k.view(bsz, qlen, -1, self.head_dim).transpose(1, 2)
            v = v.view(bsz, qlen, -1, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            o = self._attention(i, q, k, v, b, n_real, n_cand)
            x = x + o_proj(o.transpose(1, 2).reshape(bsz, qlen, -1))
            _, n = self._gate_up[i]
            gate, up = gate_up_proj(layer.post_attention_layernorm(x)).split([n, mlp.up_proj.out_features], dim=-1)
            x = x + down_proj(mlp.act_fn(gate) * up)
        return self.backbone.norm(x)

    def _decode_fused(self, ids: torch.Tensor, rows: list[int], lens: list[int]) -> torch.Tensor:
        """Forward B through `CpuKernels`: the new token of row i goes to position lens[i]."""
        plan = self.kernels.decode_plan([self.pages[r] for r in rows], lens, self.page_size)
        return self.kernels.decode_forward(ids, plan)

    @torch.inference_mode()
    def score(self, rows: list[int], new_tokens: "list[list[int]] | Feed", cand_ids: torch.Tensor) -> CandidateScores:
        """Append the new tokens of row `rows[i]` (≥ 1 each: `new_tokens[i]`, or a `Feed`
        whose ids may already be on the device) to its cache and score the candidates
        `cand_ids[i]` ([B, k] token ids) after it. Returns the candidates' scores. Raises
        `GuidanceMemoryError` (nothing computed) when some rows cannot get cache pages."""
        feed = new_tokens if isinstance(new_tokens, Feed) else Feed.from_lists(new_tokens)
        if any(n == 0 for n in feed.lengths):
            raise ValueError("every scored row needs at least one new token")
        dev = self.device
        cand_ids = cand_ids.to(dev).clamp(0, self.vocab_size - 1)
        n_cand = int(cand_ids.shape[1])
        self.reserve(rows, [self.lens[r] + n for r, n in zip(rows, feed.lengths)])
        # Forward A: everything but the last new token, for rows that have more than one.
        long = [i for i, n in enumerate(feed.lengths) if n > 1]
        if long:
            n_a = [feed.lengths[i] - 1 for i in long]
            width = max(n_a)
            ids = feed.prefix_ids(long, width).to(dev)
            lens_a = [self.lens[rows[i]] for i in long]
            if self.kernels is not None:  # unpadded: the rows' tokens concatenated
                real = torch.arange(width, device=dev)[None, :] < upload(n_a, dev, torch.long)[:, None]
                slots = self._slot_table([rows[i] for i in long], max(n + c for n, c in zip(lens_a, n_a)))
                self.kernels.prefill_forward(ids[real], n_a, lens_a, slots)
            else:
                b = self._batch([rows[i] for i in long], lens_a, n_a, width, 0)
                self._forward(ids, b, n_real=width, n_cand=0)
            for i, n in zip(long, n_a):
                self.lens[rows[i]] += n
                self.tokens_computed += n
        # Forward B: the last new token of every row + its candidates.
        last = feed.last_ids().to(dev)
        ids = torch.cat([last[:, None], cand_ids], dim=1)
        lens = [self.lens[r] for r in rows]
        if self.kernels is not None:
            hidden = self._decode_fused(ids, rows, lens)
        else:
            b = self._batch(rows, lens, [1] * len(rows), 1, n_cand)
            hidden = self._forward(ids, b, n_real=1, n_cand=n_cand)
        for r in rows:
            self.lens[r] += 1
        self.tokens_computed += len(rows) * (1 + n_cand)
        return self.head_to_scores(self._head(hidden[:, 1:]).float())  # [B, k, num_labels]

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The checkpoint's Linear-ReLU-Linear head as three functional ops (the same
        arithmetic as `hf.score`, without three module calls per step)."""
        first, act, last = self.hf.score
        if not isinstance(act, torch.nn.ReLU):
            return self.hf.score(hidden)
        return F.linear(F.linear(hidden, first.weight, first.bias).relu_(), last.weight, last.bias)

    def head_to_scores(self, logits: torch.Tensor) -> CandidateScores:
        """Head logits → scores: histogram log-probs, or the success logit ℓ = log p − log(1−p)
        (p = softmax[1] for the 3-class VGS head, σ(logit) for a 1-logit head)."""
        if self.histogram:
            return CandidateScores(atom_logprobs=torch.log_softmax(logits, -1), atoms=self.atoms)
        if self.num_labels == 1:
            return CandidateScores(success_logit=logits[..., 0])
        from vgs.modeling import SUCCESS_CLASS

        if self.num_labels == 3:  # the published head (incorrect, correct, unfinished): one op for the others
            a, b = [c for c in range(3) if c != SUCCESS_CLASS]
            return CandidateScores(success_logit=logits[..., SUCCESS_CLASS] - torch.logaddexp(logits[..., a], logits[..., b]))
        others = torch.cat([logits[..., :SUCCESS_CLASS], logits[..., SUCCESS_CLASS + 1:]], dim=-1)
        return CandidateScores(success_logit=logits[..., SUCCESS_CLASS] - torch.logsumexp(others, -1))


@dataclass
class Feed:
    """The tokens a step appends to each row: `lengths[i]` new tokens of row i, whose last
    token is `last[i]` and whose earlier ones come from `prefix(i)` — host lists (V1 adapter)
    or a gather from the device token table (MRV2 adapter), so steady decoding (one new token
    per row) never copies a token back to the host."""

    lengths: list[int]
    last: torch.Tensor  # [B] last new token of each row (any device)
    prefix: "Any" = None  # callable (rows, width) -> [len(rows), width] ids, or host lists

    @staticmethod
    def from_lists(tokens: list[list[int]]) -> "Feed":
        return Feed([len(t) for t in tokens], torch.tensor([t[-1] if t else 0 for t in tokens], dtype=torch.long),
                    [list(t) for t in tokens])

    @staticmethod
    def from_token_table(table: torch.Tensor, spans: list[tuple[int, int, int]]) -> "Feed":
        """The tokens `table[slot, start:end]` of each row `(slot, start, end)` of a device token
        table (MRV2's `all_token_ids`), gathered on the device. Only the host-side spans are
        uploaded (pinned, non-blocking), so steady decoding reads nothing back from the device."""
        dev = table.device
        slots = upload([s for s, _, _ in spans], dev, torch.long)
        starts = upload([a for _, a, _ in spans], dev, torch.long)
        ends = upload([b for _, _, b in spans], dev, torch.long)
        last = table[slots, ends - 1]

        def prefix(rows: list[int], width: int) -> torch.Tensor:
            """[len(rows), width]: all but the last new token of each row, zero-padded."""
            r = upload(rows, dev, torch.long)
            pos = starts[r, None] + torch.arange(width, device=dev)[None, :]
            inside = pos < (ends[r, None] - 1)
            ids = table[slots[r, None], torch.where(inside, pos, torch.zeros_like(pos))]
            return torch.where(inside, ids, torch.zeros_like(ids))

        return Feed([b - a for _, a, b in spans], last, prefix)

    def select(self, idx: list[int]) -> "Feed":
        """The rows `idx` of this feed, in that order."""
        if len(idx) == len(self.lengths) and idx == list(range(len(idx))):
            return self
        prefix = self.prefix
        if callable(prefix):
            sub = prefix
            prefix = lambda rows, width: sub([idx[r] for r in rows], width)  # noqa: E731
        elif prefix is not None:
            prefix = [prefix[i] for i in idx]
        last = self.last.index_select(0, upload(idx, self.last.device, torch.long))
        return Feed([self.lengths[i] for i in idx], last, prefix)

    def last_ids(self) -> torch.Tensor:
        return self.last.long()

    def prefix_ids(self, rows: list[int], width: int) -> torch.Tensor:
        """[len(rows), width] of all but the last new token of each row, zero-padded."""
        if callable(self.prefix):
            return self.prefix(rows, width).long()
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        for j, i in enumerate(rows):
            t = self.prefix[i][:-1]
            ids[j, : len(t)] = torch.tensor(t, dtype=torch.long)
        return ids


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


_MODELS: dict[tuple[str, str, float | None], CachedValueModel] = {}
_LOCK = threading.Lock()


def get_model(path: str, device: torch.device | str, budget_gib: float | None = None) -> CachedValueModel:
    """The worker's value model for `path` on `device`, loaded on first use and kept; its
    cache pool is bounded by `budget_gib` (the engine's guidance budget, fixed at first load)."""
    key = (path, str(device), budget_gib)
    with _LOCK:
        if key not in _MODELS:
            log.info("loading guidance value model %s on %s", path, device)
            _MODELS[key] = CachedValueModel(path, device, budget_gib=budget_gib)
        return _MODELS[key]
