"""The process's engine event loop: one asyncio loop in a daemon thread that owns every
`AsyncLLM` and runs every search.

Why a loop of our own: an `AsyncLLM` binds its output handler to the loop that first uses
it, so long-lived engines called from sync code (tests, `vgs collect`, the speed scripts)
cannot go through repeated `asyncio.run(...)`. Everything async in vgs runs here; sync
callers block on `run_sync`, and code on another loop (none today) would use `on_loop`.
The server runs its uvicorn app on this same loop, so requests and engines share it.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Awaitable, Coroutine, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None


def engine_loop() -> asyncio.AbstractEventLoop:
    """The engine loop, started on first use."""
    global _loop, _thread
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            _thread = threading.Thread(target=run, name="vgs-engine-loop", daemon=True)
            _thread.start()
            ready.wait()
            _loop = loop
        return _loop


def on_engine_loop() -> bool:
    return _thread is not None and threading.current_thread() is _thread


def run_sync(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run `coro` on the engine loop and wait for it. A KeyboardInterrupt (or timeout) while
    waiting cancels it there, which aborts its vLLM requests."""
    if on_engine_loop():
        coro.close()
        raise RuntimeError("run_sync called on the engine loop; await the coroutine instead")
    fut = asyncio.run_coroutine_threadsafe(coro, engine_loop())
    try:
        return fut.result(timeout)
    except BaseException:
        fut.cancel()
        raise


async def on_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Await `coro` on the engine loop from any other loop (cancellation propagates)."""
    if on_engine_loop():
        return await coro
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, engine_loop()))


async def gather_or_cancel(*aws: Awaitable[T]) -> list[T]:
    """`asyncio.gather` that cancels the siblings when one fails (so a failed or cancelled
    search leaves no vLLM request running), and re-raises the first error."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
