"""One config type per concern, validated once (DESIGN rule 3).

The CLI flags and the HTTP `search` object both parse into these dataclasses and call
`.validate()`; every range check lives here, so error messages are the same everywhere.
Configs hold data only: which `SearchConfig` fields apply to which method is the method
registry's knowledge, so the parser of a `search` object
(`vgs.search.methods.search_config_from_dict`) lives with the registry and reads these types;
this module imports nothing from `vgs.search` (no import circle).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from vgs.errors import ConfigError

SAMPLING_METHODS = ("sample", "majority", "best_of_n", "weighted_majority")
GUIDED_METHODS = ("qsharp", "cd")
METHODS = SAMPLING_METHODS + ("vgs",) + GUIDED_METHODS
SELECTIONS = ("global", "per-parent", "random")


def check(cond: bool, msg: str, param: str | None = None) -> None:
    if not cond:
        raise ConfigError(msg, param=param)


@dataclass
class SamplingConfig:
    """How the policy samples tokens. Defaults are the DeepSeek-R1-Distill settings."""

    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 16384
    seed: int = 0
    stop: list[str] = field(default_factory=list)  # stop strings (the server's `stop`); EOS always stops

    def validate(self) -> "SamplingConfig":
        check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}", "temperature")
        check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        check(self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}", "max_tokens")
        check(isinstance(self.seed, int) and self.seed >= 0, f"seed must be a non-negative integer, got {self.seed}", "seed")
        check(all(isinstance(x, str) and x for x in self.stop), "stop must be a list of non-empty strings", "stop")
        return self


@dataclass
class SearchConfig:
    """What search runs on top of sampling.

    `n` is the number of samples for sampling-style methods; for `vgs`, `budget` is the
    per-tree budget N (blocks sampled per round) and `trees` the DVTS count, so the total
    comparable budget is `budget * trees`.
    """

    method: str = "majority"
    n: int = 16
    budget: int = 16  # comparable with n: VGS's default total budget (budget × trees) is n generations
    beam_width: int = 2
    block_size: int = 4096
    trees: int = 1
    selection: str = "global"
    eta: float = 0.1
    top_k: int = 20
    report_kl: bool = False

    @property
    def num_beams(self) -> int:
        """B = N / w beams per tree."""
        return self.budget // self.beam_width

    @property
    def total_budget(self) -> int:
        """Generations comparable to this many independent samples."""
        return self.budget * self.trees if self.method == "vgs" else self.n

    def validate(self) -> "SearchConfig":
        check(self.method in METHODS, f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}", "method")
        check(self.n >= 1, f"n must be >= 1, got {self.n}", "n")
        if self.method == "vgs":
            check(self.beam_width >= 1, f"beam width must be >= 1, got {self.beam_width}", "beam_width")
            check(self.budget >= self.beam_width, f"budget ({self.budget}) must be >= beam width ({self.beam_width})", "budget")
            check(self.budget % self.beam_width == 0,
                   f"budget ({self.budget}) must be a multiple of beam width ({self.beam_width})", "budget")
            check(self.block_size >= 1, f"block size must be >= 1, got {self.block_size}", "block_size")
            check(self.trees >= 1, f"trees must be >= 1, got {self.trees}", "trees")
            check(self.selection in SELECTIONS, f"unknown selection {self.selection!r}; choose one of {', '.join(SELECTIONS)}",
                   "selection")
        if self.method in GUIDED_METHODS:
            check(self.eta > 0, f"eta must be > 0, got {self.eta}", "eta")
            check(self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}", "top_k")
        return self


@dataclass
class EngineConfig:
    """How a vLLM engine is built. `kv_cache_gib` sizes the KV cache explicitly (needed on CPU
    and when a policy and a value engine share one machine); otherwise
    `gpu_memory_utilization` applies."""

    model: str
    tokenizer: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.45
    kv_cache_gib: float | None = None
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    enforce_eager: bool | None = None
    enable_prefix_caching: bool = True
    seed: int = 0
    guidance_kv_gib: float | None = None  # Q♯/CD value-model KV budget in the worker (vgs.guidance.budget)
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> "EngineConfig":
        check(bool(self.model), "a model path or Hub id is required")
        check(0 < self.gpu_memory_utilization <= 1,
               f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        check(self.kv_cache_gib is None or self.kv_cache_gib > 0, f"kv_cache_gib must be > 0, got {self.kv_cache_gib}")
        check(self.tensor_parallel_size >= 1, f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        check(self.guidance_kv_gib is None or self.guidance_kv_gib > 0,
               f"guidance_kv_gib must be > 0, got {self.guidance_kv_gib}")
        check(self.data_parallel_size >= 1, f"data_parallel_size must be >= 1, got {self.data_parallel_size}")
        check(self.max_model_len is None or self.max_model_len >= 16, f"max_model_len too small: {self.max_model_len}")
        return self


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
