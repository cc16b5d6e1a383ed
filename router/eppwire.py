"""The endpoint picker's wire format: Envoy ext_proc messages in, the GIE answers out. Pure functions.

Facts from the Gateway API Inference Extension's endpoint picker protocol
(docs/proposals/004-endpoint-picker-protocol, checked at v1.6.0) and Envoy's ext_proc API:

* the picked endpoints go back as ``ip:port`` (IPv6 in brackets), several comma-separated in order
  (the first is used, the rest are the data plane's retries), in BOTH the request header
  ``x-gateway-destination-endpoint`` and the dynamic metadata ``envoy.lb`` /
  ``x-gateway-destination-endpoint`` (the same value: two different values are undefined);
* the data plane may restrict the choice with ``envoy.lb.subset_hint`` /
  ``x-gateway-destination-endpoint-subset`` in the request's metadata (a list of ``ip:port``);
  nothing eligible there is a 503;
* the endpoint that served the response comes back in the metadata as ``envoy.lb`` /
  ``x-gateway-destination-endpoint-served``; Envoy's ``upstream.address`` attribute says the same
  where the gateway does not write that key (plain Envoy);
* no ready endpoint: an ImmediateResponse 503; a request shed under load: 429;
* with a FULL_DUPLEX_STREAMED body the picker answers when it chooses (it may hold the headers until
  the whole body has arrived) and sends every body byte back itself (``streamed_response``); in the
  other modes every message gets exactly one answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import lru_cache
from urllib.parse import urlsplit

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import duration_pb2, struct_pb2

LB_NAMESPACE = "envoy.lb"
DESTINATION = "x-gateway-destination-endpoint"
SERVED = "x-gateway-destination-endpoint-served"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET = "x-gateway-destination-endpoint-subset"
UPSTREAM_ADDRESS = "upstream.address"

Mode = processing_mode_pb2.ProcessingMode
FULL_DUPLEX = Mode.FULL_DUPLEX_STREAMED
NONE = Mode.NONE
STREAMED = Mode.STREAMED
# Envoy's recommended largest streamed_response chunk.
CHUNK = 64 * 1024
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def headers_of(msg: ep.HttpHeaders) -> dict[str, str]:
    """Header name (lower case) -> value; Envoy sends values in ``raw_value``."""
    return {h.key.lower(): (h.raw_value.decode("latin-1") if h.raw_value else h.value) for h in msg.headers.headers}


@lru_cache(maxsize=4096)  # instance URLs repeat on every request; bounded for pods coming and going
def endpoint_of(url: str) -> str:
    """The ``ip:port`` of an instance URL (``http://10.0.0.5:8000`` -> ``10.0.0.5:8000``)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _set_headers(mutation: ep.HeaderMutation, headers: Mapping[str, str]) -> None:
    for k, v in headers.items():
        option = mutation.set_headers.add()
        option.header.key, option.header.raw_value, option.append_action = k, v.encode(), _OVERWRITE


# Messages are built by attribute paths, not nested constructors (several times cheaper with the upb
# runtime): a long streamed answer passes every chunk through here.


def pick(endpoints: Iterable[str], *, on_body: bool, echo: bytes | None = None, end_of_stream: bool = True,
         ) -> list[ep.ProcessingResponse]:
    """The answers that send the request to ``endpoints`` (in order).

    ``on_body``: the pick answers the request body message (BUFFERED: the data plane holds the
    headers until then), else the request headers message. ``echo``: FULL_DUPLEX_STREAMED, the
    picker held the headers and the whole body; it answers the headers, then sends the body back
    (``end_of_stream`` False when trailers follow)."""
    value = ",".join(endpoints)
    first = ep.ProcessingResponse()
    common = (first.request_body if on_body and echo is None else first.request_headers).response
    _set_headers(common.header_mutation, {DESTINATION: value})
    # The field path, not Struct.update (a Python walk over dicts): half the cost, same bytes.
    first.dynamic_metadata.fields[LB_NAMESPACE].struct_value.fields[DESTINATION].string_value = value
    if echo is None:
        return [first]
    return [first, *streamed(echo, request=True, end_of_stream=end_of_stream)]


def streamed(body: bytes, *, request: bool, end_of_stream: bool) -> list[ep.ProcessingResponse]:
    """``body`` sent back in FULL_DUPLEX_STREAMED mode (at most :data:`CHUNK` bytes a message)."""
    if len(body) <= CHUNK:
        return [echo(body, request=request, end_of_stream=end_of_stream)]
    pieces = [body[i:i + CHUNK] for i in range(0, len(body), CHUNK)]
    last = len(pieces) - 1
    return [echo(piece, request=request, end_of_stream=end_of_stream and i == last) for i, piece in enumerate(pieces)]


def echo(chunk: bytes, *, request: bool = False, end_of_stream: bool = False) -> ep.ProcessingResponse:
    """One body chunk passed on in FULL_DUPLEX_STREAMED mode (the empty last one of a response, which
    Envoy sends after the engine's last bytes, is a shared instance)."""
    if end_of_stream and not chunk and not request:
        return _RESPONSE_END
    return _echo(chunk, request=request, end_of_stream=end_of_stream)


def _echo(chunk: bytes, *, request: bool, end_of_stream: bool) -> ep.ProcessingResponse:
    resp = ep.ProcessingResponse()
    out = (resp.request_body if request else resp.response_body).response.body_mutation.streamed_response
    out.body = chunk
    if end_of_stream:
        out.end_of_stream = True
    return resp


_RESPONSE_END = _echo(b"", request=False, end_of_stream=True)


def immediate(status: int, body: bytes, headers: Mapping[str, str], details: str) -> ep.ProcessingResponse:
    """A local reply instead of the upstream's (a refusal: 4xx, 503 no endpoint, 429 shed)."""
    resp = ep.ProcessingResponse()
    reply = resp.immediate_response
    reply.status.code = status
    _set_headers(reply.headers, headers)
    reply.body = body
    reply.details = details.replace(" ", "_")[:64]
    return resp


def _proceeding(kind: str) -> ep.ProcessingResponse:
    resp = ep.ProcessingResponse()
    getattr(resp, kind).SetInParent()
    return resp


# Continue unchanged: one shared instance per message kind (never mutated; gRPC serialises it).
PROCEED = {kind: _proceeding(kind) for kind in ("request_headers", "request_body", "request_trailers",
                                                "response_headers", "response_body", "response_trailers")}


def proceed(kind: str, headers: Mapping[str, str] | None = None) -> ep.ProcessingResponse:
    """Continue unchanged (``kind``: the ProcessingResponse field answering the message), optionally
    setting headers (response headers: which instance served)."""
    if not headers:
        return PROCEED[kind]
    return _proceeding_with(kind, tuple(headers.items()))


# The headers set on a response (instance label, decision reason) take few distinct values: one
# shared message per combination instead of one built per request; bounded for instances coming and going.
@lru_cache(maxsize=1024)
def _proceeding_with(kind: str, headers: tuple[tuple[str, str], ...]) -> ep.ProcessingResponse:
    resp = ep.ProcessingResponse()
    _set_headers(getattr(resp, kind).response.header_mutation, dict(headers))
    return resp


def extend(timeout_s: float) -> ep.ProcessingResponse:
    """Ask for more time to answer the message in hand (the request waits for budget): Envoy's
    ``override_message_timeout``, honoured up to the filter's ``max_message_timeout`` (at most once
    per message; unused in FULL_DUPLEX_STREAMED mode, which has no message timeout)."""
    timeout = duration_pb2.Duration()
    timeout.FromMilliseconds(max(1, min(3_600_000, round(timeout_s * 1000))))
    return ep.ProcessingResponse(override_message_timeout=timeout)


def _metadata_field(req: ep.ProcessingRequest, namespace: str, key: str) -> struct_pb2.Value | None:
    fm = req.metadata_context.filter_metadata
    if namespace not in fm:
        return None
    fields = fm[namespace].fields
    return fields.get(key)


def subset_hint(req: ep.ProcessingRequest) -> set[str] | None:
    """The endpoints the data plane allows for this request, or None when it set no subset."""
    value = _metadata_field(req, SUBSET_NAMESPACE, SUBSET)
    if value is None:
        return None
    if value.HasField("list_value"):
        return {v.string_value for v in value.list_value.values if v.string_value}
    return {s.strip() for s in value.string_value.split(",") if s.strip()}


def served(req: ep.ProcessingRequest) -> str | None:
    """The endpoint that produced this response: the protocol's metadata key, else Envoy's
    ``upstream.address`` attribute (the response message's attributes), else None (unknown)."""
    value = _metadata_field(req, LB_NAMESPACE, SERVED)
    if value is not None and value.string_value:
        return value.string_value
    for attrs in req.attributes.values():
        if UPSTREAM_ADDRESS in attrs.fields:
            return attrs.fields[UPSTREAM_ADDRESS].string_value or None
    return None


def status_of(msg: ep.HttpHeaders) -> int:
    """The ``:status`` of response headers (0 if absent or not a number): the one response header the
    picker reads, so no dict of them is built."""
    for h in msg.headers.headers:
        if h.key == ":status":
            status = h.raw_value.decode("latin-1") if h.raw_value else h.value
            return int(status) if status.isdigit() else 0
    return 0
