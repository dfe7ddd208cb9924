"""The OpenAI API's request and response shapes (the part `serve` implements), and its
error object."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

# Longest stop list and stop string a request may give (OpenAI allows 4 strings).
MAX_STOPS = 16
MAX_STOP_CHARS = 256
MAX_TOP_LOGPROBS = 20  # as OpenAI's chat API


class APIError(Exception):
    """A request the server refuses: an OpenAI error object with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status,
            message,
            param,
            code,
            kind,
        )

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse({"error": error}, status_code=self.status, headers=headers)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Request(BaseModel):
    # Fields the API has that serve does not use (user, metadata, ...) are accepted and
    # ignored, as OpenAI-compatible servers do.
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise APIError(
                400,
                f"stop: at most {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} "
                "characters",
                "stop",
            )
        return stops

    def sampling_fields(self) -> dict:
        names = (
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
        )
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "image_url", "input_text"]
    text: str | None = None
    image_url: dict | str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    # An earlier reply's thinking, sent back mid tool loop: Qwen3's template shows it for
    # the turns after the last question.
    reasoning_content: str | None = None

    def for_template(self, picture: Callable[[str, str], Any] | None = None) -> dict:
        """The message as chat templates read it, tool calls as given. Its images become
        ``{"type": "image", "picture": picture(url, field)}`` items (vision/prompt.py's
        form) with a vision model's ``picture``; text parts are joined otherwise."""
        text = self.content if isinstance(self.content, str) else self.content or ""
        if isinstance(self.content, list):
            images = [i for i, part in enumerate(self.content) if part.type == "image_url"]
            if images and picture is None:
                raise APIError(400, "image content needs a vision model", "messages")
            if picture is None:
                text = "".join(part.text or "" for part in self.content)
            else:
                text = [
                    _part(part, picture, f"content[{i}]") for i, part in enumerate(self.content)
                ]
        role = "system" if self.role == "developer" else self.role
        message: dict[str, Any] = {"role": role, "content": text}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        if self.reasoning_content:
            message["reasoning_content"] = self.reasoning_content
        return message


def _part(part: ContentPart, picture: Callable[[str, str], Any], field: str) -> dict:
    if part.type != "image_url":
        return {"type": "text", "text": part.text or ""}
    url = part.image_url.get("url") if isinstance(part.image_url, dict) else part.image_url
    return {"type": "image", "picture": picture(url if isinstance(url, str) else "", field)}


class ChatCompletionRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None
    chat_template_kwargs: dict | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def alternatives(self) -> int | None:
        """Alternatives per token when logprobs are asked for, else None."""
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Request):
    prompt: str | list[int] = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def alternatives(self) -> int | None:
        return self.logprobs


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }
