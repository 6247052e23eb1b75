"""HTTP request bodies (pydantic) and their conversion into the project's configs.

The OpenAI fields behave as in vLLM's server; the `search` object (the OpenAI client's
`extra_body`) is parsed by `vgs.search.methods.search_config_from_dict`, the same code as the CLI.
Unknown top-level fields are errors (not silently ignored, unlike vLLM's models); the
OpenAI/vLLM fields this server does not implement are accepted with their neutral value only
(`vgs.server.fields`)."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    n: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=0, lt=2**31)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    search: dict[str, Any] | None = None
    skip_special_tokens: bool = True

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return [s for s in stops if s]


MAX_LOGPROBS = 20  # vLLM's default max_logprobs


class CompletionBody(_Common):
    prompt: Any  # str, [str], [int] or [[int]]: checked by `prompts()` with a message naming the form
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    add_special_tokens: bool = True

    def prompts(self) -> list[str | list[int]]:
        """The batch: each prompt a string or a list of token ids (ValueError says why not)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p, list) and p:
            if all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                return [list(p)]
            if all(isinstance(x, str) for x in p):
                return list(p)
            if all(isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x) for x in p):
                return [list(x) for x in p]
        if isinstance(p, list) and not p:
            raise ValueError("prompt is empty")
        raise ValueError("prompt must be a string, a list of strings, a list of token ids or a list of "
                         "token-id lists")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatBody(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    include_reasoning: bool = True


class TokenizeCompletionBody(BaseModel):
    """`POST /tokenize` with a prompt, as vLLM's."""
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatBody(BaseModel):
    """`POST /tokenize` with chat messages (rendered by the chat template), as vLLM's."""
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    return_token_strs: bool = False


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    tokens: list[int]
