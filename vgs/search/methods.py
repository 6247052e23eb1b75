"""The method registry: which methods exist, which engines each needs, which `SearchConfig`
options apply (others are errors), which vote picks the answer, and how many live sequences
one search holds (admission weight). Everything method-specific outside the strategies reads
it: config parsing, the eval fingerprint, the server schema, finalize.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable

from vgs.errors import VGSError

if TYPE_CHECKING:
    from vgs.config import SamplingConfig, SearchConfig
    from vgs.records import SearchResult
    from vgs.search import Engines, SearchEvents

SearchFn = Callable[[list[int], int, "Engines", "SearchConfig", "SamplingConfig", "SearchEvents | None"],
                    Awaitable["SearchResult"]]

VOTES = ("pass1", "maj", "wmaj", "bon")


@dataclass(frozen=True)
class Method:
    name: str
    run: SearchFn
    vote: str  # which vote picks the answer: pass1 | maj | wmaj | bon
    needs_scorer: bool = False  # value scorer engine (best-of-N, weighted majority, VGS)
    needs_guidance_model: bool = False  # value model loaded in the policy worker (Q#, CD)
    options: tuple[str, ...] = ()  # SearchConfig fields that apply (besides `method`)
    help: str = ""

    def sequences(self, cfg: "SearchConfig") -> int:
        """Live sequences one search holds at most (its admission weight): VGS keeps
        budget x trees candidates per round, the others their n samples."""
        return cfg.budget * cfg.trees if self.name == "vgs" else cfg.n


async def _sample(prompt, seed, engines, cfg, sampling, events):
    from vgs.search.sample import sample_n

    return await sample_n(prompt, seed, engines, cfg, sampling, events)


async def _beam(prompt, seed, engines, cfg, sampling, events):
    from vgs.search.beam import beam_search

    return await beam_search(prompt, seed, engines, cfg, sampling, events)


async def _guided(prompt, seed, engines, cfg, sampling, events):
    from vgs.search.guided import guided_sample

    return await guided_sample(prompt, seed, engines, cfg, sampling, events)


_GUIDED = ("n", "eta", "top_k", "report_kl")
METHOD_REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("sample", _sample, "pass1", options=("n",), help="n independent samples; the first is the answer"),
    Method("majority", _sample, "maj", options=("n",), help="n samples, majority vote over answers"),
    Method("best_of_n", _sample, "bon", needs_scorer=True, options=("n",),
           help="n samples, the highest-value one"),
    Method("weighted_majority", _sample, "wmaj", needs_scorer=True, options=("n",),
           help="n samples, vote weighted by value"),
    Method("vgs", _beam, "wmaj", needs_scorer=True,
           options=("budget", "beam_width", "block_size", "trees", "selection"),
           help="block-wise value-guided beam search (DVTS with trees > 1), weighted majority"),
    Method("qsharp", _guided, "maj", needs_guidance_model=True, options=_GUIDED,
           help="Q# token-level guidance, majority vote over n samples"),
    Method("cd", _guided, "maj", needs_guidance_model=True, options=_GUIDED,
           help="CD token-level guidance, majority vote over n samples"),
)}


def get_method(name: str) -> Method:
    try:
        return METHOD_REGISTRY[name]
    except KeyError:
        raise VGSError(f"unknown method {name!r}; choose one of {', '.join(METHOD_REGISTRY)}",
                       param="search.method") from None
