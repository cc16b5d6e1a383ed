"""Admission: everything a generation request must pass before it is routed.

In order: the gateway is not draining and below its limit of requests in progress, the caller is
authenticated, the body is bounded and valid JSON of the OpenAI request models, the model is served
here, the prompt is keyed for routing (block hashes), the prompt and output limits hold, and the
caller's rate limit admits it. Each refusal is an OpenAI-shaped error with its own rejection
metric; what passes is an :class:`Admitted` request, which the unified or the disaggregated path
serves (``tandem.router.unified``, ``tandem.router.pdgateway``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import xxhash
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from tandem.openai_api import ChatCompletionRequest, CompletionRequest, describe_validation_error, error_body
from tandem.prefix import chain_hashes, text_block_hashes, token_block_hashes
from tandem.router.routing.types import RouteRequest

if TYPE_CHECKING:
    from tandem.router.gateway import Gateway
    from tandem.router.pool import Pool


@dataclass(frozen=True, slots=True)
class Admitted:
    """A request that passed admission: its parsed body, raw bytes, routing key and policy.

    ``pool`` is the model's unified pool, or None when prefill/decode pools serve the model."""

    body: CompletionRequest | ChatCompletionRequest
    data: dict[str, Any]
    raw: bytes
    rreq: RouteRequest
    policy: str
    pool: Pool | None


class Tokenizer(Protocol):
    def __call__(self, text: str) -> list[str]: ...


def load_tokenizer(path: Path) -> Tokenizer:
    """The engine's own tokenizer (``tokenizer.json``), so routing blocks align with its KV blocks."""
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError:
        raise ValueError("tokenizer: needs the 'tokenizers' package (pip install 'tandem-serving[tokenizer]')") \
            from None
    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception as exc:  # the library raises plain Exception for unreadable or malformed files
        raise ValueError(f"tokenizer: cannot load {path}: {exc}") from None

    def encode(text: str) -> list[str]:
        return [str(i) for i in tok.encode(text, add_special_tokens=False).ids]

    return encode


def route_request(body: CompletionRequest | ChatCompletionRequest, block_size: int,
                  tokenizer: Tokenizer | None = None) -> RouteRequest:
    """The routing key of a request: the simulator's block hashes when given, else the engine's
    tokenizer when configured, else a cheap text chunking."""
    if body.x_tandem is not None:
        ext = body.x_tandem
        return RouteRequest(request_id="", prompt_tokens=ext.prompt_tokens, block_size=ext.block_size,
                            block_hashes=tuple(chain_hashes(ext.hash_ids)), arrival=0.0,
                            fallback_key=ext.prompt_tokens, model=body.model)
    text = body.prompt_text()
    if tokenizer is not None:
        ids = tokenizer(text)
        tokens, hashes = len(ids), token_block_hashes(ids, block_size)
    else:
        tokens, hashes = text_block_hashes(text, block_size)
    return RouteRequest(request_id="", prompt_tokens=max(tokens, 1), block_size=block_size,
                        block_hashes=tuple(hashes), arrival=0.0, fallback_key=xxhash.xxh64_intdigest(text.encode()),
                        model=body.model)


def error_response(status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                   retry_after: float | None = None) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
    return JSONResponse(status_code=status, content=error_body(message, type_=type_, param=param), headers=headers)


async def admit(gw: Gateway, request: Request, kind: str) -> Admitted | Response:
    """The admitted request, or the error response that refuses it (see the module docstring)."""
    principal = admit_headers(gw, request.headers)
    if isinstance(principal, Response):
        return principal
    raw = await read_body(request, gw.settings.max_body_bytes)
    if raw is None:
        gw.metrics.rejected.labels("too_large").inc()
        return error_response(413, f"request body exceeds {gw.settings.max_body_bytes} bytes")
    return await admit_body(gw, request.headers, raw, kind, principal)


def admit_headers(gw: Gateway, headers: Mapping[str, str]) -> str | Response | None:
    """The checks that need only the headers (draining, capacity, authentication), so a front end
    refuses before the body arrives: the caller's principal, or the refusal. ``headers`` by
    lower-case name: Starlette's, or the endpoint picker's dict."""
    if gw.draining:
        gw.metrics.rejected.labels("draining").inc()
        resp = error_response(503, "gateway is shutting down", type_="server_error", retry_after=1)
        resp.headers["connection"] = "close"  # the client's next request opens a connection elsewhere
        return resp
    if gw.active >= gw.settings.max_active_requests:
        gw.metrics.rejected.labels("overloaded").inc()
        return error_response(503, f"gateway at capacity ({gw.settings.max_active_requests} requests in progress)",
                              type_="server_error", retry_after=1)
    auth = gw.keys.authenticate(headers.get("authorization"), headers.get("x-api-key"))
    if not auth.ok:
        gw.metrics.rejected.labels("auth").inc()
        return error_response(auth.status, auth.message, type_="authentication_error")
    return auth.principal


async def admit_body(gw: Gateway, headers: Mapping[str, str], raw: bytes, kind: str, principal: str | None
                     ) -> Admitted | Response:
    """The checks of a complete body (at most ``max_body_bytes``) once :func:`admit_headers` passed:
    the HTTP gateway and the endpoint picker (``tandem.router.epp``) both end admission here."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        gw.metrics.rejected.labels("invalid").inc()
        return error_response(400, f"body is not valid JSON: {exc}")
    cls = ChatCompletionRequest if kind == "chat" else CompletionRequest
    try:
        body = cls.model_validate(data)
    except ValidationError as exc:
        gw.metrics.rejected.labels("invalid").inc()
        message, field = describe_validation_error(RequestValidationError(exc.errors()))
        return error_response(400, message, param=field)
    pool = gw.pools.get(body.model)
    disaggregated = pool is None and gw.pd_router.serves(body.model)
    if pool is None and not disaggregated and any(
            i.model == body.model for role in gw.pd.values() for i in role.values()):
        gw.metrics.rejected.labels("pd_incomplete").inc()
        return error_response(503, f"model '{body.model}' is served by prefill/decode pools, but one of the two roles "
                              "has no instance yet", type_="server_error", param="model", retry_after=2)
    if pool is None and not disaggregated:
        gw.metrics.rejected.labels("unknown_model").inc()
        known = sorted(gw.pools) or ["<none yet>"]
        return error_response(404, f"model '{body.model}' is not served here; available: {', '.join(known)}",
                              type_="NotFoundError", param="model")
    policy = gw.settings.policy
    if gw.settings.policy_header and (asked := headers.get("x-tandem-policy")):
        if not gw.known_policy(asked):
            return error_response(400, f"x-tandem-policy: unknown policy '{asked}'", param="x-tandem-policy")
        policy = asked
    if gw.tokenizer is not None and len(raw) > 32_768:  # long prompts: tokenize off the event loop
        rreq = await asyncio.to_thread(route_request, body, gw.settings.block_size, gw.tokenizer)
    else:
        rreq = route_request(body, gw.settings.block_size, gw.tokenizer)
    if (too_big_answer := too_big(gw, rreq.prompt_tokens, body.output_limit(0))) is not None:
        return too_big_answer
    limit = gw.keys.admit(principal, rreq.prompt_tokens + body.output_limit(0), time.monotonic())
    if not limit.ok:
        gw.metrics.rejected.labels("rate_limit").inc()
        return error_response(429, limit.message, type_="rate_limit_error", retry_after=limit.retry_after)
    return Admitted(body=body, data=data, raw=raw, rreq=rreq, policy=policy, pool=pool)


def too_big(gw: Gateway, prompt_tokens: int, max_tokens: int) -> JSONResponse | None:
    s = gw.settings
    if prompt_tokens > s.max_prompt_tokens:
        gw.metrics.rejected.labels("too_large").inc()
        return error_response(413, f"prompt: {prompt_tokens} tokens exceeds the limit of {s.max_prompt_tokens}",
                              param="prompt")
    if max_tokens > s.max_output_tokens:
        gw.metrics.rejected.labels("too_large").inc()
        return error_response(413, f"max_tokens: {max_tokens} exceeds the limit of {s.max_output_tokens}",
                              param="max_tokens")
    return None



async def read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None once it exceeds ``limit`` bytes (checked before and while reading)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        return None
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


