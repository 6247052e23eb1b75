"""Grading worker process: runs math-verify in its own main thread.

math-verify's timeouts use SIGALRM, which only works in a process's main thread; here they
work, and the parent adds a wall-clock timeout on top (it kills this process if a comparison
is stuck in C code that a signal cannot interrupt).

Protocol (one JSON document per line): the worker prints ``{"ready": true}`` once imports
and a warm-up call are done (or ``{"error": "..."}`` and exits), then answers each request
``{"a": str, "b": str, "t": int}`` with ``{"eq": bool}``. It exits on end of input, so it
never outlives its parent.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys

# The comparison settings of the published VGS checker (spec §3.4).
FLOAT_ROUNDING = 5
NUMERIC_PRECISION = 5


def check_pair(a: str, b: str, op_timeout: int) -> bool:
    """math-verify equivalence of two answer strings, tried in both directions.

    ``verify`` is asymmetric (gold first), so ``a ~ b`` holds if either direction verifies;
    that also makes the relation symmetric, which equivalence classes need. Each parse and
    each comparison gets ``op_timeout`` whole seconds (math-verify's granularity). Any
    failure, including math-verify's BaseException-derived timeout, counts as "not equal".
    """
    from math_verify import parse, verify

    try:
        pa = parse(f"${a}$", parsing_timeout=op_timeout)
        pb = parse(f"${b}$", parsing_timeout=op_timeout)
        if not pa or not pb:
            return False
        kwargs = dict(
            float_rounding=FLOAT_ROUNDING,
            numeric_precision=NUMERIC_PRECISION,
            strict=True,
            timeout_seconds=op_timeout,
        )
        return bool(verify(pa, pb, **kwargs) or verify(pb, pa, **kwargs))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # noqa: BLE001 - TimeoutException derives from BaseException
        return False


def main() -> None:
    # Ctrl+C belongs to the parent, which shuts us down by closing our stdin.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Keep the protocol channel private: anything a library prints goes to stderr.
    proto = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        check_pair("1", "1", 1)  # import and warm math-verify before announcing readiness
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises
        proto.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
        return
    proto.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin.buffer:
        try:
            req = json.loads(line)
            eq = check_pair(str(req["a"]), str(req["b"]), int(req["t"]))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException:  # noqa: BLE001 - a bad request is "not equal", never a crash
            eq = False
        proto.write(json.dumps({"eq": eq}) + "\n")


if __name__ == "__main__":
    main()
