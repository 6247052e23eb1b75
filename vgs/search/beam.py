"""Block-wise value-guided beam search (VGS), with DVTS.

Per problem and tree: B = budget / w beams start from the prompt. Each round every unfinished
beam samples w blocks of up to `block_size` tokens (capped at `max_tokens - generated`), the
value model scores every candidate (prefix + block) at its last token, and the k best
candidates survive, where k is the number of unfinished beams of that tree (global top-k as
published; `per-parent` keeps each parent's best child; `random` is the ablation). A beam that
ended on EOS or reached `max_tokens` is finished and frozen, with the value it was selected
with as its final weight (no rescoring). `trees` independent searches per problem are pooled.

Engineering: one async search per problem; its trees grow concurrently, and each round of a
tree issues one vLLM request per active beam (`n = w`) and one (coalesced) scoring call for
its candidates. There is no barrier across problems or trees: vLLM's continuous batching and
the value batcher merge the work of everything in flight. The value model only computes
each candidate's new block thanks to prefix caching (token ids are resubmitted exactly).
Every random choice is seeded per (problem, tree, round, beam), so results do not depend on
scheduling on CPU; on a GPU batch-shape-dependent kernels can flip near-tied tokens, so there
the guarantee is the same seeds and distribution, not identical tokens (README, "Determinism"). The round logic (`expand`, `select`, `advance`) is pure.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from vgs.config import SamplingConfig, SearchConfig
from vgs.engine import GenRequest
from vgs.records import Candidate, Compute, SearchResult
from vgs.search.common import derive_seed
from vgs.search.scoring import score


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
class Cand:
    parent: int
    tokens: list[int]
    finish_reason: str | None
    value: float = 0.0


def expand(beams: list[Beam], active: list[int], outs: list[list[Any]], max_tokens: int) -> list[Cand]:
    """The children of each active beam: its tokens + one sampled block each. A child is
    finished on EOS ("stop") or when it reaches `max_tokens` ("length")."""
    cands = []
    for j, samples in zip(active, outs):
        for smp in samples:
            toks = beams[j].tokens + list(smp.token_ids)
            fr = "stop" if smp.stopped else ("length" if len(toks) >= max_tokens else None)
            cands.append(Cand(j, toks, fr))
    return cands


def advance(beams: list[Beam], cands: list[Cand], how: str, rng: random.Random, rnd: int, tree: int
            ) -> tuple[list[Beam], dict[str, Any]]:
    """Keep the best k candidates (k = active beams) in the active slots; finished beams stay
    frozen with the value they were selected with. Returns the new beams and the round record."""
    slots = [j for j, b in enumerate(beams) if b.active]
    keep = select([c.value for c in cands], [c.parent for c in cands], len(slots), how, rng)
    new = list(beams)
    kept = [Beam(cands[c].tokens, cands[c].finish_reason, cands[c].value, beams[cands[c].parent].values +
                 [cands[c].value]) for c in keep]
    for slot, nb in zip(slots, kept):
        new[slot] = nb
    record = {"round": rnd, "tree": tree, "active": len(slots), "values": [round(c.value, 6) for c in cands],
              "parents": [c.parent for c in cands], "lengths": [len(c.tokens) for c in cands], "kept": keep,
              "finished": sum(1 for nb in kept if not nb.active)}
    return new, record


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


async def beam_search(prompt: list[int], seed: int, engines, search: SearchConfig, sampling: SamplingConfig,
                      events=None) -> SearchResult:
    """VGS on one problem: `search.trees` trees grown concurrently, then pooled."""
    from vgs.aio import gather_or_cancel

    policy = engines.policy
    comp = Compute(policy_params=policy.num_params, value_params=getattr(engines.value, "num_params", 0))
    trees = await gather_or_cancel(*(_grow_tree(prompt, seed, t, engines, search, sampling, comp, events)
                                     for t in range(search.trees)))
    result = SearchResult([], comp)
    for t, (beams, trace) in enumerate(trees):
        result.trace.extend(trace)
        for b in beams:
            result.candidates.append(Candidate(token_ids=b.tokens, finish_reason=b.finish_reason or "length",
                                               value=b.value, tree=t, info={"values": b.values}))
    result.trace.sort(key=lambda r: (r["round"], r["tree"]))
    return result


async def _grow_tree(prompt: list[int], seed: int, t: int, engines, search: SearchConfig, sampling: SamplingConfig,
                     comp: Compute, events) -> tuple[list[Beam], list[dict[str, Any]]]:
    from vgs.aio import gather_or_cancel

    policy, w, max_total = engines.policy, search.beam_width, sampling.max_tokens
    beams = [Beam() for _ in range(search.num_beams)]
    rng = random.Random(derive_seed(seed, "select", t))
    trace: list[dict[str, Any]] = []
    rnd = 0
    while active := [j for j, b in enumerate(beams) if b.active]:
        reqs = [GenRequest(prompt + beams[j].tokens, min(search.block_size, max_total - len(beams[j].tokens)),
                           n=w, seed=derive_seed(seed, t, rnd, j)) for j in active]
        outs = await gather_or_cancel(*(policy.agenerate(r, sampling) for r in reqs))
        for samples in outs:
            comp.policy_tokens += sum(len(s.token_ids) for s in samples)
            comp.prefill_tokens += sum(s.prefill_tokens for s in samples)
        cands = expand(beams, active, outs, max_total)
        values = await score(engines, [prompt + c.tokens for c in cands], comp)
        for c, v in zip(cands, values):
            c.value = v
        beams, record = advance(beams, cands, search.selection, rng, rnd, t)
        trace.append(record)
        if events is not None:
            events.round(tree=t, round=rnd, active=len(active), best_value=max(values) if values else None)
        rnd += 1
    return beams, trace
