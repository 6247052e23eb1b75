"""The OpenAI-compatible HTTP app: `/v1/models`, `/v1/completions`, `/v1/chat/completions`,
`/tokenize`, `/detokenize`, `/health`, `/metrics`.

Each prompt of a request runs the same per-problem search as `vgs eval` (`vgs.search.search`)
on the engine loop the app itself runs on, admitted as its own sequences; the method is
chosen per request with a `search` object. Without one the request is plain sampling (`n`
choices per prompt, vLLM's semantics: `echo`, `logprobs`, prompt logprobs). Text is returned
as vLLM's server returns it (special tokens skipped unless `skip_special_tokens: false`);
answer extraction still reads the full text. Bad input is an OpenAI-style 4xx body, a server
fault a 5xx, never a traceback; the server keeps no state between requests.

Off the loop: request parsing (tokenizer, chat template) runs in a worker thread; answer
extraction and math-verify in the grading process pool via a thread. Cancellation: one
watcher covers admission, search and finalization, so a disconnect (or `--request-timeout`)
while waiting in the admission queue or finalizing cancels the request too. A dead engine
turns every request into a 503 and stops the server, which exits non-zero (`vgs serve`), so
a supervisor restarts it, as vLLM's server does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from vgs.engine import GenRequest, GenSample
from vgs.errors import VGSError
from vgs.records import Compute, SearchResult
from vgs.runtime import Admission, Busy
from vgs.search import Engines, SearchEvents, search
from vgs.search.methods import get_method
from vgs.server.fields import CHAT, COMPLETIONS, check_messages, drop_neutral
from vgs.server.jobs import APIError, Defaults, Job, make_job
from vgs.server.logprobs import chat_logprobs, completion_logprobs
from vgs.server.metrics import Metrics
from vgs.server.reasoning import ReasoningStream, split
from vgs.server.schemas import ChatBody, CompletionBody, DetokenizeBody, TokenizeChatBody, TokenizeCompletionBody

log = logging.getLogger("vgs.server")

MAX_JSON_DEPTH = 32  # the deepest request body (the `search` object is two levels down)


@dataclass
class ServerState:
    engines: Engines
    tokenizer: Any
    model_name: str
    grader: Any
    admission: Admission
    api_key: str | None = None
    max_budget: int = 256
    request_timeout: float | None = None
    metrics: Metrics = field(default_factory=Metrics)
    created: int = field(default_factory=lambda: int(time.time()))
    defaults: Defaults = field(default_factory=Defaults)
    reasoning: bool = False  # deepseek_r1 split of chat answers (--reasoning-parser)
    min_block_size: int = 8  # floor on search.block_size: each VGS round rescores every beam
    max_body_bytes: int = 16 << 20
    keepalive_s: float = 15.0  # SSE comment after this long without an event, so proxies keep the stream
    dead: str | None = None  # the engine that died ("policy" / "value"): every request is a 503


# ---------------------------------------------------------------------------- JSON and errors

def clean(obj: Any) -> Any:
    """Non-finite floats (a NaN value from the value model) become null: JSON has no NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


def dumps(obj: Any) -> str:
    return json.dumps(clean(obj), allow_nan=False)


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(obj), status_code=status, media_type="application/json", headers=headers)


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> Response:
    return json_response({"error": {"message": message, "type": type_, "param": param, "code": code}}, status,
                         headers)


def _dead_error(state: ServerState) -> APIError:
    return APIError(503, f"the {state.dead or 'policy'} engine process died; the server is shutting down",
                    "service_unavailable_error", None, "engine_dead")


def fault(state: ServerState, exc: BaseException) -> APIError:
    """An exception raised while running an admitted request, as the HTTP error it is. Input
    was validated before any work started, so what fails now is the server's fault: 503 for a
    dead engine, 500 otherwise."""
    if isinstance(exc, APIError):
        return exc
    if exc.__class__.__name__ == "EngineDeadError" or state.dead:
        return _dead_error(state)
    if isinstance(exc, VGSError):
        log.error("request failed: %s", exc)
        return APIError(500, f"internal error: {exc}", "internal_error", None, "internal_error")
    log.error("request failed: %r", exc)
    return APIError(500, f"internal error: {exc.__class__.__name__}", "internal_error", None, "internal_error")


def _param_of(loc: tuple) -> str | None:
    types = {"str", "int", "float", "bool", "list", "dict", "none"}
    parts = [str(p) for p in loc if p != "body" and not (isinstance(p, str) and (
        p in types or "[" in p or "-" in p or p[:1].isupper()))]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (("." if out else "") + p)
    return out or None


def _too_deep(obj: Any, limit: int) -> bool:
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if d > limit:
            return True
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o)
    return False


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object: 413 past `limit` bytes (checked while reading), 400 for
    invalid or too deeply nested JSON."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the body is larger than the server's limit of {limit} bytes", code="body_too_large")
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise APIError(413, f"the body is larger than the server's limit of {limit} bytes", code="body_too_large")
        parts.append(part)
    try:
        data = json.loads(b"".join(parts), parse_constant=lambda c: float("nan"))
    except RecursionError:
        raise APIError(400, f"the body is nested more than {MAX_JSON_DEPTH} levels deep") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object")
    if _too_deep(data, MAX_JSON_DEPTH):
        raise APIError(400, f"the body is nested more than {MAX_JSON_DEPTH} levels deep")
    return data


def validate(model: type, data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = _param_of(tuple(err.get("loc", ())))
        msg = err.get("msg", "invalid value")
        if err.get("type") == "extra_forbidden":
            msg = "unknown or unsupported field"
        elif err.get("type") == "missing":
            msg = "field required"
        raise APIError(400, f"{param}: {msg}" if param else msg, param=param) from None


# ---------------------------------------------------------------------------- running a job

class _Progress(SearchEvents):
    def __init__(self, queue: asyncio.Queue) -> None:
        self.queue = queue

    def round(self, tree: int, round: int, active: int, best_value: float | None) -> None:  # noqa: A002
        self.queue.put_nowait({"round": round, "tree": tree, "beams_alive": active, "best_value": best_value})


async def next_item(queue: asyncio.Queue, task: asyncio.Future, timeout: float | None = None) -> tuple[bool, Any]:
    """(True, the queue's next item), or (False, None) when `task` finished first or `timeout`
    passed. Lets a stream interleave a producer's items with its completion (and keep-alive
    comments) without leaving a pending `get()`."""
    get = asyncio.ensure_future(queue.get())
    try:
        await asyncio.wait({task, get}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not get.done():
            get.cancel()
    if get.done() and not get.cancelled():
        return True, get.result()
    return False, None


async def _watch(request: Request, task: asyncio.Future, timeout: float | None) -> None:
    """Cancel `task` when the client goes away or the timeout passes."""
    start = time.monotonic()
    while not task.done():
        if await request.is_disconnected():
            log.info("client disconnected; cancelling its request")
            task.cancel("disconnect")
            return
        if timeout is not None and time.monotonic() - start > timeout:
            task.cancel("timeout")
            return
        await asyncio.sleep(0.05)


def _text(state: ServerState, job: Job, ids: list[int], finish: str) -> str:
    """Generated ids as vLLM's server returns them: special tokens skipped (unless the request
    says not to), cut before the stop string that ended the sample."""
    from vgs.prompts import decode

    text = decode(state.tokenizer, ids, skip_special_tokens=job.skip_special_tokens)
    if finish == "stop" and job.sampling.stop:
        cut = min((text.find(s) for s in job.sampling.stop if s in text), default=-1)
        if cut >= 0:
            text = text[:cut]
    return text


def _finish(reason: str | None) -> str:
    return reason if reason in ("stop", "length") else "abort"


def _finalize(state: ServerState, job: Job, result: SearchResult) -> SearchResult:
    """Off the loop: decode (special tokens kept: extraction needs `</think>`), extract, vote
    (math-verify in the grading pool)."""
    from vgs.search.finalize import finalize

    return finalize(result, state.tokenizer, state.grader, job.search.method)


def _vgs_field(job: Job, result: SearchResult) -> dict[str, Any]:
    rule = get_method(job.search.method).vote
    cands = []
    for c in result.candidates:
        weight = c.value if rule in ("wmaj", "bon") else 1.0
        item = {"answer": c.answer, "value": c.value, "vote_weight": weight, "finish_reason": _finish(c.finish_reason),
                "num_tokens": c.num_tokens, "tree": c.tree}
        for k in ("kl", "kl_t1"):  # search.report_kl (Q#/CD): the guided sample's KL from the policy
            if k in c.info:
                item[k] = c.info[k]
        cands.append(item)
    votes = result.votes
    out: dict[str, Any] = {"method": job.search.method, "seed": job.sampling.seed, "answer": result.answer,
                           "chosen": result.chosen, "candidates": cands, "compute": result.compute.to_dict()}
    if votes is not None:
        out["votes"] = {"maj_answer": votes.maj_answer, "wmaj_answer": votes.wmaj_answer,
                        "bon_answer": votes.bon_answer, "num_classes": votes.num_classes, "classes": votes.classes}
    if result.trace:
        out["rounds"] = 1 + max(r["round"] for r in result.trace)
    return out


def _compute(results: list[Any]) -> Compute:
    comp = Compute()
    for r in results:
        if isinstance(r, SearchResult):
            comp.add(r.compute)
        else:
            comp.policy_tokens += sum(len(s.token_ids) for s in r)
            comp.prefill_tokens += sum(s.prefill_tokens for s in r)
    return comp


def _usage(job: Job, comp: Compute) -> dict[str, int]:
    prompt = sum(len(p) for p in job.prompts)
    return {"prompt_tokens": prompt, "completion_tokens": comp.policy_tokens,
            "total_tokens": prompt + comp.policy_tokens, "value_tokens": comp.value_tokens}


def _message(job: Job, text: str) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": text}
    if job.reasoning:  # both names: `reasoning_content` (DeepSeek, older vLLM) and `reasoning` (vLLM now)
        reasoning, msg["content"] = split(text)
        if job.include_reasoning:
            msg["reasoning_content"] = msg["reasoning"] = reasoning
    return msg


def _choice(state: ServerState, job: Job, p: int, index: int, ids: list[int], finish: str,
            steps: list | None, prompt_steps: list | None) -> dict[str, Any]:
    tok = state.tokenizer
    text = _text(state, job, ids, finish)
    if job.endpoint == "chat":
        lp = chat_logprobs(tok, ids, steps or [], job.logprobs) if job.logprobs is not None else None
        return {"index": index, "message": _message(job, text), "logprobs": lp, "finish_reason": _finish(finish)}
    prompt = job.prompts[p]
    if job.echo_only:
        text, ids, steps = job.echo_texts[p], prompt, prompt_steps
    elif job.echo:
        text, ids = job.echo_texts[p] + text, prompt + ids
        steps = (prompt_steps or []) + (steps or []) if job.logprobs is not None else None
    lp = completion_logprobs(tok, ids, steps or [], job.logprobs) if job.logprobs is not None else None
    return {"index": index, "text": text, "logprobs": lp, "finish_reason": _finish(finish)}


def _choices(state: ServerState, job: Job, results: list[Any]) -> list[dict[str, Any]]:
    """One choice per sample (plain: index = prompt × n + sample, as vLLM numbers them) or per
    prompt (a search: its selected candidate)."""
    out = []
    for p, res in enumerate(results):
        if job.plain:
            for j, s in enumerate(res):
                out.append(_choice(state, job, p, p * job.n + j, s.token_ids, s.finish_reason, s.logprobs,
                                   s.prompt_logprobs))
        else:
            c = res.candidates[res.chosen]
            out.append(_choice(state, job, p, p, c.token_ids, c.finish_reason, None, None))
    return out


class Runner:
    """Admission, the prompts' searches, their watcher, metrics: one request's life."""

    def __init__(self, state: ServerState, request: Request, job: Job):
        self.state, self.request, self.job = state, request, job
        self.progress: asyncio.Queue = asyncio.Queue()
        self.weight = job.weight
        self.status = 200  # what /metrics records for this request
        chat = job.endpoint == "chat"
        self.rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _gauges(self) -> None:
        m, a = self.state.metrics, self.state.admission
        m.in_flight.set(a.in_use)
        m.queued.set(a.queued)

    async def _admit(self) -> int:
        try:
            return await self.state.admission.acquire(self.weight, wait=True)
        except Busy as exc:
            raise APIError(429, str(exc), "rate_limit_error", None, "server_busy", {"Retry-After": "1"}) from None
        finally:
            self._gauges()

    def _release(self, w: int) -> None:
        self.state.admission.release(w)
        self._gauges()

    def _gen_request(self, prompt: list[int]) -> GenRequest:
        job = self.job
        prompt_lps = job.logprobs if job.echo and job.logprobs is not None else None
        return GenRequest(list(prompt), job.sampling.max_tokens, n=job.n, seed=job.sampling.seed,
                          logprobs=job.logprobs, prompt_logprobs=prompt_lps)

    async def _one(self, prompt: list[int]) -> list[GenSample] | SearchResult:
        """One prompt: admitted as its sequences, sampled or searched, finalized."""
        st, job = self.state, self.job
        w = await self._admit()
        try:
            if job.plain:
                return await st.engines.policy.agenerate(self._gen_request(prompt), job.sampling)
            result = await search(prompt, job.sampling.seed, st.engines, job.search, job.sampling,
                                  _Progress(self.progress))
        finally:
            self._release(w)
        if result.error:  # the search could not finish (e.g. Q# guidance memory): this request fails alone
            raise APIError(503, f"the {job.search.method} search could not finish: {result.error}",
                           "service_unavailable_error", None, "search_failed", {"Retry-After": "1"})
        return await asyncio.to_thread(_finalize, st, job, result)

    def _cancelled(self, t0: float) -> APIError:
        st = self.state
        if st.request_timeout is not None and time.monotonic() - t0 > st.request_timeout:
            return APIError(504, f"the request did not finish within --request-timeout {st.request_timeout:g} s; "
                                 "it was cancelled", "timeout_error", None, "timeout")
        return APIError(499, "client disconnected", "client_closed_request")

    async def _watched(self, work: Any, t0: float) -> Any:
        """Await `work` (admission included) cancelled on disconnect or timeout."""
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(_watch(self.request, task, self.state.request_timeout))
        try:
            return await task
        except asyncio.CancelledError:
            if watcher.done() and not watcher.cancelled():  # cancelled by the watcher, not by the server
                raise self._cancelled(t0) from None
            raise
        finally:
            watcher.cancel()

    def _account(self, comp: Compute, t0: float) -> None:
        m = self.state.metrics
        m.latency.labels(self.job.search.method).observe(time.monotonic() - t0)
        m.generated.inc(comp.policy_tokens)
        m.prefill.inc(comp.prefill_tokens)
        m.value_tokens.inc(comp.value_tokens)

    async def run(self) -> list[Any]:
        """Every prompt concurrently; per prompt its samples (plain) or finalized SearchResult."""
        from vgs.aio import gather_or_cancel

        t0 = time.monotonic()
        results = await self._watched(gather_or_cancel(*(self._one(p) for p in self.job.prompts)), t0)
        self._account(_compute(results), t0)
        return results

    def body(self, results: list[Any]) -> dict[str, Any]:
        job = self.job
        chat = job.endpoint == "chat"
        out = {"id": self.rid, "object": "chat.completion" if chat else "text_completion", "created": self.created,
               "model": self.state.model_name, "choices": _choices(self.state, job, results),
               "usage": _usage(job, _compute(results))}
        if not job.plain:  # one object per prompt; a list for a batch
            infos = [_vgs_field(job, r) for r in results]
            out["vgs"] = infos[0] if len(infos) == 1 else infos
        return out

    # -------------------------------------------------------------------- streaming

    def _chunk(self, index: int, content: str | None, finish: str | None = None, role: bool = False,
               extra: dict[str, Any] | None = None, reasoning: str | None = None) -> str:
        chat = self.job.endpoint == "chat"
        if chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if reasoning:
                delta["reasoning_content"] = delta["reasoning"] = reasoning
            if content is not None:
                delta["content"] = content
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": content or "", "logprobs": None, "finish_reason": finish}
        body = {"id": self.rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": self.created, "model": self.state.model_name, "choices": [choice]}
        if extra:
            body.update(extra)
        return f"data: {dumps(body)}\n\n"

    def _usage_chunk(self, comp: Compute) -> str:
        chat = self.job.endpoint == "chat"
        return "data: " + dumps({"id": self.rid, "object": "chat.completion.chunk" if chat else "text_completion",
                                 "created": self.created, "model": self.state.model_name, "choices": [],
                                 "usage": _usage(self.job, comp)}) + "\n\n"

    def _error_event(self, exc: BaseException) -> str:
        """An SSE error event (as vLLM's server sends) for an error raised after the 200."""
        err = exc if isinstance(exc, APIError) else fault(self.state, exc)
        self.status = err.status
        return "data: " + dumps({"error": {"message": err.message, "type": err.type, "param": err.param,
                                           "code": err.code}}) + "\n\n"

    def _text_chunks(self, index: int, text: str, rs: ReasoningStream | None, finished: bool) -> list[str]:
        if rs is None:
            return [self._chunk(index, text)] if text else []
        reasoning, content = rs.feed(text, finished)
        out = []
        if reasoning and self.job.include_reasoning:
            out.append(self._chunk(index, None, reasoning=reasoning))
        if content:
            out.append(self._chunk(index, content))
        return out

    async def stream(self) -> AsyncIterator[str]:
        """SSE. Plain sampling: token deltas per choice. A search: progress chunks between VGS
        rounds (empty content, a `vgs` field; SSE keep-alive comments while nothing happens),
        then the selected completion, the finish chunk, optional usage, `[DONE]`."""
        done = False
        try:
            inner = self._stream_plain() if self.job.plain else self._stream_search()
            async for piece in inner:
                yield piece
            done = True
        finally:
            if not done and self.status == 200:
                self.status = 499  # the client went away mid-stream

    async def _stream_search(self) -> AsyncIterator[str]:
        job, st = self.job, self.state
        chat = job.endpoint == "chat"
        run = asyncio.ensure_future(self.run())
        try:
            if chat:
                yield self._chunk(0, "", role=True)
            elif job.echo:
                yield self._chunk(0, job.echo_texts[0])
            while not run.done():
                got, item = await next_item(self.progress, run, st.keepalive_s)
                if got:
                    yield self._chunk(0, "", extra={"vgs": {"progress": item}})
                elif not run.done():
                    yield ": keep-alive\n\n"
            try:
                results = run.result()
            except Exception as exc:  # noqa: BLE001 - reported in the stream, as vLLM's server does
                yield self._error_event(exc)
                yield "data: [DONE]\n\n"
                return
            result = results[0]
            c = result.candidates[result.chosen]
            text = _text(st, job, c.token_ids, c.finish_reason)
            rs = ReasoningStream() if job.reasoning else None
            for piece in self._text_chunks(0, text, rs, True):
                yield piece
            yield self._chunk(0, None if chat else "", _finish(c.finish_reason),
                              extra={"vgs": _vgs_field(job, result)})
            if job.include_usage:
                yield self._usage_chunk(_compute(results))
            yield "data: [DONE]\n\n"
        finally:
            if not run.done():
                run.cancel()  # the client went away mid-stream: abort the search
                await asyncio.gather(run, return_exceptions=True)

    async def _produce(self, p: int, prompt: list[int], queue: asyncio.Queue) -> None:
        """Admit one prompt, then stream its samples' deltas into `queue` as (choice index, delta)."""
        st, job = self.state, self.job
        w = await self._admit()
        try:
            async for d in st.engines.policy.astream(self._gen_request(prompt), job.sampling):
                queue.put_nowait((p * job.n + d.index, d))
        finally:
            self._release(w)

    async def _stream_plain(self) -> AsyncIterator[str]:
        """Token deltas as the engine makes them, per choice (index = prompt × n + sample); the
        deltas of a choice concatenate to the non-streamed text of the same request."""
        from vgs.aio import gather_or_cancel
        from vgs.server.textstream import TextStream

        st, job = self.state, self.job
        chat = job.endpoint == "chat"
        t0 = time.monotonic()
        queue: asyncio.Queue = asyncio.Queue()
        work = asyncio.ensure_future(self._watched(
            gather_or_cancel(*(self._produce(p, prompt, queue) for p, prompt in enumerate(job.prompts))), t0))
        count = len(job.prompts) * job.n
        texts = [TextStream(st.tokenizer, job.sampling.stop, job.skip_special_tokens) for _ in range(count)]
        splits = [ReasoningStream() if job.reasoning else None for _ in range(count)]
        comp = Compute()
        try:
            for i in range(count):
                if chat:
                    yield self._chunk(i, "", role=True)
                elif job.echo:
                    yield self._chunk(i, job.echo_texts[i // job.n])
            while True:
                got, item = await next_item(queue, work, st.keepalive_s)
                items = [item] if got else []
                if not got and work.done():
                    while not queue.empty():
                        items.append(queue.get_nowait())
                elif not got:
                    yield ": keep-alive\n\n"
                for i, d in items:
                    comp.policy_tokens += len(d.token_ids)
                    comp.prefill_tokens += d.prefill_tokens
                    finished = d.finish_reason is not None
                    text = "" if job.echo_only else texts[i].feed(d.token_ids, finished)
                    for piece in self._text_chunks(i, text, splits[i], finished):
                        yield piece
                    if finished:
                        yield self._chunk(i, None if chat else "", _finish(d.finish_reason))
                if work.done() and queue.empty():
                    break
            try:
                work.result()
            except Exception as exc:  # noqa: BLE001 - reported in the stream (the 200 is sent)
                yield self._error_event(exc)
                yield "data: [DONE]\n\n"
                return
            self._account(comp, t0)
            if job.include_usage:
                yield self._usage_chunk(comp)
            yield "data: [DONE]\n\n"
        finally:
            if not work.done():
                work.cancel()  # the client went away mid-stream: abort the request
            await asyncio.gather(work, return_exceptions=True)


# ---------------------------------------------------------------------------- engine health

def dead_engine(engines: Engines) -> str | None:
    """The engine whose process died ("policy" / "value"), if any."""
    for name, eng in (("policy", engines.policy), ("value", engines.value)):
        llm = getattr(eng, "llm", None)
        if llm is not None and getattr(llm, "errored", False):
            return name
    return None


async def watch_engines(state: ServerState, on_dead: Callable[[], None], interval: float = 0.2,
                        grace: float = 1.0) -> None:
    """Poll the engines; when one dies, every request becomes a 503 and, after `grace` seconds
    (in-flight requests get their answer), `on_dead()` stops the server."""
    while True:
        name = dead_engine(state.engines)
        if name is not None:
            state.dead = name
            log.error("the %s engine process died; answering 503 and shutting down", name)
            await asyncio.sleep(grace)
            on_dead()
            return
        await asyncio.sleep(interval)


# ---------------------------------------------------------------------------- the app

def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="vgs", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.vgs = state

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        type_ = "NotFoundError" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), type_)

    @app.exception_handler(Exception)
    async def _any(request: Request, exc: Exception) -> Response:
        log.exception("internal error on %s", request.url.path)
        err = fault(state, exc)
        return error_response(err.status, err.message, err.type, err.param, err.code)

    def _auth(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {state.api_key}":
            raise APIError(401, "missing or invalid API key (Authorization: Bearer ...)", "authentication_error",
                           None, "invalid_api_key")

    async def _body(request: Request, model: type, table: dict[str, tuple]) -> Any:
        data = await read_json(request, state.max_body_bytes)
        drop_neutral(data, table)
        if model is ChatBody or "messages" in data:
            check_messages(data.get("messages"))
        return validate(model, data)

    async def _serve(request: Request, endpoint: str, model: type, table: dict[str, tuple]) -> Response:
        method = "-"
        status = 200
        streaming = False
        try:
            if state.dead:
                raise _dead_error(state)
            _auth(request)
            body = await _body(request, model, table)
            job = await asyncio.to_thread(make_job, state, endpoint, body)
            method = job.search.method if not job.plain else "plain"
            runner = Runner(state, request, job)
            if job.stream:
                # admission before the 200 so that a full server still answers 429
                if state.admission.would_refuse(runner.weight * len(job.prompts)):
                    raise APIError(429, "server busy: too much work queued; retry later", "rate_limit_error", None,
                                   "server_busy", {"Retry-After": "1"})
                streaming = True
                return StreamingResponse(_counted(runner, endpoint, method), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            try:
                results = await runner.run()
            except Exception as exc:  # noqa: BLE001 - 4xx raised as APIError, the rest is the server's fault
                raise fault(state, exc) from None
            return json_response(runner.body(results))
        except APIError as exc:
            status = exc.status
            return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)
        except VGSError as exc:  # validation (before any work): the client's input
            status = 400
            return error_response(400, str(exc), param=getattr(exc, "param", None))
        finally:
            if not streaming:
                state.metrics.requests.labels(endpoint, method, str(status)).inc()

    async def _counted(runner: Runner, endpoint: str, method: str) -> AsyncIterator[str]:
        """The stream, its final status (200, 499 gone, or the error event's) counted at the end."""
        try:
            async for piece in runner.stream():
                yield piece
        finally:
            state.metrics.requests.labels(endpoint, method, str(runner.status)).inc()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _serve(request, "completions", CompletionBody, COMPLETIONS)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _serve(request, "chat", ChatBody, CHAT)

    async def _simple(request: Request, work: Callable[[dict[str, Any]], Any]) -> Response:
        try:
            if state.dead:
                raise _dead_error(state)
            _auth(request)
            data = await read_json(request, state.max_body_bytes)
            model = data.get("model")
            if model is not None and model != state.model_name:
                raise APIError(404, f"the model {model!r} does not exist; this server serves {state.model_name!r}",
                               "NotFoundError", "model", "model_not_found")
            return json_response(await asyncio.to_thread(work, data))
        except APIError as exc:
            return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)
        except VGSError as exc:
            return error_response(400, str(exc), param=getattr(exc, "param", None))

    def _tokenize(data: dict[str, Any]) -> dict[str, Any]:
        from vgs.server.jobs import _chat_ids

        tok = state.tokenizer
        if "messages" in data:
            check_messages(data.get("messages"))
            body = validate(TokenizeChatBody, data)
            ids = _chat_ids(tok, body, add_generation_prompt=body.add_generation_prompt)
        else:
            body = validate(TokenizeCompletionBody, data)
            ids = [int(t) for t in tok(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"]]
        strs = tok.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": int(state.engines.policy.max_model_len), "tokens": ids,
                "token_strs": strs}

    def _detokenize(data: dict[str, Any]) -> dict[str, Any]:
        body = validate(DetokenizeBody, data)
        vocab = len(state.tokenizer)
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"tokens: token id {bad[0]} is outside the vocabulary [0, {vocab})", param="tokens")
        return {"prompt": state.tokenizer.decode(body.tokens)}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        return await _simple(request, _tokenize)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        return await _simple(request, _detokenize)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            _auth(request)
        except APIError as exc:
            return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)
        return json_response({"object": "list", "data": [{"id": state.model_name, "object": "model",
                                                          "created": state.created, "owned_by": "vgs",
                                                          "max_model_len": state.engines.policy.max_model_len}]})

    @app.get("/health")
    async def health() -> Response:
        name = state.dead or dead_engine(state.engines)
        if name is not None:
            return error_response(503, f"the {name} engine is dead", "service_unavailable_error", None, "engine_dead")
        return json_response({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        state.metrics.in_flight.set(state.admission.in_use)
        state.metrics.queued.set(state.admission.queued)
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    return app
