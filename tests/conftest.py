"""Shared fixtures: tiny real-format models (built once per session) and one vLLM engine of
each kind per session (engine start costs 25-60 s on this CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vgs import assets as local_files
from vgs.assets import quiet_engines
from vgs.errors import VGSError

quiet_engines()


@pytest.fixture(scope="session")
def tokenizer_dir() -> str:
    try:
        return local_files.tokenizer_dir()
    except VGSError as exc:  # one clear line, not a traceback per test
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def data_dir() -> str:
    try:
        return local_files.data_dir()
    except VGSError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_policy(models_dir, tokenizer_dir) -> str:
    from vgs.tiny import make_tiny

    return make_tiny("policy", tokenizer_dir, str(models_dir / "policy"), layers=2, hidden=128, seed=0)


@pytest.fixture(scope="session")
def tiny_value(models_dir, tokenizer_dir) -> str:
    from vgs.tiny import make_tiny

    return make_tiny("value", tokenizer_dir, str(models_dir / "value"), layers=2, hidden=128, seed=1)


@pytest.fixture(scope="session")
def policy_engine(tiny_policy):
    """The one policy engine of the session (guidance processor loaded, as in production)."""
    from vgs.config import EngineConfig
    from vgs.engine import PolicyEngine

    engine = PolicyEngine(EngineConfig(model=tiny_policy, kv_cache_gib=1.0, max_model_len=4096))
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def vllm_value_scorer(policy_engine, tiny_value, tokenizer_dir):
    """The one vLLM value scorer of the session. Built after the policy engine, as in
    production (both live in one process, each with its own KV cache size)."""
    from vgs.config import EngineConfig
    from vgs.value import VllmValueScorer

    scorer = VllmValueScorer(EngineConfig(model=tiny_value, tokenizer=tokenizer_dir, kv_cache_gib=0.5,
                                          max_model_len=4096))
    yield scorer
    scorer.close()


@pytest.fixture(scope="session")
def hf_value_scorer(tiny_value):
    """transformers value scorer on the same tiny model (fp32 on CPU)."""
    from vgs.value import HFValueScorer

    scorer = HFValueScorer(tiny_value, device="cpu", max_model_len=4096)
    yield scorer
    scorer.close()
