"""`make demo`: the main job end to end — `vgs eval` with value-guided search on a real
benchmark (AIME 2024), printed as a table.

No trained demo model ships yet, so this builds a TINY RANDOM-WEIGHT policy and value model
with the real DeepSeek-R1-Distill tokenizer: the pipeline, engines, search, grading and
tables are real, the accuracies are ~0 because the models are untrained. To run the real
thing on a GPU:

    vgs eval --benchmark aime24 --policy deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B \
        --method vgs --value-model VGS-AI/DeepSeek-VM-1.5B --budget 8 --trees 2 --out runs/aime24
"""

from __future__ import annotations

import sys
from pathlib import Path

from vgs import assets as local_files
from vgs.errors import VGSError


def main() -> int:
    from vgs.cli import main as vgs_main
    from vgs.tiny import make_tiny

    try:
        tok, data = local_files.tokenizer_dir(), local_files.data_dir()
    except VGSError as exc:
        print(f"vgs demo: error: {exc}", file=sys.stderr)
        return 2
    cache = Path(".cache", "demo").resolve()  # outputs go under the current directory
    cache.mkdir(parents=True, exist_ok=True)
    print("=" * 88)
    print("vgs demo: NOTE — no trained demo model is available offline, so this runs the real")
    print("pipeline on TINY RANDOM-WEIGHT models (real tokenizer). Expect ~0% accuracy.")
    print("=" * 88, flush=True)
    policy, value = cache / "tiny-policy", cache / "tiny-value"
    if not (policy / "config.json").exists():
        make_tiny("policy", tok, str(policy), layers=2, hidden=128, seed=0)
    if not (value / "config.json").exists():
        make_tiny("value", tok, str(value), layers=2, hidden=128, seed=1)
    args = ["eval", "--benchmark", "aime24", "--policy", str(policy), "--method", "vgs",
            "--value-model", str(value), "--budget", "4", "--beam-width", "2", "--block-size", "64",
            "--trees", "2", "--max-tokens", "256", "--temperature", "1.0", "--top-p", "1.0",
            "--out", str(Path("runs", "demo").resolve()), "--no-save-text",
            "--kv-cache-gib", "1", "--value-kv-cache-gib", "1", "--max-model-len", "2048",
            "--data-dir", data]
    print("$ vgs " + " ".join(args), flush=True)
    return vgs_main(args)


if __name__ == "__main__":
    sys.exit(main())
