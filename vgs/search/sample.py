"""Independent sampling: the baseline every search is compared with (plain sampling,
majority vote, best-of-N, weighted majority all start from the same N samples; they differ
only in how the caller aggregates them)."""

from __future__ import annotations

from vgs.config import SamplingConfig, SearchConfig
from vgs.engine import GenRequest
from vgs.records import Candidate, Compute, SearchResult
from vgs.search.scoring import score_batch


def score_candidates(engines, prompts: list[list[int]], results: list[SearchResult]) -> None:
    """Value-score every candidate's full sequence (prompt + response) in one batched call."""
    if engines.value is None:
        return
    seqs, owners = [], []
    for prompt, res in zip(prompts, results):
        for c in res.candidates:
            seqs.append(list(prompt) + list(c.token_ids))
            owners.append((res, c))
    values, computed = score_batch(engines.value, seqs)
    for (res, c), v, t in zip(owners, values, computed):
        c.value = v
        res.compute.value_calls += 1
        res.compute.value_tokens += t


def sample_n(prompts: list[list[int]], seeds: list[int], engines, search: SearchConfig,
             sampling: SamplingConfig) -> list[SearchResult]:
    policy = engines.policy
    reqs = [GenRequest(list(p), sampling.max_tokens, n=search.n, seed=s) for p, s in zip(prompts, seeds)]
    outs = policy.generate(reqs, sampling)
    results = []
    for samples in outs:
        cands = [Candidate(token_ids=s.token_ids, finish_reason=s.finish_reason) for s in samples]
        comp = Compute(policy_tokens=sum(len(s.token_ids) for s in samples), policy_params=policy.num_params,
                       value_params=getattr(engines.value, "num_params", 0))
        results.append(SearchResult(cands, comp))
    score_candidates(engines, prompts, results)
    return results
