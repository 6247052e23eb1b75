"""Value scoring: P(finished correct) at the last token of each full token sequence.

One interface (`ValueScorer`), two backends:

- `VllmValueScorer` (default): the value model in vLLM's `AsyncLLM` as a pooling model
  (`runner="pooling"`, classify, LAST pooling) with prefix caching, so scoring prefix +
  block recomputes only the block (vLLM caches whole KV blocks: 128 tokens on CPU, 16 on GPU
  by default). Async (`ascore`): one `encode` request per sequence, batched by vLLM's
  scheduler with every other request in flight; cancelling the caller aborts them.
- `HFValueScorer`: plain transformers, batched and padded, head on the last token only, with
  its own KV store keyed by token ids so a continuation of anything scored before (or a
  sibling sharing a prefix with it) costs only its new tokens. Sync; searches reach it
  through `vgs.batcher.ValueBatcher`.

Both count `tokens_computed` (tokens actually run through the model after reuse); the search
reads it for FLOP accounting. The published VGS code re-prefills every candidate from
scratch, one at a time; `benchmarks/value_scoring.py` measures both backends against that.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np

from vgs.aio import gather_or_cancel
from vgs.batcher import Score
from vgs.config import EngineConfig
from vgs.errors import VGSError

log = logging.getLogger(__name__)

BACKENDS = ("vllm", "hf")
OFF_LOOP_TOKENS = 16384  # inputs larger than this are validated in a worker thread, not on the engine loop


class ValueScorer(Protocol):
    """What searches need from a value model."""

    num_params: int
    max_model_len: int
    tokens_computed: int  # cumulative, after prefix/KV reuse
    last_tokens_computed: list[int]  # per sequence of the latest `score` call

    def score(self, sequences: list[list[int]]) -> list[float]:
        """P(finished correct) read at the last token of each sequence, in input order."""
        ...

    def score_with_cost(self, sequences: list[list[int]]) -> tuple[list[float], list[int]]:
        """Values, and the tokens actually computed for each sequence."""
        ...

    def close(self) -> None: ...


class AsyncValueScorer(Protocol):
    """A scorer searches can await directly (no batcher, no thread): `VllmValueScorer`."""

    async def ascore(self, sequences: Sequence[Sequence[int]]) -> list[Score]:
        """Value and computed tokens per sequence; cancelling the caller stops its model work."""
        ...


# ---------------------------------------------------------------------------- shared helpers

def _read_config(model: str) -> dict[str, Any]:
    path = os.path.join(model, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    try:  # a Hub id: let transformers find (or fail to find) it
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model).to_dict()
    except Exception as exc:  # noqa: BLE001 - one line for the user
        raise VGSError(f"cannot read the value model config of {model!r}: {exc.__class__.__name__}: {exc}") from exc


def check_value_config(cfg: dict[str, Any], model: str) -> None:
    """Reject checkpoints that are not in the published value-model layout."""
    from vgs.modeling import ARCHITECTURE

    archs = cfg.get("architectures") or []
    if ARCHITECTURE not in archs:
        raise VGSError(f"{model!r} is not a value model: config.json architectures {archs} lack {ARCHITECTURE!r}")
    labels = int(cfg.get("num_labels", len(cfg.get("id2label") or {}) or 3))
    if labels not in (1, 3):
        raise VGSError(f"value model {model!r} has num_labels={labels}; only 1 (sigmoid) or 3 (softmax) are supported")


def count_value_params(model: str) -> int:
    """Parameter count of the value model, built on the meta device (no weights read)."""
    try:
        import torch
        from transformers import AutoConfig

        from vgs.modeling import Qwen2ForClassifier

        cfg = AutoConfig.from_pretrained(model)
        with torch.device("meta"):
            m = Qwen2ForClassifier(cfg)
        return int(sum(p.numel() for p in m.parameters()))
    except Exception as exc:  # noqa: BLE001 - FLOP accounting must never stop a run
        log.warning("could not count parameters of %s: %s", model, exc)
        return 0


def check_sequences(sequences: Sequence[Sequence[int]], max_len: int, vocab_size: int) -> list[list[int]]:
    """Ids as plain int lists; a clear VGSError for empty, too long or out-of-vocabulary input."""
    out = []
    for i, seq in enumerate(sequences):
        ids = [int(t) for t in seq]
        if not ids:
            raise VGSError(f"sequence {i} is empty: a value is read at the last token, so it needs at least one")
        if len(ids) > max_len:
            raise VGSError(f"sequence {i} has {len(ids)} tokens, more than the value model's limit of "
                           f"{max_len}; raise max_model_len (if the model allows) or shorten the trace")
        lo, hi = min(ids), max(ids)
        if lo < 0 or hi >= vocab_size:
            raise VGSError(f"sequence {i} has token id {lo if lo < 0 else hi} outside the value model's "
                           f"vocabulary [0, {vocab_size})")
        out.append(ids)
    return out


def _digest(ids: Sequence[int]) -> bytes:
    return hashlib.blake2b(np.asarray(ids, dtype=np.int64).tobytes(), digest_size=16).digest()


class _ValueMemo:
    """LRU of values already computed, keyed by a digest of the full id sequence: re-scoring
    a sequence (e.g. the final rescoring of a kept beam) costs nothing."""

    def __init__(self, capacity: int = 1 << 16):
        self.capacity = capacity
        self._d: OrderedDict[bytes, float] = OrderedDict()

    def get(self, key: bytes) -> float | None:
        v = self._d.get(key)
        if v is not None:
            self._d.move_to_end(key)
        return v

    def put(self, key: bytes, value: float) -> None:
        self._d[key] = value
        self._d.move_to_end(key)
        while len(self._d) > self.capacity:
            self._d.popitem(last=False)

    def clear(self) -> None:
        self._d.clear()

    def lookup(self, seqs: list[list[int]]) -> tuple[list[float | None], dict[bytes, list[int]]]:
        """Values known for `seqs` (None where not), and the distinct unknown sequences:
        digest -> positions in `seqs`, so each is computed once however often it repeats."""
        keys = [_digest(s) for s in seqs]
        values = [self.get(k) for k in keys]
        todo: dict[bytes, list[int]] = {}
        for i, (k, v) in enumerate(zip(keys, values)):
            if v is None:
                todo.setdefault(k, []).append(i)
        return values, todo


def _prob_at(probs: Sequence[float]) -> float:
    """Success probability from the activated class scores (3 classes: index 1; 1 class: itself)."""
    from vgs.modeling import SUCCESS_CLASS

    return float(probs[SUCCESS_CLASS] if len(probs) > 1 else probs[0])


# ---------------------------------------------------------------------------- vLLM backend

def _has_tokenizer(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))


class _ChatWarmupFilter(logging.Filter):
    """vLLM warms up a chat template at start even without a tokenizer and logs the failure
    with a traceback; with ids in and no tokenizer that is expected, so it is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Chat template warmup failed" not in record.getMessage()


class VllmValueScorer:
    """The value model in vLLM's `AsyncLLM` (pooling runner, classify, LAST pooling, prefix
    caching), owned by the process's engine loop (`vgs.aio`) like the policy engine.

    `ascore` is the one implementation: it submits one `encode` request per distinct
    uncached sequence and gathers them. vLLM's scheduler batches concurrent requests (of this
    call and of every other search in flight) into shared forward passes, so there is no
    batcher in front of it; and cancelling the awaiting task aborts the requests still in the
    engine, so a disconnected client's value work stops mid-batch. Sync callers (collect,
    benchmarks, tests) use `score` / `score_with_cost`, which run `ascore` on the engine loop.

    Runs beside a `PolicyEngine` in the same process: give each its own `kv_cache_gib` (CPU,
    or a GPU shared by both) or `gpu_memory_utilization` share. `cfg.tokenizer` is optional:
    the published checkpoint ships none, and ids go in directly, so without one the tokenizer
    is not loaded at all.
    """

    def __init__(self, cfg: EngineConfig):
        cfg.validate()
        from vgs.aio import run_sync
        from vgs.engine import check_model_path, start_async_llm

        check_model_path(cfg.model)
        hf_cfg = _read_config(cfg.model)
        check_value_config(hf_cfg, cfg.model)
        self.cfg = cfg
        kw = _value_engine_kwargs(cfg, hf_cfg)
        quiet = _ChatWarmupFilter() if kw.get("skip_tokenizer_init") else None
        renderer_log = logging.getLogger("vllm.renderers.base")
        if quiet:
            renderer_log.addFilter(quiet)
        try:
            self.llm = run_sync(start_async_llm(kw))  # built on the loop that will drive it
        finally:
            if quiet:
                renderer_log.removeFilter(quiet)
        mc = self.llm.model_config
        self.max_model_len = int(mc.max_model_len)
        self.vocab_size = int(hf_cfg.get("vocab_size") or mc.get_vocab_size())
        self.num_params = count_value_params(cfg.model)
        self.tokens_computed = 0
        self.last_tokens_computed: list[int] = []
        self._memo = _ValueMemo()

    # ------------------------------------------------------------------ async (the implementation)

    async def ascore(self, sequences: Sequence[Sequence[int]]) -> list[Score]:
        """Value and tokens computed (from vLLM's `num_cached_tokens`; 0 for a memo hit or a
        repeat within the call) per sequence, in input order. Runs on the engine loop.

        Cancelling the caller aborts every request of this call still in the engine."""
        if self.llm is None:
            raise VGSError("the value engine is closed")
        if sum(len(q) for q in sequences) > OFF_LOOP_TOKENS:  # big inputs: checked off the engine loop
            seqs = await asyncio.to_thread(check_sequences, sequences, self.max_model_len, self.vocab_size)
        else:
            seqs = check_sequences(sequences, self.max_model_len, self.vocab_size)
        values, todo = self._memo.lookup(seqs)
        per_seq = [0] * len(seqs)
        if todo:
            ids = {k: uuid.uuid4().hex for k in todo}
            done: set[str] = set()
            try:
                outs = await gather_or_cancel(*(self._classify(seqs[idx[0]], ids[k], done)
                                                for k, idx in todo.items()))
            except BaseException:
                await self._abort([r for r in ids.values() if r not in done])
                raise
            for (k, idx), (v, computed) in zip(todo.items(), outs):
                per_seq[idx[0]] = computed
                self.tokens_computed += computed
                self._memo.put(k, v)
                for i in idx:
                    values[i] = v
        return [Score(float(v), int(c)) for v, c in zip(values, per_seq)]  # type: ignore[arg-type]

    async def _classify(self, ids: list[int], request_id: str, done: set[str]) -> tuple[float, int]:
        """One `encode` request: (success probability, tokens computed after prefix reuse).
        `request_id` goes into `done` once vLLM reports the request finished."""
        from vllm.exceptions import VLLMValidationError
        from vllm.inputs import TokensPrompt
        from vllm.pooling_params import PoolingParams

        final = None
        try:
            async for out in self.llm.encode(TokensPrompt(prompt_token_ids=ids), PoolingParams(task="classify"),
                                             request_id=request_id):
                final = out
        except (VLLMValidationError, ValueError) as exc:  # vLLM's input checks
            raise VGSError(f"value request rejected by the engine: {exc}") from exc
        if final is None or not final.finished:
            raise VGSError(f"value request {request_id} ended without a result")
        done.add(request_id)
        if getattr(final, "error", None) is not None:
            raise VGSError(f"value request failed in the engine: {final.error}")
        return _prob_at(final.outputs.data.tolist()), len(ids) - int(final.num_cached_tokens or 0)

    async def _abort(self, request_ids: list[str]) -> None:
        """Abort requests in vLLM. `AsyncLLM.encode` aborts its own request when cancelled
        while waiting for output, but not when cancelled while the request is being added
        (registered, not yet handed back), and not requests whose task never ran; this covers
        every id of the call. Shielded so a second cancel cannot stop it half way."""
        if request_ids and self.llm is not None:
            await asyncio.shield(self.llm.abort(request_ids))

    # ------------------------------------------------------------------ sync facade

    def score(self, sequences: list[list[int]]) -> list[float]:
        values, per_seq = self.score_with_cost(sequences)
        self.last_tokens_computed = per_seq
        return values

    def score_with_cost(self, sequences: list[list[int]]) -> tuple[list[float], list[int]]:
        """Values, and the tokens actually run through the model for each sequence: `ascore`
        run on the engine loop (so sync code shares the one engine with running searches)."""
        from vgs.aio import run_sync

        scores = run_sync(self.ascore(sequences))
        return [s.value for s in scores], [s.computed_tokens for s in scores]

    @property
    def num_running(self) -> int:
        """vLLM requests not finished yet (running or waiting): 0 after a cancelled search."""
        return int(self.llm.get_num_unfinished_requests()) if self.llm is not None else 0

    def reset_prefix_cache(self) -> None:
        """Forget cached KV and values (e.g. between benchmark runs)."""
        from vgs.aio import run_sync

        async def reset() -> bool:
            return bool(await self.llm.reset_prefix_cache())

        if not run_sync(reset()):
            log.warning("value engine prefix cache not reset (requests still running?)")
        self._memo.clear()

    def close(self) -> None:
        from vgs.engine import shutdown_async_llm

        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            shutdown_async_llm(llm)


def _value_engine_kwargs(cfg: EngineConfig, hf_cfg: dict[str, Any]) -> dict[str, Any]:
    """EngineArgs of the value engine: the shared ones, pooling runner with classify + LAST
    pooling, a pinned dtype, and no tokenizer when the checkpoint ships none."""
    from vllm.config import PoolerConfig

    from vgs.engine import on_cpu, vllm_engine_kwargs

    kw = vllm_engine_kwargs(cfg, generate=False)
    kw["runner"] = "pooling"
    if cfg.dtype == "auto":
        # vLLM's "auto" may run an fp32 checkpoint (the published one is fp32) in half
        # precision; pin what the scorer promises: fp32 on CPU, bf16 on GPU.
        kw["dtype"] = "float32" if on_cpu() else "bfloat16"
    if not cfg.tokenizer and not _has_tokenizer(cfg.model):
        if int(hf_cfg.get("num_labels", len(hf_cfg.get("id2label") or {}) or 3)) == 1:
            # vLLM turns on its cross-encoder scoring API for 1-label classifiers, and that
            # loads a tokenizer at start-up.
            raise VGSError(f"value model {cfg.model!r} has 1 label and ships no tokenizer: pass the "
                           "policy's tokenizer (--tokenizer) for the vLLM backend")
        kw.pop("tokenizer", None)
        kw["skip_tokenizer_init"] = True
    kw.setdefault("pooler_config", PoolerConfig(task="classify", seq_pooling_type="LAST"))
    return kw


# ---------------------------------------------------------------------------- transformers backend

@dataclass
class _KVEntry:
    ids: np.ndarray  # int64 token ids this KV covers
    kv: list[tuple[Any, Any]]  # per layer (keys, values), each [kv_heads, len, head_dim]


@dataclass
class _Step:
    ids: list[int]  # the sequence to run (a target, or a prefix of targets)
    src: _KVEntry | None  # cached KV to start from (cropped to `reuse`)
    reuse: int
    owners: list[int] = field(default_factory=list)  # first position of each target this step serves


def _lcp(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


class _KVStore:
    """Per-sequence KV caches, LRU-evicted under a token budget.

    A stored entry also serves every prefix of its ids (crop on use), so when an entry is
    extended the shorter one is dropped: the store holds the leaves of what was scored.
    Stored tensors are never mutated; a forward copies them into a fresh cache.
    """

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.tokens = 0
        self._d: OrderedDict[bytes, _KVEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._d)

    def best(self, ids: np.ndarray) -> tuple[_KVEntry | None, int]:
        """The entry sharing the longest prefix with `ids`, and that prefix's length."""
        best, best_len = None, 0
        for e in self._d.values():
            n = _lcp(e.ids, ids)
            if n > best_len:
                best, best_len = e, n
        return best, best_len

    def touch(self, e: _KVEntry) -> None:
        key = _digest(e.ids)
        if key in self._d:
            self._d.move_to_end(key)

    def put(self, e: _KVEntry) -> None:
        if len(e.ids) > self.max_tokens:
            return
        for key, old in list(self._d.items()):
            if len(old.ids) <= len(e.ids) and _lcp(old.ids, e.ids) == len(old.ids):
                del self._d[key]
                self.tokens -= len(old.ids)
        key = _digest(e.ids)
        self._d[key] = e
        self.tokens += len(e.ids)
        while self.tokens > self.max_tokens and self._d:
            _, old = self._d.popitem(last=False)
            self.tokens -= len(old.ids)

    def clear(self) -> None:
        self._d.clear()
        self.tokens = 0


class HFValueScorer:
    """The value model in transformers, with KV reuse across `score` calls.

    For each sequence the longest prefix already held in the KV store is reused (also from a
    sibling: its KV is cropped), new tokens of several sequences run in one right-padded
    batch over left-padded past KV, and the head is applied to the last token only.
    Sequences in one call that share a prefix beyond what is cached get that prefix run once
    first. bf16 on GPU, fp32 on CPU by default.
    """

    def __init__(self, model: str, device: str | None = None, dtype: Any = None,
                 max_model_len: int | None = None, kv_cache_gib: float = 2.0,
                 max_batch_tokens: int = 32768, chunk_tokens: int = 2048, min_shared_tokens: int = 32):
        import torch

        from vgs.engine import check_model_path
        from vgs.modeling import load_value_model

        check_model_path(model)
        hf_cfg = _read_config(model)
        check_value_config(hf_cfg, model)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if isinstance(dtype, str):
            dtype = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                     "bf16": torch.bfloat16, "float16": torch.float16}[dtype]
        self.device = torch.device(device)
        self.model = load_value_model(model, dtype=dtype, device=self.device)
        self.dtype = next(self.model.parameters()).dtype
        c = self.model.config
        self.vocab_size = int(c.vocab_size)
        limit = int(getattr(c, "max_position_embeddings", 0) or 1 << 30)
        self.max_model_len = min(int(max_model_len), limit) if max_model_len else limit
        self.num_params = int(sum(p.numel() for p in self.model.parameters()))
        head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
        bytes_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * self.dtype.itemsize
        self.store = _KVStore(max(1, int(kv_cache_gib * (1 << 30)) // bytes_per_token))
        self.max_batch_tokens = max_batch_tokens
        self.chunk_tokens = chunk_tokens
        self.min_shared_tokens = min_shared_tokens
        self.tokens_computed = 0
        self.last_tokens_computed: list[int] = []
        self._memo = _ValueMemo()

    # -- planning
    def _plan(self, pending: dict[bytes, tuple[list[int], list[int]]],
              reuse_out: dict[bytes, int] | None = None) -> list[_Step]:
        """Next step for every pending target: reuse the best cached prefix, stop at a chunk
        boundary, and stop early at a prefix shared with another target (run once for both).
        `reuse_out[key]` receives each target's reused prefix length (the progress check)."""
        keyed = sorted(pending.items(), key=lambda kv: kv[1][0])
        items = [it for _, it in keyed]
        arrs = [np.asarray(ids, dtype=np.int64) for ids, _ in items]
        shared = [0] * len(items)
        for i in range(len(items) - 1):
            n = _lcp(arrs[i], arrs[i + 1])
            shared[i] = max(shared[i], n)
            shared[i + 1] = max(shared[i + 1], n)
        steps: dict[bytes, _Step] = {}
        for (tkey, (ids, owners)), arr, s in zip(keyed, arrs, shared):
            src, reuse = self.store.best(arr)
            reuse = min(reuse, len(ids) - 1)  # the last token is always run: its hidden state is the value
            if reuse_out is not None:
                reuse_out[tkey] = reuse
            end = min(len(ids), reuse + self.chunk_tokens)
            if reuse + self.min_shared_tokens <= s < end:
                end = s
            step_ids = ids[:end]
            key = _digest(step_ids)
            st = steps.get(key)
            if st is None:
                st = steps[key] = _Step(step_ids, src if reuse > 0 else None, reuse)
            st.owners.append(owners[0])
            if src is not None and reuse > 0:
                self.store.touch(src)
        return list(steps.values())

    # -- execution
    def _run(self, batch: list[_Step]) -> list[float]:
        """One padded forward: past KV left-padded to a common length, new tokens right-padded."""
        import torch
        from transformers import DynamicCache

        model, dev = self.model, self.device
        n_layers = model.config.num_hidden_layers
        b = len(batch)
        past = [s.reuse for s in batch]
        new = [len(s.ids) - s.reuse for s in batch]
        P, N = max(past), max(new)
        input_ids = torch.zeros((b, N), dtype=torch.long)
        attn = torch.zeros((b, P + N), dtype=torch.long)
        pos = torch.zeros((b, N), dtype=torch.long)
        for i, s in enumerate(batch):
            input_ids[i, : new[i]] = torch.tensor(s.ids[s.reuse:], dtype=torch.long)
            attn[i, P - past[i]: P + new[i]] = 1
            pos[i] = torch.arange(past[i], past[i] + N)
        cache = DynamicCache()
        if P > 0:
            layers = []
            for layer in range(n_layers):
                ref = next(s.src.kv[layer][0] for s in batch if s.src is not None)
                kvh, _, d = ref.shape
                k = torch.zeros((b, kvh, P, d), dtype=ref.dtype, device=dev)
                v = torch.zeros_like(k)
                for i, s in enumerate(batch):
                    if past[i]:
                        sk, sv = s.src.kv[layer]
                        k[i, :, P - past[i]:] = sk[:, : past[i]]
                        v[i, :, P - past[i]:] = sv[:, : past[i]]
                layers.append((k, v))
            cache = DynamicCache(ddp_cache_data=layers)
        with torch.inference_mode():
            out = model.model(input_ids=input_ids.to(dev), attention_mask=attn.to(dev), position_ids=pos.to(dev),
                              past_key_values=cache, use_cache=True)
            hidden = out.last_hidden_state
            last = torch.tensor([n - 1 for n in new], device=dev)
            h_last = hidden[torch.arange(b, device=dev), last]
            from vgs.modeling import success_probs

            values = success_probs(model.score(h_last).float()).tolist()
            kv_out = out.past_key_values
            for i, s in enumerate(batch):
                if len(s.ids) > self.store.max_tokens:
                    continue  # the store would drop it: do not copy it out
                lo, hi = P - past[i], P + new[i]
                kv = [(kv_out.layers[layer].keys[i, :, lo:hi].clone(), kv_out.layers[layer].values[i, :, lo:hi].clone())
                      for layer in range(n_layers)]
                self.store.put(_KVEntry(np.asarray(s.ids, dtype=np.int64), kv))
        return values

    def _batches(self, steps: list[_Step]) -> list[list[_Step]]:
        """Group steps of similar length so padded batches stay under `max_batch_tokens`."""
        steps = sorted(steps, key=lambda s: (len(s.ids), s.reuse))
        batches: list[list[_Step]] = []
        cur: list[_Step] = []
        P = N = 0
        for s in steps:
            p2, n2 = max(P, s.reuse), max(N, len(s.ids) - s.reuse)
            if cur and (len(cur) + 1) * (p2 + n2) > self.max_batch_tokens:
                batches.append(cur)
                cur, p2, n2 = [], s.reuse, len(s.ids) - s.reuse
            cur.append(s)
            P, N = p2, n2
        if cur:
            batches.append(cur)
        return batches

    def _run_alone(self, ids: list[int]) -> tuple[float, int]:
        """Score one sequence chunk by chunk with a private KV cache that is never stored:
        the path for a target the store cannot carry to its end (longer than the store plus
        a chunk, or evicted between its chunks by other targets). Memory: one sequence's KV.
        Returns (value, tokens computed)."""
        import torch
        from transformers import DynamicCache

        from vgs.modeling import success_probs

        model, dev = self.model, self.device
        src, reuse = self.store.best(np.asarray(ids, dtype=np.int64))
        reuse = min(reuse, len(ids) - 1)
        cache = DynamicCache()
        if src is not None and reuse > 0:
            cache = DynamicCache(ddp_cache_data=[(k[None, :, :reuse].clone(), v[None, :, :reuse].clone())
                                                 for k, v in src.kv])
        else:
            reuse = 0
        pos = reuse
        with torch.inference_mode():
            while pos < len(ids):
                end = min(len(ids), pos + self.chunk_tokens)
                chunk = torch.tensor([ids[pos:end]], dtype=torch.long, device=dev)
                out = model.model(input_ids=chunk, position_ids=torch.arange(pos, end, device=dev)[None],
                                  past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                pos = end
            value = success_probs(model.score(out.last_hidden_state[:, -1]).float()).tolist()[0]
        return float(value), len(ids) - reuse

    def score(self, sequences: list[list[int]]) -> list[float]:
        values, per_seq = self.score_with_cost(sequences)
        self.last_tokens_computed = per_seq
        return values

    def score_with_cost(self, sequences: list[list[int]]) -> tuple[list[float], list[int]]:
        """Values, and the tokens actually computed for each sequence (shared prefix work is
        split among the sequences it served)."""
        seqs = check_sequences(sequences, self.max_model_len, self.vocab_size)
        values, todo = self._memo.lookup(seqs)
        per_seq = [0] * len(seqs)
        pending = {k: (seqs[idx[0]], idx) for k, idx in todo.items()}
        last_reuse: dict[bytes, int] = {}
        while pending:
            # Progress check: every round must extend each target's cached prefix. A target
            # that did not advance (its chunk was too long to store, or other targets evicted
            # it) is finished on its own without the store, so this loop always ends.
            reuse_now: dict[bytes, int] = {}
            steps = self._plan(pending, reuse_now)
            stalled = [k for k in pending if k in last_reuse and reuse_now[k] <= last_reuse[k]]
            if stalled:
                for key in stalled:
                    ids, idx = pending.pop(key)
                    v, n_new = self._run_alone(ids)
                    self.tokens_computed += n_new
                    per_seq[idx[0]] += n_new
                    self._memo.put(key, v)
                    for i in idx:
                        values[i] = v
                continue
            last_reuse = reuse_now
            for batch in self._batches(steps):
                vals = self._run(batch)
                for s, v in zip(batch, vals):
                    key = _digest(s.ids)
                    self._memo.put(key, v)
                    n_new = len(s.ids) - s.reuse
                    self.tokens_computed += n_new
                    k_own = len(s.owners)
                    for j, o in enumerate(sorted(s.owners)):  # split shared work among the sequences it serves
                        per_seq[o] += n_new // k_own + (1 if j < n_new % k_own else 0)
                    if key in pending:
                        for i in pending.pop(key)[1]:
                            values[i] = v
        return [float(v) for v in values], per_seq  # type: ignore[arg-type]

    def reset_prefix_cache(self) -> None:
        self.store.clear()
        self._memo.clear()

    def close(self) -> None:
        self.store.clear()
        self.model = None


# ---------------------------------------------------------------------------- factory

def make_value_scorer(model: str, backend: str = "vllm", **kw: Any) -> ValueScorer:
    """A scorer for `model` (local path or Hub id).

    vllm: keyword arguments are `EngineConfig` fields (`tokenizer`, `kv_cache_gib`, `dtype`,
    `max_model_len`, `gpu_memory_utilization`, ..., `extra` for other EngineArgs).
    hf: keyword arguments of `HFValueScorer` (`device`, `dtype`, `kv_cache_gib`, ...).
    """
    if backend == "vllm":
        names = set(EngineConfig.__dataclass_fields__)
        bad = sorted(set(kw) - names)
        if bad:
            raise VGSError(f"unknown option(s) for the vllm value backend: {', '.join(bad)}")
        return VllmValueScorer(EngineConfig(model=model, **kw))
    if backend == "hf":
        kw.pop("tokenizer", None)  # ids go in directly; accepted for symmetry with vllm
        try:
            return HFValueScorer(model, **kw)
        except TypeError as exc:
            raise VGSError(f"bad option for the hf value backend: {exc}") from exc
    raise VGSError(f"unknown value backend {backend!r}; choose one of {', '.join(BACKENDS)}")
