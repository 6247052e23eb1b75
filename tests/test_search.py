"""VGS beam search control flow (fake engines), then through real vLLM."""

from __future__ import annotations

import pytest

from tests.fakes import EOS, MARKER, FakePolicy, MarkerScorer
from vgs.config import SamplingConfig, SearchConfig
from vgs.errors import VGSError
from vgs.search import Engines, derive_seed, run_search
from vgs.search.beam import select


def vgs_cfg(**kw) -> SearchConfig:
    base = dict(method="vgs", budget=4, beam_width=2, block_size=8, trees=1)
    base.update(kw)
    return SearchConfig(**base).validate()


def test_select_rules():
    import random

    vals = [0.1, 0.9, 0.5, 0.9, 0.2, 0.3]
    parents = [0, 0, 1, 1, 2, 2]
    assert select(vals, parents, 3, "global", random.Random(0)) == [1, 3, 2]
    assert select(vals, parents, 3, "per-parent", random.Random(0)) == [1, 3, 5]
    r = select(vals, parents, 3, "random", random.Random(0))
    assert len(set(r)) == 3 and r == select(vals, parents, 3, "random", random.Random(0))


class Recording:
    """Wraps a policy and a scorer, recording every request and every scored sequence, so
    tests check the search against what the engines actually saw and returned."""

    def __init__(self, policy, scorer):
        self.policy, self.scorer = policy, scorer
        self.eos_ids, self.num_params = policy.eos_ids, policy.num_params
        self.max_model_len = policy.max_model_len
        self.requests: list[tuple[list[int], list[list[int]]]] = []  # (prompt, children), in call order
        self.scored: list[tuple[list[int], float]] = []

    async def agenerate(self, request, sampling):
        out = await self.policy.agenerate(request, sampling)
        self.requests.append((list(request.prompt_ids), [s.token_ids for s in out]))
        return out

    @property
    def tokens_computed(self):
        return self.scorer.tokens_computed

    def score(self, seqs):
        vals = self.scorer.score(seqs)
        self.scored.extend((list(s), v) for s, v in zip(seqs, vals))
        return vals


def check_continuation(rec: Recording, prompt: list[int], result) -> int:
    """Independent of `select`, for one problem searched with one tree: every block requested
    after round 0 continues (prompt + beam) a candidate of the previous round, and within each
    round the candidates carried on (continued, or returned as final beams) have values at
    least those of every candidate dropped. Rounds are told apart by length (all live beams
    of round r hold r blocks). Returns the number of rounds."""
    value_of = {tuple(s): v for s, v in rec.scored}
    mine = [(p, children) for p, children in rec.requests if p[: len(prompt)] == prompt]
    rounds: dict[int, list[tuple[list[int], list[list[int]]]]] = {}
    for p, children in mine:
        rounds.setdefault(len(p), []).append((p, children))
    lengths = sorted(rounds)
    assert rounds[lengths[0]] and all(p == prompt for p, _ in rounds[lengths[0]])  # round 0: the bare prompt
    finals = {tuple(prompt + c.token_ids) for c in result.candidates}
    for i, length in enumerate(lengths):
        cands = [p + child for p, children in rounds[length] for child in children]
        nxt = {tuple(p) for p, _ in rounds[lengths[i + 1]]} if i + 1 < len(lengths) else set()
        if i > 0:
            prev = {tuple(p + c) for p, children in rounds[lengths[i - 1]] for c in children}
            assert all(tuple(p) in prev for p, _ in rounds[length]), "a block must continue a previous candidate"
        kept = [f for f in cands if tuple(f) in nxt or tuple(f) in finals]
        dropped = [f for f in cands if f not in kept]
        assert kept, "every round keeps some candidate"
        if dropped:
            assert min(value_of[tuple(f)] for f in kept) >= max(value_of[tuple(f)] for f in dropped)
    return len(lengths)


def test_kept_beams_are_the_high_value_ones():
    sampling = SamplingConfig(max_tokens=24)
    rec = Recording(FakePolicy(), MarkerScorer())
    res = run_search([[1, 2, 3]], [5], Engines(rec, rec), vgs_cfg(budget=4, beam_width=2), sampling)[0]
    assert check_continuation(rec, [1, 2, 3], res) == 3  # 24 tokens in blocks of 8
    assert len(rec.requests) == 3 * 2 and all(len(ch) == 2 for _, ch in rec.requests)  # B = 2 beams, w = 2
    # Final beams: B = N / w = 2, each max_tokens long, values = share of marker tokens of the full sequence.
    assert len(res.candidates) == 2
    for c in res.candidates:
        assert c.num_tokens == 24 and c.finish_reason == "length"
        assert c.value == pytest.approx(([1, 2, 3] + c.token_ids).count(MARKER) / (3 + 24))
    # Guidance helps: VGS beams have more markers than unguided samples of the same policy on average.
    plain = run_search([[1, 2, 3]] * 20, list(range(20)), Engines(FakePolicy(), None),
                       SearchConfig(method="sample", n=2), sampling)
    plain_share = sum(c.token_ids.count(MARKER) for r in plain for c in r.candidates) / (20 * 2 * 24)
    guided = run_search([[1, 2, 3]] * 20, list(range(20)), Engines(FakePolicy(), MarkerScorer()), vgs_cfg(), sampling)
    guided_share = sum(c.token_ids.count(MARKER) for r in guided for c in r.candidates) / (20 * 2 * 24)
    assert guided_share > 1.5 * plain_share


def test_budget_dvts_and_block_caps():
    policy, scorer = FakePolicy(), MarkerScorer()
    sampling = SamplingConfig(max_tokens=20)
    cfg = vgs_cfg(budget=6, beam_width=3, block_size=8, trees=3)
    results = run_search([[1], [2, 2]], [0, 1], Engines(policy, scorer), cfg, sampling)
    for res in results:
        assert len(res.candidates) == 2 * 3  # B beams per tree, pooled over trees
        assert sorted({c.tree for c in res.candidates}) == [0, 1, 2]
        # rounds of 8, 8, 4 tokens: 3 rounds, 2 active beams per tree, 3 children each
        assert [r["round"] for r in res.trace if r["tree"] == 0] == [0, 1, 2]
        assert res.compute.policy_tokens == 3 * 2 * 3 * (8 + 8 + 4)
    # per problem and tree, each round issues one request per active beam with n = w (3 rounds x 2 beams x 3
    # trees x 2 problems), the last round capped at the 4 tokens left
    assert len(policy.calls) == 3 * 2 * 3 * 2 and all(r.n == 3 for r in policy.calls)
    assert sorted(r.max_tokens for r in policy.calls).count(4) == 12
    # scoring calls of all concurrent trees and problems were coalesced into fewer model calls
    assert scorer.calls < 3 * 3 * 2


def test_finished_beams_are_frozen_and_not_rescored():
    policy, scorer = FakePolicy(p_stop=0.5), MarkerScorer()
    sampling = SamplingConfig(max_tokens=40)
    res = run_search([[1, 2]], [3], Engines(policy, scorer), vgs_cfg(budget=8, beam_width=2, block_size=8), sampling)[0]
    stopped = [c for c in res.candidates if c.finish_reason == "stop"]
    assert stopped, "p_stop=0.5 over several rounds should finish some beams on EOS"
    for c in stopped:
        assert c.token_ids[-1] == EOS and c.num_tokens <= 40
    # active counts never grow, and each round scores w candidates per still-active beam
    actives = [r["active"] for r in res.trace]
    assert actives == sorted(actives, reverse=True) and actives[0] == 4
    assert res.compute.value_calls == sum(2 * a for a in actives)
    # a finished beam keeps the value it was selected with: the scorer's value of prompt +
    # its tokens, computed here from the sequence itself (it is never scored again)
    for c in res.candidates:
        assert c.value == pytest.approx(([1, 2] + c.token_ids).count(MARKER) / (2 + c.num_tokens))


def test_deterministic_under_seed():
    sampling = SamplingConfig(max_tokens=24)
    def run(seed):
        return run_search([[4, 5]], [seed], Engines(FakePolicy(0.2), MarkerScorer()), vgs_cfg(trees=2), sampling)[0]

    a, b, c = run(11), run(11), run(12)
    assert [x.token_ids for x in a.candidates] == [x.token_ids for x in b.candidates]
    assert [x.token_ids for x in a.candidates] != [x.token_ids for x in c.candidates]
    assert derive_seed(1, "aime24", "3", 0) == derive_seed(1, "aime24", "3", 0) != derive_seed(1, "aime24", "3", 1)


def test_slow_problem_does_not_delay_a_fast_one():
    """No global round barrier: a problem whose blocks are slow finishes after a fast one that
    needs more rounds, and a cancelled search cancels its in-flight requests."""
    import asyncio
    import time

    from vgs.aio import run_sync
    from vgs.search import search

    policy = FakePolicy(delay=lambda p: 0.3 if p[0] == 1 else 0.0)
    engines = Engines(policy, MarkerScorer())
    sampling = SamplingConfig(max_tokens=32)
    done: list[str] = []

    async def both():
        async def one(name, prompt, cfg):
            await search(prompt, 0, engines, cfg, sampling)
            done.append(name)
        await asyncio.gather(one("slow", [1], vgs_cfg(block_size=32)), one("fast", [2], vgs_cfg(block_size=4)))

    run_sync(both())
    assert done == ["fast", "slow"]  # fast ran 8 rounds while slow ran 1

    async def cancelled():
        task = asyncio.ensure_future(search([1], 0, engines, vgs_cfg(trees=2), sampling))
        await asyncio.sleep(0.05)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return time.monotonic()

    before = policy.cancelled
    run_sync(cancelled())
    assert policy.cancelled - before == 4  # 2 trees x 2 beams in flight, all cancelled


def test_same_results_alone_or_concurrent():
    sampling = SamplingConfig(max_tokens=24)
    cfg = vgs_cfg(trees=2)
    prompts, seeds = [[1, 2], [3], [4, 5, 6]], [7, 8, 9]
    together = run_search(prompts, seeds, Engines(FakePolicy(0.2), MarkerScorer()), cfg, sampling)
    alone = [run_search([p], [s], Engines(FakePolicy(0.2), MarkerScorer()), cfg, sampling)[0]
             for p, s in zip(prompts, seeds)]
    for a, b in zip(together, alone):
        assert [c.token_ids for c in a.candidates] == [c.token_ids for c in b.candidates]
        assert a.compute.value_tokens == b.compute.value_tokens and a.trace == b.trace


def test_registry_and_search_object_parsing():
    from vgs.search.methods import search_config_from_dict
    from vgs.search.methods import METHOD_REGISTRY

    assert set(METHOD_REGISTRY) == {"sample", "majority", "best_of_n", "weighted_majority", "vgs", "qsharp", "cd"}
    cfg = search_config_from_dict({"method": "vgs", "budget": 16, "beam_width": 2, "trees": 2})
    assert (cfg.budget, cfg.trees, METHOD_REGISTRY["vgs"].sequences(cfg)) == (16, 2, 32)
    for bad, param, msg in [({"method": "majority", "beam_width": 4}, "beam_width", "does not apply"),
                            ({"method": "vgs", "budget": 5}, "budget", "multiple of beam width"),
                            ({"method": "nope"}, "method", "unknown method"),
                            ({"method": "qsharp", "eta": float("nan")}, "eta", "must be a number"),
                            ({"method": "vgs", "bogus": 1}, "bogus", "unknown search option"),
                            ({"method": "majority", "n": "4"}, "n", "must be int"),
                            ({"method": "majority", "n": 0}, "n", ">= 1")]:
        with pytest.raises(VGSError, match=msg) as e:
            search_config_from_dict(bad, param_prefix="search.")
        assert e.value.param == "search." + param


def test_config_errors():
    with pytest.raises(VGSError, match="multiple of beam width"):
        SearchConfig(method="vgs", budget=5, beam_width=2).validate()
    with pytest.raises(VGSError, match="unknown selection"):
        SearchConfig(method="vgs", selection="best").validate()
    with pytest.raises(VGSError, match="needs a value model"):
        run_search([[1]], [0], Engines(FakePolicy(), None), vgs_cfg(), SamplingConfig(max_tokens=8))


@pytest.mark.vllm
def test_vgs_through_real_vllm_prefers_known_values(policy_engine):
    """Real engine, known preference: the scorer likes low token ids. Beams kept each round
    are the top values, blocks continue exactly from their beams (checked on the requests
    vLLM actually received), and lengths add up."""

    class LowIdScorer(MarkerScorer):
        def score(self, seqs):
            self.calls += 1
            self.tokens_computed += sum(len(s) for s in seqs)
            return [sum(t < 75000 for t in s[-16:]) / 16 for s in seqs]

    sampling = SamplingConfig(max_tokens=32, temperature=1.0, top_p=1.0)
    prompts = [policy_engine.tokenizer("1+1=", add_special_tokens=False)["input_ids"], [151646, 151644, 100, 200]]
    cfg = vgs_cfg(budget=4, beam_width=2, block_size=16, trees=2)
    res = run_search(prompts, [0, 1], Engines(policy_engine, LowIdScorer()), cfg, sampling)
    again = run_search(prompts, [0, 1], Engines(policy_engine, LowIdScorer()), cfg, sampling)
    # one tree per problem, so "kept ≥ dropped" holds per problem on what vLLM returned
    rec = Recording(policy_engine, LowIdScorer())
    one = run_search(prompts, [0, 1], Engines(rec, rec), vgs_cfg(budget=4, beam_width=2, block_size=16), sampling)
    for prompt, r in zip(prompts, one):
        assert check_continuation(rec, prompt, r) >= 1
    for r, r2 in zip(res, again):
        assert len(r.candidates) == 4
        assert [c.token_ids for c in r.candidates] == [c.token_ids for c in r2.candidates]
        for c in r.candidates:
            assert c.num_tokens <= 32 and (c.finish_reason == "stop" or c.num_tokens == 32)


def test_admission_by_live_sequences():
    """Weighted FIFO admission: a VGS search weighs budget x trees; waiting work beyond the
    queue limit is refused (the server's 429); a cancelled waiter leaves no trace."""
    import asyncio

    from vgs.aio import run_sync
    from vgs.runtime import Admission, Busy

    async def scenario():
        adm = Admission(8, max_queued=4)
        a = await adm.acquire(6)
        assert adm.in_use == 6 and adm.would_refuse(5) is True and adm.would_refuse(2) is False
        waiter = asyncio.ensure_future(adm.acquire(4))  # does not fit: queued
        await asyncio.sleep(0)
        assert adm.queued == 4 and not waiter.done()
        with pytest.raises(Busy):
            await adm.acquire(1)  # queue full
        adm.release(a)
        assert await waiter == 4 and adm.in_use == 4 and adm.queued == 0
        adm.release(4)
        big = await adm.acquire(100)  # heavier than the limit: admitted alone, clamped
        assert big == 8 and adm.in_use == 8
        late = asyncio.ensure_future(adm.acquire(2))
        await asyncio.sleep(0)
        late.cancel()
        await asyncio.gather(late, return_exceptions=True)
        adm.release(big)
        assert adm.in_use == 0 and adm.queued == 0

    run_sync(scenario())


def test_value_batcher_coalesces_and_attributes_cost():
    import asyncio

    from vgs.aio import run_sync
    from vgs.batcher import ValueBatcher

    class CostScorer(MarkerScorer):
        def __init__(self):
            super().__init__()
            self.batches = []

        def score_with_cost(self, seqs):
            self.batches.append(len(seqs))
            return self.score(seqs), [len(s) - 1 for s in seqs]  # pretend 1 token was cached

    async def scenario():
        sc = CostScorer()
        b = ValueBatcher(sc, max_batch=100, max_wait_ms=20)
        dropped = asyncio.ensure_future(b.score([[9] * 50]))
        calls = [b.score([[MARKER] * k + [1]] * 2) for k in range(1, 6)]
        await asyncio.sleep(0)
        dropped.cancel()
        out = await asyncio.gather(*calls)
        assert sc.batches == [10]  # five concurrent calls, one model call; the cancelled one dropped
        for k, scores in enumerate(out, start=1):
            assert [s.computed_tokens for s in scores] == [k, k]
            assert scores[0].value == pytest.approx(k / (k + 1))
        b.close()

    run_sync(scenario())


def test_score_async_awaits_an_async_scorer_directly():
    """An async scorer (the vLLM one) is awaited on the caller's task, with no batcher or
    thread in between, so cancelling the search reaches its model call; no scorer is a VGSError."""
    import asyncio

    from vgs.aio import run_sync
    from vgs.batcher import Score, score_async
    from vgs.errors import VGSError

    class AsyncScorer:
        def __init__(self):
            self.started, self.cancelled = asyncio.Event(), 0

        async def ascore(self, seqs):
            self.started.set()
            if seqs == [[1]]:
                return [Score(0.5, 1)]
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise

    async def scenario():
        sc = AsyncScorer()
        assert await score_async(sc, [[1]]) == [Score(0.5, 1)]
        sc.started.clear()
        task = asyncio.ensure_future(score_async(sc, [[2]]))
        await sc.started.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert sc.cancelled == 1 and getattr(sc, "_vgs_batcher", None) is None
        with pytest.raises(VGSError, match="needs a value model"):
            await score_async(None, [[1]])

    run_sync(scenario())


def test_lengths_checked_against_every_model_the_method_reads(tmp_path):
    """Admission refuses prompt + max_tokens past the policy's context, the scorer's context
    (scored methods) and the in-worker guidance model's positions (Q♯/CD), before any work."""
    import json

    from tests.fakes import FakePolicy, MarkerScorer
    from vgs.config import SamplingConfig, SearchConfig
    from vgs.errors import VGSError
    from vgs.search import Engines, check_lengths

    vm = tmp_path / "vm"
    vm.mkdir()
    (vm / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForClassifier"], "vocab_size": 100,
                                                "max_position_embeddings": 256}))
    policy, scorer = FakePolicy(), MarkerScorer()
    policy.max_model_len, scorer.max_model_len = 1024, 512
    engines = Engines(policy=policy, value=scorer, value_model=str(vm))
    cases = [  # (method, prompt, max_tokens, error fragment or None)
        ("qsharp", 200, 56, None), ("qsharp", 200, 57, "guidance value model's context of 256"),
        ("cd", 10, 300, "guidance value model's context of 256"),
        ("vgs", 200, 312, None), ("vgs", 200, 313, "value model's context of 512"),
        ("majority", 200, 824, None), ("majority", 200, 825, "policy's context of 1024"),
    ]
    for method, prompt, max_tokens, error in cases:
        sampling = SamplingConfig(max_tokens=max_tokens)
        cfg = SearchConfig(method=method, budget=2, beam_width=2) if method == "vgs" else SearchConfig(method=method)
        if error is None:
            check_lengths(prompt, engines, cfg, sampling)
        else:
            with pytest.raises(VGSError, match=error):
                check_lengths(prompt, engines, cfg, sampling)
