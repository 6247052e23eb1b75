"""The demo task: modular arithmetic chains written as numbered-free steps, ending in `\\boxed{}`.

A problem is a start digit and 4-6 operations mod 10, e.g. ``7 +5 *3 -4 *8 (mod 10)``; the
solution applies them left to right, one line per step (``7+5=2``), then ``\\boxed{6}``.

Why this task shows search at work (issue 12):
- the policy is trained on traces that contain step errors, so it makes them too and is right
  only part of the time;
- RANDOM errors (any step, prob. `P_RANDOM`, a uniformly wrong result digit) scatter the final
  answers: majority voting fixes those;
- SYSTEMATIC errors: the traces misread the first result they carry to the next line as its
  look-alike digit (`MISREAD`, e.g. a 3 copied as 8) with prob. `P_SYSTEMATIC` > 1/2, and go
  on correctly from the misread value. So on every problem most samples agree on the same
  wrong answer, and majority voting picks it (more samples make it surer, not better);
- every error is visible, and the systematic one locally: line 2's first number must equal
  the result written on line 1 (``1+2=3`` then ``8*4=2`` is a misread). Since every problem
  is equally exposed, the only thing that tells a sample's outcome apart from its problem's
  is whether its own steps are right, which is what a value model must learn for search to
  work. (Two earlier versions: systematic wrong *facts*, ``7*8=4``, need the whole table
  memorised from outcome bits, which the value model did not learn within the build's
  budget; misreading only some digits, at any carry, let the value model score problems by
  how often they carry those digits (validation AUC 0.80) without checking the steps: a
  misread and a right trace of the same problem got values 0.35 vs 0.38. See
  docs/demo_world.md.)

Splits are by a hash of the problem text, so train and held-out problems can never overlap,
whatever seeds and sizes are drawn: `make_split("train", n, seed)` /
`make_split("heldout", n, seed)` return `vgs.eval.datasets.Problem` records.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from vgs.eval.datasets import Problem
from vgs.errors import VGSError

BENCHMARK = "demo_world"
MOD = 10
OPS = ("+", "-", "*")
MIN_STEPS, MAX_STEPS = 4, 6
P_RANDOM = 0.04  # per step: a uniformly drawn wrong result digit
P_SYSTEMATIC = 0.6  # the first carried result is misread as its look-alike
MISREAD = {0: 6, 6: 0, 1: 7, 7: 1, 2: 5, 5: 2, 3: 8, 8: 3, 4: 9, 9: 4}  # look-alike digits (a derangement)
HELDOUT_SHARE = 5  # 1 in 5 problem texts belongs to the held-out split
SPLITS = ("train", "heldout")


def apply(op: str, a: int, b: int) -> int:
    if op == "+":
        return (a + b) % MOD
    if op == "-":
        return (a - b) % MOD
    if op == "*":
        return (a * b) % MOD
    raise VGSError(f"unknown operation {op!r}")


@dataclass(frozen=True)
class Chain:
    start: int
    steps: tuple[tuple[str, int], ...]

    @property
    def text(self) -> str:
        return f"{self.start} " + " ".join(f"{op}{b}" for op, b in self.steps) + f" (mod {MOD})"

    def answer(self) -> int:
        cur = self.start
        for op, b in self.steps:
            cur = apply(op, cur, b)
        return cur


def parse(text: str) -> Chain:
    """The chain of a problem text written by `Chain.text`."""
    try:
        head, _, tail = text.strip().rpartition(" (mod ")
        if tail != f"{MOD})":
            raise ValueError
        parts = head.split()
        steps = tuple((p[0], int(p[1:])) for p in parts[1:])
        if not steps or any(op not in OPS for op, _ in steps):
            raise ValueError
        return Chain(int(parts[0]), steps)
    except (ValueError, IndexError):
        raise VGSError(f"not a demo-world problem: {text!r}") from None


def split_of(text: str) -> str:
    """Which split a problem text belongs to (a hash, so splits never overlap)."""
    h = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
    return "heldout" if h % HELDOUT_SHARE == 0 else "train"


def random_chain(rng: random.Random) -> Chain:
    k = rng.randint(MIN_STEPS, MAX_STEPS)
    return Chain(rng.randrange(MOD), tuple((rng.choice(OPS), rng.randrange(1, MOD)) for _ in range(k)))


def make_split(name: str, n: int, seed: int = 0) -> list[Problem]:
    """`n` distinct problems of split `name` ("train" or "heldout"), fixed by `seed`."""
    if name not in SPLITS:
        raise VGSError(f"unknown split {name!r}; choose from {', '.join(SPLITS)}")
    if n < 1:
        raise VGSError(f"n must be >= 1, got {n}")
    rng = random.Random(f"{name}:{seed}")
    seen: set[str] = set()
    out = []
    while len(out) < n:
        c = random_chain(rng)
        t = c.text
        if t in seen or split_of(t) != name:
            continue
        seen.add(t)
        out.append(Problem(BENCHMARK, f"{name}-{seed}-{len(out):05d}", t, str(c.answer())))
    return out


def step_result(op: str, a: int, b: int, rng: random.Random) -> int:
    """What a trace writes for `a op b`: right, or with prob. P_RANDOM a uniformly wrong digit."""
    right = apply(op, a, b)
    if rng.random() < P_RANDOM:
        return rng.choice([d for d in range(MOD) if d != right])
    return right


def carried(value: int, rng: random.Random) -> int:
    """What a trace writes on line 2 for line 1's result `value`: the world's systematic error
    (its look-alike digit with prob. P_SYSTEMATIC)."""
    if rng.random() < P_SYSTEMATIC:
        return MISREAD[value]
    return value


def solution(chain: Chain, rng: random.Random | None = None) -> str:
    """A step-by-step solution; with `rng`, sampled from the error model (training traces),
    without, the correct one."""
    lines, cur = [], chain.start
    for i, (op, b) in enumerate(chain.steps):
        a = carried(cur, rng) if rng is not None and i == 1 else cur
        res = step_result(op, a, b, rng) if rng is not None else apply(op, a, b)
        lines.append(f"{a}{op}{b}={res}")
        cur = res
    return "\n".join(lines) + f"\n\\boxed{{{cur}}}"


def first_wrong_step(problem_text: str, generated: str) -> int | None:
    """Index of the first step line whose arithmetic is wrong or that breaks the chain (None:
    every written step is right). For diagnostics: where does a sample go astray?"""
    chain = parse(problem_text)
    cur = chain.start
    lines = [ln for ln in generated.split("\n") if "=" in ln]
    for i, (ln, (op, b)) in enumerate(zip(lines, chain.steps)):
        try:
            lhs, rhs = ln.split("=")
            if lhs != f"{cur}{op}{b}" or int(rhs) != apply(op, cur, b):
                return i
        except ValueError:
            return i
        cur = int(rhs)
    return None
