"""Run directories and checkpoints shared by the trainers (value model, A*-PO).

    OUT/checkpoints/step_NNNNNNNN/   a save_pretrained model directory + tokenizer + trainer_state.pt
    OUT/checkpoints/LATEST           the newest complete one
    OUT/final -> checkpoints/...     set when a run finishes

A checkpoint is written into `.step_N.tmp` and renamed by rank 0 once complete, so a run
killed at any moment leaves only complete checkpoints. Under FSDP the optimizer state (and,
for the value model, the model) are per-rank shards (`dcp/`, torch.distributed.checkpoint):
each rank writes and, on resume, reads only its own part, whatever world size wrote them.
"""

from __future__ import annotations

import os
import shutil

from vgs.errors import VGSError

CKPT_DIR = "checkpoints"
STATE_FILE = "trainer_state.pt"
LATEST_FILE = "LATEST"
FINAL_LINK = "final"
DCP_DIR = "dcp"


def checkpoint_dirs(out: str) -> list[str]:
    """Complete checkpoints (those holding a trainer state), oldest first."""
    root = os.path.join(out, CKPT_DIR)
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith("step_") and not n.endswith(".tmp"))
    return [os.path.join(root, n) for n in names if os.path.isfile(os.path.join(root, n, STATE_FILE))]


def latest_checkpoint(out: str) -> str | None:
    dirs = checkpoint_dirs(out)
    return dirs[-1] if dirs else None


def final_model(out: str) -> str | None:
    """The checkpoint of a finished run (`OUT/final`), or None while it is unfinished."""
    link = os.path.join(out, FINAL_LINK)
    return os.path.realpath(link) if os.path.isdir(link) else None


def open_run(out: str, resume: bool) -> str | None:
    """Create `OUT/checkpoints` and return the checkpoint to resume from (None: fresh start).
    A run directory that already holds checkpoints is refused without `--resume`."""
    os.makedirs(os.path.join(out, CKPT_DIR), exist_ok=True)
    ckpt = latest_checkpoint(out)
    if ckpt and not resume:
        raise VGSError(f"{out} already holds checkpoints (latest {os.path.basename(ckpt)}); "
                       "pass --resume to continue it, or choose a new --out")
    return ckpt


def remove_partial(out: str) -> None:
    """Rank 0 at start: drop `.tmp` directories a killed run left behind."""
    root = os.path.join(out, CKPT_DIR)
    for stale in os.listdir(root):
        if stale.endswith(".tmp"):
            shutil.rmtree(os.path.join(root, stale), ignore_errors=True)


def staging_dir(out: str, step: int) -> tuple[str, str]:
    """(name, temporary directory) of the checkpoint of `step`."""
    name = f"step_{step:08d}"
    return name, os.path.join(out, CKPT_DIR, f".{name}.tmp")


def save_tokenizer(source: str, dst: str) -> None:
    """Tokenizer files (and chat template) next to the weights, so a checkpoint is a standalone
    vLLM / transformers model directory, whether `source` is a local directory or a Hub id
    (`from_pretrained` reads the Hub cache, offline too)."""
    from vgs.prompts import load_tokenizer

    load_tokenizer(source).save_pretrained(dst)
    gen = os.path.join(source, "generation_config.json")
    if os.path.isfile(gen) and not os.path.exists(os.path.join(dst, "generation_config.json")):
        shutil.copy(gen, dst)


def publish_checkpoint(out: str, tmp: str, name: str, keep_last: int) -> str:
    """Rank 0, once `tmp` is complete: rename it to `OUT/checkpoints/name` (atomic), point
    `LATEST` at it (atomic), drop all but the newest `keep_last`. A crash at any point leaves
    either the previous checkpoint or the new one, never a half-written one."""
    root = os.path.join(out, CKPT_DIR)
    final = os.path.join(root, name)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    with open(os.path.join(root, LATEST_FILE + ".tmp"), "w") as f:
        f.write(name + "\n")
    os.replace(os.path.join(root, LATEST_FILE + ".tmp"), os.path.join(root, LATEST_FILE))
    for old in checkpoint_dirs(out)[: -keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def mark_final(out: str, ckpt: str) -> None:
    link, tmp = os.path.join(out, FINAL_LINK), os.path.join(out, FINAL_LINK + ".tmp")
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(os.path.relpath(ckpt, out), tmp)
    os.replace(tmp, link)


def save_sharded(state: dict, path: str) -> None:
    """Collective: every rank writes its own shards of `state` (DCP), nothing is gathered."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=path)


def load_sharded(model, optimizer, path: str, model_too: bool = True) -> None:
    """Every rank reads only its own shards of the optimizer state (and of the model unless
    `model_too` is False, when the weights came from a consolidated checkpoint), whatever the
    world size that wrote them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_optimizer_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    sd = {"model": msd, "optim": osd} if model_too else {"optim": osd}
    dcp.load(sd, checkpoint_id=path)
    if model_too:
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    else:
        set_optimizer_state_dict(model, optimizer, optim_state_dict=sd["optim"])
