"""`vgs serve`: the OpenAI-compatible decoding server (see `vgs.server.app`).

One process holds the policy engine (AsyncLLM, guidance processor loaded) and, with
`--value-model`, the value scorer; uvicorn runs the app on the engine loop (`vgs.aio`), so
requests and engines share one event loop. Scale-out: `--tensor-parallel-size` /
`--data-parallel-size` are vLLM's own; replicas go behind any HTTP load balancer (no state is
kept between requests).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from vgs.errors import VGSError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible server: value-guided decoding chosen per request",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--policy", required=True, help="policy model (local dir or Hub id)")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the policy's)")
    p.add_argument("--value-model", default=None, help="value model: enables vgs, best_of_n, weighted_majority, "
                                                        "qsharp, cd")
    p.add_argument("--value-backend", default="vllm", help="vllm (prefix-cached pooling) or hf (transformers)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("VGS_API_KEY"), help="require 'Authorization: Bearer KEY' "
                                                                         "(default: $VGS_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the `model` clients send (default: --policy)")
    p.add_argument("--max-budget", type=int, default=256, help="most sequences one request may ask for "
                                                               "(VGS budget x trees, or n)")
    p.add_argument("--max-sequences", type=int, default=None,
                   help="live sequences in flight over all requests (default: what the policy KV cache holds "
                        "at full length); as much again may queue, beyond that requests get 429")
    p.add_argument("--request-timeout", type=float, default=None, help="seconds before a search is cancelled (504)")
    p.add_argument("--data-parallel-size", type=int, default=1, help="vLLM data parallelism (policy engine)")
    p.add_argument("--reasoning-parser", default="auto", choices=("auto", "deepseek_r1", "none"),
                   help="split chat answers into reasoning_content / content at </think> (vLLM's deepseek_r1); "
                        "auto: on when the chat template opens <think>")
    p.add_argument("--min-block-size", type=int, default=8,
                   help="smallest search.block_size a VGS request may ask for (each round rescores every beam)")
    p.add_argument("--max-body-bytes", type=int, default=16 << 20, help="largest request body (413 beyond)")
    from vgs.eval.runner import add_engine_args

    add_engine_args(p)
    p.set_defaults(func=run_cli)


def _check_args(args: argparse.Namespace) -> None:
    from vgs.engine import check_model_path

    if not 0 < args.port < 65536:
        raise VGSError(f"--port must be in 1..65535, got {args.port}")
    if args.max_budget < 1:
        raise VGSError(f"--max-budget must be >= 1, got {args.max_budget}")
    if args.max_sequences is not None and args.max_sequences < 1:
        raise VGSError(f"--max-sequences must be >= 1, got {args.max_sequences}")
    if args.request_timeout is not None and not args.request_timeout > 0:
        raise VGSError(f"--request-timeout must be > 0, got {args.request_timeout}")
    if args.min_block_size < 1:
        raise VGSError(f"--min-block-size must be >= 1, got {args.min_block_size}")
    if args.max_body_bytes < 1024:
        raise VGSError(f"--max-body-bytes must be >= 1024, got {args.max_body_bytes}")
    if args.data_parallel_size < 1:
        raise VGSError(f"--data-parallel-size must be >= 1, got {args.data_parallel_size}")
    if args.value_backend not in ("vllm", "hf"):
        raise VGSError(f"--value-backend must be vllm or hf, got {args.value_backend!r}")
    if args.api_key is not None and not args.api_key:
        raise VGSError("--api-key is empty")
    check_model_path(args.policy)
    if args.value_model:
        check_model_path(args.value_model)


def build_state(engines: Any, model_name: str, *, api_key: str | None = None, max_budget: int = 256,
                max_sequences: int | None = None, request_timeout: float | None = None, grader: Any = None,
                max_tokens_hint: int = 4096, reasoning_parser: str = "auto", min_block_size: int = 8,
                max_body_bytes: int = 16 << 20) -> Any:
    """A ServerState over running engines (the CLI's, or a test session's)."""
    from vgs.grading import Grader
    from vgs.runtime import Admission, default_max_sequences
    from vgs.server import reasoning
    from vgs.server.app import ServerState
    from vgs.server.jobs import Defaults

    cap = max_sequences or max(max_budget, default_max_sequences(engines.policy, max_tokens_hint))
    tok = engines.policy.tokenizer
    return ServerState(engines=engines, tokenizer=tok, model_name=model_name,
                       grader=grader or Grader(), admission=Admission(cap, max_queued=cap), api_key=api_key,
                       max_budget=max_budget, request_timeout=request_timeout, defaults=Defaults.of(engines.policy),
                       reasoning=reasoning.resolve(reasoning_parser, tok), min_block_size=min_block_size,
                       max_body_bytes=max_body_bytes)


class ServerHandle:
    """A uvicorn server running on the engine loop (started by `start_server`)."""

    def __init__(self, server: Any, task: Any, port: int, watchdog: Any = None):
        self.server, self.task, self.port, self.watchdog = server, task, port, watchdog

    def stop(self, timeout: float = 30) -> None:
        self.server.should_exit = True
        if self.watchdog is not None:
            self.watchdog.cancel()
        try:
            self.task.result(timeout)
        except BaseException:  # noqa: BLE001 - stopping anyway
            pass


def start_server(state: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> ServerHandle:
    """Serve the app on the engine loop in the background; returns once it listens.
    `port=0` picks a free port (see `handle.port`)."""
    import socket

    import uvicorn

    from vgs.aio import engine_loop, run_sync
    from vgs.server.app import create_app, watch_engines

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise VGSError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    config = uvicorn.Config(create_app(state), log_level=log_level, lifespan="off", access_log=False,
                            timeout_keep_alive=30)
    server = uvicorn.Server(config)
    task = asyncio.run_coroutine_threadsafe(server.serve(sockets=[sock]), engine_loop())

    async def wait_started() -> None:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.02)

    run_sync(wait_started(), timeout=60)

    def on_dead() -> None:  # a dead engine stops the server; `vgs serve` then exits non-zero
        server.should_exit = True

    watchdog = asyncio.run_coroutine_threadsafe(watch_engines(state, on_dead), engine_loop())
    return ServerHandle(server, task, sock.getsockname()[1], watchdog)


def run_cli(args: argparse.Namespace) -> int:
    from vgs.eval.runner import engine_kwargs
    from vgs.config import EngineConfig
    from vgs.runtime import build_engines, close_engines

    _check_args(args)
    import signal

    def _term(*_: Any) -> None:  # SIGTERM: shut down like Ctrl-C (engines closed, not orphaned)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    pol_kw = engine_kwargs(args, value=False)
    if args.data_parallel_size > 1:
        pol_kw["extra"] = {"data_parallel_size": args.data_parallel_size}
    engines = build_engines(EngineConfig(model=args.policy, tokenizer=args.tokenizer, **pol_kw), args.value_model,
                            needs_scorer=bool(args.value_model), value_backend=args.value_backend,
                            value_engine=engine_kwargs(args, value=True))
    name = args.served_model_name or args.policy
    state = build_state(engines, name, api_key=args.api_key, max_budget=args.max_budget,
                        max_sequences=args.max_sequences, request_timeout=args.request_timeout,
                        reasoning_parser=args.reasoning_parser, min_block_size=args.min_block_size,
                        max_body_bytes=args.max_body_bytes)
    handle = None
    try:
        handle = start_server(state, args.host, args.port, log_level="info")
        print(f"[vgs serve] {name!r} on http://{args.host}:{handle.port}/v1 "
              f"(value model: {args.value_model or 'none'}; max {state.admission.capacity} live sequences; "
              f"reasoning split: {'on' if state.reasoning else 'off'})", file=sys.stderr, flush=True)
        handle.task.result()  # until Ctrl-C / SIGTERM, or a dead engine
    except KeyboardInterrupt:
        print("[vgs serve] shutting down", file=sys.stderr)
    finally:
        if handle is not None:
            handle.stop()
        state.grader.close()
        close_engines(engines)
    if state.dead is not None:  # as vLLM's server: exit non-zero so a supervisor restarts the server
        print(f"[vgs serve] the {state.dead} engine process died; exiting", file=sys.stderr, flush=True)
        return 1
    return 0
