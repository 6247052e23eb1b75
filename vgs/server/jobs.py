"""A validated request body → a `Job`: token ids per prompt, sampling, search, output options.

Runs in a worker thread (`asyncio.to_thread`): tokenizing and rendering chat templates of a
large request would otherwise stall every stream on the engine loop (vLLM's server uses a
thread pool for the same work). Defaults are vLLM's: `max_tokens` 16 for `/v1/completions`,
the rest of the context for chat; `temperature` / `top_p` from the model's
`generation_config.json` when it sets them, else 1.0 / 1.0.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from vgs.config import SamplingConfig, SearchConfig
from vgs.search import check_engines, check_lengths
from vgs.search.methods import search_config_from_dict
from vgs.search.methods import get_method
from vgs.server.schemas import ChatBody, CompletionBody

COMPLETIONS_MAX_TOKENS = 16  # vLLM's (and OpenAI's) default for /v1/completions
VLLM_TEMPERATURE = 1.0
VLLM_TOP_P = 1.0


class APIError(Exception):
    """An HTTP error with an OpenAI-style body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


@dataclass
class Job:
    endpoint: str  # "completions" | "chat"
    prompts: list[list[int]]  # one search (or n plain samples) per prompt
    search: SearchConfig
    sampling: SamplingConfig
    plain: bool  # no `search` object: plain sampling, n choices per prompt
    stream: bool = False
    include_usage: bool = False
    skip_special_tokens: bool = True
    echo: bool = False
    echo_texts: list[str] = field(default_factory=list)  # the prompt text each echo starts with
    echo_only: bool = False  # echo with max_tokens 0: the prompt (and its logprobs) only
    logprobs: int | None = None  # top-k per token (completions `logprobs`, chat `top_logprobs`)
    reasoning: bool = False  # split chat answers into reasoning_content / content
    include_reasoning: bool = True  # false: the split still happens, the reasoning is dropped (vLLM)

    @property
    def n(self) -> int:
        return self.search.n if self.plain else 1

    @property
    def weight(self) -> int:
        """Sequences one prompt's search keeps in flight (its admission weight)."""
        return get_method(self.search.method).sequences(self.search)


@dataclass
class Defaults:
    temperature: float = VLLM_TEMPERATURE
    top_p: float = VLLM_TOP_P

    @classmethod
    def of(cls, policy: Any) -> "Defaults":
        """The policy's generation_config.json values, as vLLM reads them (its model config's
        `get_diff_sampling_param`); vLLM's own defaults for what the file leaves out."""
        try:
            diff = policy.llm.model_config.get_diff_sampling_param()
        except Exception:  # noqa: BLE001 - a fake or closed engine: vLLM's defaults
            diff = {}
        return cls(float(diff.get("temperature", VLLM_TEMPERATURE)), float(diff.get("top_p", VLLM_TOP_P)))


def _chat_ids(tok: Any, body: Any, add_generation_prompt: bool = True) -> list[int]:
    msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    try:
        ids = tok.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=True)
    except Exception as exc:  # noqa: BLE001 - a template that refuses these messages is the client's input
        raise APIError(400, f"the chat template rejected the messages: {exc}", param="messages") from None
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def _completion_prompts(tok: Any, body: CompletionBody) -> tuple[list[list[int]], list[str]]:
    try:
        prompts = body.prompts()
    except ValueError as exc:
        raise APIError(400, str(exc), param="prompt") from None
    vocab = len(tok)
    ids_list, texts = [], []
    for i, p in enumerate(prompts):
        where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        if isinstance(p, str):
            if not p:
                raise APIError(400, f"{where} is empty", param="prompt")
            ids = [int(t) for t in tok(p, add_special_tokens=body.add_special_tokens)["input_ids"]]
            text = p
        else:
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"{where}: token id {bad[0]} is outside the vocabulary [0, {vocab})",
                               param="prompt")
            ids = p
            text = tok.decode(p)  # echoed as given: a prompt's special tokens are the client's input
        if not ids:
            raise APIError(400, f"{where} is empty", param="prompt")
        ids_list.append(ids)
        texts.append(text)
    return ids_list, texts


def make_job(state: Any, endpoint: str, body: CompletionBody | ChatBody) -> Job:
    """Validate `body` against the served engines; every client error is an APIError/VGSError
    here, before any work starts."""
    if body.model is not None and body.model != state.model_name:
        raise APIError(404, f"the model {body.model!r} does not exist; this server serves {state.model_name!r}",
                       "NotFoundError", "model", "model_not_found")
    chat = isinstance(body, ChatBody)
    tok = state.tokenizer
    if chat:
        prompts, texts = [_chat_ids(tok, body)], []
    else:
        prompts, texts = _completion_prompts(tok, body)
    context = int(state.engines.policy.max_model_len)
    for p in prompts:
        if len(p) >= context:
            raise APIError(400, f"the prompt has {len(p)} tokens, more than the model's context of {context}",
                           param="messages" if chat else "prompt")
    max_tokens = body.max_tokens
    if chat and body.max_completion_tokens is not None:
        max_tokens = body.max_completion_tokens
    echo = bool(getattr(body, "echo", False))
    room = context - max(len(p) for p in prompts)
    if max_tokens is None:  # vLLM: the rest of the context (chat), 16 within it (completions)
        max_tokens = room if chat else min(COMPLETIONS_MAX_TOKENS, room)
    elif max_tokens == 0 and not echo:
        raise APIError(400, "max_tokens: must be >= 1 (0 only with echo: true, to score the prompt)",
                       param="max_tokens")
    echo_only = echo and max_tokens == 0
    if chat:
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    else:
        logprobs = body.logprobs
    d = state.defaults
    seed = body.seed if body.seed is not None else random.randrange(2**31)
    sampling = SamplingConfig(temperature=d.temperature if body.temperature is None else float(body.temperature),
                              top_p=d.top_p if body.top_p is None else float(body.top_p),
                              max_tokens=1 if echo_only else int(max_tokens), seed=seed, stop=body.stop_list())
    sampling.validate()
    if body.search is None:
        cfg = SearchConfig(method="sample", n=body.n or 1).validate()
        plain = True
    else:
        if body.n not in (None, 1):
            raise APIError(400, "n > 1 does not combine with a search method (one answer is selected); "
                                "use search.n for the number of samples", param="n")
        cfg = search_config_from_dict(body.search, param_prefix="search.")
        plain = False
        if logprobs is not None:
            raise APIError(400, "logprobs are returned for plain sampling only: a search selects among many "
                                "candidates (and Q#/CD sample from a guided distribution), so there are no "
                                "policy logprobs of the selected text to return; drop `search` or `logprobs`",
                           param="logprobs")
        if echo_only:
            raise APIError(400, "max_tokens 0 (echo only) does not combine with a search", param="max_tokens")
        if cfg.method == "vgs" and cfg.block_size < state.min_block_size:
            raise APIError(400, f"search.block_size must be >= {state.min_block_size} on this server (each round "
                                "rescores every beam; --min-block-size)", param="search.block_size")
    if body.stream and logprobs is not None:
        raise APIError(400, "logprobs with stream: true is not supported; send stream: false", param="logprobs")
    if body.stream and len(prompts) > 1 and not plain:
        raise APIError(400, "stream: true with several prompts and a search is not supported; send one prompt "
                            "per streamed search", param="stream")
    method = get_method(cfg.method)
    weight = method.sequences(cfg)
    if weight > state.max_budget:
        what = "search.budget" if cfg.method == "vgs" else ("search.n" if not plain else "n")
        raise APIError(400, f"this request needs {weight} sequences, more than the server's --max-budget of "
                            f"{state.max_budget}", param=what)
    check_engines(cfg.method, state.engines)
    for p in prompts:
        check_lengths(len(p), state.engines, cfg, sampling)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return Job(endpoint, prompts, cfg, sampling, plain, body.stream, include_usage,
               skip_special_tokens=body.skip_special_tokens, echo=echo, echo_texts=texts, echo_only=echo_only,
               logprobs=logprobs, reasoning=chat and state.reasoning,
               include_reasoning=not chat or body.include_reasoning)
