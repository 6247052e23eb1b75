"""The method registry: which methods exist, which engines each needs, which `SearchConfig`
options apply (others are errors), which vote picks the answer, and how many live sequences
one search holds (admission weight). Everything method-specific outside the strategies reads
it: config parsing, the eval fingerprint, the server schema, finalize.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from vgs.config import SearchConfig, check
from vgs.errors import ConfigError, VGSError

if TYPE_CHECKING:
    from vgs.config import SamplingConfig
    from vgs.records import SearchResult
    from vgs.search.common import Engines, SearchEvents

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

    return await sample_n(prompt, seed, engines, cfg, sampling, events, scored=METHOD_REGISTRY[cfg.method].needs_scorer)


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


def search_config_from_dict(d: dict[str, Any], param_prefix: str = "") -> SearchConfig:
    """Parse a `search` object (HTTP body, CLI flags given) into a validated SearchConfig.
    Unknown keys, wrong types and keys that do not apply to the method are errors naming the
    key; defaults fill the rest."""
    if not isinstance(d, dict):
        raise ConfigError("search must be an object", param=param_prefix.rstrip(".") or None)
    method = d.get("method", SearchConfig.method)
    check(isinstance(method, str) and method in METHOD_REGISTRY,
           f"unknown method {method!r}; choose one of {', '.join(METHOD_REGISTRY)}", param_prefix + "method")
    spec = METHOD_REGISTRY[method]
    fields = {f.name: f for f in dataclasses.fields(SearchConfig)}
    kw: dict[str, Any] = {"method": method}
    for k, v in d.items():
        if k == "method":
            continue
        check(k in fields, f"unknown search option {k!r}; options of {method!r}: "
               f"{', '.join(spec.options) or 'none'}", param_prefix + k)
        check(k in spec.options, f"option {k!r} does not apply to method {method!r} (its options: "
               f"{', '.join(spec.options) or 'none'})", param_prefix + k)
        want = type(getattr(SearchConfig(), k))
        ok = (isinstance(v, bool) if want is bool else
              isinstance(v, int) and not isinstance(v, bool) if want is int else
              isinstance(v, (int, float)) and not isinstance(v, bool) and v == v if want is float else
              isinstance(v, want))
        check(ok, f"search option {k!r} must be {'a number' if want is float else want.__name__}, got {v!r}",
               param_prefix + k)
        kw[k] = float(v) if want is float else v
    cfg = SearchConfig(**kw)
    try:
        return cfg.validate()
    except ConfigError as exc:
        if exc.param and param_prefix:
            exc.param = param_prefix + exc.param
        raise
