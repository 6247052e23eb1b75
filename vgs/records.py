"""The records every method produces (DESIGN rule 4).

A `Candidate` is one finished (or truncated) response; a `SearchResult` is everything a
method returns for one problem. Voting, grading, writing and serving read only these, so no
code downstream special-cases a method.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Candidate:
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS / stop token), "length" (hit max_tokens), "abort"
    text: str = ""
    value: float | None = None  # value-model score of the full response, if one was used
    answer: str | None = None  # extracted \boxed{} content
    correct: bool | None = None  # filled in by grading when the gold answer is known
    tree: int = 0  # DVTS tree the candidate came from (0 for sampling methods)
    info: dict[str, Any] = field(default_factory=dict)  # per-method extras (e.g. KL, value trace)

    @property
    def finished(self) -> bool:
        return self.finish_reason == "stop"

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class Compute:
    """What a search spent. FLOPs are the usual 2 * params * tokens estimate."""

    policy_tokens: int = 0  # tokens the policy generated
    prefill_tokens: int = 0  # prompt tokens the policy actually prefilled (after prefix-cache hits)
    value_tokens: int = 0  # tokens the value model actually computed (after prefix-cache hits)
    value_calls: int = 0  # sequences scored by the value model
    policy_params: int = 0
    value_params: int = 0

    @property
    def policy_flops(self) -> float:
        return 2.0 * self.policy_params * (self.policy_tokens + self.prefill_tokens)

    @property
    def value_flops(self) -> float:
        return 2.0 * self.value_params * self.value_tokens

    @property
    def total_flops(self) -> float:
        return self.policy_flops + self.value_flops

    def add(self, other: "Compute") -> None:
        self.policy_tokens += other.policy_tokens
        self.prefill_tokens += other.prefill_tokens
        self.value_tokens += other.value_tokens
        self.value_calls += other.value_calls

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(policy_flops=self.policy_flops, value_flops=self.value_flops, total_flops=self.total_flops)
        return d


@dataclass
class SearchResult:
    candidates: list[Candidate]
    compute: Compute = field(default_factory=Compute)
    trace: list[dict[str, Any]] = field(default_factory=list)  # per-round records (VGS)
    # filled in by `vgs.search.finalize` (label-free: decode, extract, vote, choose)
    answer: str | None = None  # the method's chosen answer
    chosen: int | None = None  # index of the selected candidate (the chosen answer's best member)
    votes: Any = None  # the vgs.grading.VoteResult the answer came from
    error: str | None = None  # the search could not finish this problem (e.g. guidance memory); not a result
