"""Independent sampling: the baseline every search is compared with (plain sampling,
majority vote, best-of-N, weighted majority all start from the same N samples; they differ
only in the vote that picks the answer, see `vgs.search.methods`). One vLLM request with
`n` samples per problem."""

from __future__ import annotations

from vgs.config import SamplingConfig, SearchConfig
from vgs.engine import GenRequest
from vgs.records import Candidate, Compute, SearchResult
from vgs.search.scoring import score


async def sample_n(prompt: list[int], seed: int, engines, cfg: SearchConfig, sampling: SamplingConfig,
                   events=None, *, scored: bool = False) -> SearchResult:
    """`scored`: value-score every sample (best-of-N, weighted majority); the method registry
    passes its `needs_scorer`, so this module does not read the registry that dispatches to it."""
    policy = engines.policy
    samples = await policy.agenerate(GenRequest(list(prompt), sampling.max_tokens, n=cfg.n, seed=seed), sampling)
    cands = [Candidate(token_ids=s.token_ids, finish_reason=s.finish_reason) for s in samples]
    comp = Compute(policy_tokens=sum(len(s.token_ids) for s in samples),
                   prefill_tokens=sum(s.prefill_tokens for s in samples), policy_params=policy.num_params,
                   value_params=getattr(engines.value, "num_params", 0) if scored else 0)
    if scored:  # every candidate's full sequence, in one (coalesced) call
        values = await score(engines, [list(prompt) + list(c.token_ids) for c in cands], comp)
        for c, v in zip(cands, values):
            c.value = v
    return SearchResult(cands, comp)
