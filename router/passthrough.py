"""The engine's routes besides generation that clients and probes use, passed to one engine as they are.

vLLM serves ``/health``, ``/ping``, ``/version`` and ``/load`` (probes) and ``/tokenize`` and
``/detokenize`` (a client counting tokens with the model's own tokenizer); a client that talks to
vLLM through the gateway expects them. Each goes to one routable engine, of the body's ``model`` when
it names one (a model served here: else the generation routes' 404), else to any engine, and the
engine's answer (status, body, content type) goes back unchanged. With no routable engine the
gateway answers 503 itself. The tokenizer routes need the client's API key when the gateway has
keys (they cost engine CPU); the probes are open, as on vLLM.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import Response

from tandem.router.admission import error_response, read_body
from tandem.router.proxy import UpstreamFailure

if TYPE_CHECKING:
    from tandem.router.gateway import Gateway
    from tandem.router.pool import Instance

PROBES = ("/health", "/ping", "/version", "/load")
TOKENIZER_ROUTES = ("/tokenize", "/detokenize")
PROBE_TIMEOUT_S = 10.0


def pick_engine(candidates: Sequence[Instance], turn: int) -> Instance | None:
    """The routable candidate with the fewest requests in flight; ties taken in turn (pure)."""
    routable = [i for i in candidates if i.state.routable and not i.removed]
    if not routable:
        return None
    least = min(i.state.inflight_requests for i in routable)
    tied = [i for i in routable if i.state.inflight_requests == least]
    return tied[turn % len(tied)]


def body_model(raw: bytes) -> str | None:
    """The ``model`` a JSON body names, if any (a body the engine will judge otherwise)."""
    try:
        data = json.loads(raw) if raw else None
    except (ValueError, RecursionError):
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) and model else None


class Passthrough:
    """Forwards the routes above for one gateway."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self._turns = itertools.count()

    async def forward(self, request: Request, path: str) -> Response:
        gw = self.gw
        raw = b""
        model = None
        if path in TOKENIZER_ROUTES:
            auth = gw.keys.authenticate(request.headers.get("authorization"), request.headers.get("x-api-key"))
            if not auth.ok:
                gw.metrics.rejected.labels("auth").inc()
                return error_response(auth.status, auth.message, type_="authentication_error")
            try:
                body = await read_body(request, gw.settings.max_body_bytes, gw.settings.body_timeout)
            except TimeoutError:
                return error_response(408, f"request body not received within {gw.settings.body_timeout:g} s")
            if body is None:
                return error_response(413, f"request body exceeds {gw.settings.max_body_bytes} bytes")
            raw, model = body, body_model(body)
        instances = gw.all_instances()
        if model is not None:
            instances = [i for i in instances if i.model == model]
            if not instances:
                known = gw.served_models() or ["<none yet>"]
                return error_response(404, f"model '{model}' is not served here; available: {', '.join(known)}",
                                      type_="NotFoundError", param="model")
        inst = pick_engine(instances, next(self._turns))
        if inst is None:
            return error_response(503, "no routable engine" + (f" for model '{model}'" if model else ""),
                                  type_="server_error", retry_after=2)
        assert gw.upstream is not None
        url = inst.endpoint.url + path + (f"?{request.url.query}" if request.url.query else "")
        try:
            status, headers, content = await gw.upstream.exchange(
                request.method, url, raw, budget_s=PROBE_TIMEOUT_S, headers=gw.engine_headers(inst.endpoint))
        except UpstreamFailure as exc:
            gw.metrics.upstream_errors.labels(inst.label, exc.kind).inc()
            said = exc if gw.settings.expose_topology else exc.summary
            return error_response(502, f"engine {inst.label}: {said}", type_="server_error")
        return Response(content, status_code=status, headers={**headers, "x-tandem-instance": inst.label})
