"""The OpenAI-compatible HTTP app: `/v1/models`, `/v1/completions`, `/v1/chat/completions`,
`/health`, `/metrics`.

Each request runs the same per-problem search as `vgs eval` (`vgs.search.search`) on the
engine loop the app itself runs on. The method is chosen per request with a `search` object;
without one the request is plain sampling (`n` choices). Bad input is an OpenAI-style error
body (`{"error": {"message", "type", "param", "code"}}`), never a traceback; the server keeps
no state between requests, so replicas can sit behind any HTTP load balancer.

Cancellation: a watcher polls the client connection; a disconnect (or `--request-timeout`)
cancels the search task, which aborts its vLLM requests (AsyncLLM.generate aborts on
cancellation) and drops its queued value calls. Answer extraction and math-verify run in the
grading process pool via a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from vgs.config import SamplingConfig, SearchConfig
from vgs.engine import GenRequest
from vgs.errors import VGSError
from vgs.records import Compute
from vgs.runtime import Admission, Busy
from vgs.search import Engines, SearchEvents, check_engines, search
from vgs.search.methods import get_method, search_config_from_dict
from vgs.server.metrics import Metrics
from vgs.server.schemas import ChatBody, CompletionBody

log = logging.getLogger("vgs.server")

DEFAULT_TEMPERATURE = SamplingConfig.temperature
DEFAULT_TOP_P = SamplingConfig.top_p


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


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _param_of(loc: tuple) -> str | None:
    types = {"str", "int", "float", "bool", "list", "dict", "none"}
    parts = [str(p) for p in loc if p != "body" and not (isinstance(p, str) and (
        p in types or "[" in p or "-" in p or p[:1].isupper()))]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (("." if out else "") + p)
    return out or None


# ---------------------------------------------------------------------------- request → configs

@dataclass
class Job:
    endpoint: str
    prompt: list[int]
    search: SearchConfig
    sampling: SamplingConfig
    plain: bool  # no `search` object: plain sampling, n choices
    stream: bool
    include_usage: bool


def _prompt_ids(state: ServerState, body: CompletionBody | ChatBody) -> list[int]:
    tok = state.tokenizer
    if isinstance(body, ChatBody):
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        try:
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # noqa: BLE001 - a template that refuses these messages is the client's input
            raise APIError(400, f"the chat template rejected the messages: {exc}", param="messages") from None
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]
    if isinstance(body.prompt, list):
        if not body.prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        vocab = len(tok)
        bad = [t for t in body.prompt if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})", param="prompt")
        return list(body.prompt)
    if not body.prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    return [int(t) for t in tok(body.prompt, add_special_tokens=True)["input_ids"]]


def make_job(state: ServerState, endpoint: str, body: CompletionBody | ChatBody) -> Job:
    if body.model is not None and body.model != state.model_name:
        raise APIError(404, f"the model {body.model!r} does not exist; this server serves {state.model_name!r}",
                       "NotFoundError", "model", "model_not_found")
    prompt = _prompt_ids(state, body)
    context = int(state.engines.policy.max_model_len)
    if len(prompt) >= context:
        raise APIError(400, f"the prompt has {len(prompt)} tokens, more than the model's context of {context}",
                       param="messages" if endpoint == "chat" else "prompt")
    max_tokens = body.max_tokens
    if isinstance(body, ChatBody) and body.max_completion_tokens is not None:
        max_tokens = body.max_completion_tokens
    if max_tokens is None:
        max_tokens = context - len(prompt)  # as vLLM's server: the rest of the context
    seed = body.seed if body.seed is not None else random.randrange(2**31)
    sampling = SamplingConfig(temperature=DEFAULT_TEMPERATURE if body.temperature is None else float(body.temperature),
                              top_p=DEFAULT_TOP_P if body.top_p is None else float(body.top_p),
                              max_tokens=int(max_tokens), seed=seed, stop=body.stop_list())
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
    method = get_method(cfg.method)
    weight = method.sequences(cfg)
    if weight > state.max_budget:
        what = "search.budget" if cfg.method == "vgs" else ("search.n" if not plain else "n")
        raise APIError(400, f"this request needs {weight} sequences, more than the server's --max-budget of "
                            f"{state.max_budget}", param=what)
    check_engines(cfg.method, state.engines)
    from vgs.search import check_lengths

    check_lengths(len(prompt), state.engines, cfg, sampling)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return Job(endpoint, prompt, cfg, sampling, plain, body.stream, include_usage)


# ---------------------------------------------------------------------------- running a job

class _Progress(SearchEvents):
    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()

    def round(self, tree: int, round: int, active: int, best_value: float | None) -> None:  # noqa: A002
        self.queue.put_nowait({"round": round, "tree": tree, "beams_alive": active, "best_value": best_value})


async def next_item(queue: asyncio.Queue, task: asyncio.Future) -> tuple[bool, Any]:
    """(True, the queue's next item), or (False, None) when `task` finished first. Lets a stream
    interleave a producer's items with its completion without leaving a pending `get()`."""
    get = asyncio.ensure_future(queue.get())
    try:
        await asyncio.wait({task, get}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not get.done():
            get.cancel()
    if get.done() and not get.cancelled():
        return True, get.result()
    return False, None


async def _watch(request: Request, task: asyncio.Task, timeout: float | None) -> None:
    """Cancel `task` when the client goes away or the timeout passes."""
    start = time.monotonic()
    while not task.done():
        if await request.is_disconnected():
            log.info("client disconnected; cancelling its search")
            task.cancel("disconnect")
            return
        if timeout is not None and time.monotonic() - start > timeout:
            task.cancel("timeout")
            return
        await asyncio.sleep(0.05)


def _text(state: ServerState, cand: Any, stops: list[str]) -> str:
    from vgs.prompts import decode

    text = cand.text or decode(state.tokenizer, cand.token_ids)
    if cand.finish_reason == "stop" and stops:  # vLLM stops on the string; the text excludes it
        cut = min((text.find(s) for s in stops if s in text), default=-1)
        if cut >= 0:
            text = text[:cut]
    return text


def _finish(cand: Any) -> str:
    return cand.finish_reason if cand.finish_reason in ("stop", "length") else "abort"


def _finalize(state: ServerState, job: Job, result: Any) -> Any:
    """Off the loop: decode, extract, vote (math-verify in the grading pool)."""
    from vgs.prompts import decode
    from vgs.search.finalize import finalize

    if job.plain:
        for c in result.candidates:
            c.text = decode(state.tokenizer, c.token_ids)
        return result
    return finalize(result, state.tokenizer, state.grader, job.search.method)


def _vgs_field(job: Job, result: Any) -> dict[str, Any]:
    rule = get_method(job.search.method).vote
    cands = []
    for c in result.candidates:
        weight = c.value if rule in ("wmaj", "bon") else 1.0
        cands.append({"answer": c.answer, "value": c.value, "vote_weight": weight, "finish_reason": _finish(c),
                      "num_tokens": c.num_tokens, "tree": c.tree})
    votes = result.votes
    out: dict[str, Any] = {"method": job.search.method, "seed": job.sampling.seed, "answer": result.answer,
                           "chosen": result.chosen, "candidates": cands, "compute": result.compute.to_dict()}
    if votes is not None:
        out["votes"] = {"maj_answer": votes.maj_answer, "wmaj_answer": votes.wmaj_answer,
                        "bon_answer": votes.bon_answer, "num_classes": votes.num_classes, "classes": votes.classes}
    if result.trace:
        out["rounds"] = 1 + max(r["round"] for r in result.trace)
    return out


def _usage(job: Job, result: Any) -> dict[str, int]:
    comp = result.compute
    return {"prompt_tokens": len(job.prompt), "completion_tokens": comp.policy_tokens,
            "total_tokens": len(job.prompt) + comp.policy_tokens, "value_tokens": comp.value_tokens}


def _choices(state: ServerState, job: Job, result: Any) -> list[dict[str, Any]]:
    cands = result.candidates if job.plain else [result.candidates[result.chosen]]
    out = []
    for i, c in enumerate(cands):
        text = _text(state, c, job.sampling.stop)
        if job.endpoint == "chat":
            out.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                        "finish_reason": _finish(c)})
        else:
            out.append({"index": i, "text": text, "logprobs": None, "finish_reason": _finish(c)})
    return out


class Runner:
    """Admission, the search task, its watcher, metrics: one request's life."""

    def __init__(self, state: ServerState, request: Request, job: Job):
        self.state, self.request, self.job = state, request, job
        self.progress = _Progress()
        self.weight = get_method(job.search.method).sequences(job.search)

    async def admit(self) -> int:
        try:
            w = await self.state.admission.acquire(self.weight, wait=True)
        except Busy as exc:
            raise APIError(429, str(exc), "rate_limit_error", None, "server_busy", {"Retry-After": "1"}) from None
        finally:
            self._gauges()
        return w

    def _gauges(self) -> None:
        m, a = self.state.metrics, self.state.admission
        m.in_flight.set(a.in_use)
        m.queued.set(a.queued)

    async def run(self) -> Any:
        """Admit, search, finalize. Cancelled on disconnect/timeout (→ APIError 499/504)."""
        st, job = self.state, self.job
        t0 = time.monotonic()
        w = await self.admit()
        try:
            task = asyncio.ensure_future(search(job.prompt, job.sampling.seed, st.engines, job.search, job.sampling,
                                                self.progress))
            watcher = asyncio.ensure_future(_watch(self.request, task, st.request_timeout))
            try:
                result = await task
            except asyncio.CancelledError:
                if watcher.done() and not watcher.cancelled():  # cancelled by us, not by the server
                    if st.request_timeout is not None and time.monotonic() - t0 > st.request_timeout:
                        raise APIError(504, f"the search did not finish within --request-timeout "
                                            f"{st.request_timeout:g} s; it was cancelled", "timeout_error",
                                       None, "timeout") from None
                    raise APIError(499, "client disconnected", "client_closed_request") from None
                raise
            finally:
                watcher.cancel()
        finally:
            st.admission.release(w)
            self._gauges()
        if result.error:  # the search could not finish (e.g. Q# guidance memory): this request fails alone
            raise APIError(503, f"the {job.search.method} search could not finish: {result.error}",
                           "service_unavailable_error", None, "search_failed", {"Retry-After": "1"})
        result = await asyncio.to_thread(_finalize, st, job, result)
        st.metrics.latency.labels(job.search.method).observe(time.monotonic() - t0)
        st.metrics.generated.inc(result.compute.policy_tokens)
        st.metrics.prefill.inc(result.compute.prefill_tokens)
        st.metrics.value_tokens.inc(result.compute.value_tokens)
        return result

    def body(self, result: Any) -> dict[str, Any]:
        job = self.job
        chat = job.endpoint == "chat"
        out = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
               "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
               "model": self.state.model_name, "choices": _choices(self.state, job, result),
               "usage": _usage(job, result)}
        if not job.plain:
            out["vgs"] = _vgs_field(job, result)
        return out

    async def stream(self) -> AsyncIterator[str]:
        """SSE: progress chunks between VGS rounds (empty content, a `vgs` field), then the
        selected completion, the finish chunk, optional usage, `[DONE]`."""
        job, st = self.job, self.state
        chat = job.endpoint == "chat"
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(index: int, content: str | None, finish: str | None, role: bool = False,
                  extra: dict[str, Any] | None = None) -> str:
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if role else {}
                if content is not None:
                    delta["content"] = content
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": index, "text": content or "", "logprobs": None, "finish_reason": finish}
            body = {"id": rid, "object": obj, "created": created, "model": st.model_name, "choices": [choice]}
            if extra:
                body.update(extra)
            return f"data: {json.dumps(body)}\n\n"

        if job.plain:
            async for piece in self._stream_plain(chunk, rid, obj, created):
                yield piece
            return
        run = asyncio.ensure_future(self.run())
        try:
            if chat:
                yield chunk(0, "", None, role=True)
            while not run.done():
                got, item = await next_item(self.progress.queue, run)
                if got:
                    yield chunk(0, "", None, extra={"vgs": {"progress": item}})
            try:
                result = run.result()
            except Exception as exc:  # noqa: BLE001 - reported in the stream, as vLLM's server does
                yield _error_event(exc)
                yield "data: [DONE]\n\n"
                return
            for i, ch in enumerate(_choices(st, job, result)):
                text = ch["message"]["content"] if chat else ch["text"]
                yield chunk(i, text, None, role=chat and i > 0)
                extra = {"vgs": _vgs_field(job, result)} if (not job.plain and i == 0) else None
                yield chunk(i, None if chat else "", ch["finish_reason"], extra=extra)
            if job.include_usage:
                yield f"data: {json.dumps({'id': rid, 'object': obj, 'created': created, 'model': st.model_name, 'choices': [], 'usage': _usage(job, result)})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not run.done():
                run.cancel()  # the client went away mid-stream: abort the search
                await asyncio.gather(run, return_exceptions=True)


    async def _produce(self, queue: asyncio.Queue) -> Compute:
        """Admit, then stream the policy's deltas into `queue` (plain sampling)."""
        st, job = self.state, self.job
        w = await self.admit()
        comp = Compute(policy_params=st.engines.policy.num_params)
        try:
            req = GenRequest(list(job.prompt), job.sampling.max_tokens, n=job.search.n, seed=job.sampling.seed)
            async for d in st.engines.policy.astream(req, job.sampling):
                comp.policy_tokens += len(d.token_ids)
                comp.prefill_tokens += d.prefill_tokens
                queue.put_nowait(d)
        finally:
            st.admission.release(w)
            self._gauges()
        return comp

    async def _stream_plain(self, chunk: Any, rid: str, obj: str, created: int) -> AsyncIterator[str]:
        """SSE for plain sampling: token deltas as the engine makes them, per choice; the
        deltas of a choice concatenate to the non-streamed text of the same request."""
        from vgs.records import SearchResult
        from vgs.server.textstream import TextStream

        st, job = self.state, self.job
        chat = job.endpoint == "chat"
        t0 = time.monotonic()
        queue: asyncio.Queue = asyncio.Queue()
        prod = asyncio.ensure_future(self._produce(queue))
        watcher = asyncio.ensure_future(_watch(self.request, prod, st.request_timeout))
        texts = [TextStream(st.tokenizer, job.sampling.stop) for _ in range(job.search.n)]
        try:
            if chat:
                for i in range(job.search.n):
                    yield chunk(i, "", None, role=True)
            while True:
                got, item = await next_item(queue, prod)
                if got:
                    items = [item]
                elif prod.done():
                    items = []
                    while not queue.empty():
                        items.append(queue.get_nowait())
                else:
                    continue
                for d in items:
                    finish = d.finish_reason
                    text = texts[d.index].feed(d.token_ids, finish is not None)
                    if text:
                        yield chunk(d.index, text, None)
                    if finish is not None:
                        yield chunk(d.index, None if chat else "", finish if finish in ("stop", "length") else "abort")
                if prod.done() and queue.empty():
                    break
            try:
                comp = prod.result()
            except asyncio.CancelledError:
                timed_out = st.request_timeout is not None and time.monotonic() - t0 > st.request_timeout
                yield _error_event(APIError(504, f"the request did not finish within --request-timeout "
                                                 f"{st.request_timeout:g} s; it was cancelled", "timeout_error",
                                            None, "timeout") if timed_out else
                                   APIError(499, "client disconnected", "client_closed_request"))
                yield "data: [DONE]\n\n"
                return
            except Exception as exc:  # noqa: BLE001 - reported in the stream
                yield _error_event(exc)
                yield "data: [DONE]\n\n"
                return
            st.metrics.latency.labels(job.search.method).observe(time.monotonic() - t0)
            st.metrics.generated.inc(comp.policy_tokens)
            st.metrics.prefill.inc(comp.prefill_tokens)
            if job.include_usage:
                usage = _usage(job, SearchResult([], comp))
                yield f"data: {json.dumps({'id': rid, 'object': obj, 'created': created, 'model': st.model_name, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            if not prod.done():
                prod.cancel()  # the client went away mid-stream: abort the request
            await asyncio.gather(prod, watcher, return_exceptions=True)


def _error_event(exc: BaseException) -> str:
    """An SSE error event (as vLLM's server sends) for an error raised after the 200."""
    if isinstance(exc, APIError):
        err = {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}
    elif isinstance(exc, VGSError):
        err = {"message": str(exc), "type": "invalid_request_error", "param": exc.param, "code": None}
    else:
        log.error("search failed: %r", exc)
        err = {"message": f"internal error: {exc.__class__.__name__}", "type": "internal_error",
               "param": None, "code": None}
    return "data: " + json.dumps({"error": err}) + "\n\n"


# ---------------------------------------------------------------------------- the app

def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="vgs", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.vgs = state

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "NotFoundError" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), type_)

    @app.exception_handler(Exception)
    async def _any(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return error_response(500, f"internal error: {exc.__class__.__name__}", "internal_error")

    def _auth(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {state.api_key}":
            raise APIError(401, "missing or invalid API key (Authorization: Bearer ...)", "authentication_error",
                           None, "invalid_api_key")

    async def _body(request: Request, model: type) -> Any:
        raw = await request.body()
        try:
            data = json.loads(raw, parse_constant=lambda c: float("nan"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object")
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

    async def _serve(request: Request, endpoint: str, model: type) -> Response:
        method = "-"
        status = 200
        try:
            _auth(request)
            body = await _body(request, model)
            job = make_job(state, endpoint, body)
            method = job.search.method if not job.plain else "plain"
            runner = Runner(state, request, job)
            if job.stream:
                # admission before the 200 so that a full server still answers 429
                if state.admission.would_refuse(runner.weight):
                    raise APIError(429, "server busy: too much work queued; retry later", "rate_limit_error", None,
                                   "server_busy", {"Retry-After": "1"})
                return StreamingResponse(runner.stream(), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            result = await runner.run()
            return JSONResponse(runner.body(result))
        except APIError as exc:
            status = exc.status
            return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)
        except VGSError as exc:
            status = 400
            return error_response(400, str(exc), param=getattr(exc, "param", None))
        finally:
            state.metrics.requests.labels(endpoint, method, str(status)).inc()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _serve(request, "completions", CompletionBody)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _serve(request, "chat", ChatBody)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            _auth(request)
        except APIError as exc:
            return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)
        return JSONResponse({"object": "list", "data": [{"id": state.model_name, "object": "model",
                                                         "created": state.created, "owned_by": "vgs",
                                                         "max_model_len": state.engines.policy.max_model_len}]})

    @app.get("/health")
    async def health() -> Response:
        llm = getattr(state.engines.policy, "llm", None)
        if llm is not None and getattr(llm, "errored", False):
            return error_response(503, "the policy engine is dead", "internal_error")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        state.metrics.in_flight.set(state.admission.in_use)
        state.metrics.queued.set(state.admission.queued)
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    return app
