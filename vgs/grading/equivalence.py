"""Answer equivalence with math-verify, safe from any thread and bounded in time.

Why a process pool of our own: math-verify's timeouts rely on SIGALRM, which works only in
a process's main thread (called from a thread it raises; with timeouts disabled a
pathological sympy comparison can hang forever). So every math-verify call runs in the main
thread of a long-lived worker process (``vgs.grading._worker``) with its timeouts on, and the
parent waits on the answer with a wall-clock deadline. A worker that misses the deadline is
killed and replaced, and the pair counts as not equal. Workers are plain subprocesses that
speak JSON lines over pipes, so they need no ``__main__`` guard in the caller, ignore the
caller's start method, can be killed one by one, and exit when the parent goes away.

Cheap cases never reach a worker: missing/empty answers, identical strings, and pairs of
plain integers ("073" vs "73", AMC's "27.0" vs "27"). Results are cached per unordered pair,
because the relation is symmetric (both directions of ``verify`` are tried).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import re
import select
import subprocess
import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0
# A fresh worker imports sympy and math-verify (about 1-2 s, more on a loaded CI machine).
STARTUP_TIMEOUT = 180.0
_PLAIN_INT_RE = re.compile(r"[+-]?\d+(?:\.0*)?")
_REPO_ROOT = str(Path(__file__).resolve().parents[2])
TIMED_OUT = "timed out"
DIED = "died"


class GradingUnavailable(RuntimeError):
    """A grading worker could not start (broken environment, not a bad answer)."""


def available_cpus() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def _norm(x: object) -> str | None:
    """Answers arrive as str or None; golds from some datasets are numbers (AMC: 27.0)."""
    if x is None:
        return None
    s = x.strip() if isinstance(x, str) else str(x).strip()
    return s or None


def _plain_int(s: str) -> int | None:
    if _PLAIN_INT_RE.fullmatch(s):
        return int(s.split(".", 1)[0])
    return None


def quick_equal(a: str | None, b: str | None) -> bool | None:
    """Decide the pairs that need no math-verify; None means "ask math-verify"."""
    a, b = _norm(a), _norm(b)
    if a is None or b is None:
        return False
    if a == b:
        return True
    ia, ib = _plain_int(a), _plain_int(b)
    if ia is not None and ib is not None:
        return ia == ib
    return None


def _op_timeout(timeout: float) -> int:
    """math-verify's own per-operation limit (whole seconds). A comparison is two parses and
    up to a few verify steps, so a quarter of the wall-clock budget each (at least 1 s, the
    published setting) lets the worker usually give up by itself before being killed."""
    return max(1, int(timeout // 4))


class _Worker:
    """One grading subprocess and its pipes; used by one thread at a time."""

    def __init__(self) -> None:
        env = os.environ.copy()
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO_ROOT, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vgs.grading._worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,  # unbuffered: select() on the pipe then sees every byte
            env=env,
            start_new_session=True,  # a Ctrl+C in the terminal is the parent's business
        )
        self.ready = False

    def _read(self, timeout: float) -> dict | str:
        """The next JSON line, or TIMED_OUT / DIED."""
        out = self.proc.stdout
        assert out is not None
        ready, _, _ = select.select([out], [], [], max(0.0, timeout))
        if not ready:
            return TIMED_OUT
        line = out.readline()
        if not line:
            return DIED
        try:
            return json.loads(line)
        except ValueError:
            return DIED

    def wait_ready(self) -> None:
        if self.ready:
            return
        msg = self._read(STARTUP_TIMEOUT)
        if not isinstance(msg, dict) or not msg.get("ready"):
            detail = msg.get("error") if isinstance(msg, dict) else f"it {msg}"
            self.kill()
            raise GradingUnavailable(f"math-verify grading worker failed to start: {detail}")
        self.ready = True

    def ask(self, a: str, b: str, timeout: float) -> bool | str:
        """True/False from math-verify, or TIMED_OUT / DIED."""
        try:
            assert self.proc.stdin is not None
            req = json.dumps({"a": a, "b": b, "t": _op_timeout(timeout)}) + "\n"
            self.proc.stdin.write(req.encode("utf-8"))
        except (BrokenPipeError, OSError):
            return DIED
        msg = self._read(timeout)
        return msg if isinstance(msg, str) else bool(msg.get("eq", False))

    def close(self) -> None:
        """Ask politely (end of input), for shutdown."""
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
        except OSError:
            pass

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - unkillable process
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                if f:
                    f.close()
            except OSError:
                pass


class Grader:
    """math-verify equivalence over a pool of worker processes, with a result cache.

    One worker per available core by default. Workers start on the first comparison that
    needs math-verify (integer-only benchmarks such as AIME never start them). Every method
    is thread-safe; ``timeout`` is the wall-clock limit of one comparison inside a worker
    (time spent waiting for a free worker does not count).

    Use as a context manager, or call ``close()``; ``get_grader()`` gives a shared instance.
    """

    def __init__(self, workers: int | None = None, timeout: float = DEFAULT_TIMEOUT,
                 cache_size: int = 1_000_000) -> None:
        if workers is not None and workers < 1:
            raise ValueError("Grader needs at least one worker")
        if not timeout > 0:
            raise ValueError("Grader timeout must be positive")
        self.num_workers = workers or available_cpus()
        self.timeout = float(timeout)
        self.cache_size = cache_size
        self.timeouts = 0  # comparisons abandoned at the wall-clock deadline (for logs)
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], bool] = OrderedDict()
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._workers: set[_Worker] = set()
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        self.pid = os.getpid()

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop the workers. Comparisons still waiting for a worker return False."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            workers = list(self._workers)
            self._workers.clear()
            executor, self._executor = self._executor, None
        if os.getpid() != self.pid:  # inherited by a fork: the workers are not ours
            return
        for w in workers:
            w.close()
        for w in workers:
            try:
                w.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
            w.kill()
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    def _start(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._closed:
                raise RuntimeError("Grader is closed")
            if self._executor is None:
                for _ in range(self.num_workers):
                    w = _Worker()
                    self._workers.add(w)
                    self._idle.put(w)
                self._executor = ThreadPoolExecutor(self.num_workers, thread_name_prefix="vgs-grading")
            return self._executor

    def _acquire(self) -> _Worker | None:
        while True:
            if self._closed:
                return None
            try:
                w = self._idle.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                w.wait_ready()
            except GradingUnavailable:
                with self._lock:
                    self._workers.discard(w)
                if self._closed:  # killed by close() while starting
                    return None
                raise
            return w

    def _replace(self, dead: _Worker) -> None:
        dead.kill()
        with self._lock:
            self._workers.discard(dead)
            if self._closed:
                return
            w = _Worker()
            self._workers.add(w)
        self._idle.put(w)

    # ---------------------------------------------------------------- comparisons
    def _cached(self, key: tuple[str, str]) -> bool | None:
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
            return hit

    def _store(self, key: tuple[str, str], value: bool) -> None:
        with self._lock:
            self._cache[key] = value
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def _ask_worker(self, a: str, b: str, timeout: float) -> bool:
        """One math-verify comparison on a free worker. A worker that misses the deadline is
        replaced and the pair is False; one that died (e.g. killed for memory while idle) is
        replaced and the pair retried once, so a dead process does not cost a wrong answer."""
        for attempt in range(2):
            w = self._acquire()
            if w is None:  # closed
                return False
            try:
                res = w.ask(a, b, timeout)
            except BaseException:
                self._replace(w)
                raise
            if isinstance(res, bool):
                self._idle.put(w)
                return res
            self._replace(w)
            if self._closed:
                return False
            if res == TIMED_OUT:
                with self._lock:
                    self.timeouts += 1
                logger.warning("grading timed out after %.1fs; counted as not equal: %.80r vs %.80r",
                               timeout, a, b)
                return False
            logger.warning("grading worker died (attempt %d): %.80r vs %.80r", attempt + 1, a, b)
        return False

    def equal_many(self, pairs: Sequence[tuple[str | None, str | None]],
                   timeout: float | None = None) -> list[bool]:
        """Equivalence of each (a, b) pair, the math-verify ones in parallel."""
        timeout = self.timeout if timeout is None else float(timeout)
        out: list[bool | None] = []
        todo: dict[tuple[str, str], list[int]] = {}
        for i, (a, b) in enumerate(pairs):
            na, nb = _norm(a), _norm(b)
            res = quick_equal(na, nb)
            if res is None:
                key = (na, nb) if na <= nb else (nb, na)  # type: ignore[operator]
                res = self._cached(key)
                if res is None:
                    todo.setdefault(key, []).append(i)
            out.append(res)
        if todo:
            keys = list(todo)
            executor = self._start()
            if len(keys) == 1:  # no thread hop: the caller's thread waits on the worker
                results = [self._ask_worker(keys[0][0], keys[0][1], timeout)]
            else:
                futures = [executor.submit(self._ask_worker, a, b, timeout) for a, b in keys]
                results = [f.result() for f in futures]
            for key, res in zip(keys, results):
                self._store(key, res)
                for i in todo[key]:
                    out[i] = res
        return [bool(r) for r in out]

    def equal(self, a: str | None, b: str | None, timeout: float | None = None) -> bool:
        """Are two answers equivalent? Symmetric; never raises for any input strings."""
        return self.equal_many([(a, b)], timeout)[0]

    def correct(self, gold: str, preds: Sequence[str | None]) -> list[bool]:
        """Correctness of each prediction against one gold answer (None = no answer)."""
        return self.equal_many([(gold, p) for p in preds])

    def classes(self, answers: Sequence[str | None]) -> list[int]:
        """Equivalence-class id of each answer, ids numbered by first appearance.

        Greedy single pass (the published VGS rule): each answer is compared with the
        representative (first member) of every class so far and joins the first that
        matches, else opens a new class. Missing or empty answers never match anything, so
        each is its own singleton class. Identical strings share a class without a check.
        """
        ids: list[int] = []
        reps: list[str | None] = []  # representative per class id; None for empty singletons
        seen: dict[str, int] = {}
        for ans in answers:
            s = _norm(ans)
            if s is None:
                ids.append(len(reps))
                reps.append(None)
                continue
            if s in seen:
                ids.append(seen[s])
                continue
            cands = [cid for cid, r in enumerate(reps) if r is not None]
            eqs = self.equal_many([(s, reps[cid]) for cid in cands]) if cands else []
            cid = next((c for c, e in zip(cands, eqs) if e), None)
            if cid is None:
                cid = len(reps)
                reps.append(s)
            seen[s] = cid
            ids.append(cid)
        return ids


# -------------------------------------------------------------------- shared instance
_default: Grader | None = None
_default_lock = threading.Lock()


def get_grader() -> Grader:
    """The process-wide Grader (created on first use, closed at interpreter exit).

    A forked child gets a fresh one rather than sharing its parent's worker pipes.
    """
    global _default
    with _default_lock:
        if _default is None or _default.closed or _default.pid != os.getpid():
            _default = Grader()
        return _default


@atexit.register
def _close_default() -> None:
    if _default is not None:
        _default.close()


def is_equivalent(gold: str, pred: str | None, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Is ``pred`` the same answer as ``gold``? math-verify, both directions, tolerant numerics.

    Safe from any thread; bounded by ``timeout`` seconds of worker time (a stuck comparison
    is abandoned and counts as False); plain integers never reach math-verify. Results are
    cached in the shared Grader.
    """
    quick = quick_equal(gold, pred)
    if quick is not None:
        return quick
    try:
        return get_grader().equal(gold, pred, timeout=timeout)
    except GradingUnavailable:
        raise
    except Exception:  # noqa: BLE001 - grading must never take the caller down
        logger.exception("grading failed; counted as not equal")
        return False
