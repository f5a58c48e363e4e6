"""The OpenAI-compatible request and response bodies of ``nemojax serve`` (pydantic v2), as vLLM accepts them:
``POST /v1/chat/completions`` (:class:`ChatCompletionRequest`) and ``POST /v1/completions``
(:class:`CompletionRequest`). Unknown fields are ignored; a field the server cannot honour (``n`` > 1, logprobs,
penalties, ``echo``, ``suffix``) is a validation error, answered as a 400 error object."""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..sampling import check_sampling

__all__ = [
    "TextPart", "ToolCallFunction", "MessageToolCall", "ChatMessage", "FunctionDef", "Tool", "NamedToolChoice",
    "StreamOptions", "SamplingFields", "ChatCompletionRequest", "CompletionRequest", "ErrorBody", "ErrorResponse",
    "Usage", "PromptTokensDetails", "ResponseMessage", "ChatChoice", "ChatCompletionResponse", "DeltaToolCall",
    "DeltaMessage", "ChatChunkChoice", "ChatCompletionChunk", "CompletionChoice", "CompletionResponse",
    "ModelCard", "ModelList", "new_id",
]


def new_id(prefix: str) -> str:
    """``prefix`` + 24 random hex digits, e.g. ``chatcmpl-…``, ``cmpl-…``, ``call_…``."""
    return prefix + uuid.uuid4().hex[:24]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---------------------------------------------------------------------------------------------- chat messages
class TextPart(_Body):
    """One part of a list-valued message content; only text parts are supported."""
    type: Literal["text"]
    text: str


class ToolCallFunction(_Body):
    name: str
    arguments: Union[str, dict[str, Any]] = "{}"   # a JSON string (OpenAI) or an object


class MessageToolCall(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    reasoning_content: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _content_present(self):
        if self.role in ("system", "developer", "user", "tool") and self.content is None:
            raise ValueError(f"a {self.role} message needs content")
        return self

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class FunctionDef(_Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDef


class _NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: _NamedFunction


class StreamOptions(_Body):
    include_usage: bool = False


# ---------------------------------------------------------------------------------------------- requests
class SamplingFields(_Body):
    """The fields chat and completion requests share."""
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    user: str | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v):
        if v != 1:
            raise ValueError(f"n={v}: nemojax serve returns one choice per request (n must be 1)")
        return v

    @model_validator(mode="after")
    def _check_sampling(self):
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise ValueError(f"{name} is not supported (only 0)")
        if self.repetition_penalty not in (None, 1, 1.0):
            raise ValueError("repetition_penalty is not supported (only 1)")
        sp = self.sampling({})
        check_sampling(sp["temperature"], sp["top_k"], sp["top_p"])
        if any(not s for s in self.stop_list()):
            raise ValueError("stop strings must not be empty")
        return self

    def sampling(self, defaults: dict) -> dict:
        """temperature, top_p, top_k (0 = off), seed for ``nemojax.serve.engine.Request``: the request's values,
        else ``defaults`` (the model's generation_config, as vLLM reads it), else 1, 1, off."""
        def pick(name, fallback):
            v = getattr(self, name)
            return defaults.get(name, fallback) if v is None else v

        top_k = pick("top_k", 0)
        return dict(temperature=float(pick("temperature", 1.0)), top_p=float(pick("top_p", 1.0)),
                    top_k=0 if top_k in (None, -1) else int(top_k), seed=self.seed)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["auto", "none", "required"], NamedToolChoice, None] = None
    max_completion_tokens: int | None = Field(None, ge=1)
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    logprobs: bool | None = None
    top_logprobs: int | None = None

    @model_validator(mode="after")
    def _check_chat(self):
        if self.logprobs or self.top_logprobs:
            raise ValueError("logprobs are not supported")
        if self.tool_choice == "required" and not self.tools:
            raise ValueError("tool_choice 'required' needs tools")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = [t.function.name for t in self.tools or []]
            if self.tool_choice.function.name not in names:
                raise ValueError(f"tool_choice names the function {self.tool_choice.function.name!r}, which is "
                                 f"not among the tools {names}")
        return self

    def output_limit(self) -> int | None:
        """max_completion_tokens, else max_tokens (None: up to the context)."""
        return self.max_completion_tokens or self.max_tokens

    def enable_thinking(self) -> bool:
        return bool((self.chat_template_kwargs or {}).get("enable_thinking", True))


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = Field(16, ge=1)   # the OpenAI default for completions
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None
    skip_special_tokens: bool = True

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt is empty")
            if isinstance(v[0], (str, list)):
                if len(v) != 1:
                    raise ValueError(f"prompt holds {len(v)} prompts: nemojax serve takes one per request")
                v = v[0]
                if isinstance(v, list) and not v:
                    raise ValueError("prompt is empty")
        if isinstance(v, str) and not v:
            raise ValueError("prompt is empty")
        return v

    @model_validator(mode="after")
    def _check_completion(self):
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.logprobs is not None:
            raise ValueError("logprobs are not supported")
        if self.best_of not in (None, 1):
            raise ValueError("best_of must be 1")
        return self

    def output_limit(self) -> int | None:
        return self.max_tokens


# ---------------------------------------------------------------------------------------------- responses
class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    object: Literal["error"] = "error"
    error: ErrorBody


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[MessageToolCall] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int = 0
    message: ResponseMessage
    logprobs: None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaToolCall(BaseModel):
    index: int
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """A ``text_completion`` object: the whole answer, or one streamed chunk of it."""
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "nemojax"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
