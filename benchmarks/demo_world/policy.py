"""The demo policy: a tiny `Qwen2ForCausalLM` (head size 64, so vLLM's CPU attention serves it
unchanged) trained by plain PyTorch SFT on step-by-step traces sampled from the task's error
model (`task.solution(chain, rng)`), so it learns to make the same random and systematic step
errors. Loss on the assistant tokens only (solution + EOS); the data is generated on the fly
from the train split, with a fixed seed.

Also here, for the value-model experiments of docs/demo_world.md: `PolicyConfig(errors=False,
init=...)` fine-tunes a model on the *correct* solutions (a "checker" LM that knows every
fact), and `deepen` adds identity-initialised layers on top of a model.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass

from benchmarks.demo_world import task
from benchmarks.demo_world.tokenizer import build_tokenizer


@dataclass
class PolicyConfig:
    hidden: int = 128
    layers: int = 3
    intermediate: int = 384
    max_positions: int = 256
    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    train_problems: int = 20000
    seed: int = 0
    threads: int = 0  # torch threads; 0 = torch's default
    errors: bool = True  # train on error-model traces (the policy); False: on correct solutions
    init: str | None = None  # start from this causal LM (same tokenizer) instead of random weights


def qwen2_config(cfg: PolicyConfig, tok):
    from transformers import Qwen2Config

    vocab = 64 * ((len(tok) + 63) // 64)
    return Qwen2Config(vocab_size=vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                       num_hidden_layers=cfg.layers, num_attention_heads=cfg.hidden // 64, num_key_value_heads=1,
                       head_dim=64, max_position_embeddings=cfg.max_positions, rope_theta=10000.0,
                       bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       tie_word_embeddings=False, use_sliding_window=False, torch_dtype="float32")


def _example(tok, chain: task.Chain, rng: random.Random, errors: bool = True) -> tuple[list[int], int]:
    """Token ids of prompt + solution (sampled from the error model, or the correct one) + EOS,
    and the prompt length."""
    from vgs.prompts import prompt_ids

    prompt = prompt_ids(tok, chain.text)
    text = task.solution(chain, rng if errors else None)
    sol = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return prompt + sol, len(prompt)


def train_policy(out_dir: str, cfg: PolicyConfig = PolicyConfig(), progress: bool = True) -> str:
    """Train and save the policy (model + tokenizer files) into `out_dir`, atomically."""
    import math

    import torch
    from tqdm import tqdm
    from transformers import GenerationConfig, Qwen2ForCausalLM

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tok = build_tokenizer(tmp)
    if cfg.init:
        model = Qwen2ForCausalLM.from_pretrained(cfg.init, dtype=torch.float32).train()
    else:
        model = Qwen2ForCausalLM(qwen2_config(cfg, tok)).float().train()
    chains = [task.parse(p.problem) for p in task.make_split("train", cfg.train_problems, cfg.seed)]
    rng = random.Random(cfg.seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))))

    bar = tqdm(range(cfg.steps), desc="policy SFT" if cfg.errors else "checker LM SFT", disable=not progress, dynamic_ncols=True)
    ema = None
    for step in bar:
        batch = [_example(tok, rng.choice(chains), rng, cfg.errors) for _ in range(cfg.batch_size)]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (seq, plen) in enumerate(batch):
            ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, plen: len(seq)] = torch.tensor(seq[plen:])
            mask[i, : len(seq)] = 1
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema = float(loss) if ema is None else 0.95 * ema + 0.05 * float(loss)
        bar.set_postfix(loss=f"{ema:.4f}")
    bar.close()
    model.eval()
    model.save_pretrained(tmp)
    GenerationConfig(bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id).save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def deepen(src: str, dst: str, extra_layers: int, seed: int = 0) -> str:
    """Copy the causal LM at `src` into `dst` with `extra_layers` more decoder layers on top,
    each initialised as the identity (attention and MLP output projections zero), so the
    deeper model computes exactly what `src` computes until training moves it.

    Why (the value model's init): checking a step from outcome labels takes more hops than the
    3-layer policy has (gather the operands, compare the written result with the right one,
    then carry "a step was wrong" to every later token), and starting from the policy keeps
    what it knows about the arithmetic."""
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    base = Qwen2ForCausalLM.from_pretrained(src, dtype=torch.float32)
    cfg = base.config
    cfg.num_hidden_layers = cfg.num_hidden_layers + extra_layers
    cfg.layer_types = ["full_attention"] * cfg.num_hidden_layers
    deep = Qwen2ForCausalLM(cfg).float()
    missing, unexpected = deep.load_state_dict(base.state_dict(), strict=False)
    if unexpected or any(not k.startswith("model.layers.") for k in missing):
        raise RuntimeError(f"deepen: unexpected weights {unexpected} / missing {missing}")
    with torch.no_grad():
        for layer in deep.model.layers[-extra_layers:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    tmp = dst.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    deep.save_pretrained(tmp)
    for name in os.listdir(src):
        if name.startswith(("tokenizer", "chat_template", "generation_config", "special_tokens")):
            shutil.copy(os.path.join(src, name), os.path.join(tmp, name))
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return dst
