"""Q♯ / CD guidance: the offset core, the cached in-worker value model, both logits-processor
adapters (V1 with synthetic batch updates, MRV2 with a synthetic context), and end to end
through the session's real vLLM policy engine."""

from __future__ import annotations

import math
import os
import uuid
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vgs.guidance import offsets as core
from vgs.guidance.params import parse_guide_params


def closed_form(p: float, eta: float) -> float:
    """log E[exp(Z/η)] for Z ~ Bernoulli(p), written directly (not the softplus form)."""
    return math.log(1 - p + p * math.exp(1 / eta))


# ---------------------------------------------------------------------------------------
# The offset core
# ---------------------------------------------------------------------------------------

def test_qsharp_offsets_match_closed_form_and_table():
    ps = [0.0, 0.001, 0.01, 0.1, 0.5, 0.9, 1.0]
    for eta in (1.0, 0.5, 0.1, 0.02):
        got = core.compute_offsets(core.CandidateScores.from_probs(torch.tensor([ps], dtype=torch.float64)), eta)
        want = [closed_form(p, eta) for p in ps]
        assert got[0].tolist() == pytest.approx(want, abs=2e-5)
    # The spec's table (η = 0.1): p = 0.01 → 5.40, p = 0.5 → 9.31.
    t = core.compute_offsets(core.CandidateScores.from_probs(torch.tensor([[0.01, 0.5]])), 0.1)[0]
    assert t.tolist() == pytest.approx([5.40, 9.31], abs=0.01)


def test_two_stage_top_k_equals_torch_topk():
    g = torch.Generator().manual_seed(9)
    for vocab in (151936, 151937, 3000, 50):
        for k in (1, 20, 50):
            x = torch.randn(3, vocab, generator=g)
            x[0] = float("-inf")
            x[0, 7] = 0.0  # one finite entry, ties among the rest
            got, want = core.top_k_candidates(x, k), torch.topk(x, k).indices
            assert torch.equal(x.gather(1, got), x.gather(1, want)), (vocab, k)
            assert torch.equal(got[1:], want[1:])


def test_guided_distribution_equals_formula():
    """softmax(logits + offsets) is π_ref · E[exp(Z/η)] renormalised, per row, with per-row η."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 2
    k = 6
    cand = core.top_k_candidates(logits, k)
    p = torch.rand(3, k, generator=g)
    etas = [0.1, 0.5, 2.0]
    offs = core.compute_offsets(core.CandidateScores.from_probs(p), etas, ["qsharp"] * 3)
    guided = torch.softmax(core.add_offsets(logits.clone(), cand, offs), -1)
    ref = torch.softmax(logits.double(), -1)
    for b in range(3):
        w = ref[b].clone()
        for j in range(k):
            w[cand[b, j]] *= 1 - p[b, j].item() + p[b, j].item() * math.exp(1 / etas[b])
        assert torch.allclose(guided[b].double(), w / w.sum(), atol=1e-6)
        untouched = torch.ones(50, dtype=torch.bool)
        untouched[cand[b]] = False  # non-candidates keep their relative odds
        assert torch.allclose((guided[b] / ref[b])[untouched].double(), (guided[b] / ref[b])[untouched][0].double(),
                              rtol=1e-4)


def test_temperature_applies_after_the_offset():
    """The algebra of tempering offset logits: softmax((ℓ + offset)/T) ∝ π_ref^{1/T} · exp(offset/T).
    It is not a check of vLLM: that vLLM tempers after the processor is its sampler's order
    (docs/guidance.md, "Temperature after the offset")."""
    logits = torch.randn(1, 30, generator=torch.Generator().manual_seed(1))
    cand = core.top_k_candidates(logits, 4)
    offs = core.compute_offsets(core.CandidateScores.from_probs(torch.tensor([[0.9, 0.5, 0.1, 0.0]])), 0.2)
    t = 0.6
    sampled = torch.softmax(core.add_offsets(logits.clone(), cand, offs) / t, -1)
    w = torch.softmax(logits / t, -1)[0].clone()
    w[cand[0]] *= torch.exp(offs[0] / t)
    assert torch.allclose(sampled[0], w / w.sum(), atol=1e-6)


def test_large_eta_gives_reference_back():
    logits = torch.randn(2, 40, generator=torch.Generator().manual_seed(2))
    cand = core.top_k_candidates(logits, 10)
    p = torch.rand(2, 10, generator=torch.Generator().manual_seed(3))
    for method in ("qsharp", "cd"):
        offs = core.compute_offsets(core.CandidateScores.from_probs(p), 1e6, method)
        guided = torch.softmax(core.add_offsets(logits.clone(), cand, offs), -1)
        assert torch.allclose(guided, torch.softmax(logits, -1), atol=1e-6)
    # ... and a small η does move it (the check above can fail).
    offs = core.compute_offsets(core.CandidateScores.from_probs(p), 0.1)
    assert (torch.softmax(core.add_offsets(logits.clone(), cand, offs), -1) - torch.softmax(logits, -1)).abs().max() > 0.05


def test_histogram_and_cd_forms():
    g = torch.Generator().manual_seed(4)
    atoms = torch.linspace(0, 1, 11)
    hist = torch.softmax(torch.randn(2, 5, 11, generator=g), -1)
    scores = core.CandidateScores(atom_logprobs=hist.log(), atoms=atoms)
    eta = 0.25
    got = core.compute_offsets(scores, eta, "qsharp")
    want = torch.log((hist.double() * torch.exp(atoms.double() / eta)).sum(-1))  # log E[exp(Z/η)]
    assert torch.allclose(got.double(), want, atol=1e-5)
    assert torch.allclose(core.compute_offsets(scores, eta, "cd").double(), (hist.double() * atoms).sum(-1) / eta,
                          atol=1e-5)
    # A two-atom histogram {0, 1} is the Bernoulli model.
    p = torch.rand(2, 5, generator=g)
    two = core.CandidateScores(atom_logprobs=torch.stack([1 - p, p], -1).log(), atoms=torch.tensor([0.0, 1.0]))
    assert torch.allclose(core.compute_offsets(two, eta), core.compute_offsets(core.CandidateScores.from_probs(p), eta)
                          .float(), atol=1e-5)
    # CD: p / η, per-row methods mix.
    cd = core.compute_offsets(core.CandidateScores.from_probs(p), [0.5, 2.0], ["cd", "qsharp"])
    assert torch.allclose(cd[0].double(), p[0].double() / 0.5, atol=1e-6)
    assert cd[1].tolist() == pytest.approx([closed_form(x, 2.0) for x in p[1].tolist()], abs=1e-5)


@pytest.mark.parametrize("temp", [1.0, 0.7])
def test_guided_kl_matches_brute_force(temp):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 64, generator=g) * 3
    cand = core.top_k_candidates(logits, 8)
    offs = core.compute_offsets(core.CandidateScores.from_probs(torch.rand(3, 8, generator=g)), 0.1)
    valid = torch.ones(3, 8, dtype=torch.bool)
    valid[2, 5:] = False  # a row with k = 5 in a k = 8 batch
    kl = core.guided_kl(logits, cand, offs, temp, valid)
    ref_lp = torch.log_softmax(logits.double() / temp, -1)
    gl = core.add_offsets(logits.clone().double(), cand, offs.double(), valid)
    g_lp = torch.log_softmax(gl / temp, -1)
    want = (g_lp.exp() * (g_lp - ref_lp)).sum(-1)
    assert kl.double().tolist() == pytest.approx(want.tolist(), rel=1e-4, abs=1e-6)
    assert (want > 0.01).all()


# ---------------------------------------------------------------------------------------
# Parameters (what validate_params enforces)
# ---------------------------------------------------------------------------------------

def test_params_validation(tiny_value, tiny_policy):
    ok = {"vgs_guidance": "qsharp", "vgs_value_model": tiny_value}
    p = parse_guide_params(ok)
    assert (p.method, p.eta, p.top_k) == ("qsharp", 0.1, 20)
    p = parse_guide_params({**ok, "vgs_guidance": "cd", "vgs_eta": "0.5", "vgs_top_k": "7", "vgs_report_key": "a-1"})
    assert (p.method, p.eta, p.top_k, p.report_key) == ("cd", 0.5, 7, "a-1")
    assert parse_guide_params(None) is None and parse_guide_params({"other": 1}) is None
    bad = [
        ({**ok, "vgs_guidance": "beam"}, "vgs_guidance"),
        ({**ok, "vgs_eta": 0}, "vgs_eta"),
        ({**ok, "vgs_eta": -1.0}, "vgs_eta"),
        ({**ok, "vgs_eta": "nan"}, "vgs_eta"),
        ({**ok, "vgs_eta": "x"}, "vgs_eta"),
        ({**ok, "vgs_top_k": 0}, "vgs_top_k"),
        ({**ok, "vgs_top_k": 2.5}, "vgs_top_k"),
        ({**ok, "vgs_top_k": 151937}, "vocabulary"),
        ({"vgs_guidance": "qsharp"}, "vgs_value_model"),
        ({**ok, "vgs_value_model": "/nonexistent/vm"}, "neither a local directory"),
        ({**ok, "vgs_value_model": tiny_policy}, "not a value model"),
        ({**ok, "vgs_report_key": "../etc/x"}, "vgs_report_key"),
        ({"vgs_eta": 0.1}, "without vgs_guidance"),
    ]
    for args, msg in bad:
        with pytest.raises(ValueError, match=msg):
            parse_guide_params(args)
    with pytest.raises(ValueError, match="n=1"):
        parse_guide_params({**ok, "vgs_report_key": "k"}, n=4)


# ---------------------------------------------------------------------------------------
# The in-worker value model
# ---------------------------------------------------------------------------------------

def hf_success_logits(hf, seq: list[int], cands: list[int]) -> torch.Tensor:
    """ℓ = log p − log(1 − p) of prefix + c for each candidate, by full HF forwards."""
    from vgs.modeling import success_probs

    out = []
    with torch.no_grad():
        for c in cands:
            logits = hf(input_ids=torch.tensor([seq + [c]])).logits[0, -1]
            p = success_probs(logits).double()
            out.append(float(torch.log(p) - torch.log1p(-p)))
    return torch.tensor(out, dtype=torch.float64)


@pytest.fixture(scope="module")
def value_hf(tiny_value):
    from vgs.modeling import load_value_model

    return load_value_model(tiny_value)


@pytest.mark.parametrize("page_size", [64, 4])
def test_cached_value_model_matches_full_forwards(tiny_value, value_hf, page_size):
    from vgs.guidance.worker_model import CachedValueModel

    m = CachedValueModel(tiny_value, page_size=page_size)  # 4: rows span many pages
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 151000, (n,), generator=g).tolist() for n in (5, 17, 1)]
    rows = [m.alloc_row() for _ in seqs]
    for step in range(4):
        cands = torch.randint(0, 151000, (len(rows), 5), generator=g)
        news = [s[m.lens[r]:] for r, s in zip(rows, seqs)]
        got = m.score(rows, news, cands).success_logit.double()
        for i, s in enumerate(seqs):
            want = hf_success_logits(value_hf, s, cands[i].tolist())
            assert torch.allclose(got[i], want, atol=2e-4), (step, i)
            assert want.std() > 1e-3  # candidates really get different values
            s.append(int(cands[i, step % 5]))
        if step == 1:
            seqs[0].extend([11, 12, 13])  # several new tokens in one step (forward A)
            m.free_row(rows[2])  # a request leaves; its row is reused by a new one
            rows[2] = m.alloc_row()
            assert m.lens[rows[2]] == 0
            seqs[2] = torch.randint(0, 151000, (9,), generator=g).tolist()
    assert m.tokens_computed > 0
    for r in rows:  # every page comes back when the requests end
        m.free_row(r)
    assert m.pages_in_use == 0


def test_new_pool_fits_what_the_budget_allows(tiny_value):
    """A fresh pool sized for exactly the pages asked for must still hold them all: page 0 is
    padding and never handed out (regression: the first 4 x 256-token rows failed one row
    with "budget exhausted" under an 8 GiB budget)."""
    from vgs.guidance.worker_model import CachedValueModel

    m = CachedValueModel(tiny_value, page_size=64, budget_gib=8.0)
    rows = [m.alloc_row() for _ in range(4)]
    m.reserve(rows, [256] * 4)  # 16 pages on an empty pool
    assert [len(m.pages[r]) for r in rows] == [4] * 4 and m.pages_in_use == 16
    m.reserve(rows, [300] * 4)  # growing an existing pool
    assert m.pages_in_use == 20


def test_feed_from_token_table_matches_host_lists():
    """The MRV2 feed gathered from a device token table equals the host-list feed."""
    from vgs.guidance.worker_model import Feed

    table = torch.arange(40).reshape(4, 10)
    spans = [(2, 3, 7), (0, 9, 10), (3, 0, 4)]  # (slot, start, end)
    dev = Feed.from_token_table(table, spans)
    host = Feed.from_lists([table[s, a:b].tolist() for s, a, b in spans])
    assert dev.lengths == host.lengths == [4, 1, 4]
    assert torch.equal(dev.last_ids(), host.last_ids())
    assert torch.equal(dev.prefix_ids([0, 2], 3), host.prefix_ids([0, 2], 3))
    sub = dev.select([2, 0])
    assert sub.lengths == [4, 4] and torch.equal(sub.prefix_ids([0, 1], 3), host.select([2, 0]).prefix_ids([0, 1], 3))


def test_guidance_kv_budget_fails_one_request_not_the_batch(tiny_value, value_hf, tmp_path, monkeypatch):
    """A 5-page budget (4 usable pages of 64 tokens): a second 150-token request cannot fit.
    It alone is ended (only its stop token stays possible) with the error in its report; the
    first is guided exactly; once requests end their pages are free for the next one."""
    from vllm.v1.sample.logits_processor import BatchUpdate

    from vgs.guidance.report import read_report
    from vgs.guidance.v1_processor import QSharpV1Processor

    monkeypatch.setenv("VGS_GUIDANCE_REPORT_DIR", str(tmp_path))
    page_bytes = 2 * 2 * 1 * 64 * 64 * 4  # (k, v) x layers x kv heads x page x head dim x fp32
    cfg = SimpleNamespace(additional_config={"vgs_guidance_kv_gib": 5 * page_bytes / 2**30})
    proc = QSharpV1Processor(cfg, torch.device("cpu"), False)
    g = torch.Generator().manual_seed(11)
    V = value_hf.config.vocab_size
    eos = 151643

    def params(key):
        p = sp(tiny_value, vgs_report_key=key)
        p.stop_token_ids = [eos]
        p._all_stop_token_ids = {eos}
        return p

    prompts = {n: torch.randint(0, 150000, (150,), generator=g).tolist() for n in "abc"}
    outs = {n: [] for n in prompts}
    proc.update_state(BatchUpdate(2, removed=[], moved=[], added=[
        (0, params("a"), prompts["a"], outs["a"]), (1, params("b"), prompts["b"], outs["b"])]))
    model = proc.entries[0].req.model
    assert model.max_pages == 5
    for _ in range(2):
        logits = torch.randn(2, V, generator=g)
        before = logits.clone()
        after = proc.apply(logits)
        check_rows(before[:1], after[:1], {0: expected_delta(value_hf, prompts["a"] + outs["a"], before[0])})
        assert after[1, eos] == 0 and torch.isinf(after[1]).sum() == V - 1  # b is ended: stop token only
        outs["a"].append(int(torch.randint(0, 150000, (1,), generator=g)))
        outs["b"].append(eos)
    assert model.pages_in_use == 3  # a's 151-152 tokens; b holds nothing
    rep_b = read_report("b", 2)
    assert rep_b.error and "guidance KV budget exhausted" in rep_b.error and "--guidance-kv-gib" in rep_b.error
    assert read_report("a", 2).error is None
    proc.update_state(BatchUpdate(0, removed=[0, 1], moved=[], added=[]))
    assert model.pages_in_use == 0
    proc.update_state(BatchUpdate(1, removed=[], moved=[], added=[(0, params("c"), prompts["c"], outs["c"])]))
    logits = torch.randn(1, V, generator=g)
    before = logits.clone()
    check_rows(before, proc.apply(logits), {0: expected_delta(value_hf, prompts["c"], before[0])})


def test_cached_value_model_histogram_head(tiny_value, value_hf):
    """A histogram head (atoms on [0, 1]) yields log-probabilities over the atoms."""
    from vgs.guidance.worker_model import CachedValueModel

    atoms = torch.tensor([0.0, 0.5, 1.0])
    m = CachedValueModel(tiny_value, histogram_atoms=atoms)
    seq, cands = [3, 14, 15, 92], [65, 35, 89]
    got = m.score([m.alloc_row()], [seq], torch.tensor([cands]))
    with torch.no_grad():
        want = torch.stack([torch.log_softmax(value_hf(input_ids=torch.tensor([seq + [c]])).logits[0, -1], -1)
                            for c in cands])
    assert got.success_logit is None and torch.allclose(got.atom_logprobs[0], want, atol=1e-5)
    offs = core.compute_offsets(got, 0.1)[0].double()
    direct = torch.log((want.double().exp() * torch.exp(atoms.double() / 0.1)).sum(-1))
    assert torch.allclose(offs, direct, atol=1e-4)


def test_processor_class_path(monkeypatch):
    from vgs.guidance.processor import detect_runner, processor_class_path

    assert processor_class_path() == "vgs.guidance.processor:GuidanceProcessor"
    assert processor_class_path("mrv2") == "vgs.guidance.mrv2_processor:QSharpMRV2Processor"
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    assert detect_runner() == "v1" and processor_class_path(None) == "vgs.guidance.v1_processor:QSharpV1Processor"
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    assert detect_runner() == "mrv2"
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER")
    assert detect_runner() == ("mrv2" if torch.cuda.is_available() else "v1")
    with pytest.raises(ValueError):
        processor_class_path("v3")


# ---------------------------------------------------------------------------------------
# The adapters (no engine): V1 with synthetic batch updates, MRV2 with a synthetic context
# ---------------------------------------------------------------------------------------

def sp(tiny_value, **extra):
    from vllm import SamplingParams

    args = {"vgs_guidance": "qsharp", "vgs_value_model": tiny_value, "vgs_eta": 0.3, "vgs_top_k": 5}
    args.update(extra)
    return SamplingParams(temperature=1.0, extra_args={k: v for k, v in args.items() if v is not None})


def expected_delta(value_hf, seq, row, eta=0.3, k=5, method="qsharp"):
    """Dense offsets a guided row must receive: top-k of its raw logits, scored by full HF
    forwards of seq + candidate."""
    cand = torch.topk(row, k).indices
    ell = hf_success_logits(value_hf, seq, cand.tolist())
    offs = core.compute_offsets(core.CandidateScores(success_logit=ell[None]), eta, method)[0]
    d = torch.zeros_like(row, dtype=torch.float64)
    d[cand] = offs.double()
    return d


def check_rows(logits_before, logits_after, expected: dict[int, torch.Tensor]):
    for r in range(logits_before.shape[0]):
        delta = (logits_after[r] - logits_before[r]).double()
        if r in expected:
            assert torch.allclose(delta, expected[r], atol=2e-4), r
            assert expected[r].abs().max() > 0.1
        else:
            assert torch.equal(logits_after[r], logits_before[r]), r  # unguided rows bit-identical


def test_v1_adapter_batch_updates(tiny_value, value_hf):
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    from vgs.guidance.v1_processor import QSharpV1Processor

    proc = QSharpV1Processor(None, torch.device("cpu"), False)
    g = torch.Generator().manual_seed(7)
    V = value_hf.config.vocab_size
    prompts = {n: torch.randint(0, 150000, (ln,), generator=g).tolist() for n, ln in (("a", 6), ("b", 3), ("c", 4))}
    outs = {n: [] for n in prompts}
    # a, b guided (b is CD), c plain; batch indices 0, 1, 2.
    proc.update_state(BatchUpdate(3, removed=[], moved=[], added=[
        (0, sp(tiny_value), prompts["a"], outs["a"]),
        (1, sp(tiny_value, vgs_guidance="cd"), prompts["b"], outs["b"]),
        (2, SamplingParams(temperature=1.0), prompts["c"], outs["c"])]))
    order = ["a", "b", "c"]
    methods = {"a": "qsharp", "b": "cd"}

    def step(order):
        logits = torch.randn(len(order), V, generator=g)
        before = logits.clone()
        after = proc.apply(logits)
        exp = {i: expected_delta(value_hf, prompts[n] + outs[n], before[i], method=methods[n])
               for i, n in enumerate(order) if n in methods}
        check_rows(before, after, exp)
        for n in order:  # vLLM appends the sampled token to the live output lists
            outs[n].append(int(torch.randint(0, 150000, (1,), generator=g)))

    step(order)
    step(order)
    proc.update_state(None)
    step(order)
    # Swap a <-> c, then b finishes and c moves down into its index (condense).
    proc.update_state(BatchUpdate(3, removed=[], added=[], moved=[(0, 2, MoveDirectionality.SWAP)]))
    order = ["c", "b", "a"]
    step(order)
    row_b = proc.entries[1].req.row
    proc.update_state(BatchUpdate(2, removed=[1], added=[], moved=[(2, 1, MoveDirectionality.UNIDIRECTIONAL)]))
    assert row_b in proc.entries[1].req.model._free  # b's cache row was freed
    order = ["c", "a"]
    step(order)
    # Preemption: a leaves, comes back with its partial output, re-fed from scratch.
    proc.update_state(BatchUpdate(1, removed=[1], added=[], moved=[]))
    assert not proc.entries
    proc.update_state(BatchUpdate(2, removed=[], moved=[], added=[(1, sp(tiny_value), prompts["a"], outs["a"])]))
    assert proc.entries[1].req.fed == 0
    step(order)
    assert proc.entries[1].req.fed == len(prompts["a"]) + len(outs["a"]) - 1
    # A step whose sample was discarded (no new token): scored again from the same prefix.
    logits = torch.randn(2, V, generator=g)
    first = proc.apply(logits.clone())
    second = proc.apply(logits.clone())
    assert torch.equal(first, second)
    check_rows(logits, second, {1: expected_delta(value_hf, prompts["a"] + outs["a"], logits[1])})


def mrv2_state(max_reqs=6, max_len=64):
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcRequestState

    return LogitsProcRequestState(
        device=torch.device("cpu"), max_num_reqs=max_reqs, vocab_size=151936,
        all_token_ids=SimpleNamespace(gpu=torch.zeros(max_reqs, max_len, dtype=torch.int32)),
        prompt_len=SimpleNamespace(np=np.zeros(max_reqs, dtype=np.int32)),
        prefill_len=SimpleNamespace(np=np.zeros(max_reqs, dtype=np.int32)),
        total_len=SimpleNamespace(gpu=torch.zeros(max_reqs, dtype=torch.int32)))


def mrv2_ctx(slots: list[int], seq_lens: list[int]):
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext

    idx = torch.tensor(slots, dtype=torch.int32)
    return LogitsContext(expanded_idx_mapping=idx, idx_mapping=idx, idx_mapping_np=np.array(slots, dtype=np.int32),
                         expanded_local_pos=torch.zeros(len(slots), dtype=torch.int32), input_ids=idx,
                         pos=torch.tensor(seq_lens) - 1, seq_lens_upper_bound_np=np.array(seq_lens, dtype=np.int32))


def test_v1_adapter_rows_with_their_own_top_k_and_eta(tiny_value, value_hf):
    """Rows of one step with different top-k and eta: each row gets exactly its own k offsets
    (the batch's candidates past a row's k get none) at its own eta. This is the path where
    `Guide` builds its candidate mask; the usual one (one k and eta for all) builds none."""
    from vllm.v1.sample.logits_processor import BatchUpdate

    from vgs.guidance.v1_processor import QSharpV1Processor

    proc = QSharpV1Processor(None, torch.device("cpu"), False)
    g = torch.Generator().manual_seed(5)
    V = value_hf.config.vocab_size
    prompts = {n: torch.randint(0, 150000, (ln,), generator=g).tolist() for n, ln in (("a", 5), ("b", 8))}
    outs = {n: [] for n in prompts}
    params = {"a": (5, 0.3), "b": (2, 0.7)}  # (top-k, eta)
    proc.update_state(BatchUpdate(2, removed=[], moved=[], added=[
        (i, sp(tiny_value, vgs_top_k=params[n][0], vgs_eta=params[n][1]), prompts[n], outs[n])
        for i, n in enumerate(params)]))
    for _ in range(2):
        logits = torch.randn(2, V, generator=g)
        before = logits.clone()
        after = proc.apply(logits)
        exp = {i: expected_delta(value_hf, prompts[n] + outs[n], before[i], eta=params[n][1], k=params[n][0])
               for i, n in enumerate(params)}
        check_rows(before, after, exp)
        assert [int((after[i] != before[i]).sum()) for i in range(2)] == [5, 2]
        for n in outs:
            outs[n].append(int(torch.randint(0, 150000, (1,), generator=g)))


def test_mrv2_adapter_synthetic_context(tiny_value, value_hf):
    from vllm import SamplingParams

    from vgs.guidance.mrv2_processor import QSharpMRV2Processor
    from vgs.guidance.processor import GuidanceProcessor

    st = mrv2_state()
    proc = QSharpMRV2Processor(None, st)
    g = torch.Generator().manual_seed(8)
    V = value_hf.config.vocab_size
    seqs: dict[int, list[int]] = {}

    def admit(slot, params, tokens, prompt_len=None):
        seqs[slot] = list(tokens)
        st.all_token_ids.gpu[slot, : len(tokens)] = torch.tensor(tokens)
        st.prompt_len.np[slot] = prompt_len or len(tokens)
        st.prefill_len.np[slot] = len(tokens)
        return proc.add_request(slot, params)

    def step(slots, guided, seq_lens=None):
        seq_lens = seq_lens or [len(seqs[s]) for s in slots]
        logits = torch.randn(len(slots), V, generator=g)
        before = logits.clone()
        after = proc.apply(logits, mrv2_ctx(slots, seq_lens))
        exp = {i: expected_delta(value_hf, seqs[s][: seq_lens[i]], before[i]) for i, s in enumerate(slots)
               if s in guided and seq_lens[i] >= st.prefill_len.np[s]}
        check_rows(before, after, exp)
        for i, s in enumerate(slots):  # post_update: the sampled token is committed
            if seq_lens[i] >= st.prefill_len.np[s]:
                t = int(torch.randint(0, 150000, (1,), generator=g))
                st.all_token_ids.gpu[s, len(seqs[s])] = t
                seqs[s].append(t)

    rand = lambda n: torch.randint(0, 150000, (n,), generator=g).tolist()  # noqa: E731
    assert admit(3, sp(tiny_value), rand(5)) is True
    assert admit(0, SamplingParams(temperature=1.0), rand(4)) is False
    assert admit(1, sp(tiny_value), rand(7)) is True
    step([1, 0, 3], {1, 3})
    step([3, 1, 0], {1, 3})  # rows reordered: rows are not slots
    # Slot 1's request finished; the slot is recycled by an unguided, then a guided request.
    row_1 = proc.slots[1].row
    assert admit(1, SamplingParams(temperature=1.0), rand(3)) is False
    assert row_1 in proc.slots[3].model._free
    step([0, 1, 3], {3})
    assert admit(1, sp(tiny_value), rand(6)) is True
    assert proc.slots[1].fed == 0
    step([1, 3], {1, 3})
    # Chunked prefill: a 10-token prompt computed in two chunks; the first row is skipped.
    admit(4, sp(tiny_value), rand(10))
    step([4, 3], {3, 4}, seq_lens=[6, len(seqs[3])])
    assert proc.slots[4].fed == 0
    step([4, 3], {3, 4})
    # Preemption: slot 3's request resumes in slot 5 with prompt + partial output prefilled.
    prompt_len = int(st.prompt_len.np[3])
    assert admit(5, sp(tiny_value), seqs[3], prompt_len=prompt_len) is True
    step([5, 4], {5, 4})
    # The dual class works under both constructor signatures.
    assert isinstance(GuidanceProcessor(None, mrv2_state()).slots, dict)
    assert isinstance(GuidanceProcessor(None, torch.device("cpu"), False).entries, dict)


# ---------------------------------------------------------------------------------------
# End to end through the session's vLLM policy engine (guidance processor loaded)
# ---------------------------------------------------------------------------------------

def make_marker_value(path: str, tokenizer_dir: str, marker: int, p_marker: float, p_other: float) -> str:
    """A real-format value model whose success probability is exactly `p_marker` when the last
    token is `marker` and `p_other` otherwise: attention and MLP outputs are zeroed, so the
    last hidden state is norm(embedding of the last token), and the head reads one coordinate."""
    from vgs.modeling import load_value_model
    from vgs.tiny import make_tiny

    make_tiny("value", tokenizer_dir, path, layers=1, hidden=128, seed=3, num_labels=1)
    m = load_value_model(path)
    h = m.config.hidden_size
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = m.model.embed_tokens.weight
        emb.zero_()
        emb[:, 1] = 1.0
        emb[marker, 1] = 0.0
        emb[marker, 0] = 1.0
        m.model.norm.weight.fill_(1.0)
        m.score[0].weight.copy_(torch.eye(h))
        w = torch.zeros(1, h)
        w[0, 0], w[0, 1] = logit(p_marker) / math.sqrt(h), logit(p_other) / math.sqrt(h)
        m.score[2].weight.copy_(w)
        got = m(input_ids=torch.tensor([[5, 6, marker, 7, marker]])).logits[0, -3:, 0]
    assert got.tolist() == pytest.approx([logit(p_marker), logit(p_other), logit(p_marker)], rel=1e-3)
    m.save_pretrained(path)
    return path


PROMPT = list(range(2000, 2032))


def top_k_logprobs(lps: dict[int, float], k: int) -> dict[int, float]:
    """π_ref's top-k at one position from vLLM's returned raw logprobs (top-k + the sampled token)."""
    return dict(sorted(lps.items(), key=lambda kv: -kv[1])[:k])


@pytest.mark.vllm
def test_preferred_token_frequency_rises_as_predicted(policy_engine, tokenizer_dir, tmp_path):
    from vgs.config import SamplingConfig
    from vgs.engine import GenRequest

    samp = SamplingConfig(temperature=1.0, top_p=1.0, max_tokens=1, seed=0)
    ref = policy_engine.generate([GenRequest(PROMPT, 1, seed=0, logprobs=20)], samp)[0][0]
    top = top_k_logprobs(ref.logprobs[0], 20)
    marker = list(top)[9]  # π_ref's 10th most likely token
    pi_m = math.exp(top[marker])
    # Pick η so that guidance should lift the marker to about 40%.
    p_m, p_o = 0.95, 1e-9
    w = 0.4 / (0.6 * pi_m)
    eta = 1 / math.log((w - 1 + p_m) / p_m)
    vm = make_marker_value(str(tmp_path / "marker_vm"), tokenizer_dir, marker, p_m, p_o)
    n = 400
    args = {"vgs_guidance": "qsharp", "vgs_value_model": vm, "vgs_eta": eta, "vgs_top_k": 20}
    guided = policy_engine.generate([GenRequest(PROMPT, 1, n=n, seed=1, logprobs=20, extra_args=args)], samp)[0]
    plain = policy_engine.generate([GenRequest(PROMPT, 1, n=n, seed=1)], samp)[0]
    # Prediction from π_ref (vLLM's raw logprobs = the top-k the processor saw) and the closed form.
    pi = {t: math.exp(lp) for t, lp in top_k_logprobs(guided[0].logprobs[0], 20).items()}
    assert marker in pi
    boost = {t: 1 - (p_m if t == marker else p_o) + (p_m if t == marker else p_o) * math.exp(1 / eta) for t in pi}
    z = 1 + sum(pi[t] * (boost[t] - 1) for t in pi)
    pred = pi[marker] * boost[marker] / z
    count = sum(s.token_ids[0] == marker for s in guided)
    sd = math.sqrt(n * pred * (1 - pred))
    assert 0.25 < pred < 0.55
    assert abs(count - n * pred) <= 4 * sd, (count, n * pred)
    assert sum(s.token_ids[0] == marker for s in plain) <= 2  # π_ref alone almost never picks it


@pytest.mark.vllm
def test_temperature_applies_after_the_offset_through_vllm(policy_engine, tiny_policy, tokenizer_dir, tmp_path):
    """At T = 0.6 vLLM samples the boosted token as often as softmax((ℓ + offset)/T) predicts
    (the offset inside the temperature: what docs/guidance.md says) and measurably not as
    often as softmax(ℓ/T + offset) would. π_ref over the whole vocabulary comes from the HF
    forward of the same checkpoint (the tail matters once T ≠ 1), checked against vLLM's raw
    logprobs on the top 20."""
    from transformers import AutoModelForCausalLM

    from vgs.config import SamplingConfig
    from vgs.engine import GenRequest

    T = 0.6
    hf = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([PROMPT])).logits[0, -1].double()
    logp = torch.log_softmax(logits, -1)
    ref = policy_engine.generate([GenRequest(PROMPT, 1, seed=0, logprobs=20)],
                                 SamplingConfig(temperature=1.0, top_p=1.0, max_tokens=1, seed=0))[0][0]
    top = top_k_logprobs(ref.logprobs[0], 20)
    for t, lp in top.items():
        assert abs(float(logp[t]) - lp) < 1e-3  # the HF forward is π_ref as vLLM sees it
    marker = list(top)[4]
    p_m, p_o = 0.95, 1e-9
    cand = torch.tensor(list(top))

    def predict(eta: float) -> tuple[float, float]:
        off = torch.zeros_like(logits)
        lift = lambda p: math.log(1 - p + p * math.exp(1 / eta))  # noqa: E731
        off[cand] = lift(p_o)
        off[marker] = lift(p_m)
        after = torch.softmax((logits + off) / T, -1)[marker]  # vLLM: processors, then temperature
        before = torch.softmax(logits / T + off, -1)[marker]  # the other order
        return float(after), float(before)

    lo, hi = 0.01, 10.0  # η giving a predicted frequency of ~0.4 (monotone in η)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if predict(mid)[0] > 0.4 else (lo, mid)
    eta = (lo + hi) / 2
    pred, other = predict(eta)
    n = 400
    sd = math.sqrt(n * pred * (1 - pred))
    assert abs(pred - other) * n > 8 * sd, (pred, other)  # the two orders are far apart
    vm = make_marker_value(str(tmp_path / "marker_vm_t"), tokenizer_dir, marker, p_m, p_o)
    args = {"vgs_guidance": "qsharp", "vgs_value_model": vm, "vgs_eta": eta, "vgs_top_k": 20}
    guided = policy_engine.generate([GenRequest(PROMPT, 1, n=n, seed=2, extra_args=args)],
                                    SamplingConfig(temperature=T, top_p=1.0, max_tokens=1, seed=0))[0]
    count = sum(s.token_ids[0] == marker for s in guided)
    assert abs(count - n * pred) <= 4 * sd, (count, n * pred, n * other)


@pytest.mark.vllm
def test_mixed_batch_and_kl_report(policy_engine, tokenizer_dir, tmp_path):
    from vgs.config import SamplingConfig
    from vgs.engine import GenRequest
    from vgs.guidance.report import read_report, report_path

    samp = SamplingConfig(temperature=0.8, top_p=1.0, max_tokens=12, seed=0)
    probe = policy_engine.generate([GenRequest(PROMPT, 1, seed=0, logprobs=20)], samp)[0][0]
    marker = list(top_k_logprobs(probe.logprobs[0], 20))[3]
    p_m, p_o, eta, k = 0.9, 0.2, 0.05, 20
    vm = make_marker_value(str(tmp_path / "marker_vm2"), tokenizer_dir, marker, p_m, p_o)
    prompts = [PROMPT, PROMPT[:20], PROMPT[5:], PROMPT[::-1]]
    keys = [uuid.uuid4().hex for _ in prompts]
    guided = [GenRequest(p, 12, seed=i, logprobs=20, extra_args={
        "vgs_guidance": "qsharp", "vgs_value_model": vm, "vgs_eta": eta, "vgs_top_k": k, "vgs_report_key": key})
        for i, (p, key) in enumerate(zip(prompts, keys))]
    same_unguided = [GenRequest(p, 12, seed=i, logprobs=20) for i, p in enumerate(prompts)]
    plain = [GenRequest(p, 12, seed=10 + i, logprobs=20) for i, p in enumerate(prompts)]
    mixed = policy_engine.generate(guided + plain, samp)
    alone = policy_engine.generate(same_unguided + plain, samp)
    for a, b in zip(mixed[4:], alone[4:]):
        assert a[0].token_ids == b[0].token_ids  # unguided requests do not notice the guided ones
    assert any(a[0].token_ids != b[0].token_ids for a, b in zip(mixed[:4], alone[:4]))
    # The KL report: kl_t1 recomputed from vLLM's raw logprobs and the known offsets.
    off = {True: math.log(1 - p_m + p_m * math.exp(1 / eta)), False: math.log(1 - p_o + p_o * math.exp(1 / eta))}
    for req, out, key in zip(guided, mixed[:4], keys):
        s = out[0]
        rep = read_report(key, len(s.token_ids))
        assert rep is not None and rep.steps == len(s.token_ids)
        want = 0.0
        for lps in s.logprobs:
            pi = {t: math.exp(lp) for t, lp in top_k_logprobs(lps, k).items()}
            z = 1 + sum(p * (math.exp(off[t == marker]) - 1) for t, p in pi.items())
            want += sum(p * math.exp(off[t == marker]) / z * off[t == marker] for t, p in pi.items()) - math.log(z)
        assert rep.kl_t1 == pytest.approx(want, rel=2e-3)
        assert rep.kl > 0 and rep.kl != pytest.approx(rep.kl_t1)  # T = 0.8 differs from T = 1
        n = len(s.token_ids)
        assert rep.value_tokens == len(req.prompt_ids) + (n - 1) + n * k
        assert not os.path.exists(report_path(key))  # read_report cleans up


@pytest.mark.vllm
def test_guided_sample_search_and_bad_params(policy_engine, tiny_value):
    from vgs.config import SamplingConfig, SearchConfig
    from vgs.engine import GenRequest
    from vgs.errors import VGSError
    from vgs.search import Engines, run_search

    samp = SamplingConfig(temperature=0.6, top_p=0.95, max_tokens=8, seed=0)
    search = SearchConfig(method="qsharp", n=3, eta=0.1, top_k=5, report_kl=True).validate()
    res = run_search([PROMPT, PROMPT[:10]], [7, 8], Engines(policy_engine, value_model=tiny_value), search, samp)
    assert len(res) == 2 and all(len(r.candidates) == 3 for r in res)
    for prompt, r in zip([PROMPT, PROMPT[:10]], res):
        assert r.compute.policy_tokens == sum(c.num_tokens for c in r.candidates)
        assert r.compute.value_tokens == sum(len(prompt) + c.num_tokens - 1 + 5 * c.num_tokens for c in r.candidates)
        assert r.compute.value_params > 0 and r.compute.policy_params > 0
        for c in r.candidates:
            assert c.info["kl"] > 0 and c.info["kl_t1"] > 0 and c.finish_reason in ("stop", "length")
    with pytest.raises(VGSError, match="eta"):
        run_search([PROMPT], [0], Engines(policy_engine, value_model=tiny_value),
                   SearchConfig(method="cd", n=1, eta=-1.0), samp)
    # Bad per-request arguments are refused at admission (→ HTTP 400 in a server; offline
    # PolicyEngine turns vLLM's VLLMValidationError into a VGSError) ...
    with pytest.raises(VGSError, match="vgs_top_k"):
        policy_engine.generate([GenRequest(PROMPT, 4, extra_args={
            "vgs_guidance": "qsharp", "vgs_value_model": tiny_value, "vgs_top_k": 0})], samp)
    # ... and the engine keeps serving.
    assert 1 <= len(policy_engine.generate([GenRequest(PROMPT, 4, seed=1)], samp)[0][0].token_ids) <= 4


@pytest.mark.vllm
def test_guidance_budget_through_vllm_eval_keeps_going(tiny_policy, tiny_value, data_dir, tmp_path, monkeypatch):
    """A real engine whose guidance budget is 4 usable 64-token pages: guided AIME prompts
    (100+ tokens, 2 samples each, all in flight together) cannot all fit. The engine process
    survives, `vgs eval` reports the failed items in one line each, writes the others, and
    the same engine then guides a request that fits."""
    import io

    import vgs.eval.runner as runner
    from vgs.eval.runner import EvalConfig, run_eval
    from vgs.config import EngineConfig, SamplingConfig, SearchConfig
    from vgs.engine import GenRequest, PolicyEngine
    from vgs.guidance.params import GuideParams
    from vgs.guidance.report import read_report
    from vgs.search import Engines

    page_bytes = 2 * 2 * 1 * 64 * 64 * 4
    engine = PolicyEngine(EngineConfig(model=tiny_policy, kv_cache_gib=0.25, max_model_len=1024,
                                       guidance_kv_gib=5 * page_bytes / 2**30))
    try:
        monkeypatch.setattr(runner, "build_engines", lambda cfg: Engines(policy=engine, value_model=tiny_value))
        err = io.StringIO()
        monkeypatch.setattr(runner.sys, "stderr", err)
        cfg = EvalConfig(benchmarks=["aime24"], policy=tiny_policy, value_model=tiny_value, out=str(tmp_path / "q"),
                         data_dir=data_dir, limit=3, batch_size=3,
                         search=SearchConfig(method="qsharp", n=2, eta=0.5, top_k=4),
                         sampling=SamplingConfig(max_tokens=16, temperature=1.0, top_p=1.0, seed=0))
        run_eval(cfg)
        log = err.getvalue()
        failures = [ln for ln in log.splitlines() if " failed: " in ln]
        assert failures and all("guidance KV budget exhausted" in ln for ln in failures), log[-2000:]
        rows_path = tmp_path / "q" / "samples.jsonl"
        written = rows_path.read_text().count("\n") if rows_path.exists() else 0
        assert written + len(failures) == 3
        assert "re-run the same command to retry" in log
        # the engine still serves, and guides what fits
        key = "fits-" + uuid.uuid4().hex
        args = GuideParams("qsharp", tiny_value, 0.5, 4, key).to_extra_args()
        out = engine.generate([GenRequest(PROMPT[:20], 8, seed=1, extra_args=args)],
                              SamplingConfig(max_tokens=8, temperature=1.0, top_p=1.0))[0][0]
        rep = read_report(key, len(out.token_ids))
        assert rep is not None and rep.error is None and rep.value_tokens > 0
    finally:
        engine.close()


def test_cached_value_model_packed_gemm_matches_torch_gemm(tiny_value, monkeypatch):
    """On CPU with vLLM's oneDNN kernels the projections run packed (vgs.guidance.cpu_gemm);
    the scores equal those of torch's GEMM, and VGS_GUIDANCE_ONEDNN=0 turns the packing off."""
    from vgs.guidance.cpu_gemm import _onednn_ops
    from vgs.guidance.worker_model import CachedValueModel

    if _onednn_ops() is None:
        pytest.skip("vLLM's oneDNN GEMM is not available here")
    packed = CachedValueModel(tiny_value)
    monkeypatch.setenv("VGS_GUIDANCE_ONEDNN", "0")
    plain = CachedValueModel(tiny_value)
    assert packed.packed and not plain.packed
    assert packed.layers[0].mlp.down_proj.weight.numel() == 0  # HF copies released, not doubled
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 151000, (n,), generator=g).tolist() for n in (9, 30)]
    cands = torch.randint(0, 151000, (2, 6), generator=g)
    got = [m.score([m.alloc_row(), m.alloc_row()], seqs, cands).success_logit for m in (packed, plain)]
    assert torch.allclose(got[0], got[1], atol=1e-4)
    assert got[0].std() > 1e-3


def test_guidance_timing_file_splits_the_step(tiny_value, tmp_path, monkeypatch):
    """VGS_GUIDANCE_TIMING: one line per guided step, `rows seconds topk_s forward_s`, the
    parts inside the total (what benchmarks/qsharp_overhead.py reports per step)."""
    from vgs.guidance.guide import Guide

    path = tmp_path / "timing.txt"
    monkeypatch.setenv("VGS_GUIDANCE_TIMING", str(path))
    guide = Guide("cpu", budget_gib=0.05)
    reqs = [guide.start(sp(tiny_value)) for _ in range(2)]
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 151000, (n,), generator=g).tolist() for n in (7, 12)]
    for step in range(2):
        logits = torch.randn(2, 151936, generator=g)
        news = prompts if step == 0 else [[11], [12]]
        guide.apply(logits, [0, 1], reqs, news, [step, step])
    lines = [ln.split() for ln in path.read_text().splitlines()]
    assert len(lines) == 2 and all(len(ln) == 4 and ln[0] == "2" for ln in lines)
    for _, total, topk, forward in ([float(x) for x in ln] for ln in lines):
        assert 0 < topk < total and 0 < forward < total and topk + forward <= total


@pytest.mark.parametrize("lengths,per_row", [((3, 70, 21), True), ((60, 62, 64), False)])
def test_cached_value_model_fused_cpu_kernels_match_module_path(tiny_value, value_hf, monkeypatch, lengths, per_row):
    """On CPU with vLLM's kernels the value step runs fused (vgs.guidance.cpu_kernels: vLLM's
    RMSNorm and RoPE, prefix attention with its log-sum-exp merged with each candidate's own
    key, one attention call per row for rows of unequal length or one masked call, an
    unpadded prefill); its scores equal the module path's and full HF forwards, step after
    step, and VGS_GUIDANCE_FUSED=0 turns it off."""
    from vgs.guidance.cpu_kernels import CpuKernels, _c_ops
    from vgs.guidance.worker_model import CachedValueModel

    if _c_ops() is None:
        pytest.skip("vLLM's CPU kernels are not available here")
    fused = CachedValueModel(tiny_value)
    monkeypatch.setenv("VGS_GUIDANCE_FUSED", "0")
    plain = CachedValueModel(tiny_value)
    assert fused.kernels is not None and plain.kernels is None
    assert CpuKernels.per_row([n + 1 for n in lengths], max(lengths) + 1) is per_row
    g = torch.Generator().manual_seed(7)
    seqs = [torch.randint(0, 151000, (n,), generator=g).tolist() for n in lengths]
    rows = {id(m): [m.alloc_row() for _ in seqs] for m in (fused, plain)}
    for step in range(4):
        cands = torch.randint(0, 151000, (len(seqs), 6), generator=g)
        got = []
        for m in (fused, plain):
            news = [s[m.lens[r]:] for r, s in zip(rows[id(m)], seqs)]
            got.append(m.score(rows[id(m)], news, cands).success_logit.double())
        assert torch.allclose(got[0], got[1], atol=1e-5), step
        assert got[0].std() > 1e-3
        for i, s in enumerate(seqs):
            assert torch.allclose(got[0][i], hf_success_logits(value_hf, s, cands[i].tolist()), atol=2e-4), (step, i)
            s.append(int(cands[i, step]))
        if step == 1:
            seqs[1].extend([5, 6, 7])  # several new tokens: forward A, then the fused step
