"""Per-request guidance arguments, carried in `SamplingParams.extra_args`.

Every value is a string or a number, so the same dict works offline and over HTTP
(`vllm_xargs`, which only accepts str/int/float values):

    {"vgs_guidance": "qsharp",          # or "cd"; absent → the request is not guided
     "vgs_value_model": "/path/to/vm",  # local dir, or a Hub id already in the local HF cache
     "vgs_eta": 0.1,                    # η > 0 (KL coefficient; smaller = stronger guidance)
     "vgs_top_k": 20,                   # candidates scored per token, 1 ≤ k ≤ vocab
     "vgs_report_key": "abc123"}        # optional: write KL / value-token stats for this key

`parse_guide_params` is what both processors' `validate_params` call at admission (in the
frontend), so a bad value fails the request there (HTTP 400) instead of inside the worker.
This module imports no torch and no vLLM worker code: the frontend loads it too.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

METHOD_KEY = "vgs_guidance"
MODEL_KEY = "vgs_value_model"
ETA_KEY = "vgs_eta"
TOP_K_KEY = "vgs_top_k"
REPORT_KEY = "vgs_report_key"
KEYS = (METHOD_KEY, MODEL_KEY, ETA_KEY, TOP_K_KEY, REPORT_KEY)
METHODS = ("qsharp", "cd")
DEFAULT_ETA = 0.1
DEFAULT_TOP_K = 20
_REPORT_KEY_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class GuideParams:
    method: str
    value_model: str
    eta: float = DEFAULT_ETA
    top_k: int = DEFAULT_TOP_K
    report_key: str | None = None

    def to_extra_args(self) -> dict[str, Any]:
        """The `extra_args` / `vllm_xargs` dict that requests this guidance."""
        d: dict[str, Any] = {METHOD_KEY: self.method, MODEL_KEY: self.value_model, ETA_KEY: float(self.eta),
                             TOP_K_KEY: int(self.top_k)}
        if self.report_key:
            d[REPORT_KEY] = self.report_key
        return d


def _number(args: Mapping[str, Any], key: str, default: Any, kind: type) -> Any:
    """A float or int argument; numbers may also arrive as strings (HTTP clients)."""
    raw = args.get(key, default)
    if not isinstance(raw, bool):
        try:
            if kind is float:
                return float(raw)
            if isinstance(raw, str):
                return int(raw.strip())
            if isinstance(raw, float) and raw.is_integer():
                return int(raw)
            if isinstance(raw, int):
                return raw
        except (TypeError, ValueError):
            pass
    raise ValueError(f"{key} must be {'a number' if kind is float else 'an integer'}, got {raw!r}")


def resolve_value_model_path(path: str) -> str:
    """A local directory for `path`: the path itself, or a Hub id already in the local HF cache.

    Never downloads: it runs in the worker (and in the frontend for validation), where a network
    fetch would stall every request of the engine step.
    """
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download

    return snapshot_download(path, local_files_only=True)


@functools.lru_cache(maxsize=64)
def _value_model_config(path: str, mtime: float) -> dict:
    """config.json of a value-model checkpoint; raises ValueError with a user message."""
    try:
        local = resolve_value_model_path(path)
    except Exception:  # noqa: BLE001 - any failure means "not available locally"
        raise ValueError(f"{MODEL_KEY} {path!r} is neither a local directory nor a Hub id in the local "
                         "Hugging Face cache (download it first)") from None
    cfg_path = os.path.join(local, "config.json")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        raise ValueError(f"{MODEL_KEY} {path!r} has no readable config.json") from None
    if "Qwen2ForClassifier" not in (cfg.get("architectures") or []):
        raise ValueError(f"{MODEL_KEY} {path!r} is not a value model (config.json architectures lack "
                         "Qwen2ForClassifier)")
    return cfg


def _value_model_vocab(path: str, mtime: float) -> int:
    return int(_value_model_config(path, mtime).get("vocab_size", 0))


def value_model_context(path: str) -> int | None:
    """Positions the in-worker value model was built for (`max_position_embeddings`), or None
    when its config does not say. Admission checks prompt + max_tokens against it, so a Q♯/CD
    request never runs past the value model's context in the middle of decoding."""
    n = _value_model_config(path, _mtime(path)).get("max_position_embeddings")
    return int(n) if n else None


def _mtime(path: str) -> float:
    try:
        return os.path.getmtime(os.path.join(path, "config.json"))
    except OSError:
        return 0.0


def parse_guide_params(extra_args: Mapping[str, Any] | None, n: int = 1,
                       check_model: bool = True) -> GuideParams | None:
    """The request's guidance, or None when it asks for none. Raises ValueError (→ HTTP 400)
    on a bad method, η, top-k, value model or report key."""
    args = extra_args or {}
    method = args.get(METHOD_KEY)
    if method is None:
        stray = [k for k in KEYS if k in args]
        if stray:
            raise ValueError(f"{', '.join(stray)} given without {METHOD_KEY} (one of {', '.join(METHODS)})")
        return None
    if method not in METHODS:
        raise ValueError(f"{METHOD_KEY} must be one of {', '.join(METHODS)}, got {method!r}")
    model = args.get(MODEL_KEY)
    if not isinstance(model, str) or not model:
        raise ValueError(f"{METHOD_KEY}={method} needs {MODEL_KEY} (path of a value model)")
    eta = _number(args, ETA_KEY, DEFAULT_ETA, float)
    if not (math.isfinite(eta) and eta > 0):
        raise ValueError(f"{ETA_KEY} must be > 0, got {args.get(ETA_KEY)!r}")
    top_k = _number(args, TOP_K_KEY, DEFAULT_TOP_K, int)
    if top_k < 1:
        raise ValueError(f"{TOP_K_KEY} must be >= 1, got {args.get(TOP_K_KEY)!r}")
    if check_model:
        vocab = _value_model_vocab(model, _mtime(model))
        if vocab and top_k > vocab:
            raise ValueError(f"{TOP_K_KEY} must be <= the vocabulary size ({vocab}), got {top_k}")
    report = args.get(REPORT_KEY)
    if report is not None:
        if not isinstance(report, str) or not _REPORT_KEY_RE.match(report):
            raise ValueError(f"{REPORT_KEY} must be 1-128 characters of [A-Za-z0-9_.-], got {report!r}")
        if n != 1:
            raise ValueError(f"{REPORT_KEY} needs n=1 (one report per sequence); send n separate requests")
    return GuideParams(method, model, eta, top_k, report)


def validate_sampling_params(sampling_params: Any) -> GuideParams | None:
    """`validate_params` body shared by the V1 and MRV2 processors."""
    return parse_guide_params(getattr(sampling_params, "extra_args", None), n=getattr(sampling_params, "n", 1) or 1)
