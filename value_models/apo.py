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
  (`PolicyEngine.update_weights`: vLLM worker RPC, in-place reload, prefix-cache reset). The
  engine samples only at the start of a batch, so this is the same as syncing after every
  optimizer step, without the syncs nobody would sample from.

Checkpoints: `OUT/checkpoints/step_NNNNNNNN/` is a plain `Qwen2ForCausalLM` directory (weights,
config, tokenizer; `vgs eval --policy` / `vgs serve --policy` load it) plus `trainer_state.pt`
(optimizer, step, sampler position). Written by rank 0 into a temporary directory and renamed;
`--resume` continues with identical losses on CPU (sampling seeds derive from (seed, step,
problem id), and the engine restarts from the checkpoint's weights).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from vgs.errors import VGSError

CKPT_DIR = "checkpoints"
STATE_FILE = "trainer_state.pt"
LOG_FIELDS = ["step", "epoch", "lr", "loss", "reward", "v_star", "advantage", "kl", "kl_token", "entropy",
              "resp_len", "finished", "grad_norm", "gen_s", "train_s", "sync_s", "step_s"]


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
    grad_checkpointing: bool = False
    dtype: str = "auto"
    fsdp: bool = False
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
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise VGSError(msg)

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


def load_vstar(paths: list[str], filter_incorrect: bool = False) -> Problems:
    """Stage-1 rows (`vgs apo-vstar` directories or Parquet files), in a stable order."""
    import pyarrow.parquet as pq

    files: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(glob.glob(os.path.join(p, "**", "*.parquet"), recursive=True))
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise VGSError(f"--data {p!r} does not exist")
    if not files:
        raise VGSError(f"no Parquet files in {', '.join(paths)} (run `vgs apo-vstar` first)")
    cols = ["problem_id", "prompt_ids", "answer", "v_star", "pass_rate"]
    out = Problems([], [], [], np.zeros(0), np.zeros(0))
    vs, pr = [], []
    for f in files:
        t = pq.read_table(f)
        missing = [c for c in cols if c not in t.column_names]
        if missing:
            raise VGSError(f"{f} lacks column(s) {', '.join(missing)}; is it `vgs apo-vstar` output?")
        d = t.select(cols).to_pydict()
        for pid, ids, ans, v, p in zip(d["problem_id"], d["prompt_ids"], d["answer"], d["v_star"], d["pass_rate"]):
            if filter_incorrect and p == 0:
                out.dropped += 1
                continue
            out.ids.append(str(pid))
            out.prompt_ids.append(list(ids))
            out.answers.append(str(ans))
            vs.append(float(v))
            pr.append(float(p))
    if len(set(out.ids)) != len(out.ids):
        raise VGSError("duplicate problem ids in --data (the same stage-1 output listed twice?)")
    out.v_star, out.pass_rate = np.asarray(vs), np.asarray(pr)
    return out


# ----------------------------------------------------------------------------------------------
# distributed setup, models


def pin_local_device() -> None:
    """Under torchrun on GPUs, give each rank one visible GPU before CUDA starts, so the
    trainer and the vLLM engine it spawns use the same device (cuda:0 of that rank)."""
    local = os.environ.get("LOCAL_RANK")
    if local is None or int(os.environ.get("LOCAL_WORLD_SIZE", "1")) <= 1:
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else None
    if devices is not None and len(devices) == 1:
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = devices[int(local)] if devices else str(local)


def setup_distributed(fsdp: bool):
    import torch
    import torch.distributed as dist

    from value_models.train import Dist, _free_port

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda:0") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 or fsdp:
        if "MASTER_ADDR" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group(backend="nccl" if cuda else "gloo", rank=rank, world_size=world,
                                device_id=device if cuda else None)
    if not cuda and world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))))
    return Dist(rank, world, local, device)


def load_causal_lm(source: str, what: str):
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
    return AutoModelForCausalLM.from_pretrained(source, config=cfg, dtype=torch.float32, attn_implementation="sdpa")


def _wrap(module, cfg: ApoConfig, d, trainable: bool):
    import torch

    module.to(d.device)
    if cfg.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and d.device.type == "cuda")
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        for layer in module.policy.model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(module, mp_policy=mp)
        return module
    if trainable and d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(module, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    return module


def _autocast(cfg: ApoConfig, d):
    import torch

    if cfg.dtype == "bf16" or (cfg.dtype == "auto" and d.device.type == "cuda"):
        return torch.autocast(device_type=d.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def full_weights(model, policy, cfg: ApoConfig, cpu_offload: bool) -> dict:
    """The policy's full state dict in transformers names (gathered on every rank under FSDP,
    on rank 0 only with `cpu_offload`)."""
    if not cfg.fsdp:
        return policy.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload))
    return {k[len("policy."):]: v for k, v in sd.items() if k.startswith("policy.")}


# ----------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(cfg: ApoConfig, d, model, policy, optimizer, step: int, sampler_state: dict) -> str:
    """Collective: every rank calls it; rank 0 alone writes, into `.step_N.tmp`, then renames."""
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from value_models.train import barrier, copy_tokenizer_files, publish_checkpoint

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = full_weights(model, policy, cfg, cpu_offload=True) if cfg.fsdp else None
    optim_sd = get_optimizer_state_dict(model, optimizer, options=opts)
    root = os.path.join(cfg.out, CKPT_DIR)
    name = f"step_{step:08d}"
    final, tmp = os.path.join(root, name), os.path.join(root, f".{name}.tmp")
    if d.main:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        policy.config.use_cache = True  # a checkpoint is an inference model
        policy.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
        policy.config.use_cache = False
        copy_tokenizer_files(cfg.tokenizer or cfg.init, tmp)
        torch.save({"step": step, "optimizer": optim_sd, "sampler": sampler_state, "world_size": d.world,
                    "config": dataclasses.asdict(cfg)}, os.path.join(tmp, STATE_FILE))
        publish_checkpoint(cfg.out, tmp, name, cfg.keep_last)
    barrier(d)
    return final


# ----------------------------------------------------------------------------------------------
# the loop


def train(cfg: ApoConfig) -> str:
    """Run (or resume) stage 2; returns the last checkpoint directory."""
    cfg.validate()
    d = setup_distributed(cfg.fsdp)
    try:
        return _train(cfg, d)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: ApoConfig, d) -> str:
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    from value_models.collect import item_seed
    from value_models.apo_vstar import grade_responses
    from value_models.data import StepSampler
    from value_models.train import (CsvLog, all_sum, barrier, latest_checkpoint, mark_final, param_groups)
    from vgs.config import EngineConfig, SamplingConfig
    from vgs.engine import GenRequest, PolicyEngine
    from vgs.grading import get_grader
    from vgs.prompts import load_tokenizer

    if cfg.mini_batch_size % d.world:
        raise VGSError(f"--mini-batch-size ({cfg.mini_batch_size}) must be a multiple of the world size ({d.world})")
    probs = load_vstar(cfg.data, cfg.filter_incorrect)
    if not probs.ids:
        raise VGSError("no problems left in --data")
    from vgs.engine import model_max_len

    context = cfg.max_model_len or model_max_len(cfg.init)
    longest = max(len(p) for p in probs.prompt_ids)
    if longest + cfg.max_tokens > context:  # checked before any engine starts
        raise VGSError(f"the longest prompt ({longest} tokens) + --max-tokens ({cfg.max_tokens}) exceeds the context of "
                       f"{context} tokens; lower --max-tokens or raise --max-model-len")
    sampler = StepSampler(np.arange(len(probs.ids)), cfg.batch_size, seed=cfg.seed, rank=d.rank, world_size=d.world)
    total = cfg.steps or max(1, math.ceil((cfg.epochs or 1.0) * sampler.steps_per_epoch))
    stop = min(total, cfg.stop_at_step) if cfg.stop_at_step else total
    os.makedirs(os.path.join(cfg.out, CKPT_DIR), exist_ok=True)
    ckpt = latest_checkpoint(cfg.out)
    if ckpt and not cfg.resume:
        raise VGSError(f"{cfg.out} already holds checkpoints (latest {os.path.basename(ckpt)}); "
                       "pass --resume to continue it, or choose a new --out")
    state = torch.load(os.path.join(ckpt, STATE_FILE), map_location="cpu", weights_only=False) if ckpt else None
    if d.main:
        for stale in os.listdir(os.path.join(cfg.out, CKPT_DIR)):
            if stale.endswith(".tmp"):
                shutil.rmtree(os.path.join(cfg.out, CKPT_DIR, stale), ignore_errors=True)
        with open(os.path.join(cfg.out, "apo_config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
    barrier(d)
    tok_src = cfg.tokenizer or cfg.init
    tok = load_tokenizer(tok_src)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    LogProbPolicy = _module()
    policy = load_causal_lm(ckpt or cfg.init, "--init")
    if cfg.grad_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.train()
    model = _wrap(LogProbPolicy(policy, cfg.logprob_chunk), cfg, d, trainable=True)
    ref = load_causal_lm(cfg.ref or cfg.init, "--ref").eval().requires_grad_(False)
    ref_model = _wrap(LogProbPolicy(ref, cfg.logprob_chunk), cfg, d, trainable=False)
    optimizer = torch.optim.AdamW(param_groups(policy, cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.eps)
    step = 0
    if state is not None:
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
    grader = get_grader()
    sampling = SamplingConfig(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens, seed=cfg.seed)
    log = CsvLog(os.path.join(cfg.out, "apo_log.csv"), LOG_FIELDS, step) if d.main else None
    n_mini = cfg.batch_size // cfg.mini_batch_size
    per_mini = cfg.mini_batch_size // d.world  # this rank's sequences per mini-batch
    if d.main:
        print(f"[apo] {len(probs.ids)} problems ({probs.dropped} dropped: pass rate 0), mean V* "
              f"{probs.v_star.mean():.4f}; {total} steps x {cfg.batch_size} prompts ({n_mini} optimizer steps each), "
              f"world {d.world}, device {d.device}", flush=True)
    from tqdm import tqdm

    bar = tqdm(total=stop, initial=step, desc="apo", unit="step", disable=not (d.main and cfg.progress),
               dynamic_ncols=True)
    last = ckpt
    try:
        while step < stop:
            t0 = time.time()
            idx = sampler.next_indices()
            reqs = [GenRequest(probs.prompt_ids[i], cfg.max_tokens, n=1, seed=item_seed(cfg.seed, "apo", step, probs.ids[i]))
                    for i in idx]
            samples = [o[0] for o in engine.generate(reqs, sampling)]
            rewards, _ = grade_responses(tok, [probs.answers[i] for i in idx], samples, grader)
            t_gen = time.time()
            prompts = [probs.prompt_ids[i] for i in idx]
            responses = [list(s.token_ids) for s in samples]
            r = torch.tensor(rewards, dtype=torch.float32)
            vs = torch.tensor(probs.v_star[idx], dtype=torch.float32)
            lens = [len(x) for x in responses]
            # pi_ref log-probs of the whole batch, before any update
            ref_lp = torch.zeros(len(idx))
            with torch.no_grad(), _autocast(cfg, d):
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
                    with _sync_context(model, cfg, sync=k == len(micro) - 1), _autocast(cfg, d):
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
            engine.update_weights(full_weights(model, policy, cfg, cpu_offload=False).items())
            t_sync = time.time()
            ratio = (pol_lp - ref_lp)
            sums = all_sum(d, [float(len(idx)), loss_sum, float(r.sum()), float(vs.sum()), float((r - vs).sum()),
                               float(ratio.sum()), float(sum(lens)), ent_sum, float(sum(s.stopped for s in samples))])
            n, loss_s, r_s, v_s, a_s, kl_s, tok_s, ent_s, fin_s = sums
            row = {"step": step, "epoch": round(sampler.epoch + sampler.position / max(1, len(probs.ids)), 4), "lr": lr,
                   "loss": loss_s / n, "reward": r_s / n, "v_star": v_s / n, "advantage": a_s / n, "kl": kl_s / n,
                   "kl_token": kl_s / max(tok_s, 1.0), "entropy": ent_s / max(tok_s, 1.0), "resp_len": tok_s / n,
                   "finished": fin_s / n, "grad_norm": grad_norm, "gen_s": round(t_gen - t0, 3),
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
        bar.close()
        if log is not None:
            log.close()
        engine.close()
    return last or ""


def _sync_context(model, cfg: ApoConfig, sync: bool):
    if cfg.fsdp:
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if not sync and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


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
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: --init)")
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
    o.add_argument("--grad-checkpointing", action="store_true")
    o.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"), help="autocast: bf16 on GPU, fp32 on CPU")
    o.add_argument("--fsdp", action="store_true", help="shard policy, pi_ref, grads and optimizer (FSDP2)")
    o.add_argument("--seed", type=int, default=0, help="problem order and sampling seeds")
    s = p.add_argument_group("sampling (vLLM, one engine per rank)")
    s.add_argument("--max-tokens", type=int, default=1024, help="response length cap")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--kv-cache-gib", type=float, default=None, help="KV cache per engine (CPU default 2)")
    s.add_argument("--gpu-memory-utilization", type=float, default=0.4)
    s.add_argument("--max-model-len", type=int, default=None)
    s.add_argument("--engine-dtype", default="auto")
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
