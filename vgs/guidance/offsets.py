"""The guidance core: value-model scores of π_ref's top-k candidates → logit offsets.

Q♯ (arXiv 2502.20548) samples from π_guided(a|s) ∝ π_ref(a|s) · exp(Q*(s,a)/η) with
Q*(s,a) = η · log E[exp(Z/η)] for the return Z of π_ref continuations of s + a. So guidance is
an additive offset Q*/η on π_ref's logits:

- Bernoulli value model (success probability p = σ(ℓ)): log(1 − p + p·e^{1/η})
  = softplus(ℓ + 1/η) − softplus(ℓ), written in ℓ so it stays exact for p near 0 or 1.
- Histogram value model (atoms z_i, probabilities p_i): logsumexp_i(log p_i + z_i/η).
- CD baseline (η → ∞ reading of the same model, Q^{π_ref}/η): E[Z]/η, i.e. p/η.

Only the top-k tokens of π_ref get an offset; every other token keeps offset 0 (for the
Bernoulli form that is "p = 0"; the published histogram code instead subtracts the minimum
top-k offset, which we do not, so both forms treat unscored tokens alike). The offset is
added to the raw logits; vLLM applies temperature afterwards (as the published HF code does),
so the sampled distribution is ∝ exp((logit + offset) / T): relative to the tempered π_ref the
effective guidance strength is 1/(η·T).

Everything here is plain batched torch with no vLLM dependency, so the V1 and MRV2 adapters
and the tests share one implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vgs.guidance.transfer import upload

METHODS = ("qsharp", "cd")


@dataclass
class CandidateScores:
    """What the value model says about each candidate (prefix + token), per row.

    Exactly one of `success_logit` ([B, k], ℓ = log p − log(1 − p)) and `atom_logprobs`
    ([B, k, K] log-probabilities over `atoms` [K]) is set.
    """

    success_logit: torch.Tensor | None = None
    atom_logprobs: torch.Tensor | None = None
    atoms: torch.Tensor | None = None

    @staticmethod
    def from_probs(p: torch.Tensor) -> "CandidateScores":
        """From success probabilities (clamped so p = 0 / 1 give finite logits)."""
        p = p.double().clamp(1e-300, 1 - 1e-16)
        return CandidateScores(success_logit=(torch.log(p) - torch.log1p(-p)))

    def success_prob(self) -> torch.Tensor:
        if self.success_logit is not None:
            return torch.sigmoid(self.success_logit)
        return (self.atom_logprobs.exp() * self.atoms).sum(-1)


def _as_col(x: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A per-row parameter as a [B, 1] tensor broadcasting over candidates."""
    t = torch.as_tensor(x, dtype=like.dtype, device=like.device)
    return t.reshape(-1, 1) if t.dim() else t


def compute_offsets(scores: CandidateScores, eta: torch.Tensor | float,
                    method: str | list[str] = "qsharp") -> torch.Tensor:
    """Offsets [B, k] to add to the candidates' raw logits.

    `eta` is a scalar or one value per row; `method` one name or one per row ("qsharp" |
    "cd"). Bernoulli and histogram scores give the forms in the module docstring.
    """
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(f"unknown guidance method {method!r}; choose one of {', '.join(METHODS)}")
        return _offsets(scores, eta, method)  # one method for the batch: only its form is computed
    qsharp, cd = _offsets(scores, eta, "qsharp"), _offsets(scores, eta, "cd")
    is_cd = upload([m == "cd" for m in method], qsharp.device, torch.bool).reshape(-1, 1)
    return torch.where(is_cd, cd, qsharp)


def _offsets(scores: CandidateScores, eta: torch.Tensor | float, method: str) -> torch.Tensor:
    if scores.success_logit is not None:
        ell = scores.success_logit.float()
        inv = 1.0 / float(eta) if isinstance(eta, (int, float)) else 1.0 / _as_col(eta, ell)
        if method == "qsharp":
            return F.softplus(ell + inv) - F.softplus(ell)
        return torch.sigmoid(ell) * inv
    lp = scores.atom_logprobs.float()
    z = scores.atoms.to(lp)
    inv = 1.0 / _as_col(eta, lp[..., 0])
    if method == "qsharp":
        return torch.logsumexp(lp + z * inv.unsqueeze(-1), dim=-1)
    return (lp.exp() * z).sum(-1) * inv


def top_k_candidates(logits: torch.Tensor, k: int, chunk: int = 128) -> torch.Tensor:
    """Ids [B, k] of π_ref's k highest raw logits per row (the tokens that get scored), in
    descending order.

    Two stages, because a plain `torch.topk` over a 152k vocabulary is one of the costliest
    steps of guidance on CPU: the k largest entries all lie in the k chunks with the largest
    maxima (an entry outside them is beaten by the maximum of each of those k chunks), so take
    chunk maxima (one vectorised pass), the top-k chunks, then top-k among their k·chunk entries.
    """
    b, v = logits.shape
    if v <= 4 * k * chunk:
        return torch.topk(logits, k, dim=-1, sorted=True).indices
    pad = (-v) % chunk
    x = F.pad(logits, (0, pad), value=float("-inf")) if pad else logits
    top_chunks = torch.topk(x.view(b, -1, chunk).amax(-1), k, dim=-1, sorted=False).indices  # [B, k]
    # ids of the entries of those chunks, [B, k * chunk] (padding ids are never among the best)
    ids = (top_chunks[:, :, None] * chunk + torch.arange(chunk, device=logits.device)).view(b, k * chunk)
    best = torch.topk(x.gather(1, ids), k, dim=-1, sorted=True).indices
    return ids.gather(1, best)


def add_offsets(logits: torch.Tensor, cand_ids: torch.Tensor, offsets: torch.Tensor,
                valid: torch.Tensor | None = None) -> torch.Tensor:
    """Scatter-add `offsets` onto `logits` at `cand_ids`, in place; other tokens unchanged.
    `valid` [B, k] masks padding candidates (rows with a smaller k than the batch's)."""
    off = offsets.to(logits.dtype)
    if valid is not None:
        off = off.masked_fill(~valid, 0.0)
    logits.scatter_add_(1, cand_ids, off)
    return logits


def guided_kl(logits: torch.Tensor, cand_ids: torch.Tensor, offsets: torch.Tensor,
              temperature: torch.Tensor | float = 1.0, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Exact per-row KL(π_guided ‖ π_ref) over the full vocabulary, in nats, [B].

    `logits` are the raw (un-offset) logits; both distributions are taken at `temperature`
    (before top-p/top-k truncation): π_ref = softmax(ℓ/T), π_guided = softmax((ℓ + o)/T).
    With offsets o only on the candidate set K: log Z = log Σ_a π_ref(a) e^{o(a)/T}, and
    KL = Σ_{a∈K} π_guided(a) · o(a)/T − log Z, so one logsumexp over the vocabulary suffices.
    """
    x = logits.double()  # KL is a small difference of large terms: fp32 loses ~1e-4 relative
    t = _as_col(temperature, x)
    off = offsets.double()
    if valid is not None:
        off = off.masked_fill(~valid, 0.0)
    logp_all = x / t
    lse = torch.logsumexp(logp_all, dim=-1, keepdim=True)
    logp_k = torch.gather(logp_all, 1, cand_ids) - lse  # log π_ref(a), a ∈ K
    if valid is not None:
        logp_k = logp_k.masked_fill(~valid, float("-inf"))
    rest = torch.log((1.0 - logp_k.exp().sum(-1, keepdim=True)).clamp_min(0.0))  # log π_ref(outside K)
    u = off / t
    log_z = torch.logsumexp(torch.cat([rest, logp_k + u], dim=-1), dim=-1, keepdim=True)
    q_k = torch.exp(logp_k + u - log_z)
    kl = (q_k * u).nan_to_num(0.0).sum(-1) - log_z.squeeze(-1)
    return kl.clamp_min(0.0).float()
