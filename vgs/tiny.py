"""`vgs make-tiny`: random-weight Qwen2 models with a real tokenizer, for tests and for
trying a pipeline without a GPU.

Head size is 64 (vLLM's CPU attention rejects tiny head sizes such as 16). The policy is a
`Qwen2ForCausalLM` with the tokenizer saved beside it; the value model is written in exactly
the published value-model layout (no tokenizer: the policy's is used, as for the real one).
"""

from __future__ import annotations

import json
import os
import shutil

from vgs.errors import VGSError

HEAD_DIM = 64
TOKENIZER_FILES = (
    "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", "generation_config.json",
)


def _base_kwargs(tokenizer_dir: str, layers: int, hidden: int, max_positions: int) -> dict:
    if hidden % HEAD_DIM:
        raise VGSError(f"--hidden must be a multiple of {HEAD_DIM} (head size), got {hidden}")
    if layers < 1:
        raise VGSError(f"--layers must be >= 1, got {layers}")
    ref = {}
    ref_path = os.path.join(tokenizer_dir, "config.json")
    if os.path.isfile(ref_path):
        with open(ref_path) as f:
            ref = json.load(f)
    heads = hidden // HEAD_DIM
    return dict(
        vocab_size=int(ref.get("vocab_size", 151936)),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=1 if heads % 2 else max(1, heads // 2),
        head_dim=HEAD_DIM,
        max_position_embeddings=max_positions,
        rms_norm_eps=float(ref.get("rms_norm_eps", 1e-6)),
        rope_theta=float(ref.get("rope_theta", 10000.0)),
        bos_token_id=int(ref.get("bos_token_id", 151643)),
        eos_token_id=int(ref.get("eos_token_id", 151643)),
        tie_word_embeddings=False,
        use_sliding_window=False,
    )


def make_tiny(kind: str, tokenizer_dir: str, out: str, layers: int = 2, hidden: int = 128,
              seed: int = 0, num_labels: int = 3, max_positions: int = 32768) -> str:
    """Build and save a tiny random model; returns `out`."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    if kind not in ("policy", "value"):
        raise VGSError(f"--kind must be 'policy' or 'value', got {kind!r}")
    if not os.path.isdir(tokenizer_dir):
        raise VGSError(f"tokenizer directory {tokenizer_dir!r} does not exist")
    kwargs = _base_kwargs(tokenizer_dir, layers, hidden, max_positions)
    torch.manual_seed(seed)
    if kind == "policy":
        model = Qwen2ForCausalLM(Qwen2Config(**kwargs))
    else:
        from vgs.modeling import Qwen2ForClassifier, value_model_config

        model = Qwen2ForClassifier(value_model_config(num_labels=num_labels, **kwargs))
    model = model.to(torch.float32).eval()
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if kind == "policy":
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp)
        for name in ("chat_template.jinja", "generation_config.json"):
            src = os.path.join(tokenizer_dir, name)
            if os.path.isfile(src) and not os.path.exists(os.path.join(tmp, name)):
                shutil.copy(src, tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
