"""The assets shipped inside the package (`vgs/data/`) for offline use: the real DeepSeek-R1-Distill
tokenizer (tests and demos build tiny models with it) and the offline copy of the benchmark
registry. Nothing here reads anything outside the package; `VGS_TOKENIZER_DIR` and
`VGS_DATA_DIR` point elsewhere when wanted. `quiet_engines()` sets the environment every
script wants before vLLM is imported.
"""

from __future__ import annotations

import os
from pathlib import Path

from vgs.eval.datasets import SHIPPED_DATA_DIR
from vgs.errors import VGSError

PACKAGE = Path(__file__).resolve().parent
# The directory above the package: the repository root in a checkout, site-packages when
# installed. Read-only for vgs (only named in an error message); outputs go to `--out` or
# the current directory, never next to the package.
REPO = PACKAGE.parent
TOKENIZER_DIR = Path(os.environ.get("VGS_TOKENIZER_DIR") or PACKAGE / "data" / "tokenizers" / "deepseek-r1-distill-qwen-1.5b")
DATA_DIR = Path(os.environ.get("VGS_DATA_DIR") or SHIPPED_DATA_DIR)


def require_dir(path: Path, what: str) -> str:
    """`path` as a string, or one clear error naming the missing asset and how to supply it."""
    if not (path.is_dir() and any(path.iterdir())):
        where = (f"reinstall vgs, or in a checkout `git checkout -- {path.relative_to(REPO)}`"
                 if path.is_relative_to(PACKAGE) else "check the path")
        raise VGSError(f"missing {what} at {path} (it ships with the vgs package: {where}; "
                       f"or point the environment variable at a copy)")
    return str(path)


def tokenizer_dir() -> str:
    """The shipped tokenizer directory (or $VGS_TOKENIZER_DIR), checked."""
    return require_dir(TOKENIZER_DIR, "tokenizer directory")


def data_dir() -> str:
    """The offline benchmark files (or $VGS_DATA_DIR), checked."""
    return require_dir(DATA_DIR, "benchmark data directory")


def quiet_engines() -> None:
    """vLLM logs at WARNING; tokenizers do not fork-warn. Call before importing vllm."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
