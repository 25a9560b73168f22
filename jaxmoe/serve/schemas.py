"""OpenAI request bodies (the fields jaxmoe honours, checked by pydantic) and error objects.

Unknown fields are ignored, as clients send many; fields whose meaning jaxmoe cannot honour
(n > 1, echo, logprobs, penalties, logit_bias, several prompts) are refused with a 400
naming the field rather than silently ignored.
"""

from __future__ import annotations

from typing import Literal, Union

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr


class ServeError(Exception):
    """An OpenAI-style error: HTTP status, message, the offending parameter."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str | None = None,
                 headers: dict | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers
        self.kind = kind or error_type(status)


def error_type(status: int) -> str:
    """The OpenAI error type of a status a request is refused with."""
    return {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
            503: "service_unavailable"}.get(status, "invalid_request_error")  # fmt: skip


def error_body(message: str, param: str | None, kind: str) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def error_response(status: int, message: str, param: str | None = None, kind: str | None = None,
                   headers: dict | None = None) -> JSONResponse:  # fmt: skip
    """`kind` None: the status's own type (error_type)."""
    return JSONResponse(error_body(message, param, kind or error_type(status)), status_code=status, headers=headers)


Number = Union[StrictInt, StrictFloat]


class SLORequest(BaseModel):
    """Extension: this request's objectives (server defaults where absent) and the class
    its attainment is counted under in /metrics."""

    model_config = ConfigDict(extra="forbid")
    ttft_ms: Number | None = Field(None, gt=0)
    tpot_ms: Number | None = Field(None, gt=0)
    name: StrictStr = Field("default", alias="class", max_length=64)


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    model: StrictStr
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number = Field(1.0, ge=0, le=2)
    top_p: Number = Field(1.0, gt=0, le=1)
    top_k: StrictInt = Field(0, ge=0)  # extension (vLLM, llama.cpp)
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = Field(1, ge=1)
    slo: SLORequest | None = None
    # Accepted only at their neutral values: anything else would be silently wrong.
    presence_penalty: Number = 0.0
    frequency_penalty: Number = 0.0
    logit_bias: dict | None = None
    logprobs: StrictBool | StrictInt | None = None
    user: StrictStr | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(field, why) for the first field set to something jaxmoe does not do."""
        if self.n != 1:
            return "n", "n > 1 is not supported: send the request n times (with different seeds)"
        if self.presence_penalty or self.frequency_penalty:
            field = "presence_penalty" if self.presence_penalty else "frequency_penalty"
            return field, f"{field} is not supported (only 0)"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        if self.logprobs not in (None, False, 0):
            return "logprobs", "logprobs are not supported"
        stops = self.stop_list()
        if len(stops) > 4:
            return "stop", f"at most 4 stop sequences, got {len(stops)}"
        return None

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(Sampling):
    prompt: StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]]
    echo: StrictBool = False
    suffix: StrictStr | None = None

    def unsupported(self):
        if self.echo:
            return "echo", "echo is not supported"
        if self.suffix:
            return "suffix", "suffix is not supported"
        return super().unsupported()


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
