"""Analytic forward FLOPs of a Qwen2 value model, to bound what KV/prefix reuse can save.

A wall-time speedup over the published re-prefill can come from two places only: fewer
FLOPs (reuse) and more FLOPs per second (batching, better kernels). This module counts the
first exactly, so a benchmark can print the speedup that reuse alone would give at the
baseline's own speed (`bound`), and how fast each method actually computes.

Counted per token: the q/k/v/o projections and the gated MLP of every layer (2 FLOPs per
multiply-add); per (query, key) pair: QK^T and PV of every head; per head application: the
value head `Linear(H,H) -> ReLU -> Linear(H,labels)`. Norms, rotary, softmax and the
embedding lookup are left out (a few percent, the same for every method).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    labels: int

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelShape":
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        return cls(layers=int(cfg["num_hidden_layers"]), hidden=hidden, heads=heads,
                   kv_heads=int(cfg.get("num_key_value_heads") or heads),
                   head_dim=int(cfg.get("head_dim") or hidden // heads),
                   intermediate=int(cfg["intermediate_size"]),
                   labels=int(cfg.get("num_labels") or len(cfg.get("id2label") or {}) or 3))

    @property
    def per_token(self) -> int:
        """Projection + MLP FLOPs of one token through all layers."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.layers * 2 * (h * (q + 2 * kv) + q * h + 3 * h * self.intermediate)

    @property
    def per_pair(self) -> int:
        """Attention FLOPs of one (query, key) pair through all layers."""
        return self.layers * 2 * 2 * self.heads * self.head_dim

    @property
    def per_head_call(self) -> int:
        return 2 * self.hidden * (self.hidden + self.labels)

    def flops(self, work: "Work") -> int:
        return work.tokens * self.per_token + work.pairs * self.per_pair + work.head_calls * self.per_head_call

    def attention_share(self, work: "Work") -> float:
        return work.pairs * self.per_pair / max(1, self.flops(work))


@dataclass(frozen=True)
class Work:
    """What a forward computes: token positions, causal (query, key) pairs, head calls."""
    tokens: int = 0
    pairs: int = 0
    head_calls: int = 0


def reprefill_work(sequences: Iterable[Sequence[int]]) -> Work:
    """The published approach: every sequence from scratch, head on every position."""
    seqs = list(sequences)
    return Work(tokens=sum(len(s) for s in seqs), pairs=sum(len(s) * (len(s) + 1) // 2 for s in seqs),
                head_calls=sum(len(s) for s in seqs))


def reuse_work(sequences: Iterable[Sequence[int]]) -> Work:
    """A perfect prefix cache: every distinct prefix computed once, the head applied to the
    last token of each distinct sequence. `sequences` in scoring order; repeats are free."""
    seen: set[int] = set()
    scored: set[int] = set()
    tokens = pairs = 0
    for s in sequences:
        key = 0
        for i, tok in enumerate(s):
            key = hash((key, tok))
            if key not in seen:
                seen.add(key)
                tokens += 1
                pairs += i + 1
        if s:
            scored.add(key)
    return Work(tokens=tokens, pairs=pairs, head_calls=len(scored))


# The published value model (DeepSeek-VM-1.5B: the Qwen2-1.5B trunk, 3-class head).
PUBLISHED_VALUE_SHAPE = ModelShape(layers=28, hidden=1536, heads=12, kv_heads=2, head_dim=128, intermediate=8960,
                                   labels=3)


def _causal_pairs(start: int, end: int) -> int:
    """Σ_{i=start}^{end-1} (i + 1): (query, key) pairs of positions start..end-1."""
    return end * (end + 1) // 2 - start * (start + 1) // 2


def beam_search_work(prompt: int, beams: int, rounds: int, width: int, block: int) -> tuple[Work, Work]:
    """(re-prefill, perfect reuse) work of scoring a block beam search in closed form: round r
    scores beams × width candidates of prompt + (r+1)·block tokens. Re-prefill runs each from
    scratch with the head on every position; a perfect prefix cache computes the prompt once
    and each candidate's new block once, with one head call per candidate."""
    re_tokens = re_pairs = 0
    new_tokens = new_pairs = 0
    for r in range(rounds):
        n = beams * width
        length = prompt + (r + 1) * block
        re_tokens += n * length
        re_pairs += n * _causal_pairs(0, length)
        new_tokens += n * block
        new_pairs += n * _causal_pairs(length - block, length)
    reprefill = Work(tokens=re_tokens, pairs=re_pairs, head_calls=re_tokens)
    reuse = Work(tokens=prompt + new_tokens, pairs=_causal_pairs(0, prompt) + new_pairs,
                 head_calls=beams * width * rounds)
    return reprefill, reuse
