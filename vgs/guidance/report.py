"""Per-request guidance statistics, from the worker back to the caller.

vLLM gives a logits processor no way to return data with a request's output (and returns
*raw* π_ref logprobs by default, not the guided ones), so the processor appends one line per
decoding step to a small file named by the request's `vgs_report_key`, in a directory both
processes agree on (`$VGS_GUIDANCE_REPORT_DIR`, else a per-user folder under /dev/shm or the
temp dir). The line is written and flushed inside `apply()`, i.e. before the token sampled in
that step can reach the caller, so once `generate` returns the file is complete.

Each line: `pos kl kl_t1 value_tokens`
- `pos`: the index of the output token this step samples (number of output tokens before it);
- `kl`: KL(π_guided ‖ π_ref) of this step, both at the request's sampling temperature T
  (π_ref = softmax(ℓ/T), π_guided = softmax((ℓ + offset)/T); before top-p/top-k truncation;
  T = 1 for greedy requests) — how far guidance moved the distribution actually sampled from;
- `kl_t1`: the same at T = 1: KL(softmax(ℓ + offset) ‖ softmax(ℓ)), the per-token term of the
  KL-regularised objective Q♯ optimises;
- `value_tokens`: tokens the value model computed in this step for this request.
A step recomputed after preemption or a discarded chunked-prefill sample writes the same `pos`
again; the reader keeps the last line per position and sums over the returned tokens.
A line `error <message>` says the worker gave up guiding the sequence (its value-model cache
did not fit the guidance budget); the caller fails that sequence with the message.
"""

from __future__ import annotations

import getpass
import os
import tempfile
from dataclasses import dataclass, field


def report_dir() -> str:
    """Where reports live; identical in the frontend and the worker (same env and user)."""
    env = os.environ.get("VGS_GUIDANCE_REPORT_DIR")
    if env:
        return env
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        user = str(os.getuid())
    return os.path.join(base, f"vgs-guidance-{user}")


def report_path(key: str) -> str:
    return os.path.join(report_dir(), f"{key}.kl")


class ReportWriter:
    """The worker side: append-only, opened on first write."""

    def __init__(self, key: str):
        self.key = key
        self._f = None

    def write(self, pos: int, kl: float, kl_t1: float, value_tokens: int) -> None:
        if self._f is None:
            os.makedirs(report_dir(), mode=0o700, exist_ok=True)
            self._f = open(report_path(self.key), "a", buffering=1 << 16)
        self._f.write(f"{pos} {kl:.9g} {kl_t1:.9g} {value_tokens}\n")

    def write_error(self, message: str) -> None:
        """The request's guidance failed (e.g. the value-model KV budget is spent)."""
        if self._f is None:
            os.makedirs(report_dir(), mode=0o700, exist_ok=True)
            self._f = open(report_path(self.key), "a", buffering=1 << 16)
        self._f.write("error " + " ".join(message.split()) + "\n")

    def flush(self) -> None:
        if self._f is not None:
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


@dataclass
class GuidanceReport:
    """What one guided sequence cost and how far it moved from π_ref (see module docstring)."""

    kl: float = 0.0  # Σ_t KL(π_guided ‖ π_ref) at the sampling temperature, nats
    kl_t1: float = 0.0  # the same at temperature 1
    value_tokens: int = 0  # tokens the value model computed for this sequence
    steps: int = 0  # positions with a record
    per_token_kl: list[float] = field(default_factory=list)  # kl per output position
    error: str | None = None  # set when the worker gave up guiding this sequence

    def info(self) -> dict[str, float | int]:
        return {"kl": self.kl, "kl_t1": self.kl_t1, "value_tokens": self.value_tokens}


def read_report(key: str, num_tokens: int, delete: bool = True) -> GuidanceReport | None:
    """Sum the records of `key` over the first `num_tokens` output positions; None if absent."""
    path = report_path(key)
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return None
    last: dict[int, tuple[float, float]] = {}
    value_tokens = 0
    error = None
    for line in lines:
        if line.startswith("error "):
            error = line[len("error "):]
            continue
        parts = line.split()
        if len(parts) != 4:
            continue  # a torn line (cannot happen after generate returned; be lenient)
        pos = int(parts[0])
        last[pos] = (float(parts[1]), float(parts[2]))
        value_tokens += int(parts[3])
    per = [last.get(i, (0.0, 0.0)) for i in range(num_tokens)]
    rep = GuidanceReport(kl=float(sum(k for k, _ in per)), kl_t1=float(sum(k for _, k in per)),
                         value_tokens=value_tokens, steps=sum(1 for i in range(num_tokens) if i in last),
                         per_token_kl=[k for k, _ in per], error=error)
    if delete:
        try:
            os.remove(path)
        except OSError:
            pass
    return rep
