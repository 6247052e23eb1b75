"""Consolidate a sharded (FSDP) training checkpoint into a loadable value model.

    python -m value_models.export RUN/checkpoints/step_00001000 [--out DIR]

An FSDP run writes per-rank shards of model and optimizer state (`dcp/`, via
torch.distributed.checkpoint) at every save, so no rank ever gathers or loads the full
state; only the last step (and every `--export-every` steps) is consolidated into
`model.safetensors`. This command does it for any other checkpoint, in one process on CPU,
reading only the model's entries of the shards (not the optimizer's).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from value_models.command import run_command
from vgs.errors import VGSError

WEIGHTS = "model.safetensors"


def export_checkpoint(ckpt: str, out: str | None = None) -> str:
    """Write `model.safetensors` (fp32, the published layout) next to the checkpoint's config,
    or into `out` (with config and tokenizer files). Returns the model directory."""
    import torch.distributed.checkpoint as dcp
    from transformers import Qwen2Config

    from vgs.modeling import Qwen2ForClassifier
    from value_models.train import DCP_DIR

    shards = os.path.join(ckpt, DCP_DIR)
    if not os.path.isdir(shards):
        if os.path.isfile(os.path.join(ckpt, WEIGHTS)):
            return ckpt if out is None else _copy(ckpt, out)
        raise VGSError(f"{ckpt} holds neither sharded state ({DCP_DIR}/) nor {WEIGHTS}")
    try:
        config = Qwen2Config.from_pretrained(ckpt)
    except Exception as exc:  # noqa: BLE001
        raise VGSError(f"cannot read the model config in {ckpt}: {exc}") from exc
    model = Qwen2ForClassifier(config).float()
    sd = {"model": model.state_dict()}
    dcp.load(sd, checkpoint_id=shards, no_dist=True)  # one process: reads every shard of the model entries
    model.load_state_dict(sd["model"])
    dest = out or ckpt
    tmp = os.path.join(dest, ".export.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    for name in os.listdir(ckpt):  # config, tokenizer files (not the shards or the trainer state)
        src = os.path.join(ckpt, name)
        if out and os.path.isfile(src) and name not in (WEIGHTS, "trainer_state.pt"):
            shutil.copy(src, os.path.join(dest, name))
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(dest, name))
    os.rmdir(tmp)
    return dest


def _copy(ckpt: str, out: str) -> str:
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(ckpt):
        src = os.path.join(ckpt, name)
        if os.path.isfile(src) and name != "trainer_state.pt":
            shutil.copy(src, os.path.join(out, name))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m value_models.export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a checkpoint directory (RUN/checkpoints/step_N)")
    p.add_argument("--out", default=None, help="write the model here instead of into the checkpoint")
    args = p.parse_args(argv)
    return run_command("value_models.export", lambda: f"[export] {export_checkpoint(args.checkpoint, args.out)}")


if __name__ == "__main__":
    sys.exit(main())
