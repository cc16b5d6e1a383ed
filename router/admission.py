"""Admission: everything a generation request must pass before it is routed.

In order: the gateway is not draining and below its limit of requests in progress (:func:`gate`;
from there the request counts toward that limit), the caller is authenticated, the body is bounded
in size and in time and valid JSON of the OpenAI request models, the model is served
here, the prompt is keyed for routing (block hashes), the prompt and output limits hold, and the
caller's rate limit admits it. Each refusal is an OpenAI-shaped error with its own rejection
metric; what passes is an :class:`Admitted` request, which the unified or the disaggregated path
serves (``tandem.router.unified``, ``tandem.router.pdgateway``).

One implementation, two front ends: the HTTP gateway runs the steps in :func:`admit` (after
:func:`gate`); the endpoint picker (``tandem.router.epp``), which receives the body from the data
plane message by message, runs the same steps one by one: :func:`gate`, :func:`authenticate`, the
body bounded in size (:func:`declared_too_large`, :func:`body_too_large`) and in time
(:func:`body_too_slow`), then :func:`admit_body`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import xxhash
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from tandem.kvindex import PromptTokens
from tandem.openai_api import error_body
from tandem.prefix import block_id_tokens, chain_hashes, piece_ids, token_block_hashes, tokenize
from tandem.router.cpuwork import CpuBusy
from tandem.router.observations import EngineKey
from tandem.router.requestview import Kind, Refusal, RequestView, batch_size, prompt_texts, read_view
from tandem.router.routing.types import RouteRequest
from tandem.router.tokenizer import EngineTokenizer, approximate_chat

if TYPE_CHECKING:
    from tandem.router.gateway import Gateway
    from tandem.router.pool import Pool


@dataclass(frozen=True, slots=True)
class Admitted:
    """A request that passed admission: what the gateway reads of it, its JSON, raw bytes, routing key,
    engine-block key (for the observations' hit estimate) and policy.

    ``pool`` is the model's unified pool, or None when prefill/decode pools serve the model."""

    body: RequestView
    data: dict[str, Any]
    raw: bytes
    rreq: RouteRequest
    engine_key: EngineKey | None
    policy: str
    pool: Pool | None


@dataclass(frozen=True, slots=True)
class _Keyed:
    """One prompt's tokens (the engine's, or the gateway's word pieces), its routing hashes, and the
    engine's token ids the exact cache view matches against the blocks the engine reports cached
    (computed on first use; None: not known, the prompt is routed on the shadow view)."""

    tokens: list[str] | None  # None: keyed from a trace's hints, no tokens to hash at another block size
    count: int
    hashes: list[int]
    fallback: int
    exact: PromptTokens | None


def _key_text(text: str, block_size: int, tokenizer: EngineTokenizer | None, *, special: bool,
              engine_text: bool = True) -> _Keyed:
    """``engine_text``: ``text`` is what the engine tokenizes (not the gateway's own chat rendering,
    made when the model's chat template is missing or refused the conversation: the engine's ids are
    then unknown). Without a tokenizer the ids are ``tandem sim``'s ids of the word pieces, what it
    reports in its KV-cache events."""
    if tokenizer is not None:
        tokens = tokenizer.encode(text, special=special)
        exact = PromptTokens(make=lambda: [int(t) for t in tokens]) if engine_text else None
    else:
        tokens = tokenize(text)
        exact = PromptTokens(make=lambda: piece_ids(tokens))
    return _Keyed(tokens, len(tokens), token_block_hashes(tokens, block_size), xxhash.xxh64_intdigest(text.encode()),
                  exact)


def _key_ids(ids: tuple[int, ...], block_size: int) -> _Keyed:
    tokens = [str(i) for i in ids]  # as the tokenizer path spells them: a text and its ids key alike
    return _Keyed(tokens, len(tokens), token_block_hashes(tokens, block_size),
                  xxhash.xxh64_intdigest("\x1f".join(tokens).encode()), PromptTokens(ids))


def _unicode_refusal(view: RequestView) -> Refusal | None:
    for text in prompt_texts(view):
        try:
            text.encode()
        except UnicodeEncodeError:  # JSON may carry lone surrogates ("\\ud800"): not text any engine can take
            return Refusal("prompt: not valid Unicode text (a lone surrogate)",
                           "prompt" if view.kind == "completion" else "messages" if view.kind == "chat" else "input")
    return None


def route_request(view: RequestView, block_size: int, tokenizer: EngineTokenizer | None = None, *,
                  trust_hints: bool = False, engine_block: int | None = None
                  ) -> tuple[RouteRequest, EngineKey | None] | Refusal:
    """The routing key of a request: the simulator's block hashes when given and trusted (a gateway
    started for simulator benchmarks), else its prompt's tokens (token ids as given; text through the
    engine's tokenizer and chat template when configured, else a cheap word chunking). A batch of
    prompts is keyed on its first (a batch usually shares its prefix) and counts every prompt's tokens.
    Untrusted hints are never read: the prompt's own text is what limits and budgets see. The routing
    request also carries the first prompt's engine token ids (``tokens``, lazy: see :class:`_Keyed`;
    for hints, stand-in ids of their block ids) for the instances routed on the exact cache view.

    ``engine_block``: the engines' KV block size, when scraped; the first prompt is then also hashed
    in those blocks (:class:`EngineKey`), for the observations' estimate of the engine's own hits."""
    if trust_hints and view.x_tandem is not None:
        ext = view.x_tandem
        return RouteRequest(request_id="", prompt_tokens=ext.prompt_tokens, block_size=ext.block_size,
                            block_hashes=tuple(chain_hashes(ext.hash_ids)), arrival=0.0,
                            fallback_key=ext.prompt_tokens, model=view.model,
                            tokens=PromptTokens(make=lambda: block_id_tokens(ext.hash_ids, ext.block_size,
                                                                             ext.prompt_tokens))), None
    if (refused := _unicode_refusal(view)) is not None:
        return refused
    if view.messages is not None:
        rendered = tokenizer.chat.render(view.messages) if tokenizer is not None and tokenizer.chat else None
        keyed = [_key_text(rendered if rendered is not None else approximate_chat(view.messages), block_size,
                           tokenizer, special=False, engine_text=rendered is not None or tokenizer is None)]
    else:
        keyed = [_key_text(p, block_size, tokenizer, special=True) if isinstance(p, str) else _key_ids(p, block_size)
                 for p in view.prompts] or [_key_text("", block_size, tokenizer, special=False)]
    first = keyed[0]
    engine_key = None
    if engine_block and first.tokens is not None:
        engine_key = EngineKey(engine_block, tuple(token_block_hashes(first.tokens, engine_block)))
    tokens = sum(k.count for k in keyed)
    return RouteRequest(request_id="", prompt_tokens=max(tokens, 1), block_size=block_size,
                        block_hashes=tuple(first.hashes), arrival=0.0, fallback_key=first.fallback,
                        model=view.model, tokens=first.exact), engine_key


MAX_JSON_DEPTH = 64


def too_deep(data: Any, limit: int) -> bool:
    """Whether ``data`` nests lists and objects deeper than ``limit`` (iterative: no recursion to exhaust)."""
    if not isinstance(data, (dict, list)):
        return False
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def parse_body(raw: bytes, kind: Kind) -> tuple[dict[str, Any], RequestView] | Refusal:
    """The JSON body and what the gateway reads of it (:mod:`tandem.router.requestview`), or why the
    gateway cannot route it. Hostile JSON ends here too: a number too long to convert (Python bounds
    int parsing at 4,300 digits), nesting deeper than the parser's recursion limit, invalid UTF-8 or
    lone surrogates in the text. Everything else about the body is the engine's to judge."""
    try:
        data = json.loads(raw)
    except RecursionError:
        return Refusal("body is not valid JSON: nested too deeply")
    except json.JSONDecodeError as exc:
        return Refusal(f"body is not valid JSON: {exc}")
    except UnicodeDecodeError:
        return Refusal("body is not valid JSON: not UTF-8 text")
    except ValueError:  # the int-string conversion limit (its message names a Python setting: not repeated)
        return Refusal(f"body is not valid JSON: a number has more than {sys.get_int_max_str_digits()} digits")
    if too_deep(data, MAX_JSON_DEPTH):  # re-serialised on some paths (disaggregated bodies): bounded here
        return Refusal(f"body: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    view = read_view(data, kind)
    return view if isinstance(view, Refusal) else (data, view)


# Bodies larger than this are parsed and keyed on the admission threads (``tandem.router.cpuwork``);
# smaller ones take less time on the loop than the hand-over would.
OFF_LOOP_BYTES = 32_768


def prepare(raw: bytes, kind: Kind, block_size: int, tokenizer: EngineTokenizer | None, trust_hints: bool,
            engine_blocks: Mapping[str, int] | None = None
            ) -> tuple[dict[str, Any], RequestView, RouteRequest, EngineKey | None] | Refusal:
    """The CPU-bound part of admission, the same on the loop or on a thread: the parsed body, what the
    gateway reads of it and its routing key (prompt tokens, block hashes), or why the body is refused.
    ``engine_blocks``: model -> the engines' KV block size, where scraped (read once: thread-safe)."""
    parsed = parse_body(raw, kind)
    if isinstance(parsed, Refusal):
        return parsed
    data, view = parsed
    if view.x_tandem is not None and not trust_hints:
        # A client-declared token count and block ids would let it pass the prompt limit and budget
        # with any prompt and pin any engine: believed only by a gateway started to benchmark simulators.
        return Refusal("x_tandem: prompt hints are not accepted by this gateway (they are for simulator "
                       "benchmarks: tandem gateway --trust-prompt-hints)", "x_tandem")
    keyed = route_request(view, block_size, tokenizer, trust_hints=trust_hints,
                          engine_block=(engine_blocks or {}).get(view.model))
    return keyed if isinstance(keyed, Refusal) else (data, view, *keyed)


def error_response(status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                   retry_after: float | None = None) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
    return JSONResponse(status_code=status, content=error_body(message, type_=type_, param=param), headers=headers)


def gate(gw: Gateway) -> Response | None:
    """The refusal of a request the gateway takes no more of (draining, or at its limit), before it
    reads anything; a request that passes counts toward the limit from then on, body reading included."""
    if gw.draining:
        gw.metrics.rejected.labels("draining").inc()
        resp = error_response(503, "gateway is shutting down", type_="server_error", retry_after=1)
        resp.headers["connection"] = "close"  # the client's next request opens a connection elsewhere
        return resp
    if gw.active >= gw.settings.max_active_requests:
        gw.metrics.rejected.labels("overloaded").inc()
        return error_response(503, f"gateway at capacity ({gw.settings.max_active_requests} requests in progress)",
                              type_="server_error", retry_after=1)
    return None


async def admit(gw: Gateway, request: Request, kind: Kind) -> Admitted | Response:
    """The admitted request, or the error response that refuses it (see the module docstring)."""
    principal = authenticate(gw, request.headers)
    if isinstance(principal, Response):
        return principal
    try:
        raw = await read_body(request, gw.settings.max_body_bytes, gw.settings.body_timeout)
    except TimeoutError:
        return body_too_slow(gw)
    if raw is None:
        return body_too_large(gw)
    return await admit_body(gw, request.headers, raw, kind, principal)


def authenticate(gw: Gateway, headers: Mapping[str, str]) -> str | Response | None:
    """The caller's principal, or the refusal of a missing or wrong key: the check that needs only the
    headers, so a front end refuses before the body arrives. ``headers`` by lower-case name:
    Starlette's, or the endpoint picker's dict."""
    auth = gw.keys.authenticate(headers.get("authorization"), headers.get("x-api-key"))
    if not auth.ok:
        gw.metrics.rejected.labels("auth").inc()
        return error_response(auth.status, auth.message, type_="authentication_error")
    return auth.principal


def declared_too_large(headers: Mapping[str, str], limit: int) -> bool:
    """Whether the body's declared length (``content-length``) already exceeds ``limit`` bytes."""
    declared = headers.get("content-length")
    return bool(declared and declared.isdigit() and int(declared) > limit)


def body_too_large(gw: Gateway) -> JSONResponse:
    """The refusal of a body over ``max_body_bytes`` (declared so, or found so while reading)."""
    gw.metrics.rejected.labels("too_large").inc()
    return error_response(413, f"request body exceeds {gw.settings.max_body_bytes} bytes")


def body_too_slow(gw: Gateway) -> JSONResponse:
    """The refusal of a body not received within ``body_timeout`` (a slow client holds a slot, so it
    is bounded in time); the connection closes, as nothing says where the unread body ends."""
    gw.metrics.rejected.labels("body_timeout").inc()
    resp = error_response(408, f"request body not received within {gw.settings.body_timeout:g} s")
    resp.headers["connection"] = "close"
    return resp


async def admit_body(gw: Gateway, headers: Mapping[str, str], raw: bytes, kind: Kind, principal: str | None
                     ) -> Admitted | Response:
    """The checks of a whole body (at most ``max_body_bytes``) of an authenticated caller: the HTTP
    gateway and the endpoint picker both end admission here."""
    s = gw.settings
    work = functools.partial(prepare, raw, kind, s.block_size, gw.tokenizer, s.trust_prompt_hints, gw.engine_blocks)
    if len(raw) > OFF_LOOP_BYTES:  # big prompts: parsed, tokenized and hashed off the event loop
        try:
            prepared = await gw.cpu.run(work)
        except CpuBusy as exc:
            gw.metrics.rejected.labels("overloaded").inc()
            return error_response(503, f"gateway busy: {exc}", type_="server_error", retry_after=1)
    else:
        prepared = work()
    if isinstance(prepared, Refusal):
        gw.metrics.rejected.labels("invalid").inc()
        return error_response(400, prepared.message, param=prepared.param)
    data, body, rreq, engine_key = prepared
    pool = gw.pools.get(body.model)
    disaggregated = pool is None and gw.pd_router.serves(body.model)
    if pool is None and not disaggregated and any(
            i.model == body.model for role in gw.pd.values() for i in role.values()):
        gw.metrics.rejected.labels("pd_incomplete").inc()
        return error_response(503, f"model '{body.model}' is served by prefill/decode pools, but one of the two roles "
                              "has no instance yet", type_="server_error", param="model", retry_after=2)
    if pool is None and not disaggregated:
        gw.metrics.rejected.labels("unknown_model").inc()
        known = gw.served_models() or ["<none yet>"]
        return error_response(404, f"model '{body.model}' is not served here; available: {', '.join(known)}",
                              type_="NotFoundError", param="model")
    policy = gw.settings.policy
    if gw.settings.policy_header and (asked := headers.get("x-tandem-policy")):
        # A policy such as consistent_hash pins an engine: the operator's choice, never a client's.
        if gw.admin_mode != "open" and not (gw.admin_mode == "keys" and gw.admin_keys.authenticate(
                None, headers.get("x-tandem-admin-key")).ok):
            gw.metrics.rejected.labels("auth").inc()
            return error_response(403, "x-tandem-policy: choosing the routing policy needs an admin key "
                                  "(X-Tandem-Admin-Key)", type_="permission_error", param="x-tandem-policy")
        if not gw.known_policy(asked):
            return error_response(400, f"x-tandem-policy: unknown policy '{asked}'", param="x-tandem-policy")
        policy = asked
    if (too_big_answer := too_big(gw, rreq.prompt_tokens, body.output_limit)) is not None:
        return too_big_answer
    if body.n > s.max_n:
        gw.metrics.rejected.labels("invalid").inc()
        return error_response(400, f"n: {body.n} exceeds the limit of {s.max_n}", param="n")
    # Charged with what the request may produce: every choice's output limit (the one in force when it set
    # none), n choices for each prompt of a batch.
    choices = body.n * batch_size(body)
    charge = rreq.prompt_tokens + choices * gw.output_in_force(body.model, body.output_limit, rreq.prompt_tokens)
    limit = await gw.limiter.admit(gw.keys.principal(principal), charge)
    if not limit.ok:
        gw.metrics.rejected.labels("rate_limit").inc()
        return error_response(429, limit.message, type_="rate_limit_error", retry_after=limit.retry_after)
    return Admitted(body=body, data=data, raw=raw, rreq=rreq, engine_key=engine_key, policy=policy, pool=pool)


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



async def read_body(request: Request, limit: int, deadline_s: float) -> bytes | None:
    """The body, or None once it exceeds ``limit`` bytes (checked before and while reading); raises
    TimeoutError when the whole body has not arrived within ``deadline_s`` seconds (slow clients)."""
    if declared_too_large(request.headers, limit):
        return None
    parts: list[bytes] = []
    size = 0
    async with asyncio.timeout(deadline_s):
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return None
            parts.append(chunk)
    return b"".join(parts)
