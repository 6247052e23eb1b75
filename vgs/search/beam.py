"""Block-wise value-guided beam search (VGS), with DVTS.

Per problem and tree: B = budget / w beams start from the prompt. Each round every unfinished
beam samples w blocks of up to `block_size` tokens (capped at `max_tokens - generated`), the
value model scores every candidate (prefix + block) at its last token, and the k best
candidates survive, where k is the number of unfinished beams of that tree (global top-k as
published; `per-parent` keeps each parent's best child; `random` is the ablation). A beam that
ended on EOS or reached `max_tokens` is finished and frozen, with the value it was selected
with as its final weight (no rescoring). `trees` independent searches per problem are pooled.

Engineering: one `generate` call per round covers all active beams of all problems and trees
(`n = w` per beam), and one batched scoring call covers all candidates; the value model only
computes each candidate's new block thanks to prefix caching (token ids are resubmitted
exactly). Every random choice is seeded per (problem, tree, round, beam), so results do not
depend on batching.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

from vgs.config import SamplingConfig, SearchConfig
from vgs.engine import GenRequest
from vgs.records import Candidate, Compute, SearchResult
from vgs.search import derive_seed
from vgs.search.scoring import score_batch


@dataclass
class Beam:
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # None while the beam is still growing
    value: float | None = None
    values: list[float] = field(default_factory=list)  # value after each round it survived

    @property
    def active(self) -> bool:
        return self.finish_reason is None


@dataclass
class _Cand:
    problem: int
    tree: int
    parent: int
    tokens: list[int]
    finish_reason: str | None
    value: float = 0.0


def select(values: list[float], parents: list[int], k: int, how: str, rng: random.Random) -> list[int]:
    """Indices of the k surviving candidates, best first (ties: lower index first)."""
    order = sorted(range(len(values)), key=lambda c: (-values[c], c))
    if how == "global":
        return order[:k]
    if how == "per-parent":
        best: dict[int, int] = {}
        for c in order:
            best.setdefault(parents[c], c)
        return sorted(best.values(), key=lambda c: (-values[c], c))[:k]
    if how == "random":
        return rng.sample(range(len(values)), k)
    raise ValueError(f"unknown selection {how!r}")


def beam_search(prompts: list[list[int]], seeds: list[int], engines, search: SearchConfig,
                sampling: SamplingConfig,
                on_round: Callable[[int, int], None] | None = None) -> list[SearchResult]:
    policy, scorer = engines.policy, engines.value
    w, n_beams, max_total = search.beam_width, search.num_beams, sampling.max_tokens
    trees = [[[Beam() for _ in range(n_beams)] for _ in range(search.trees)] for _ in prompts]
    results = [SearchResult([], Compute(policy_params=policy.num_params, value_params=getattr(scorer, "num_params", 0)))
               for _ in prompts]
    rngs = {(i, t): random.Random(derive_seed(seeds[i], "select", t)) for i in range(len(prompts)) for t in range(search.trees)}

    rnd = 0
    while True:
        active = [(i, t, j) for i, tr in enumerate(trees) for t, beams in enumerate(tr)
                  for j, b in enumerate(beams) if b.active]
        if not active:
            break
        reqs = []
        for i, t, j in active:
            beam = trees[i][t][j]
            reqs.append(GenRequest(prompts[i] + beam.tokens, min(search.block_size, max_total - len(beam.tokens)),
                                   n=w, seed=derive_seed(seeds[i], t, rnd, j)))
        outs = policy.generate(reqs, sampling)

        cands: list[_Cand] = []
        for (i, t, j), samples in zip(active, outs):
            parent = trees[i][t][j]
            for s in samples:
                toks = parent.tokens + s.token_ids
                fr = "stop" if s.stopped else ("length" if len(toks) >= max_total else None)
                cands.append(_Cand(i, t, j, toks, fr))
                results[i].compute.policy_tokens += len(s.token_ids)
        values, computed = score_batch(scorer, [prompts[c.problem] + c.tokens for c in cands])
        for c, v, n_tok in zip(cands, values, computed):
            c.value = v
            results[c.problem].compute.value_tokens += n_tok
            results[c.problem].compute.value_calls += 1

        groups: dict[tuple[int, int], list[_Cand]] = {}
        for c in cands:
            groups.setdefault((c.problem, c.tree), []).append(c)
        for (i, t), group in groups.items():
            beams = trees[i][t]
            slots = [j for j, b in enumerate(beams) if b.active]
            keep = select([c.value for c in group], [c.parent for c in group], len(slots), search.selection, rngs[(i, t)])
            new_beams = [Beam(group[c].tokens, group[c].finish_reason, group[c].value,
                              beams[group[c].parent].values + [group[c].value]) for c in keep]
            for slot, nb in zip(slots, new_beams):
                beams[slot] = nb
            results[i].trace.append({
                "round": rnd, "tree": t, "active": len(slots),
                "values": [round(c.value, 6) for c in group], "parents": [c.parent for c in group],
                "lengths": [len(c.tokens) for c in group], "kept": keep,
                "finished": sum(1 for nb in new_beams if not nb.active),
            })
        rnd += 1
        if on_round is not None:
            on_round(rnd, len(active))

    for i, tr in enumerate(trees):
        for t, beams in enumerate(tr):
            for b in beams:
                results[i].candidates.append(Candidate(token_ids=b.tokens, finish_reason=b.finish_reason or "length",
                                                       value=b.value, tree=t, info={"values": b.values}))
    return results
