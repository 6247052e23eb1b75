"""A*-PO stage 2: on-policy least-squares policy regression, vLLM sampling + torchrun update.

    python -m value_models.apo --data VSTAR_DIR --init POLICY --out RUN                # one process
    torchrun --nproc_per_node 8 -m value_models.apo --data VSTAR_DIR --init POLICY ...   # DDP, or --fsdp

One training step (the published recipe, arXiv 2505.20686; `docs/training.md`):
- take the next global batch of `--batch-size` problems (the same on every rank; rank r keeps
  every world-th one) and sample ONE response per problem from the current policy pi_theta
  with this rank's in-process vLLM engine (`PolicyEngine`); token ids are used as vLLM
  returns them, never re-tokenized;
- reward r = 1 iff the response ended on EOS with a math-verify-equivalent boxed answer
  (the stage-1 verifier, `apo_vstar.grade_responses`);
- split the batch into `--batch-size / --mini-batch-size` mini-batches, one optimizer step
  each (gradient accumulation over `--micro-batch-size` sequences), minimising

      mean_i [ beta2 * (sum_t log pi_theta(y_t|.) - sum_t log pi_ref(y_t|.)) - (r_i - V*(x_i)) ]^2
      - entropy_coeff * (token-mean entropy of pi_theta)

  with sums over response tokens, pi_ref a frozen copy of the initial policy (sharded like
  pi_theta under FSDP). Log-probabilities come from a chunked log-softmax over the response
  positions only, each chunk recomputed in backward (activation checkpointing), so no
  [tokens x vocab] fp32 tensor is ever built or kept;
- after the batch's optimizer steps, push the new weights into the running vLLM engine
  in the engine's dtype (bf16 on GPU): one rank per node gathers them one tensor at a time
  and stages them in `--sync-dir` (default `/dev/shm`, space checked before the first step),
  every engine of the node reloads them in place (vLLM worker RPC, prefix-cache reset). The
  engine samples only at the start of a batch, so this is the same as syncing after every
  optimizer step, without the syncs nobody would sample from.

Memory (docs/training.md, `python -m benchmarks.train_memory --apo`): gradient checkpointing is
on by default on GPU; pi_ref is held in bf16 on GPU (`--ref-dtype`), and its log-probs are
computed once per batch, before the updates; FSDP (`--fsdp`) is the setting for 1.5B+ on 80 GB.

Prompts (`--prompt-format`): the stage-1 data's prompt ids as recorded by `vgs apo-vstar`
(raw problem text + the paper's instruction for base models, the chat template for chat
models), or re-rendered here from the problem text in the format asked for.

Checkpoints: `OUT/checkpoints/step_NNNNNNNN/` is a plain `Qwen2ForCausalLM` directory (weights,
config, tokenizer, whether --init is a directory or a Hub id; `vgs eval --policy` / `vgs serve
--policy` load it) plus `trainer_state.pt` (step, sampler position; without FSDP the
optimizer). Under FSDP the optimizer state is per-rank shards (`dcp/`): each rank writes and
reads back only its own. Written into a temporary directory and renamed; `--resume` continues
with identical losses on CPU (sampling seeds derive from (seed, step, problem id), and the
engine restarts from the checkpoint's weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from value_models.checks import need
from value_models.checkpointing import (CKPT_DIR, DCP_DIR, STATE_FILE, load_sharded, mark_final, open_run,
                                        publish_checkpoint, remove_partial, save_sharded, save_tokenizer, staging_dir)
from value_models.distributed import (all_sum, autocast, barrier, ddp, fully_shard_layers, pin_local_device,
                                      setup_distributed, sync_context, teardown, use_bf16)
from vgs.errors import VGSError

PROMPT_FORMATS = ("raw", "chat")
LOG_FIELDS = ["step", "epoch", "lr", "loss", "reward", "v_star", "advantage", "kl", "kl_token", "entropy",
              "resp_len", "finished", "grad_norm", "sync_lp_err", "gen_s", "train_s", "sync_s", "step_s"]


@dataclass
class ApoConfig:
    data: list[str]
    init: str
    out: str
    ref: str | None = None
    tokenizer: str | None = None
    beta2: float = 1e-3
    entropy_coeff: float = 1e-3
    lr: float = 1e-6
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0
    batch_size: int = 256
    mini_batch_size: int = 128
    micro_batch_size: int = 8
    steps: int | None = None
    epochs: float | None = None
    max_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    filter_incorrect: bool = False
    logprob_chunk: int = 512
    grad_checkpointing: bool | None = None  # None: on for GPU runs, off on CPU
    dtype: str = "auto"
    ref_dtype: str = "auto"  # auto: bf16 when the forward runs in bf16 (GPU), else fp32
    fsdp: bool = False
    prompt_format: str | None = None  # None: the stage-1 data's prompts as recorded
    sync_dir: str | None = None  # weight staging (default /dev/shm)
    check_sync: bool = False
    seed: int = 0
    kv_cache_gib: float | None = None
    gpu_memory_utilization: float = 0.4
    max_model_len: int | None = None
    engine_dtype: str = "auto"
    save_every: int = 0
    keep_last: int = 2
    resume: bool = False
    stop_at_step: int | None = None
    progress: bool = True

    def validate(self) -> "ApoConfig":
        need(bool(self.data), "--data is required (a `vgs apo-vstar` output directory)")
        need(bool(self.init), "--init is required (the policy to train; also pi_ref unless --ref)")
        need(bool(self.out), "--out is required")
        need(self.beta2 > 0 and math.isfinite(self.beta2), f"--beta2 must be > 0, got {self.beta2}")
        need(self.entropy_coeff >= 0, f"--entropy-coeff must be >= 0, got {self.entropy_coeff}")
        need(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        need(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        need(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "--adam-beta1/--adam-beta2 must be in [0, 1)")
        need(self.grad_clip >= 0, "--grad-clip must be >= 0 (0 disables clipping)")
        need(self.batch_size >= 1 and self.mini_batch_size >= 1 and self.micro_batch_size >= 1,
             "--batch-size, --mini-batch-size and --micro-batch-size must be >= 1")
        need(self.batch_size % self.mini_batch_size == 0,
             f"--batch-size ({self.batch_size}) must be a multiple of --mini-batch-size ({self.mini_batch_size})")
        need(self.steps is None or self.steps >= 1, f"--steps must be >= 1, got {self.steps}")
        need(self.epochs is None or self.epochs > 0, f"--epochs must be > 0, got {self.epochs}")
        need(self.max_tokens >= 1, f"--max-tokens must be >= 1, got {self.max_tokens}")
        need(self.temperature > 0, f"--temperature must be > 0 (on-policy sampling), got {self.temperature}")
        need(0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}")
        need(self.logprob_chunk >= 1, "--logprob-chunk must be >= 1")
        need(self.dtype in ("auto", "bf16", "fp32"), f"--dtype must be auto, bf16 or fp32, got {self.dtype}")
        need(self.ref_dtype in ("auto", "bf16", "fp32"), f"--ref-dtype must be auto, bf16 or fp32, got {self.ref_dtype}")
        need(self.prompt_format in (None,) + PROMPT_FORMATS,
             f"--prompt-format must be raw or chat, got {self.prompt_format!r}")
        need(self.kv_cache_gib is None or self.kv_cache_gib > 0, "--kv-cache-gib must be > 0")
        need(0 < self.gpu_memory_utilization <= 1, "--gpu-memory-utilization must be in (0, 1]")
        need(self.keep_last >= 1, "--keep-last must be >= 1")
        need(self.save_every >= 0, "--save-every must be >= 0")
        need(self.stop_at_step is None or self.stop_at_step >= 1, "--stop-at-step must be >= 1")
        need(self.seed >= 0, "--seed must be >= 0")
        return self


# ----------------------------------------------------------------------------------------------
# the loss


def apo_sequence_loss(logp, ref_logp, rewards, v_star, beta2: float):
    """Per-sequence A*-PO loss (beta2 * (log pi_theta(y) - log pi_ref(y)) - (r - V*))^2.
    Its gradient is 2 beta2 (beta2 log-ratio - (r - V*)) grad log pi_theta(y): REINFORCE with
    the fixed baseline V*(x) and a KL-in-reward term of weight beta2."""
    return (beta2 * (logp - ref_logp) - (rewards - v_star)) ** 2


def _chunk_logprob_entropy(h, weight, targets):
    """log p(target) and entropy for a chunk of hidden states: one [chunk, vocab] fp32 block."""
    import torch

    logits = (h @ weight.t()).float()
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets[:, None])[:, 0] - lse
    entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logp, entropy


def chunked_logprobs(hidden, weight, targets, chunk: int):
    """Token log-probabilities and entropies of `targets` under logits = hidden @ weight^T,
    `chunk` rows at a time. With grad enabled each chunk is checkpointed: its [chunk, vocab]
    logits are freed after the forward and rebuilt in backward, so peak memory holds one chunk,
    never [tokens x vocab]."""
    import torch
    from torch.utils.checkpoint import checkpoint

    outs_lp, outs_ent = [], []
    for s in range(0, hidden.shape[0], chunk):
        h, t = hidden[s: s + chunk], targets[s: s + chunk]
        if torch.is_grad_enabled():
            lp, ent = checkpoint(_chunk_logprob_entropy, h, weight, t, use_reentrant=False)
        else:
            lp, ent = _chunk_logprob_entropy(h, weight, t)
        outs_lp.append(lp)
        outs_ent.append(ent)
    if not outs_lp:
        z = hidden.new_zeros(0, dtype=torch.float32)
        return z, z
    return torch.cat(outs_lp), torch.cat(outs_ent)


def _module():
    import torch

    class LogProbPolicy(torch.nn.Module):
        """A causal LM whose forward returns per-token log-probs and entropies of the response
        tokens (the only positions that need logits). One module, so FSDP unshards the LM head
        once for the whole chunked pass."""

        def __init__(self, policy, chunk: int):
            super().__init__()
            self.policy = policy
            self.chunk = chunk

        def forward(self, input_ids, attention_mask, rows, cols, targets):
            hidden = self.policy.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            return chunked_logprobs(hidden[rows, cols], self.policy.lm_head.weight, targets, self.chunk)

    return LogProbPolicy


@dataclass
class Batch:
    input_ids: Any
    attention_mask: Any
    rows: Any  # [N] batch row of each response token's predicting position
    cols: Any  # [N] its position
    targets: Any  # [N] the response token
    seq: Any  # [N] index of its sequence in the batch
    num_seqs: int

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.rows, self.cols, self.targets,
                                               self.seq)), self.num_seqs)


def collate(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> Batch:
    """Right-padded prompt + response rows; response token j of row b is predicted at
    position len(prompt) + j - 1."""
    import torch

    lens = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width = max(lens)
    ids = torch.full((len(lens), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(lens), width), dtype=torch.long)
    rows, cols, targets, seq = [], [], [], []
    for b, (p, r) in enumerate(zip(prompts, responses)):
        ids[b, : lens[b]] = torch.tensor(list(p) + list(r), dtype=torch.long)
        mask[b, : lens[b]] = 1
        rows += [b] * len(r)
        cols += list(range(len(p) - 1, len(p) + len(r) - 1))
        targets += list(r)
        seq += [b] * len(r)
    t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return Batch(ids, mask, t(rows), t(cols), t(targets), t(seq), len(lens))


def sequence_sums(values, batch: Batch):
    import torch

    return torch.zeros(batch.num_seqs, dtype=values.dtype, device=values.device).index_add(0, batch.seq, values)


# ----------------------------------------------------------------------------------------------
# data


@dataclass
class Problems:
    ids: list[str]
    prompt_ids: list[list[int]]
    answers: list[str]
    v_star: np.ndarray
    pass_rate: np.ndarray
    dropped: int = 0
    problems: list[str | None] = dataclasses.field(default_factory=list)  # text, to re-render prompts
    prompt_format: str | None = None  # as stage 1 recorded it (None: older data, chat)


def load_vstar(paths: list[str], filter_incorrect: bool = False) -> Problems:
    """Stage-1 rows (`vgs apo-vstar` directories or Parquet files), in a stable order."""
    import pyarrow.parquet as pq

    from value_models.data import parquet_files

    missing_paths = [p for p in paths if not os.path.exists(p)]
    if missing_paths:
        raise VGSError(f"--data {missing_paths[0]!r} does not exist")
    files = parquet_files(paths, what="--data")
    cols = ["problem_id", "prompt_ids", "answer", "v_star", "pass_rate"]
    out = Problems([], [], [], np.zeros(0), np.zeros(0))
    vs, pr, formats = [], [], set()
    for f in files:
        t = pq.read_table(f)
        missing = [c for c in cols if c not in t.column_names]
        if missing:
            raise VGSError(f"{f} lacks column(s) {', '.join(missing)}; is it `vgs apo-vstar` output?")
        d = t.select(cols + [c for c in ("problem", "prompt_format") if c in t.column_names]).to_pydict()
        n = len(d["problem_id"])
        texts, fmts = d.get("problem", [None] * n), d.get("prompt_format", [None] * n)
        for pid, ids, ans, v, p, text, fmt in zip(d["problem_id"], d["prompt_ids"], d["answer"], d["v_star"],
                                                  d["pass_rate"], texts, fmts):
            if filter_incorrect and p == 0:
                out.dropped += 1
                continue
            out.ids.append(str(pid))
            out.prompt_ids.append(list(ids))
            out.answers.append(str(ans))
            out.problems.append(text)
            formats.add(fmt)
            vs.append(float(v))
            pr.append(float(p))
    if len(formats) > 1:
        raise VGSError(f"--data mixes prompt formats ({', '.join(sorted(str(f) for f in formats))}); "
                       "pass --prompt-format to render them all one way")
    out.prompt_format = next(iter(formats), None)
    if len(set(out.ids)) != len(out.ids):
        raise VGSError("duplicate problem ids in --data (the same stage-1 output listed twice?)")
    out.v_star, out.pass_rate = np.asarray(vs), np.asarray(pr)
    return out


# ----------------------------------------------------------------------------------------------
# distributed setup, models


def load_causal_lm(source: str, what: str, dtype: Any = None):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if source.startswith(("/", ".", "~")) and not os.path.exists(os.path.join(source, "config.json")):
        raise VGSError(f"{what} {source!r} is not a model directory (no config.json)")
    try:
        cfg = AutoConfig.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001
        raise VGSError(f"cannot read a model config from {what} {source!r}: {exc}") from exc
    if getattr(cfg, "model_type", None) != "qwen2":
        raise VGSError(f"{what} must be a Qwen2 causal LM, {source!r} is {getattr(cfg, 'model_type', None)!r}")
    hf_logging.disable_progress_bar()
    cfg.use_cache = False
    return AutoModelForCausalLM.from_pretrained(source, config=cfg, dtype=dtype or torch.float32,
                                                attn_implementation="sdpa")


def _wrap(module, cfg: ApoConfig, d, trainable: bool):
    module.to(d.device)
    if cfg.fsdp:
        return fully_shard_layers(module, module.policy.model.layers, cfg.dtype, d)
    return ddp(module, d) if trainable and d.enabled else module


def use_grad_checkpointing(cfg: ApoConfig, d) -> bool:
    """Explicit setting, else on for GPU runs (the published shapes do not fit an 80 GB card
    without it, `benchmarks.train_memory --apo`) and off on CPU (recomputation only costs time)."""
    return cfg.grad_checkpointing if cfg.grad_checkpointing is not None else d.device.type == "cuda"


def ref_torch_dtype(cfg: ApoConfig, d):
    """pi_ref is frozen and only ever run forward: bf16 when the forward runs in bf16 anyway
    (GPU), which halves its memory against a second fp32 copy; fp32 on CPU."""
    import torch

    bf16 = cfg.ref_dtype == "bf16" or (cfg.ref_dtype == "auto" and use_bf16(cfg.dtype, d))
    return torch.bfloat16 if bf16 else torch.float32


def iter_full_weights(model, policy, cfg: ApoConfig) -> Iterator[tuple[str, Any]]:
    """The policy's full weights in transformers names, one tensor at a time. Under FSDP every
    rank gathers each tensor in turn (a collective: all ranks iterate), so at most one full
    tensor is materialised per rank, never the whole fp32 state dict."""
    if not cfg.fsdp:
        yield from policy.state_dict().items()
        return
    from torch.distributed.tensor import DTensor

    for name, t in model.state_dict().items():
        if not name.startswith("policy."):
            continue
        yield name[len("policy."):], (t.full_tensor() if isinstance(t, DTensor) else t)


def consolidated_weights(model, policy, cfg: ApoConfig) -> dict | None:
    """The full state dict on rank 0 (host memory) for `save_pretrained`; None without FSDP
    (save_pretrained reads the module itself)."""
    if not cfg.fsdp:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k[len("policy."):]: v for k, v in sd.items() if k.startswith("policy.")}


# ----------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(cfg: ApoConfig, d, model, policy, optimizer, step: int, sampler_state: dict) -> str:
    """Collective: every rank calls it. Rank 0 writes the consolidated model (an inference
    checkpoint) and the tokenizer into `.step_N.tmp`, then renames it. The optimizer state:
    without FSDP rank 0 writes it whole; under FSDP every rank writes its own shard (`dcp/`)."""
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    name, tmp = staging_dir(cfg.out, step)
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier(d)
    sd = consolidated_weights(model, policy, cfg)
    optim_sd = None
    if cfg.fsdp:
        save_sharded({"optim": get_optimizer_state_dict(model, optimizer)}, os.path.join(tmp, DCP_DIR))
    else:
        optim_sd = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                       cpu_offload=True))
    if d.main:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        policy.config.use_cache = True  # a checkpoint is an inference model
        policy.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
        policy.config.use_cache = False
        save_tokenizer(cfg.tokenizer or cfg.init, tmp)
        torch.save({"step": step, "optimizer": optim_sd, "sharded": cfg.fsdp, "sampler": sampler_state,
                    "world_size": d.world, "config": dataclasses.asdict(cfg)}, os.path.join(tmp, STATE_FILE))
        publish_checkpoint(cfg.out, tmp, name, cfg.keep_last)
    barrier(d)
    return os.path.join(cfg.out, CKPT_DIR, name)


# ----------------------------------------------------------------------------------------------
# the loop


def train(cfg: ApoConfig) -> str:
    """Run (or resume) stage 2; returns the last checkpoint directory."""
    cfg.validate()
    d = setup_distributed(cfg.fsdp)
    try:
        return _train(cfg, d)
    finally:
        teardown()


class WeightSync:
    """Pushes the trained weights into this rank's engine after each step. All ranks hold the
    same weights after a step, so one rank per node (local rank 0) stages them, in the
    engine's dtype and one tensor at a time (`vgs.weight_sync.write_weights`), into one
    directory under `--sync-dir`, and every engine of the node reloads from it: a node needs
    the policy's size in bf16 once (3.1 GB for 1.5B), not fp32 once per rank."""

    def __init__(self, cfg: ApoConfig, d, engine, token: str):
        from vgs.weight_sync import check_staging_space, staging_root

        self.cfg, self.d, self.engine = cfg, d, engine
        self.path = os.path.join(staging_root(cfg.sync_dir), f"vgs-apo-sync-{token}")
        self.writer = d.local_rank == 0
        check_staging_space(os.path.dirname(self.path), engine.sync_bytes())  # every rank: all raise together

    def __call__(self, model, policy) -> None:
        from vgs.weight_sync import write_weights

        weights = iter_full_weights(model, policy, self.cfg)
        if self.writer:
            shutil.rmtree(self.path, ignore_errors=True)
            os.makedirs(self.path)
            write_weights(weights, self.path, dtype=self.engine.weight_dtype, skip=self.engine.tied_weight_names)
        elif self.cfg.fsdp:
            for _ in weights:  # the gathers are collectives: every rank takes part
                pass
        barrier(self.d)
        self.engine.reload_staged(self.path)
        barrier(self.d)
        if self.writer:
            shutil.rmtree(self.path, ignore_errors=True)

    def close(self) -> None:
        if self.writer:
            shutil.rmtree(self.path, ignore_errors=True)


def expected_sync_bytes(cfg: ApoConfig, policy, d) -> int:
    """What one weight sync stages, known before the engine starts: every parameter once in
    the engine's dtype (vgs runs CPU engines in fp32; on GPU "auto" is the checkpoint's
    16-bit dtype)."""
    names = {"bfloat16": 2, "bf16": 2, "float16": 2, "half": 2, "fp16": 2, "float32": 4, "float": 4, "fp32": 4}
    size = names.get(cfg.engine_dtype, 4 if d.device.type == "cpu" else 2)
    return size * sum(p.numel() for p in policy.parameters())


def _train(cfg: ApoConfig, d) -> str:
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    from value_models.apo_vstar import format_prompt_ids, grade_responses
    from value_models.collect import item_seed
    from value_models.data import StepSampler
    from value_models.distributed import all_gather_objects
    from value_models.logs import CsvLog
    from value_models.train import param_groups
    from vgs.config import EngineConfig, SamplingConfig
    from vgs.engine import GenRequest, PolicyEngine, model_max_len
    from vgs.grading import get_grader
    from vgs.prompts import load_tokenizer
    from vgs.weight_sync import check_staging_space, staging_root

    if cfg.mini_batch_size % d.world:
        raise VGSError(f"--mini-batch-size ({cfg.mini_batch_size}) must be a multiple of the world size ({d.world})")
    probs = load_vstar(cfg.data, cfg.filter_incorrect)
    if not probs.ids:
        raise VGSError("no problems left in --data")
    tok_src = cfg.tokenizer or cfg.init
    tok = load_tokenizer(tok_src)
    data_format = probs.prompt_format or "chat"
    if cfg.prompt_format and cfg.prompt_format != data_format:
        if any(t is None for t in probs.problems):
            raise VGSError(f"--prompt-format {cfg.prompt_format} re-renders the prompts from the problem text, which "
                           "--data lacks (re-run `vgs apo-vstar --prompt-format ...` instead)")
        probs.prompt_ids = [format_prompt_ids(tok, t, cfg.prompt_format) for t in probs.problems]
    fmt = cfg.prompt_format or data_format
    context = cfg.max_model_len or model_max_len(cfg.init)
    longest = max(len(p) for p in probs.prompt_ids)
    if longest + cfg.max_tokens > context:  # checked before any engine starts
        raise VGSError(f"the longest prompt ({longest} tokens) + --max-tokens ({cfg.max_tokens}) exceeds the context of "
                       f"{context} tokens; lower --max-tokens or raise --max-model-len")
    sampler = StepSampler(np.arange(len(probs.ids)), cfg.batch_size, seed=cfg.seed, rank=d.rank, world_size=d.world)
    total = cfg.steps or max(1, math.ceil((cfg.epochs or 1.0) * sampler.steps_per_epoch))
    stop = min(total, cfg.stop_at_step) if cfg.stop_at_step else total
    ckpt = open_run(cfg.out, cfg.resume)
    state = torch.load(os.path.join(ckpt, STATE_FILE), map_location="cpu", weights_only=False) if ckpt else None
    if d.main:
        remove_partial(cfg.out)
        with open(os.path.join(cfg.out, "apo_config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
    barrier(d)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    LogProbPolicy = _module()
    policy = load_causal_lm(ckpt or cfg.init, "--init")
    # the staging space, before anything expensive (the engine re-checks with its own numbers)
    check_staging_space(staging_root(cfg.sync_dir), expected_sync_bytes(cfg, policy, d))
    if use_grad_checkpointing(cfg, d):
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.train()
    model = _wrap(LogProbPolicy(policy, cfg.logprob_chunk), cfg, d, trainable=True)
    ref = load_causal_lm(cfg.ref or cfg.init, "--ref", dtype=ref_torch_dtype(cfg, d)).eval().requires_grad_(False)
    ref_model = _wrap(LogProbPolicy(ref, cfg.logprob_chunk), cfg, d, trainable=False)
    optimizer = torch.optim.AdamW(param_groups(policy, cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.eps)
    step = 0
    if state is not None:
        if state.get("sharded"):  # FSDP: each rank reads its own shard of the optimizer state
            load_sharded(model, optimizer, os.path.join(ckpt, DCP_DIR), model_too=False)
        else:
            set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        sampler.load_state_dict(state["sampler"])
        step = int(state["step"])
        if d.main:
            print(f"[apo] resumed from {ckpt} at step {step}", flush=True)
    # the engine samples from the weights being trained: the checkpoint on resume, else --init
    engine = PolicyEngine(EngineConfig(model=ckpt or cfg.init, tokenizer=tok_src, dtype=cfg.engine_dtype,
                                       max_model_len=cfg.max_model_len, kv_cache_gib=cfg.kv_cache_gib,
                                       gpu_memory_utilization=cfg.gpu_memory_utilization, seed=cfg.seed),
                          logits_processors=[])
    sync = log = bar = None
    try:
        sync = WeightSync(cfg, d, engine, all_gather_objects(d, os.urandom(6).hex())[0])
        grader = get_grader()
        sampling = SamplingConfig(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                                  seed=cfg.seed)
        log = CsvLog(os.path.join(cfg.out, "apo_log.csv"), LOG_FIELDS, step) if d.main else None
        n_mini = cfg.batch_size // cfg.mini_batch_size
        per_mini = cfg.mini_batch_size // d.world  # this rank's sequences per mini-batch
        if d.main:
            print(f"[apo] {len(probs.ids)} problems ({probs.dropped} dropped: pass rate 0), mean V* "
                  f"{probs.v_star.mean():.4f}, prompts {fmt}; {total} steps x {cfg.batch_size} prompts ({n_mini} "
                  f"optimizer steps each), world {d.world}, device {d.device}", flush=True)
        from tqdm import tqdm

        bar = tqdm(total=stop, initial=step, desc="apo", unit="step", disable=not (d.main and cfg.progress),
                   dynamic_ncols=True)
        last = ckpt
        while step < stop:
            t0 = time.time()
            idx = sampler.next_indices()
            reqs = [GenRequest(probs.prompt_ids[i], cfg.max_tokens, n=1, seed=item_seed(cfg.seed, "apo", step, probs.ids[i]),
                               logprobs=0 if cfg.check_sync else None) for i in idx]
            samples = [o[0] for o in engine.generate(reqs, sampling)]
            rewards, _ = grade_responses(tok, [probs.answers[i] for i in idx], samples, grader)
            t_gen = time.time()
            prompts = [probs.prompt_ids[i] for i in idx]
            responses = [list(s.token_ids) for s in samples]
            r = torch.tensor(rewards, dtype=torch.float32)
            vs = torch.tensor(probs.v_star[idx], dtype=torch.float32)
            lens = [len(x) for x in responses]
            sync_err = sync_lp_error(model, cfg, d, prompts, samples, pad_id) if cfg.check_sync else float("nan")
            # pi_ref log-probs of the whole batch, once, before any update
            ref_lp = torch.zeros(len(idx))
            with torch.no_grad(), autocast(cfg.dtype, d):
                for s in range(0, len(idx), cfg.micro_batch_size):
                    b = collate(prompts[s: s + cfg.micro_batch_size], responses[s: s + cfg.micro_batch_size], pad_id).to(d.device)
                    lp, _ = ref_model(b.input_ids, b.attention_mask, b.rows, b.cols, b.targets)
                    ref_lp[s: s + b.num_seqs] = sequence_sums(lp.float(), b).cpu()
            pol_lp = torch.zeros(len(idx))
            ent_sum = loss_sum = grad_norm = 0.0
            lr = cfg.lr
            for m in range(n_mini):
                part = list(range(m * per_mini, (m + 1) * per_mini))
                part.sort(key=lambda i: lens[i])  # similar lengths per micro-batch: less padding
                micro = [part[s: s + cfg.micro_batch_size] for s in range(0, len(part), cfg.micro_batch_size)]
                (tokens_global,) = all_sum(d, [float(sum(lens[i] for i in part))])
                for k, mb in enumerate(micro):
                    b = collate([prompts[i] for i in mb], [responses[i] for i in mb], pad_id).to(d.device)
                    sel = torch.tensor(mb)
                    with sync_context(model, cfg.fsdp, sync=k == len(micro) - 1), autocast(cfg.dtype, d):
                        tok_lp, tok_ent = model(b.input_ids, b.attention_mask, b.rows, b.cols, b.targets)
                        lp = sequence_sums(tok_lp.float(), b)
                        per_seq = apo_sequence_loss(lp, ref_lp[sel].to(d.device), r[sel].to(d.device),
                                                    vs[sel].to(d.device), cfg.beta2)
                        ent = tok_ent.float().sum()
                        loss = per_seq.sum() / per_mini
                        if cfg.entropy_coeff:
                            loss = loss - cfg.entropy_coeff * ent * d.world / max(tokens_global, 1.0)
                        loss.backward()
                    pol_lp[sel] = lp.detach().cpu()
                    ent_sum += float(ent.detach())
                    loss_sum += float(per_seq.detach().sum())
                clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            t_train = time.time()
            sync(model, policy)
            t_sync = time.time()
            ratio = (pol_lp - ref_lp)
            sums = all_sum(d, [float(len(idx)), loss_sum, float(r.sum()), float(vs.sum()), float((r - vs).sum()),
                               float(ratio.sum()), float(sum(lens)), ent_sum, float(sum(s.stopped for s in samples))])
            n, loss_s, r_s, v_s, a_s, kl_s, tok_s, ent_s, fin_s = sums
            err = max(all_gather_objects(d, sync_err)) if cfg.check_sync else float("nan")
            row = {"step": step, "epoch": round(sampler.epoch + sampler.position / max(1, len(probs.ids)), 4), "lr": lr,
                   "loss": loss_s / n, "reward": r_s / n, "v_star": v_s / n, "advantage": a_s / n, "kl": kl_s / n,
                   "kl_token": kl_s / max(tok_s, 1.0), "entropy": ent_s / max(tok_s, 1.0), "resp_len": tok_s / n,
                   "finished": fin_s / n, "grad_norm": grad_norm, "sync_lp_err": err, "gen_s": round(t_gen - t0, 3),
                   "train_s": round(t_train - t_gen, 3), "sync_s": round(t_sync - t_train, 3),
                   "step_s": round(t_sync - t0, 3)}
            if d.main:
                log.write(row)
                bar.update(1)
                bar.set_postfix(reward=f"{row['reward']:.3f}", v_star=f"{row['v_star']:.3f}",
                                adv=f"{row['advantage']:+.3f}", kl=f"{row['kl']:.3f}", ent=f"{row['entropy']:.3f}")
            if (cfg.save_every and step % cfg.save_every == 0) or step == stop:
                last = save_checkpoint(cfg, d, model, policy, optimizer, step, sampler.state_dict())
        if step >= total and d.main and last:
            mark_final(cfg.out, last)
        barrier(d)
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
        if sync is not None:
            sync.close()
        engine.close()
    return last or ""


def sync_lp_error(model, cfg: ApoConfig, d, prompts, samples, pad_id: int) -> float:
    """Largest |engine - trainer| per-token log-prob over the first micro-batch of this step's
    samples: the engine's (vLLM's sampled-token log-probs) come from the weights last synced,
    the trainer's from the policy before this step's update, which are the same weights.
    `--check-sync` logs it every step (`sync_lp_err`)."""
    import torch

    k = min(cfg.micro_batch_size, len(samples))
    b = collate(prompts[:k], [list(s.token_ids) for s in samples[:k]], pad_id).to(d.device)
    with torch.no_grad(), autocast(cfg.dtype, d):
        lp, _ = model(b.input_ids, b.attention_mask, b.rows, b.cols, b.targets)
    engine_lp = [float(pos[t]) for s in samples[:k] for pos, t in zip(s.logprobs or [], s.token_ids)]
    if len(engine_lp) != lp.numel():
        return float("inf")
    return float((lp.float().cpu() - torch.tensor(engine_lp)).abs().max()) if engine_lp else 0.0


# ----------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    from vgs.cli import _Parser

    p = _Parser(prog="python -m value_models.apo", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True, help="`vgs apo-vstar` output dir(s) or Parquet files")
    p.add_argument("--init", required=True, help="policy to train (a Qwen2 causal LM); pi_ref too unless --ref")
    p.add_argument("--out", required=True, help="run dir: checkpoints/, apo_log.csv, final")
    p.add_argument("--ref", default=None, help="frozen pi_ref (default: --init)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir or Hub id (default: --init)")
    p.add_argument("--prompt-format", default=None, choices=PROMPT_FORMATS,
                   help="raw: problem text + the paper's instruction (base models, as published); chat: the "
                        "tokenizer's chat template; default: as `vgs apo-vstar` rendered the --data prompts")
    g = p.add_argument_group("objective (published defaults)")
    g.add_argument("--beta2", type=float, default=1e-3, help="KL coefficient of the regression")
    g.add_argument("--entropy-coeff", type=float, default=1e-3, help="token-mean entropy bonus")
    g.add_argument("--filter-incorrect", action="store_true", help="drop problems pi_ref never solved in stage 1")
    o = p.add_argument_group("optimisation (published defaults)")
    o.add_argument("--lr", type=float, default=1e-6, help="AdamW, constant")
    o.add_argument("--weight-decay", type=float, default=0.01, help="on matrices")
    o.add_argument("--adam-beta1", type=float, default=0.9)
    o.add_argument("--adam-beta2", type=float, default=0.999)
    o.add_argument("--eps", type=float, default=1e-8)
    o.add_argument("--grad-clip", type=float, default=1.0, help="global grad-norm clip (0: off)")
    o.add_argument("--batch-size", type=int, default=256, help="prompts per step (one response each), all ranks")
    o.add_argument("--mini-batch-size", type=int, default=128, help="prompts per optimizer step")
    o.add_argument("--micro-batch-size", type=int, default=8, help="sequences per forward pass per rank")
    o.add_argument("--steps", type=int, default=None, help="training steps (default: --epochs worth)")
    o.add_argument("--epochs", type=float, default=None, help="passes over the problems (default 1; published 25)")
    o.add_argument("--logprob-chunk", type=int, default=512, help="tokens per chunk of the log-softmax")
    o.add_argument("--grad-checkpointing", dest="grad_checkpointing", action="store_const", const=True, default=None,
                   help="recompute activations in backward (default: on for GPU runs, off on CPU)")
    o.add_argument("--no-grad-checkpointing", dest="grad_checkpointing", action="store_const", const=False)
    o.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"), help="autocast: bf16 on GPU, fp32 on CPU")
    o.add_argument("--ref-dtype", default="auto", choices=("auto", "bf16", "fp32"),
                   help="pi_ref's weights (forward only): auto = bf16 when --dtype is bf16 (GPU), else fp32")
    o.add_argument("--fsdp", action="store_true",
                   help="shard policy, pi_ref, grads and optimizer (FSDP2); recommended for 1.5B+ on 80 GB GPUs")
    o.add_argument("--seed", type=int, default=0, help="problem order and sampling seeds")
    s = p.add_argument_group("sampling (vLLM, one engine per rank)")
    s.add_argument("--max-tokens", type=int, default=1024, help="response length cap")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--kv-cache-gib", type=float, default=None, help="KV cache per engine (CPU default 2)")
    s.add_argument("--gpu-memory-utilization", type=float, default=0.4)
    s.add_argument("--max-model-len", type=int, default=None)
    s.add_argument("--engine-dtype", default="auto", help="vLLM dtype (weights are synced in it)")
    s.add_argument("--sync-dir", default=None,
                   help="where each node stages the weights for the engines (default /dev/shm; space checked first)")
    s.add_argument("--check-sync", action="store_true",
                   help="log sync_lp_err: engine vs trainer log-probs of this step's samples after each sync")
    c = p.add_argument_group("checkpoints")
    c.add_argument("--save-every", type=int, default=0, help="checkpoint every K steps (always at the end)")
    c.add_argument("--keep-last", type=int, default=2)
    c.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out (if any)")
    c.add_argument("--stop-at-step", type=int, default=None, help="checkpoint and exit after this step")
    c.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: list[str] | None = None) -> int:
    pin_local_device()
    args = build_parser().parse_args(argv)
    names = {f.name for f in dataclasses.fields(ApoConfig)}
    try:
        cfg = ApoConfig(**{k: v for k, v in vars(args).items() if k in names})
        last = train(cfg)
    except VGSError as exc:
        print(f"value_models.apo: error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0 and last:
        print(f"[apo] {'done' if os.path.isdir(os.path.join(cfg.out, 'final')) else 'stopped; continue with --resume'}: "
              f"{last}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
