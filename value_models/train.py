"""Train a token-level value model. One readable loop, from 1 CPU process to many GPU nodes.

    python -m value_models.train --data DIR --init MODEL --out RUN          # one process
    python -m value_models.prepare --data DIR --out PREP                    # once, before torchrun
    torchrun --nproc_per_node 8 -m value_models.train --data PREP ...       # DDP (NCCL / gloo)
    torchrun --nnodes 16 --nproc_per_node 8 --rdzv-endpoint HOST:PORT ...   # many nodes (--fsdp)

What one optimizer step does (the published recipe, see docs/training.md):
- take the next global batch of `--batch-size` sequences from the sampler (the same on all
  ranks), keep this rank's share, split it into length-sorted micro-batches;
- per micro-batch: forward, token-level cross-entropy on roll-out tokens (mean per
  sequence), summed over sequences and divided by the rank's share, backward (gradient
  synchronisation only on the last micro-batch);
- clip the global gradient norm, AdamW step with the warmup + cosine learning rate.

Checkpoints are `save_pretrained` directories of `Qwen2ForClassifier` (the published layout,
loadable by `vgs.modeling.load_value_model` and the scorer) plus `trainer_state.pt`
(step, sampler position, every rank's RNG; with DDP also the optimizer). With `--fsdp` the
model and optimizer state are per-rank shards (`dcp/`, torch.distributed.checkpoint), and the
model is consolidated only on export. They are written into a temporary directory and
renamed, so a run killed at any moment leaves only complete checkpoints, and `--resume`
continues with bit-identical losses on the same CPU hardware (docs/training.md: what holds
on GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vgs.errors import VGSError
from value_models.checks import need
from value_models.checkpointing import (CKPT_DIR, DCP_DIR, STATE_FILE, final_model, load_sharded, mark_final,
                                        open_run, publish_checkpoint, remove_partial, save_sharded, save_tokenizer,
                                        staging_dir)
from value_models.data import DROP_FILTERS
from value_models.distributed import (Dist, all_gather_objects, all_sum, autocast, barrier, ddp, fully_shard_layers,
                                      setup_distributed, sync_context, teardown)
from value_models.logs import CsvLog, Trackers

DATA_CACHE = ".data_cache"
TRAIN_FIELDS = ["step", "epoch", "lr", "loss", "grad_norm", "seqs", "loss_tokens", "tokens", "pad_frac", "step_s", "tok_per_s"]
VAL_FIELDS = ["step", "val_loss", "val_seqs", "acc", "auc", "ece", "brier", "prefix_auc", "prefix_ece", "pos_frac"]
VARLEN_ATTN = ("flash_attention_2", "flash_attention_3")
HEAD_INITS = ("config", "fan_in")


@dataclass
class TrainConfig:
    data: list[str]
    init: str
    out: str
    val_data: list[str] = field(default_factory=list)
    val_fraction: float = 0.05
    val_max_seqs: int = 2000
    num_labels: int = 3
    max_length: int = 16384
    batch_size: int = 128
    micro_batch_size: int = 4
    steps: int | None = None
    epochs: float | None = None
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-6
    grad_clip: float = 5.0
    dropout: float = 0.05
    head_init: str = "config"  # a new head's matrices: "config" (N(0, initializer_range)) or "fan_in" (N(0, 1/fan_in))
    grad_checkpointing: bool | None = None  # None: on for GPU runs, off on CPU
    pack: bool = False
    drop: str = "auto"  # problem filter over all --data: auto = what the collection manifests name
    pad_to_multiple: int = 8
    data_cache: bool = True
    dtype: str = "auto"
    attn_impl: str = "sdpa"
    fsdp: bool = False
    export_every: int = 0
    seed: int = 1337
    eval_every: int = 0
    save_every: int = 0
    keep_last: int = 3
    log_every: int = 1
    resume: bool = False
    stop_at_step: int | None = None
    tokenizer: str | None = None
    tensorboard: bool = False
    wandb_project: str | None = None
    run_name: str | None = None

    def validate(self) -> "TrainConfig":
        need(bool(self.data), "--data is required")
        need(bool(self.init), "--init is required (a causal-LM or value-model checkpoint)")
        need(bool(self.out), "--out is required")
        need(self.num_labels in (1, 3), f"--num-labels must be 1 or 3, got {self.num_labels}")
        need(self.max_length >= 2, f"--max-length must be >= 2, got {self.max_length}")
        need(self.batch_size >= 1 and self.micro_batch_size >= 1, "--batch-size and --micro-batch-size must be >= 1")
        need(self.steps is None or self.steps >= 1, f"--steps must be >= 1, got {self.steps}")
        need(self.epochs is None or self.epochs > 0, f"--epochs must be > 0, got {self.epochs}")
        need(self.lr > 0 and 0 <= self.min_lr_ratio <= 1, "--lr must be > 0 and --min-lr-ratio in [0, 1]")
        need(self.warmup_steps is None or self.warmup_steps >= 0, "--warmup-steps must be >= 0")
        need(0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}")
        need(self.grad_clip >= 0, "--grad-clip must be >= 0 (0 disables clipping)")
        need(0 <= self.val_fraction < 1, f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        need(self.head_init in HEAD_INITS, f"--head-init must be one of {', '.join(HEAD_INITS)}, got {self.head_init!r}")
        need(self.dtype in ("auto", "bf16", "fp32"), f"--dtype must be auto, bf16 or fp32, got {self.dtype}")
        need(self.pad_to_multiple >= 1, "--pad-to-multiple must be >= 1")
        need(self.keep_last >= 1, "--keep-last must be >= 1")
        need(self.stop_at_step is None or self.stop_at_step >= 1, "--stop-at-step must be >= 1")
        need(self.export_every >= 0, "--export-every must be >= 0")
        need(self.drop == "auto" or self.drop in DROP_FILTERS,
             f"--drop must be auto or one of {', '.join(DROP_FILTERS)}, got {self.drop!r}")
        need(not self.pack or self.attn_impl in VARLEN_ATTN,
             f"--pack needs varlen attention (--attn-impl {' or '.join(VARLEN_ATTN)}, CUDA + the flash-attn "
             f"package): with {self.attn_impl} the packed row would need a dense [tokens x tokens] mask "
             "(17 GB for 8 x 16k tokens); train without --pack (length-sorted padding)")
        return self


# ----------------------------------------------------------------------------------------------
# model, optimizer, schedule, loss


def build_model(cfg: TrainConfig, source: str, main: bool):
    """A `Qwen2ForClassifier` from a value-model checkpoint (warm start, same head) or from a
    causal LM (backbone weights, freshly initialised head; seeded, so identical on all ranks)."""
    import torch
    from transformers import Qwen2Config
    from transformers.utils import logging as hf_logging

    from vgs.modeling import ARCHITECTURE, LABEL_NAMES, Qwen2ForClassifier, is_value_checkpoint

    if not os.path.isdir(source) and not os.path.exists(os.path.join(source, "config.json")) and source.startswith(("/", ".")):
        raise VGSError(f"--init {source!r} does not exist")
    try:
        config = Qwen2Config.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001
        raise VGSError(f"cannot read a model config from {source!r}: {exc}") from exc
    if config.model_type != "qwen2":
        raise VGSError(f"--init must be a Qwen2-architecture model (the value model is Qwen2ForClassifier); "
                       f"{source!r} is {config.model_type!r}")
    warm = is_value_checkpoint(source)
    if warm and int(config.num_labels) != cfg.num_labels:
        raise VGSError(f"{source!r} is a value model with {config.num_labels} label(s) but --num-labels is {cfg.num_labels}")
    config.num_labels = cfg.num_labels
    config.architectures = [ARCHITECTURE]
    if cfg.num_labels == 3:
        config.id2label, config.label2id = dict(LABEL_NAMES), {v: k for k, v in LABEL_NAMES.items()}
    config.attention_dropout = cfg.dropout
    config.head_dropout = cfg.dropout
    config.use_cache = False
    torch.manual_seed(cfg.seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # the load report of a causal LM lists lm_head/score: expected
    try:
        model = Qwen2ForClassifier.from_pretrained(source, config=config, dtype=torch.float32,
                                                   attn_implementation=cfg.attn_impl)
    except Exception as exc:  # noqa: BLE001
        raise VGSError(f"cannot load weights from {source!r}: {exc.__class__.__name__}: {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    model.head_dropout = cfg.dropout
    if not warm and cfg.head_init == "fan_in":
        init_head_fan_in(model)
    if main:
        kind = "value model (warm start)" if warm else "causal LM backbone + new head"
        n = sum(p.numel() for p in model.parameters())
        print(f"[train] init from {source}: {kind}, {n / 1e6:.1f}M params, {cfg.num_labels} label(s)", flush=True)
    return model


def init_head_fan_in(model) -> None:
    """Re-draw a new head's matrices from N(0, 1/fan_in) (seeded by the caller).

    Why: transformers draws them from N(0, initializer_range = 0.02) whatever the width. For
    the published 1.5B (hidden 1536) that is about 1/sqrt(fan_in) anyway; for a hidden-128
    model it is 4.4x smaller per layer, ~20x on the logits, and the backbone gets almost no
    gradient through the head at first (docs/demo_world.md: the demo value model's plateau)."""
    import torch

    with torch.no_grad():
        for layer in model.score:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0.0, layer.weight.shape[1] ** -0.5)


def param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (dim >= 2: linear weights, embeddings, head), none on norms/biases."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, cfg: TrainConfig, total: int, warmup: int) -> float:
    """Linear warmup from 0 over `warmup` steps, then cosine down to min_lr_ratio * lr at `total`."""
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def sequence_losses(logits, batch):
    """Per-sequence mean of the token-level loss over roll-out tokens: [num_seqs] fp32.

    Every supervised position is trained toward its sequence's outcome class (3 classes: CE;
    1 class: BCE against label == 1). Works for padded and packed batches via `seq_index`;
    a sequence without supervised tokens gets 0 (as `modeling.token_level_loss`)."""
    import torch
    import torch.nn.functional as F

    c = logits.shape[-1]
    flat = logits.reshape(-1, c).float()
    sel = batch.loss_mask.reshape(-1) > 0
    seq = batch.seq_index.reshape(-1)[sel]
    lg = flat[sel]
    target = batch.labels[seq]
    if c == 1:
        per_tok = F.binary_cross_entropy_with_logits(lg[:, 0], (target == 1).float(), reduction="none")
    else:
        per_tok = F.cross_entropy(lg, target, reduction="none")
    n = batch.num_seqs
    sums = torch.zeros(n, device=flat.device, dtype=torch.float32).index_add(0, seq, per_tok)
    counts = torch.zeros(n, device=flat.device, dtype=torch.float32).index_add(0, seq, torch.ones_like(per_tok))
    return sums / counts.clamp_min(1.0)


# ----------------------------------------------------------------------------------------------
# validation metrics


def binary_metrics(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> dict[str, float]:
    """Accuracy of p > 0.5, ROC-AUC and expected calibration error of P(correct) against the
    binary outcome label == 1 (classes 0 and 2 both count as "not correct"), so 3-class
    labels work (the published validation broke on label 2)."""
    import pandas as pd

    p = np.asarray(probs, dtype=np.float64)
    y = (np.asarray(labels) == 1).astype(np.float64)
    out = {"acc": float("nan"), "auc": float("nan"), "ece": float("nan"), "brier": float("nan"),
           "pos_frac": float("nan")}
    if len(p) == 0:
        return out
    out["acc"] = float(((p > 0.5) == (y == 1)).mean())
    out["brier"] = float(((p - y) ** 2).mean())
    out["pos_frac"] = float(y.mean())
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    if n_pos and n_neg:  # Mann-Whitney U with average ranks for ties
        ranks = pd.Series(p).rank(method="average").to_numpy()
        out["auc"] = float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    idx = np.minimum((p * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += m.mean() * abs(p[m].mean() - y[m].mean())
    out["ece"] = float(ece)
    return out


# ----------------------------------------------------------------------------------------------
# checkpoints


def _rng_state() -> dict:
    import torch

    s = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def _set_rng_state(s: dict) -> None:
    import torch

    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def save_checkpoint(cfg: TrainConfig, d: Dist, model, raw_model, optimizer, step: int, state: dict,
                    export: bool = True) -> str:
    """Collective: every rank calls it. Everything goes into `.step_N.tmp`, which rank 0 renames.

    DDP: rank 0 writes the model (`save_pretrained`) and the full optimizer state. FSDP:
    every rank writes its own shard of model + optimizer state (torch.distributed.checkpoint,
    `dcp/`), nothing is gathered; the model is consolidated into `model.safetensors` only on
    export (the last step, every `--export-every` steps, or `python -m value_models.export`)."""
    import torch
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    name, tmp = staging_dir(cfg.out, step)
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier(d)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = optim_sd = None
    if cfg.fsdp:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, optimizer)
        save_sharded({"model": msd, "optim": osd}, os.path.join(tmp, DCP_DIR))
        if export:
            model_sd = get_model_state_dict(model, options=opts)
    else:
        optim_sd = get_optimizer_state_dict(model, optimizer, options=opts)
    rngs = all_gather_objects(d, _rng_state())
    if d.main:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if export or not cfg.fsdp:
            raw_model.save_pretrained(tmp, state_dict=model_sd, safe_serialization=True)
        else:
            raw_model.config.save_pretrained(tmp)  # what `value_models.export` needs to consolidate later
        save_tokenizer(cfg.tokenizer or cfg.init, tmp)
        torch.save({**state, "step": step, "optimizer": optim_sd, "sharded": cfg.fsdp, "rng": rngs,
                    "world_size": d.world, "config": dataclasses.asdict(cfg)}, os.path.join(tmp, STATE_FILE))
        publish_checkpoint(cfg.out, tmp, name, cfg.keep_last)
    barrier(d)
    return os.path.join(cfg.out, CKPT_DIR, name)


# ----------------------------------------------------------------------------------------------
# the loop


def _forward(model, batch, cfg: TrainConfig, d: Dist):
    with autocast(cfg.dtype, d):
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids, use_cache=False)
    return out.logits.float()


def evaluate(model, ds, val_idx: np.ndarray, cfg: TrainConfig, d: Dist, pad_id: int) -> dict[str, float]:
    """Held-out loss and metrics of the value at the final token and at the end of the roll-in
    prefix (the state search actually scores). Every rank runs the same number of forward
    passes (FSDP needs it): short shards repeat their last batch and discard its outputs."""
    import torch

    from value_models.data import collate, length_buckets
    from vgs.modeling import success_probs

    mine = val_idx[d.rank:: d.world].tolist()
    buckets = length_buckets(mine, ds.lengths, cfg.micro_batch_size)
    n_batches = int(max(all_gather_objects(d, len(buckets))))
    model.eval()
    losses, finals, prefixes, labels = [], [], [], []
    with torch.no_grad():
        for k in range(n_batches):
            real = k < len(buckets)
            idx = buckets[k] if real else (buckets[-1] if buckets else [int(val_idx[0])])
            batch = collate([ds[i] for i in idx], pad_id, cfg.pad_to_multiple, cfg.pack).to(d.device)
            logits = _forward(model, batch, cfg, d)
            if not real:
                continue
            flat = logits.reshape(-1, logits.shape[-1])
            losses += sequence_losses(logits, batch).tolist()
            finals += success_probs(flat[batch.last_pos]).tolist()
            pre = (batch.first_out_pos - 1).clamp_min(0)  # last prompt/roll-in token
            prefixes += success_probs(flat[pre]).tolist()
            labels += batch.labels.tolist()
    model.train()
    parts = all_gather_objects(d, (losses, finals, prefixes, labels))
    losses = [x for p in parts for x in p[0]]
    finals = np.array([x for p in parts for x in p[1]])
    prefixes = np.array([x for p in parts for x in p[2]])
    labels = np.array([x for p in parts for x in p[3]])
    m = binary_metrics(finals, labels)
    pm = binary_metrics(prefixes, labels)
    return {"val_loss": float(np.mean(losses)) if losses else float("nan"), "val_seqs": len(losses),
            **{k: m[k] for k in ("acc", "auc", "ece", "brier", "pos_frac")},
            "prefix_auc": pm["auc"], "prefix_ece": pm["ece"]}


def _wrap(model, cfg: TrainConfig, d: Dist):
    if use_grad_checkpointing(cfg, d):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(d.device)
    if cfg.fsdp:
        return fully_shard_layers(model, model.model.layers, cfg.dtype, d)
    return ddp(model, d) if d.enabled else model


def use_grad_checkpointing(cfg: TrainConfig, d: Dist) -> bool:
    """Explicit setting, else on for GPU runs (16k-token sequences of the 1.5B model need it,
    see docs/training.md) and off on CPU (small models, where recomputation only costs time)."""
    return cfg.grad_checkpointing if cfg.grad_checkpointing is not None else d.device.type == "cuda"


def _check_varlen(cfg: TrainConfig, d: Dist) -> None:
    """Packing is only offered with varlen attention, which reads the sequence boundaries from
    the position ids instead of a dense mask over the packed row."""
    from transformers.utils import is_flash_attn_2_available

    if d.device.type != "cuda" or (cfg.attn_impl == "flash_attention_2" and not is_flash_attn_2_available()):
        raise VGSError(f"--pack with --attn-impl {cfg.attn_impl} needs a CUDA GPU and the flash-attn package "
                       "(pip install flash-attn); train without --pack otherwise")


def load_data(cfg: TrainConfig, d: Dist, paths: list[str], drop: str):
    """Prepared directories as they are; raw Parquet data only in a single process (prepared
    into OUT/.data_cache first, or read into memory with --no-data-cache). Under torchrun,
    raw data is refused: preparing it on one rank would keep the others waiting in a barrier
    that times out (NCCL: 10 minutes) on large data."""
    import hashlib

    from value_models.data import ValueDataset, is_prepared
    from value_models.prepare import prepare

    ready = [p for p in paths if os.path.isdir(p) and is_prepared(p)]
    raw = [p for p in paths if p not in ready]
    if raw and d.world > 1:
        raise VGSError(f"training data {' '.join(raw)} is not prepared; run `python -m value_models.prepare --data "
                       f"{' '.join(raw)} --out PREPARED` once, then torchrun ... --data PREPARED")
    if raw and cfg.data_cache:
        key = hashlib.sha1(json.dumps(sorted(os.path.abspath(p) for p in raw)).encode()).hexdigest()[:16]
        cache = os.path.join(cfg.out, DATA_CACHE, key)
        prepare(raw, cache, progress=False)
        paths = ready + [cache]
    return ValueDataset(paths, cfg.max_length, drop=drop)


def train(cfg: TrainConfig) -> str:
    """Run (or resume) training; returns the final checkpoint directory."""
    cfg.validate()
    d = setup_distributed(cfg.fsdp)
    try:
        return _train(cfg, d)
    finally:
        teardown()


def _train(cfg: TrainConfig, d: Dist) -> str:
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    from value_models.data import StepSampler, collate, length_buckets, recorded_drop

    per_rank = cfg.batch_size // d.world
    if cfg.batch_size % d.world or per_rank % cfg.micro_batch_size:
        raise VGSError(f"--batch-size {cfg.batch_size} must be a multiple of world size ({d.world}) x "
                       f"--micro-batch-size ({cfg.micro_batch_size})")
    ckpt = open_run(cfg.out, cfg.resume)
    # -- data: prepared directories are memory-mapped by every rank (no rank waits for another)
    if cfg.pack:
        _check_varlen(cfg, d)
    drop = cfg.drop if cfg.drop != "auto" else (recorded_drop(cfg.data) or "none")
    ds = load_data(cfg, d, cfg.data, drop)
    usable = ds.usable()
    if cfg.val_data:
        train_idx = usable
        val_ds = load_data(cfg, d, cfg.val_data, drop)
        val_idx = val_ds.usable()
    else:
        train_idx, val_idx = ds.split(usable, cfg.val_fraction, seed=cfg.seed)
        val_ds = ds
    if len(val_idx) > cfg.val_max_seqs:
        val_idx = np.sort(np.random.default_rng(cfg.seed).choice(val_idx, cfg.val_max_seqs, replace=False))
    sampler = StepSampler(train_idx, cfg.batch_size, seed=cfg.seed, rank=d.rank, world_size=d.world)
    total = cfg.steps or max(1, math.ceil((cfg.epochs or 1.0) * sampler.steps_per_epoch))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(0.05 * total)
    # -- resume or fresh start (an FSDP checkpoint holds no full optimizer state: each rank reads its shard)
    state = torch.load(os.path.join(ckpt, STATE_FILE), map_location="cpu", weights_only=False) if ckpt else None
    sharded = bool(state and state.get("sharded"))
    if d.main:
        remove_partial(cfg.out)  # partial writes of a killed run
        with open(os.path.join(cfg.out, "train_config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
    barrier(d)
    pad_id = _pad_id(cfg)
    raw_model = build_model(cfg, cfg.init if sharded or not ckpt else ckpt, d.main)
    raw_model.train()
    model = _wrap(raw_model, cfg, d)
    optimizer = torch.optim.AdamW(param_groups(raw_model, cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)  # fused: also ~7x faster on CPU
    step = 0
    if state is not None and sharded:
        load_sharded(model, optimizer, os.path.join(ckpt, DCP_DIR))
    elif state is not None:
        set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
    if state is not None:
        sampler.load_state_dict(state["sampler"])
        step = int(state["step"])
        if int(state.get("world_size", d.world)) == d.world:
            _set_rng_state(state["rng"][d.rank])
        else:
            torch.manual_seed(cfg.seed + 1000 * d.rank + step)
            if d.main:
                print(f"[train] world size changed ({state['world_size']} -> {d.world}): RNG streams reseeded", flush=True)
        if d.main:
            print(f"[train] resumed from {ckpt} at step {step}", flush=True)
    else:
        torch.manual_seed(cfg.seed + 1000 * d.rank)  # dropout masks differ per rank
    train_log = CsvLog(os.path.join(cfg.out, "train_log.csv"), TRAIN_FIELDS, step) if d.main else None
    val_log = CsvLog(os.path.join(cfg.out, "val_log.csv"), VAL_FIELDS, step) if d.main else None
    trackers = Trackers(cfg, d.main)
    if d.main:
        n_drop = int(ds.dropped_problems.sum())
        print(f"[train] --drop {drop}: {n_drop} of {len(ds.problem_names)} problems dropped ({int(ds.dropped.sum())} rows), "
              f"judged over all --data together", flush=True)
        print(f"[train] {len(train_idx)} train / {len(val_idx)} val sequences "
              f"({int(((ds.loss_tokens == 0) & ~ds.dropped).sum())} skipped: roll-in fills max_length), "
              f"{total} steps x {cfg.batch_size} seqs "
              f"({sampler.steps_per_epoch} steps/epoch), world {d.world}, device {d.device}", flush=True)

    last_ckpt = ckpt
    stop = min(total, cfg.stop_at_step) if cfg.stop_at_step else total
    while step < stop:
        t0 = time.time()
        lr = lr_at(step, cfg, total, warmup)
        for g in optimizer.param_groups:
            g["lr"] = lr
        micro = length_buckets(sampler.next_indices(), ds.lengths, cfg.micro_batch_size)
        loss_sum = tokens = loss_tokens = padded = 0.0
        for k, idx in enumerate(micro):
            batch = collate([ds[i] for i in idx], pad_id, cfg.pad_to_multiple, cfg.pack).to(d.device)
            with sync_context(model, cfg.fsdp, sync=k == len(micro) - 1):
                per_seq = sequence_losses(_forward(model, batch, cfg, d), batch)
                loss = per_seq.sum() / per_rank
                loss.backward()
            loss_sum += float(per_seq.detach().sum())
            tokens += batch.num_tokens
            padded += batch.num_padded
            loss_tokens += float(batch.loss_mask.sum())
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_sum, tokens, loss_tokens, padded = all_sum(d, [loss_sum, tokens, loss_tokens, padded])
        dt = time.time() - t0
        row = {"step": step, "epoch": round(sampler.epoch + sampler.position / max(1, len(train_idx)), 4), "lr": lr,
               "loss": loss_sum / cfg.batch_size, "grad_norm": float(grad_norm), "seqs": cfg.batch_size,
               "loss_tokens": int(loss_tokens), "tokens": int(tokens), "pad_frac": round(1 - tokens / max(1.0, padded), 4),
               "step_s": round(dt, 3), "tok_per_s": round(tokens / max(dt, 1e-9), 1)}
        if d.main:
            train_log.write(row)
            trackers.log("train", row, step)
            if step % cfg.log_every == 0 or step == stop:
                print(f"[train] step {step}/{total} | loss {row['loss']:.4f} | lr {lr:.2e} | gnorm {row['grad_norm']:.3f} "
                      f"| {row['tok_per_s']:.0f} tok/s | pad {row['pad_frac']:.1%} | epoch {row['epoch']:.2f}", flush=True)
        if len(val_idx) and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total):
            vrow = {"step": step, **evaluate(model, val_ds, val_idx, cfg, d, pad_id)}
            if d.main:
                val_log.write(vrow)
                trackers.log("val", vrow, step)
                print(f"[train] val step {step} | loss {vrow['val_loss']:.4f} | acc {vrow['acc']:.3f} | auc {vrow['auc']:.3f} "
                      f"| ece {vrow['ece']:.3f} | prefix auc {vrow['prefix_auc']:.3f} ({vrow['val_seqs']} seqs)", flush=True)
        if (cfg.save_every and step % cfg.save_every == 0) or step == stop:
            export = step == total or bool(cfg.export_every and step % cfg.export_every == 0)
            last_ckpt = save_checkpoint(cfg, d, model, raw_model, optimizer, step, {"sampler": sampler.state_dict()},
                                        export=export)
            if d.main:
                print(f"[train] saved {last_ckpt}", flush=True)
    if step >= total and d.main and last_ckpt:
        mark_final(cfg.out, last_ckpt)
    barrier(d)
    if d.main:
        train_log.close()
        val_log.close()
    trackers.close()
    return last_ckpt or ""


def _pad_id(cfg: TrainConfig) -> int:
    """Padding never reaches the loss or attention; any valid id works. Prefer the config's
    pad / EOS id so padded batches look like the published ones."""
    try:
        with open(os.path.join(cfg.init, "config.json")) as f:
            c = json.load(f)
        for key in ("pad_token_id", "eos_token_id"):
            v = c.get(key)
            if isinstance(v, list):
                v = v[0] if v else None
            if isinstance(v, int):
                return v
    except (OSError, ValueError):
        pass
    return 0


# ----------------------------------------------------------------------------------------------
# command line


def add_arguments(p: argparse.ArgumentParser, rounds: bool = False) -> None:
    """Training flags (shared with `vgs train-rounds`, where --seed and --dtype, which the
    collection flags also have, are spelled --train-seed and --train-dtype)."""
    g = p.add_argument_group("training")
    g.add_argument("--max-length", type=int, default=16384, help="truncate roll_in + roll_out to this many tokens")
    g.add_argument("--num-labels", type=int, default=3, choices=(1, 3), help="3-class CE head or 1-class BCE head")
    g.add_argument("--batch-size", type=int, default=128, help="sequences per optimizer step, all ranks together (published code default; the "
                        "released model used 1024)")
    g.add_argument("--micro-batch-size", type=int, default=4, help="sequences per forward pass per rank (released model: 8)")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (default: --epochs worth)")
    g.add_argument("--epochs", type=float, default=None, help="passes over the training split (default 1)")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    g.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of the steps (the published code floors it at 100; "
                        "docs/training.md lists where the defaults differ from the recipe)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="on matrices only")
    g.add_argument("--beta1", type=float, default=0.9)
    g.add_argument("--beta2", type=float, default=0.95)
    g.add_argument("--eps", type=float, default=1e-6, help="AdamW epsilon (published: 1e-6)")
    g.add_argument("--grad-clip", type=float, default=5.0, help="global grad-norm clip (0: off)")
    g.add_argument("--dropout", type=float, default=0.05, help="attention + head-input dropout (published: 0.05)")
    g.add_argument("--head-init", default="config", choices=HEAD_INITS,
                   help="a new head (init from a causal LM): config = N(0, initializer_range) as transformers does, "
                        "fan_in = N(0, 1/fan_in), width-independent (small models learn faster, docs/demo_world.md)")
    g.add_argument("--grad-checkpointing", dest="grad_checkpointing", action="store_const", const=True, default=None,
                   help="recompute activations in backward (default: on for GPU runs, off on CPU)")
    g.add_argument("--no-grad-checkpointing", dest="grad_checkpointing", action="store_const", const=False)
    g.add_argument("--pack", action="store_true",
                   help="pack each micro-batch into one row (no padding); needs --attn-impl flash_attention_2 "
                        "on CUDA (varlen attention), refused otherwise: SDPA would need a dense mask over the row")
    g.add_argument("--drop", default="auto", choices=("auto",) + DROP_FILTERS,
                   help="problem filter, judged per problem over all --data (all rounds): all-wrong = drop problems "
                        "without a correct roll-out (published VGS), no-variation = also all-correct ones, none; "
                        "auto = what `vgs collect --drop` recorded, else none")
    g.add_argument("--pad-to-multiple", type=int, default=8)
    g.add_argument("--no-data-cache", dest="data_cache", action="store_false",
                   help="single process, unprepared data: read the Parquet data into memory instead of "
                        "preparing a memory-mapped copy in OUT/.data_cache")
    g.add_argument("--train-dtype" if rounds else "--dtype", dest="train_dtype", default="auto", choices=("auto", "bf16", "fp32"),
                   help="autocast dtype: auto = bf16 on GPU, fp32 on CPU (weights stay fp32)")
    g.add_argument("--attn-impl", default="sdpa", help="transformers attention implementation (sdpa, flash_attention_2, eager)")
    g.add_argument("--fsdp", action="store_true",
                   help="shard parameters/grads/optimizer (FSDP2) instead of DDP; checkpoints are per-rank shards")
    g.add_argument("--export-every", type=int, default=0,
                   help="FSDP: also consolidate the model into model.safetensors every K steps (always at the end)")
    g.add_argument("--val-fraction", type=float, default=0.05,
                   help="fraction of problems held out by problem id (differs from the published run, which "
                        "trained on all of OpenR1-VM; 0 does the same)")
    g.add_argument("--val-max-seqs", type=int, default=2000)
    g.add_argument("--eval-every", type=int, default=0, help="validate every K steps (always at the end)")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every K steps (always at the end)")
    g.add_argument("--keep-last", type=int, default=3, help="checkpoints kept")
    g.add_argument("--log-every", type=int, default=1)
    g.add_argument("--train-seed" if rounds else "--seed", dest="train_seed", type=int, default=1337,
                   help="data order, head init, dropout")
    g.add_argument("--tokenizer", default=None, help="tokenizer files to copy into checkpoints (default: from --init)")
    g.add_argument("--tensorboard", action="store_true")
    g.add_argument("--wandb-project", default=None)


def config_from_args(args: argparse.Namespace, **override: Any) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    kw = {k: v for k, v in vars(args).items() if k in names and k not in ("seed", "dtype")}
    kw["seed"], kw["dtype"] = args.train_seed, args.train_dtype
    kw.update(override)
    return TrainConfig(**kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m value_models.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", help="prepared directories (value_models.prepare; required under torchrun) "
                                             "or, in one process, Parquet files or directories (rounds: list them all)")
    p.add_argument("--val-data", nargs="+", default=[], help="held-out Parquet data (default: split --data by problem)")
    p.add_argument("--init", help="causal LM (new head) or value model (warm start) checkpoint")
    p.add_argument("--out", help="run directory: checkpoints/, train_log.csv, val_log.csv, final")
    p.add_argument("--config-json", default=None,
                   help="read every setting from this JSON (a TrainConfig; `vgs train-rounds` uses it)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out (if any)")
    p.add_argument("--stop-at-step", type=int, default=None, help="checkpoint and exit after this step (job slicing)")
    p.add_argument("--run-name", default=None)
    add_arguments(p)
    return p


def load_config_json(path: str) -> TrainConfig:
    try:
        with open(path) as f:
            return TrainConfig(**json.load(f))
    except (OSError, ValueError, TypeError) as exc:
        raise VGSError(f"cannot read a training config from {path!r}: {exc}") from exc


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.config_json:
            cfg = load_config_json(args.config_json)
        else:
            missing = [f"--{k}" for k in ("data", "init", "out") if not getattr(args, k)]
            if missing:
                raise VGSError(f"missing {', '.join(missing)}")
            cfg = config_from_args(args)
        ckpt = train(cfg)
    except VGSError as exc:
        print(f"value_models.train: error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0 and ckpt:
        done = final_model(cfg.out) is not None
        print(f"[train] {'done' if done else 'stopped; continue with --resume'}: {ckpt}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
