"""OpenAI / vLLM request fields this server does not implement, and their neutral values.

SDKs and proxies send many fields with a value that changes nothing (`null`, `false`, `0`,
`[]`, a penalty of 0, `tool_choice: "none"`). Those are dropped before validation, so such
clients work; any other value of them is a 400 naming the field and saying it is not
supported, rather than being silently ignored (vLLM's models ignore unknown keys) or failing
with a type message. Fields not listed here and not in the body models stay unknown-field
errors.
"""

from __future__ import annotations

from typing import Any

from vgs.errors import VGSError

_ABSENT: tuple[Any, ...] = (None,)
_OFF: tuple[Any, ...] = (None, False)
_EMPTY: tuple[Any, ...] = (None, [], {}, "")

# field -> neutral values (compared with ==, bools kept apart from ints)
COMMON: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "repetition_penalty": (None, 1),
    "length_penalty": (None, 1),
    "logit_bias": _EMPTY,
    "top_k": (None, 0, -1),
    "min_p": (None, 0),
    "min_tokens": (None, 0),
    "ignore_eos": _OFF,
    "include_stop_str_in_output": _OFF,
    "spaces_between_special_tokens": (None, True),
    "stop_token_ids": _EMPTY,
    "bad_words": _EMPTY,
    "allowed_token_ids": _EMPTY,
    "prompt_logprobs": _ABSENT,
    "truncate_prompt_tokens": _ABSENT,
    "response_format": (None, {"type": "text"}),
    "structured_outputs": _EMPTY,
    "guided_json": _EMPTY, "guided_regex": _EMPTY, "guided_choice": _EMPTY, "guided_grammar": _EMPTY,
    "guided_decoding_backend": _EMPTY, "guided_whitespace_pattern": _EMPTY,
    "service_tier": (None, "auto", "default"),
    "store": _OFF,
    "metadata": _EMPTY,
    "priority": (None, 0),
    "request_id": _EMPTY,
    "return_tokens_as_token_ids": _OFF,
    "return_token_ids": _OFF,
    "cache_salt": _EMPTY,
    "kv_transfer_params": _EMPTY,
    "vllm_xargs": _EMPTY,
    "mm_processor_kwargs": _EMPTY,
    "use_beam_search": _OFF,
}
COMPLETIONS: dict[str, tuple[Any, ...]] = {
    **COMMON,
    "best_of": (None, 1),
    "suffix": _EMPTY,
    "prompt_embeds": _EMPTY,
}
CHAT: dict[str, tuple[Any, ...]] = {
    **COMMON,
    "tools": _EMPTY,
    "tool_choice": (None, "none", "auto"),
    "parallel_tool_calls": (None, True, False),
    "functions": _EMPTY,
    "function_call": (None, "none", "auto"),
    "modalities": (None, [], ["text"]),
    "audio": _ABSENT,
    "prediction": _ABSENT,
    "reasoning_effort": _ABSENT,
    "web_search_options": _ABSENT,
    "add_generation_prompt": (None, True),
    "continue_final_message": _OFF,
    "echo": _OFF,
    "documents": _EMPTY,
    "chat_template": _EMPTY,
    "chat_template_kwargs": _EMPTY,
}
MESSAGE: dict[str, tuple[Any, ...]] = {
    "tool_calls": _EMPTY,
    "tool_call_id": _EMPTY,
    "function_call": _ABSENT,
    "refusal": _ABSENT,
    "audio": _ABSENT,
    "reasoning": _ABSENT,
    "reasoning_content": _ABSENT,
}
# the reason a non-neutral value is refused, where saying it helps
WHY = {
    "tools": "tool calls are not supported", "tool_choice": "tool calls are not supported",
    "functions": "tool calls are not supported", "function_call": "tool calls are not supported",
    "parallel_tool_calls": "tool calls are not supported", "tool_calls": "tool calls are not supported",
    "tool_call_id": "tool calls are not supported", "modalities": "only text output is supported",
    "audio": "audio is not supported", "prompt_embeds": "prompt embeddings are not supported",
    "use_beam_search": "use a `search` object (e.g. {\"method\": \"vgs\"}) for search",
    "best_of": "use a `search` object (e.g. {\"method\": \"best_of_n\", \"n\": 4}) to select among samples",
}


def _neutral(value: Any, allowed: tuple[Any, ...]) -> bool:
    """`value` equals one of `allowed`, with booleans never equal to numbers (`false` != `0`)."""
    return any(isinstance(value, bool) == isinstance(a, bool) and type(value) in (type(a), int, float)
               and value == a if a is not None else value is None for a in allowed)


def drop_neutral(data: dict[str, Any], table: dict[str, tuple[Any, ...]], where: str = "") -> None:
    """Remove the unsupported fields of `data` that carry a neutral value (in place); a VGSError
    naming the first field with any other value."""
    for key in [k for k in data if k in table]:
        if _neutral(data[key], table[key]):
            del data[key]
            continue
        why = WHY.get(key, "this server does not support it; send it absent or with its neutral value")
        raise VGSError(f"{where}{key}: {why}", param=f"{where}{key}")


def check_messages(messages: Any) -> None:
    """Chat messages: neutral tool/audio fields dropped; image/audio/file parts and batched
    conversations refused with what is not supported."""
    if not isinstance(messages, list):
        return  # the body model reports the type
    for i, m in enumerate(messages):
        if isinstance(m, list):
            raise VGSError("messages: a batch of conversations is not supported; send one conversation "
                           "per request", param="messages")
        if not isinstance(m, dict):
            continue
        if m.get("role") == "tool":
            raise VGSError(f"messages[{i}].role: tool messages are not supported (no tool calls)",
                           param=f"messages[{i}].role")
        drop_neutral(m, MESSAGE, f"messages[{i}].")
        content = m.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind != "text":
                    what = "images are" if "image" in kind else f"{kind!r} content parts are"
                    raise VGSError(f"messages[{i}].content[{j}]: {what} not supported (text only)",
                                   param=f"messages[{i}].content[{j}].type")
