"""Prompt rendering: the one place where problem text becomes token ids (DESIGN rule 1).

The default user turn is the one the published DeepSeek-R1-Distill results (and the VGS
value model's training data) use. The chat template of the policy tokenizer adds the BOS,
`<｜User｜>`, `<｜Assistant｜>` and the opening `<think>\\n`.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from vgs.errors import VGSError

DEFAULT_USER_TEMPLATE = "{problem} Please think step-by-step and put your final answer within \\boxed{{}}."


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str) -> Any:
    """Load (and cache) a Hugging Face tokenizer from a local dir or a Hub id."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - surfaced to the user as one line
        where = "directory" if os.path.isdir(path) else "Hub id"
        raise VGSError(f"cannot load a tokenizer from {where} {path!r}: {exc.__class__.__name__}: {exc}") from exc


def render_prompt(tokenizer: Any, problem: str, user_template: str = DEFAULT_USER_TEMPLATE) -> str:
    """The prompt string, ending with the generation prompt (`<think>\\n` for R1 models)."""
    try:
        user = user_template.format(problem=problem)
    except (KeyError, IndexError, ValueError) as exc:
        raise VGSError(f"bad prompt template {user_template!r}: it must contain {{problem}} and escape other braces as {{{{ }}}}") from exc
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    return user


def prompt_ids(tokenizer: Any, problem: str, user_template: str = DEFAULT_USER_TEMPLATE) -> list[int]:
    """Token ids of the rendered prompt. Special tokens are already in the text, so the
    tokenizer must not add another BOS."""
    text = render_prompt(tokenizer, problem, user_template)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def eos_token_ids(tokenizer: Any) -> list[int]:
    ids = tokenizer.eos_token_id
    if ids is None:
        return []
    return list(ids) if isinstance(ids, (list, tuple)) else [int(ids)]


def decode(tokenizer: Any, ids: list[int], skip_special_tokens: bool = False) -> str:
    """Generated ids to text. Special tokens are kept by default (the answer extractor needs
    `</think>`, which some tokenizers mark special); the server returns text as vLLM's server
    does, with `skip_special_tokens=True` (no `<|end|>` / EOS in the answer)."""
    return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
