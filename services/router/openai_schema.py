"""OpenAI API request models (pydantic) and the response bodies duopool sends, shared by the HTTP routes and
the batch output files (a batch output line's ``response.body`` is exactly what the endpoint would answer).

Only what duopool can honour is accepted with a non-default value; a parameter it cannot honour (``n > 1``,
``logprobs``, tools, penalties, ...) is a 400 naming it, never silently ignored. Unknown extra fields are
ignored (clients such as LangChain send vendor fields), as vLLM's and OpenAI's servers do for many.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "stop", "": "length"}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class _Common(BaseModel):
    """Fields chat and completions share."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    n: int | None = Field(default=None, ge=1, le=128)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    service_tier: str | None = None
    user: str | None = None
    presence_penalty: float | None = Field(default=None, allow_inf_nan=False)
    frequency_penalty: float | None = Field(default=None, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    ignore_eos: bool | None = False  # vLLM's extension (benchmarks ask for fixed output lengths)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    audio: Any = None
    modalities: list[str] | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)


def unsupported(req: _Common) -> tuple[str, str] | None:
    """(param, message) for the first parameter set to a value duopool cannot honour, else None."""
    if req.n not in (None, 1):
        return "n", "only n=1 is supported"
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            return name, f"{name} is not supported (only 0)"
    if req.logit_bias:
        return "logit_bias", "logit_bias is not supported"
    if req.logprobs not in (None, False, 0):
        return "logprobs", "logprobs are not supported"
    if isinstance(req.stop, list) and len(req.stop) > 4:
        return "stop", "at most 4 stop sequences"
    if isinstance(req, ChatCompletionRequest):
        for name in ("tools", "functions"):
            if getattr(req, name):
                return name, f"{name} (function calling) is not supported"
        for name in ("tool_choice", "function_call", "audio"):
            if getattr(req, name) not in (None, "none", "auto"):
                return name, f"{name} is not supported"
        if req.top_logprobs not in (None, 0):
            return "top_logprobs", "logprobs are not supported"
        if req.response_format and req.response_format.get("type", "text") != "text":
            return "response_format", "only response_format type 'text' is supported"
        if req.modalities and set(req.modalities) - {"text"}:
            return "modalities", "only the text modality is supported"
    if isinstance(req, CompletionRequest):
        if req.echo:
            return "echo", "echo is not supported"
        if req.suffix:
            return "suffix", "suffix is not supported"
        if req.best_of not in (None, 1):
            return "best_of", "only best_of=1 is supported"
    return None


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(engine_reason: str) -> str:
    return FINISH_REASONS.get(engine_reason, "stop")


def chat_completion_body(cid: str, created: int, model: str, text: str, reason: str, prompt_tokens: int,
                         completion_tokens: int, service_tier: str = "default") -> dict:
    return {
        "id": cid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                     "logprobs": None, "finish_reason": finish_reason(reason)}],
        "usage": usage(prompt_tokens, completion_tokens), "service_tier": service_tier,
        "system_fingerprint": None,
    }


def completion_body(cid: str, created: int, model: str, text: str, reason: str, prompt_tokens: int,
                    completion_tokens: int) -> dict:
    return {
        "id": cid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(reason)}],
        "usage": usage(prompt_tokens, completion_tokens), "system_fingerprint": None,
    }


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
