"""The wire format of vLLM 0.32's OpenAI server, as the simulator speaks it (pure: dicts in, dicts out).

Checked against a recording of the real engine (``tests/fixtures/vllm-0.32``, ``tests/sim/test_sim_fidelity.py``):
error bodies (``{"error": {"message", "type", "param", "code"}}`` with the HTTP status as ``code``,
``BadRequestError`` for a parameter the engine refuses, ``Bad Request`` for a body its request model
refuses, ``NotFoundError`` for an unknown model), the fields of completion and chat bodies and of
their stream chunks (a chat stream opens with a role-only chunk), ``usage.prompt_tokens_details``
null unless ``--enable-prompt-tokens-details``, the parameter checks and the context-length limit.
What the simulator does not imitate is listed in docs/simulator.md.
"""

from __future__ import annotations

import math
import time
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.requests import Request

from tandem.openai_api import ChatCompletionRequest, CompletionRequest

VLLM_VERSION = "0.32.0"
_ERROR_TYPES = {400: "BadRequestError", 401: "UnauthorizedError", 404: "NotFoundError",
                500: "InternalServerError", 503: "ServiceUnavailableError"}


class EngineRefusal(Exception):
    """A request the engine refuses: status, message and the parameter it names."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, value: Any = None) -> None:
        if param is not None and status == 400:  # vLLM's validation errors end by naming the parameter
            message = f"{message} (parameter={param}, value={value})"
        super().__init__(message)
        self.status, self.param = status, param


def error(status: int, message: str, param: str | None = None, type_: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {
        "message": message, "type": type_ or _ERROR_TYPES.get(status, "Error"), "param": param, "code": status}})


def refused(exc: EngineRefusal) -> JSONResponse:
    return error(exc.status, str(exc), exc.param)


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """A body the request model refuses: vLLM answers with pydantic's error list, type ``Bad Request``."""
    assert isinstance(exc, RequestValidationError)
    errors = [{"type": e.get("type"), "loc": ".".join(str(p) for p in e.get("loc", ())), "msg": e.get("msg")}
              for e in exc.errors()]
    lines = "\n".join(f"  {e}" for e in errors)
    message = f"{len(errors)} validation error{'s' if len(errors) != 1 else ''}:\n{lines}"
    return error(400, message, errors[0]["loc"] if errors else None, "Bad Request")


def unknown_model(model: str, served: str) -> JSONResponse:
    return error(404, f"The model `{model}` does not exist. Valid aliases: {served}.", "model")


def missing_field(name: str) -> JSONResponse:
    """What vLLM's request model answers for a required field the body lacks."""
    detail = {"type": "missing", "loc": f"body.{name}", "msg": "Field required"}
    return error(400, f"1 validation error:\n  {detail}", f"body.{name}", "Bad Request")


def check_parameters(body: CompletionRequest | ChatCompletionRequest, max_model_len: int) -> None:
    """vLLM's checks of the sampling parameters the simulator reads (raises :class:`EngineRefusal`)."""
    if body.stream_options is not None and not body.stream:
        raise EngineRefusal("Stream options can only be defined when `stream=True`.", "stream_options",
                            value=body.stream_options.model_dump())
    if body.temperature is not None:
        t = body.temperature
        why = ("must be a finite number" if not math.isfinite(t) else "must be non-negative" if t < 0
               else "must be in [0, 2]" if t > 2 else None)
        if why is not None:
            raise EngineRefusal(f"temperature {why}, got {t}.", "temperature", value=t)
    if body.n is not None and body.n < 1:
        raise EngineRefusal(f"n must be at least 1, got {body.n}.", "n", value=body.n)
    name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if asked is not None and asked > max_model_len:
        raise EngineRefusal(f"{name}={asked} cannot be greater than max_model_len={max_model_len}. Please request "
                            "fewer output tokens.", name, value=asked)
    if asked is not None and asked < 1:
        raise EngineRefusal(f"max_tokens must be at least 1, got {asked}.", "max_tokens", value=asked)
    least = (body.model_extra or {}).get("min_tokens")
    if isinstance(least, int) and asked is not None and least > asked:
        raise EngineRefusal(f"min_tokens must be less than or equal to max_tokens={asked}, got {least}.",
                            "min_tokens", value=least)


def output_limit(asked: int | None, default: int, prompt_tokens: int, max_model_len: int) -> int:
    """The output tokens a request gets: what it asked for (else the simulator's default), cut to what
    the context leaves after the prompt, as vLLM cuts it; a prompt longer than the context is refused."""
    if prompt_tokens > max_model_len:
        raise EngineRefusal(f"This model's maximum context length is {max_model_len} tokens. However, your prompt "
                            f"contains {prompt_tokens} input tokens, which exceeds this limit even without any "
                            "output tokens. Please reduce the length of the input prompt.", "input_tokens",
                            value=prompt_tokens)
    limit = min(asked if asked is not None else default, max_model_len - prompt_tokens)
    if limit < 1:
        raise EngineRefusal(f"max_tokens must be at least 1, got {limit}.", "max_tokens", value=limit)
    return limit


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int, details: bool) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens} if details else None,
            "completion_tokens_details": None}


def stream_usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int, details: bool) -> dict[str, Any]:
    """A stream's usage chunk: the counts, and the details only when enabled."""
    out: dict[str, Any] = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
                           "completion_tokens": completion_tokens}
    if details:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


def fingerprint() -> str:
    return f"vllm-{VLLM_VERSION}-tandem-sim"


def completion_body(rid: str, model: str, text: str, finish: str, use: dict[str, Any]) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None,
                         "token_ids": None, "prompt_logprobs": None, "prompt_token_ids": None,
                         "routed_experts": None}],
            "service_tier": None, "system_fingerprint": fingerprint(), "usage": use, "kv_transfer_params": None,
            "ec_transfer_params": None, "metrics": None}


def chat_body(rid: str, model: str, text: str, finish: str, use: dict[str, Any]) -> dict[str, Any]:
    message = {"role": "assistant", "content": text, "refusal": None, "annotations": None, "audio": None,
               "function_call": None, "reasoning": None}
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish,
                         "stop_reason": None, "token_ids": None, "routed_experts": None}],
            "service_tier": None, "system_fingerprint": fingerprint(), "usage": use, "prompt_logprobs": None,
            "prompt_token_ids": None, "prompt_text": None, "kv_transfer_params": None, "ec_transfer_params": None,
            "metrics": None}


def role_chunk(rid: str, model: str) -> dict[str, Any]:
    """The chunk a chat stream opens with: the role, no content (sent with the first token)."""
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}], "prompt_token_ids": None, "prompt_text": None}


def token_chunk(kind: str, rid: str, model: str, text: str, finish: str | None, *, closing: bool = False
                ) -> dict[str, Any]:
    """One token's chunk; ``closing``: the stream's last chunk (no usage chunk follows), which carries
    the system fingerprint."""
    created = int(time.time())
    if kind == "chat":
        choice: dict[str, Any] = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": finish}
        if finish is not None:
            choice["stop_reason"] = None
        choice["token_ids"] = None
        out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
    else:
        out = {"id": rid, "object": "text_completion", "created": created, "model": model,
               "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None,
                            "prompt_token_ids": None, "token_ids": None}]}
    if closing:
        out["system_fingerprint"] = fingerprint()
    return out


def usage_chunk(kind: str, rid: str, model: str, use: dict[str, Any]) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model, "choices": [], "usage": use,
            "system_fingerprint": fingerprint()}
