"""Where the development files live (tokenizer, benchmark data), for benchmarks and tests.

They sit in `../shared` beside the repository (override with `VGS_SHARED_DIR`); the Hub is
the path for real users, this is the offline one. `quiet_engines()` sets the environment
every script here wants before vLLM is imported.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VGS_SHARED_DIR", REPO.parent / "shared"))
TOKENIZER_DIR = SHARED / "tokenizers" / "deepseek-r1-distill-qwen-1.5b"
DATA_DIR = SHARED / "data"


def quiet_engines() -> None:
    """vLLM logs at WARNING; tokenizers do not fork-warn. Call before importing vllm."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
