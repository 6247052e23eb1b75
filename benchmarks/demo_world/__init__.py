"""The demo world: a synthetic step-by-step arithmetic task, a tiny Qwen2 policy trained on it
with its own tokenizer, and a value model trained by the project's real pipeline
(`vgs collect` + `value_models.train`), small enough to build on 2 CPU cores in minutes and
to ship in the repository.

    python -m benchmarks.demo_world.build      # rebuild models/policy and models/value
    python -m benchmarks.demo_world            # evaluate on the held-out split (`make demo`)

Modules: `task` (problems, splits, traces with step errors), `tokenizer` (word/char-level
tokenizer + chat template), `policy` (Qwen2 config + plain PyTorch SFT), `build`, `__main__`.
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS_DIR = HERE / "models"
POLICY_DIR = MODELS_DIR / "policy"
VALUE_DIR = MODELS_DIR / "value"
