"""Value model: the published checkpoint layout, and both scoring backends.

The reference checkpoints here are written by plain torch/transformers/safetensors code in
this file (a `Qwen2Model` and an `nn.Sequential` head, state dicts prefixed by hand), never by
vgs, so the loaders are checked against the layout itself rather than against themselves.
"""

from __future__ import annotations

import json
import random
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from torch import nn

from vgs.errors import VGSError

VOCAB = 151936
HIDDEN = 128


# ---------------------------------------------------------------- plain reference checkpoints

class PlainValueModel:
    """The published layout built from stock parts: trunk `Qwen2Model`, bias-free MLP head."""

    def __init__(self, num_labels: int, seed: int):
        from transformers import Qwen2Config, Qwen2Model

        torch.manual_seed(seed)
        self.config = Qwen2Config(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048,
            tie_word_embeddings=False, use_sliding_window=False)
        self.trunk = Qwen2Model(self.config).float().eval()
        self.head = nn.Sequential(nn.Linear(HIDDEN, HIDDEN, bias=False), nn.ReLU(),
                                  nn.Linear(HIDDEN, num_labels, bias=False)).float().eval()
        with torch.no_grad():  # a head strong enough that values spread well away from uniform
            for lin in (self.head[0], self.head[2]):
                lin.weight.normal_(0.0, 1.5 / HIDDEN**0.5)
        self.num_labels = num_labels

    def save(self, out: Path) -> str:
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        state = {f"model.{k}": v.contiguous() for k, v in self.trunk.state_dict().items()}
        state.update({f"score.{k}": v.contiguous() for k, v in self.head.state_dict().items()})
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        cfg = self.config.to_dict()
        cfg["architectures"] = ["Qwen2ForClassifier"]
        cfg["num_labels"] = self.num_labels
        if self.num_labels == 3:
            cfg["id2label"] = {"0": "incorrect", "1": "correct", "2": "unfinished"}
            cfg["label2id"] = {"incorrect": 0, "correct": 1, "unfinished": 2}
        else:
            cfg["id2label"] = {"0": "LABEL_0"}
            cfg["label2id"] = {"LABEL_0": 0}
        cfg["torch_dtype"] = cfg["dtype"] = "float32"
        (out / "config.json").write_text(json.dumps(cfg, indent=1, default=str))
        return str(out)

    @torch.no_grad()
    def values(self, seqs: list[list[int]]) -> list[float]:
        out = []
        for s in seqs:
            h = self.trunk(input_ids=torch.tensor([s])).last_hidden_state[0, -1]
            logits = self.head(h).float()
            p = torch.sigmoid(logits[0]) if self.num_labels == 1 else torch.softmax(logits, -1)[1]
            out.append(float(p))
        return out


def rand_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


def assert_close(got, want, tol, min_spread: float | None = None):
    """Elementwise within `tol`; with `min_spread`, the reference values must also spread over
    at least that much, so the comparison could tell a position or head mix-up apart (values
    that all sit near 1/3 within a few 1e-3 would pass a 1e-3 check almost whatever is read)."""
    diff = max(abs(a - b) for a, b in zip(got, want))
    assert len(got) == len(want) and diff <= tol, f"max abs diff {diff} > {tol}: {got} vs {want}"
    if min_spread is not None:
        assert max(want) - min(want) >= min_spread, f"reference values spread only {max(want) - min(want)}: {want}"


@pytest.fixture(scope="module")
def plain3(tmp_path_factory):
    ref = PlainValueModel(3, seed=11)
    return ref, ref.save(tmp_path_factory.mktemp("plain") / "vm3")


@pytest.fixture(scope="module")
def plain1(tmp_path_factory):
    ref = PlainValueModel(1, seed=12)
    return ref, ref.save(tmp_path_factory.mktemp("plain") / "vm1")


@pytest.fixture(scope="module")
def spread_value(tiny_value, tmp_path_factory) -> str:
    """The session's tiny value model with its head re-drawn strong (N(0, 2.25 / hidden)), so
    its values spread over (0, 1) instead of sitting within ~1e-2 of 1/3."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("spread") / "value"
    shutil.copytree(tiny_value, out)
    state = load_file(str(out / "model.safetensors"))
    g = torch.Generator().manual_seed(21)
    for k in ("score.0.weight", "score.2.weight"):
        state[k] = torch.randn(state[k].shape, generator=g) * 1.5 / HIDDEN**0.5
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return str(out)


@pytest.fixture(scope="module")
def spread_scorers(policy_engine, spread_value, tokenizer_dir):
    """vLLM and transformers scorers of `spread_value` (the vLLM one next to the session's
    policy engine, as in production)."""
    from vgs.config import EngineConfig
    from vgs.value import HFValueScorer, VllmValueScorer

    vllm = VllmValueScorer(EngineConfig(model=spread_value, tokenizer=tokenizer_dir, kv_cache_gib=0.5, max_model_len=4096))
    hf = HFValueScorer(spread_value, device="cpu", max_model_len=4096)
    yield vllm, hf
    hf.close()
    vllm.close()


@pytest.fixture(scope="module")
def probe_seqs():
    """Mixed lengths, one crossing a 128-token block, one a single token."""
    rng = random.Random(0)
    return [rand_ids(rng, n) for n in (1, 7, 64, 200, 333)]


# ---------------------------------------------------------------- layout and loading (no vLLM)

def test_plugin_entry_point_registers_architecture():
    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.value == "vgs.vllm_plugin:register"]
    assert eps, "vllm.general_plugins entry point for vgs.vllm_plugin:register is not installed"
    eps[0].load()()
    from vllm import ModelRegistry

    assert "Qwen2ForClassifier" in ModelRegistry.get_supported_archs()
    cls = ModelRegistry._try_load_model_cls("Qwen2ForClassifier")
    assert cls is not None and cls.__name__ == "Qwen2ForClassifierPooling" and cls.is_pooling_model


@pytest.mark.parametrize("which", ["plain3", "plain1"])
def test_plain_checkpoint_loads_in_load_value_model(which, request, probe_seqs):
    from vgs.modeling import load_value_model

    ref, path = request.getfixturevalue(which)
    want = ref.values(probe_seqs)
    assert max(want) - min(want) > 0.05, "reference values too flat for a meaningful comparison"
    m = load_value_model(path)
    assert m.num_labels == ref.num_labels
    got = [float(m.predict_values(torch.tensor([s]))[0]) for s in probe_seqs]
    assert_close(got, want, 1e-5)
    if ref.num_labels == 1:  # sigmoid of the single logit, not a softmax (which would be 1.0)
        assert all(0.0 < v < 1.0 for v in got) and max(got) < 0.999


@pytest.mark.parametrize("which", ["plain3", "plain1"])
def test_plain_checkpoint_hf_backend(which, request, probe_seqs):
    from vgs.value import HFValueScorer

    ref, path = request.getfixturevalue(which)
    scorer = HFValueScorer(path, device="cpu")
    assert_close(scorer.score(probe_seqs), ref.values(probe_seqs), 1e-4)
    assert scorer.tokens_computed == sum(len(s) for s in probe_seqs)
    assert scorer.max_model_len == 2048
    assert scorer.num_params == sum(p.numel() for p in ref.trunk.parameters()) + sum(p.numel() for p in ref.head.parameters())


def test_save_pretrained_round_trip_keeps_layout(plain3, tmp_path, probe_seqs):
    from safetensors import safe_open

    from vgs.modeling import Qwen2ForClassifier

    ref, path = plain3
    m = Qwen2ForClassifier.from_pretrained(path, dtype=torch.float32)
    m.save_pretrained(tmp_path / "rt")
    with safe_open(str(tmp_path / "rt" / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:
        original = set(f.keys())
    assert saved == original
    assert {"score.0.weight", "score.2.weight", "model.embed_tokens.weight", "model.norm.weight"} <= saved
    assert all(k.startswith("model.") or k in ("score.0.weight", "score.2.weight") for k in saved)
    cfg = json.loads((tmp_path / "rt" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForClassifier"] and cfg["model_type"] == "qwen2"
    assert len(cfg["id2label"]) == 3
    again = Qwen2ForClassifier.from_pretrained(tmp_path / "rt", dtype=torch.float32).eval()
    got = [float(again.predict_values(torch.tensor([s]))[0]) for s in probe_seqs]
    assert_close(got, ref.values(probe_seqs), 1e-5)


def test_auto_classes_round_trip(plain3, tmp_path, probe_seqs):
    """AutoConfig reads the plain Qwen2Config; AutoValueModel maps it to the value class,
    from a config and from a checkpoint, and a saved model comes back the same."""
    from transformers import AutoConfig, AutoModelForTokenClassification, Qwen2ForTokenClassification

    from vgs.modeling import AutoValueModel, Qwen2ForClassifier

    ref, path = plain3
    cfg = AutoConfig.from_pretrained(path)
    assert cfg.model_type == "qwen2" and cfg.num_labels == 3 and cfg.architectures == ["Qwen2ForClassifier"]
    assert type(AutoValueModel.from_config(cfg)) is Qwen2ForClassifier
    m = AutoValueModel.from_pretrained(path, dtype=torch.float32).eval()
    assert type(m) is Qwen2ForClassifier
    m.save_pretrained(tmp_path / "auto")
    again = AutoValueModel.from_pretrained(tmp_path / "auto", dtype=torch.float32).eval()
    got = [float(again.predict_values(torch.tensor([s]))[0]) for s in probe_seqs]
    assert_close(got, ref.values(probe_seqs), 1e-5)
    # transformers' own Auto classes are left alone
    assert type(AutoModelForTokenClassification.from_config(cfg)) is Qwen2ForTokenClassification


def test_make_tiny_cli_writes_published_layout(tokenizer_dir, tmp_path, plain3):
    from safetensors import safe_open

    from vgs.cli import main

    out = tmp_path / "tiny-vm"
    assert main(["make-tiny", "--kind", "value", "--tokenizer", tokenizer_dir, "--out", str(out),
                 "--layers", "2", "--hidden", "128"]) == 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        tiny_keys = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    with safe_open(str(Path(plain3[1]) / "model.safetensors"), "pt") as f:
        plain_keys = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert set(tiny_keys) == set(plain_keys)
    assert tiny_keys["score.0.weight"] == (128, 128) and tiny_keys["score.2.weight"] == (3, 128)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForClassifier"] and cfg["model_type"] == "qwen2"
    assert len(cfg["id2label"]) == 3  # transformers 5 stores num_labels as the label map
    assert not (out / "tokenizer.json").exists(), "the published value checkpoint ships no tokenizer"


# ---------------------------------------------------------------- HF backend: KV reuse

def test_hf_continuation_costs_only_new_tokens(plain3):
    from vgs.value import HFValueScorer

    ref, path = plain3
    rng = random.Random(1)
    prefix = rand_ids(rng, 150)
    scorer = HFValueScorer(path, device="cpu")
    scorer.score([prefix])
    assert scorer.tokens_computed == 150

    conts = [prefix + rand_ids(rng, 30), prefix + rand_ids(rng, 45)]
    before = scorer.tokens_computed
    got = scorer.score(conts)
    assert scorer.tokens_computed - before == 30 + 45
    assert scorer.last_tokens_computed == [30, 45]
    fresh = HFValueScorer(path, device="cpu").score(conts)
    assert_close(got, fresh, 1e-5)
    assert_close(got, ref.values(conts), 1e-4)

    # a sibling of a scored sequence reuses the shared part (cropped from the sibling's KV)
    sib = conts[0][:170] + rand_ids(rng, 10)
    before = scorer.tokens_computed
    assert_close(scorer.score([sib]), ref.values([sib]), 1e-4)
    assert scorer.tokens_computed - before == 10

    # re-scoring a known sequence computes nothing; a prefix of one computes its last token
    before = scorer.tokens_computed
    again = scorer.score([conts[1], conts[1][:100]])
    assert again[0] == got[1]
    assert scorer.tokens_computed - before == 1
    assert_close(again[1:], ref.values([conts[1][:100]]), 1e-4)


def test_hf_shared_prefix_within_one_call_and_chunking(plain3):
    from vgs.value import HFValueScorer

    ref, path = plain3
    rng = random.Random(2)
    prompt = rand_ids(rng, 120)
    cands = [prompt + rand_ids(rng, 40) for _ in range(4)] + [rand_ids(rng, 90)]
    scorer = HFValueScorer(path, device="cpu", chunk_tokens=64, max_batch_tokens=400)
    got = scorer.score(cands)
    assert_close(got, ref.values(cands), 1e-4)
    # the shared prompt runs once, then each candidate's own 40 tokens, plus the lone one
    assert scorer.tokens_computed == 120 + 4 * 40 + 90
    assert sum(scorer.last_tokens_computed) == scorer.tokens_computed
    assert scorer.last_tokens_computed[:4] == [70, 70, 70, 70]


def test_hf_kv_store_respects_budget(plain3):
    from vgs.value import HFValueScorer

    _, path = plain3
    scorer = HFValueScorer(path, device="cpu", kv_cache_gib=300 * 2 * 2 * 64 * 4 / 2**30)  # ~300 tokens
    rng = random.Random(3)
    scorer.score([rand_ids(rng, 200)])
    scorer.score([rand_ids(rng, 200)])
    assert scorer.store.tokens <= scorer.store.max_tokens == 300
    assert len(scorer.store) == 1


def test_hf_scores_sequences_longer_than_a_tiny_store(plain3):
    """A store of 100 tokens with 32-token chunks: a 300-token sequence (longer than store +
    chunk) and several sequences that evict each other between chunks are still scored, with
    the values a full forward gives, and the call returns (it used to loop forever)."""
    import signal

    from vgs.value import HFValueScorer

    ref, path = plain3
    per_token = 2 * 2 * 1 * 64 * 4  # layers x (k, v) x kv heads x head dim x fp32 bytes
    scorer = HFValueScorer(path, device="cpu", kv_cache_gib=100 * per_token / 2**30, chunk_tokens=32)
    assert scorer.store.max_tokens == 100
    rng = random.Random(4)
    long = rand_ids(rng, 300)
    crowd = [rand_ids(rng, 90) for _ in range(5)]

    def hang(*_):
        raise TimeoutError("score() did not return")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(120)
    try:
        got = scorer.score([long] + crowd)
        first = scorer.tokens_computed
        longer = long + rand_ids(rng, 5)
        again = scorer.score([longer])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert_close(got, ref.values([long] + crowd), 1e-4)
    assert scorer.store.tokens <= 100
    assert_close(again, ref.values([longer]), 1e-4)
    # every token is computed at least once; a target finished alone restarts at most once
    assert 300 + 5 * 90 <= first <= 2 * (300 + 5 * 90)
    assert sum(scorer.last_tokens_computed) == scorer.tokens_computed - first >= 5


def test_hf_rejects_bad_sequences(plain3):
    from vgs.value import HFValueScorer

    _, path = plain3
    scorer = HFValueScorer(path, device="cpu", max_model_len=64)
    with pytest.raises(VGSError, match="65 tokens, more than the value model's limit of 64"):
        scorer.score([[1] * 10, [1] * 65])
    with pytest.raises(VGSError, match="empty"):
        scorer.score([[]])
    with pytest.raises(VGSError, match="outside the value model's vocabulary"):
        scorer.score([[1, VOCAB]])
    assert scorer.tokens_computed == 0


def test_factory_rejects_bad_input(plain3, tiny_policy):
    from vgs.value import make_value_scorer

    with pytest.raises(VGSError, match="unknown value backend"):
        make_value_scorer(plain3[1], backend="onnx")
    with pytest.raises(VGSError, match="not a value model"):
        make_value_scorer(tiny_policy, backend="hf")
    with pytest.raises(VGSError, match="does not exist"):
        make_value_scorer("/nonexistent/vm", backend="hf")
    with pytest.raises(VGSError, match="unknown option"):
        make_value_scorer(plain3[1], backend="vllm", devise="cpu")


# ---------------------------------------------------------------- vLLM backend

@pytest.mark.vllm
def test_plain_checkpoint_vllm_backend_agrees(plain3, probe_seqs):
    """vLLM scorer on the plain checkpoint, with no tokenizer at all (as published)."""
    from vgs.config import EngineConfig
    from vgs.value import HFValueScorer, VllmValueScorer

    ref, path = plain3
    want = ref.values(probe_seqs)
    scorer = VllmValueScorer(EngineConfig(model=path, kv_cache_gib=0.25))
    try:
        got = scorer.score(probe_seqs)
        assert scorer.max_model_len == 2048
        with pytest.raises(VGSError, match="more than the value model's limit of 2048"):
            scorer.score([[5] * 2049])
    finally:
        scorer.close()
    assert_close(got, want, 1e-3, min_spread=0.1)
    assert_close(got, HFValueScorer(path, device="cpu").score(probe_seqs), 1e-3, min_spread=0.1)


@pytest.mark.vllm
def test_plain_one_label_checkpoint_vllm_backend(plain1, probe_seqs, tokenizer_dir):
    from vgs.config import EngineConfig
    from vgs.value import VllmValueScorer

    ref, path = plain1
    with pytest.raises(VGSError, match="1 label and ships no tokenizer"):
        VllmValueScorer(EngineConfig(model=path, kv_cache_gib=0.25))
    scorer = VllmValueScorer(EngineConfig(model=path, tokenizer=tokenizer_dir, kv_cache_gib=0.25))
    try:
        got = scorer.score(probe_seqs)
    finally:
        scorer.close()
    assert_close(got, ref.values(probe_seqs), 1e-3, min_spread=0.1)


@pytest.mark.vllm
def test_vllm_prefix_cache_reuse_is_counted(spread_scorers):
    sc, hf = spread_scorers
    rng = random.Random(4)
    prefix = rand_ids(rng, 256)  # whole KV blocks (128 on CPU, 16 on GPU)
    before = sc.tokens_computed
    sc.score([prefix])
    assert sc.tokens_computed - before == 256
    conts = [prefix + rand_ids(rng, 50), prefix + rand_ids(rng, 70)]
    before = sc.tokens_computed
    got = sc.score(conts)
    assert sc.tokens_computed - before == 50 + 70
    assert sc.last_tokens_computed == [50, 70]
    assert_close(got, hf.score(conts), 1e-3, min_spread=0.02)
    before = sc.tokens_computed
    assert sc.score([conts[0]]) == [got[0]]  # known sequence: no model work
    assert sc.tokens_computed == before


@pytest.mark.vllm
def test_vllm_rejects_bad_sequences(vllm_value_scorer):
    sc = vllm_value_scorer
    with pytest.raises(VGSError, match="4097 tokens, more than the value model's limit of 4096"):
        sc.score([[3] * 4097])
    with pytest.raises(VGSError, match="empty"):
        sc.score([[1, 2], []])
    with pytest.raises(VGSError, match="vocabulary"):
        sc.score([[-1]])


@pytest.mark.vllm
def test_policy_and_value_engines_share_a_process(policy_engine, spread_scorers):
    """Generate with the policy, score prompt + generation with the value engine."""
    from vgs.config import SamplingConfig
    from vgs.engine import GenRequest

    prompt = policy_engine.tokenizer("What is 1+1?", add_special_tokens=False)["input_ids"]
    outs = policy_engine.generate([GenRequest(prompt, max_tokens=24, n=2, seed=1)], SamplingConfig(temperature=1.0))
    seqs = [prompt + s.token_ids for s in outs[0]]
    vllm, hf = spread_scorers
    got = vllm.score(seqs)
    assert_close(got, hf.score(seqs), 1e-3, min_spread=0.02)


@pytest.mark.vllm
def test_vllm_concurrent_calls_get_their_own_cost(spread_scorers):
    """Two searches scoring at once on the async engine: each call gets the tokens computed
    for its own sequences, values match transformers, and no batcher (thread) is involved."""
    import asyncio

    from vgs.aio import run_sync
    from vgs.batcher import score_async

    sc, hf = spread_scorers
    rng = random.Random(5)
    prefix = rand_ids(rng, 256)  # whole KV blocks
    sc.score([prefix])
    a = [prefix + rand_ids(rng, 50), prefix + rand_ids(rng, 20)]
    b = [prefix + rand_ids(rng, 70)]

    async def both():
        return await asyncio.gather(score_async(sc, a), score_async(sc, b))

    before = sc.tokens_computed
    sa, sb = run_sync(both())
    assert [s.computed_tokens for s in sa] == [50, 20]
    assert [s.computed_tokens for s in sb] == [70]
    assert sc.tokens_computed - before == 140
    assert_close([s.value for s in sa + sb], hf.score(a + b), 1e-3, min_spread=0.02)
    assert getattr(sc, "_vgs_batcher", None) is None  # awaited directly, not through a batcher


@pytest.mark.vllm
def test_vllm_cancel_aborts_value_requests(spread_scorers):
    """A cancelled value call leaves no request in the value engine, whenever the cancel
    lands: before its requests are added, while they are being added, or while they run."""
    import asyncio

    from vgs.aio import run_sync

    sc, hf = spread_scorers
    rng = random.Random(6)

    async def cancel_after(turns: int | None) -> tuple[bool, int]:
        task = asyncio.ensure_future(sc.ascore([rand_ids(rng, 3000) for _ in range(4)]))
        if turns is None:  # until every request is in the engine
            while sc.num_running < 4 and not task.done():
                await asyncio.sleep(0.001)
        else:
            for _ in range(turns):
                await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return task.cancelled(), sc.num_running

    async def scenario() -> list[tuple[bool, int]]:
        return [await cancel_after(t) for t in [*range(12), None]]

    got = run_sync(scenario())
    assert all(cancelled for cancelled, _ in got)
    assert [left for _, left in got] == [0] * len(got)
    seqs = [rand_ids(rng, 100), rand_ids(rng, 60), rand_ids(rng, 30)]  # the engine still serves
    assert_close(sc.score(seqs), hf.score(seqs), 1e-3, min_spread=0.02)
