"""Fakes for control-flow unit tests only (every feature also has a real-vLLM test)."""

from __future__ import annotations

import random

from vgs.engine import GenSample

EOS = 151643
MARKER = 7


class FakePolicy:
    """Samples `max_tokens` random ids per request (seeded like vLLM: child i gets seed+i);
    stops early with EOS with probability `p_stop` per block."""

    eos_ids = [EOS]
    num_params = 1000
    max_model_len = 10**6

    def __init__(self, p_stop: float = 0.0, vocab: int = 20, delay=None):
        self.p_stop, self.vocab, self.calls = p_stop, vocab, []
        self.delay = delay  # prompt -> seconds to sleep before answering (scheduling tests)
        self.cancelled = 0

    async def agenerate(self, request, sampling):
        import asyncio

        self.calls.append(request)
        try:
            await asyncio.sleep(self.delay(request.prompt_ids) if self.delay else 0)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return self.generate([request], sampling)[0]

    def generate(self, requests, sampling, progress=False):
        out = []
        for r in requests:
            samples = []
            for i in range(r.n):
                rng = random.Random((r.seed or 0) + i)
                if rng.random() < self.p_stop:
                    k = rng.randint(1, r.max_tokens)
                    samples.append(GenSample([rng.randrange(self.vocab) for _ in range(k - 1)] + [EOS], "stop"))
                else:
                    samples.append(GenSample([rng.randrange(self.vocab) for _ in range(r.max_tokens)], "length"))
            out.append(samples)
        return out


class MarkerScorer:
    """Value = share of MARKER tokens in the sequence: a preference the test knows exactly."""

    num_params = 10
    max_model_len = 10**6

    def __init__(self):
        self.tokens_computed = 0
        self.calls = 0

    def score(self, seqs):
        self.calls += 1
        self.tokens_computed += sum(len(s) for s in seqs)
        return [s.count(MARKER) / len(s) for s in seqs]
