"""OpenAI-compatible request models: what the engine simulator accepts, and the gateway's API schema.

They accept what vLLM accepts (a prompt as text, token ids or a batch of either; chat messages of any
role) and keep unknown fields (engines take many vendor extensions, e.g. vLLM ``kv_transfer_params``).
The simulator validates requests with them and judges the rest as vLLM does
(``tandem.sim.server``); the gateway does not validate with them at all: it reads only what routing
needs (``tandem.router.requestview``) and leaves the judging to the engine behind it.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator


class TandemPromptExtension(BaseModel):
    """``x_tandem``: a prompt given as prefix block ids (Mooncake ``hash_ids``) and a token count.

    Lets a trace whose prompts are only hashes be replayed through real HTTP: the simulator and the
    gateway use these blocks for caching and routing instead of tokenizing text.
    """

    model_config = ConfigDict(extra="forbid")

    hash_ids: list[int] = Field(default_factory=list, max_length=4096)
    prompt_tokens: int = Field(gt=0, le=10_000_000)
    block_size: int = Field(512, gt=0, le=65536)

    @model_validator(mode="after")
    def _blocks_cover_prompt(self) -> TandemPromptExtension:
        if len(self.hash_ids) > -(-self.prompt_tokens // self.block_size):
            raise ValueError("more hash_ids than ceil(prompt_tokens / block_size)")
        return self


class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int | None = Field(None, description="choices to generate (each costs its output tokens)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    x_tandem: TandemPromptExtension | None = None

    def output_limit(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


TokenIds = Annotated[list[int], Field(min_length=1)]


class CompletionRequest(_GenerationRequest):
    prompt: str | TokenIds | list[str] | list[TokenIds] | None = None

    @model_validator(mode="after")
    def _has_prompt(self) -> CompletionRequest:
        if self.prompt in (None, "", []) and self.x_tandem is None:
            raise ValueError("prompt: field required (a text, token ids, or a batch of either)")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request: one, or each of a batch."""
        p = self.prompt
        if p is None:
            return []
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else ""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str = Field(min_length=1, description="any role; the chat template decides what it accepts")
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            # Text parts only (a part's "text" is a string; anything else is not prompt text), joined by
            # newlines as vLLM flattens them for a string-content chat template.
            return "\n".join(t for part in self.content if isinstance(t := part.get("text"), str))
        return self.content or ""


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] | None = Field(None, max_length=10_000, description="required unless x_tandem")

    def prompt_text(self) -> str:
        return "".join(f"<|{m.role}|>\n{m.text()}\n" for m in self.messages or ())


def error_body(message: str, *, type_: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def describe_validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable line naming the first bad field, in OpenAI's error shape."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ())]
    if loc and loc[0] in ("body", "query", "path", "header", "cookie"):  # where it was, not which field
        loc = loc[1:]
    field = ".".join(loc) or None
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return (f"{field}: {msg}" if field and not msg.startswith(f"{field}:") else msg), field


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message, field = describe_validation_error(exc)
    return JSONResponse(status_code=400, content=error_body(message, param=field))
