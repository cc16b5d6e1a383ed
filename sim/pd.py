"""Prefill/decode roles of the simulated engine: the two KV-transfer handshakes real engines use.

vLLM (NixlConnector, as its disaggregated proxy drives it): the proxy sends the prompt to a
prefill engine with ``max_tokens=1`` and ``kv_transfer_params={"do_remote_decode": true, ...}``;
the prefill engine keeps the prompt's KV blocks and answers with ``kv_transfer_params`` naming its
engine id, the block ids and the host/port to pull from; the proxy passes those to a decode engine
with the original request; the decode engine pulls the KV, recomputes only the last prompt token
and streams. SGLang: the router sends the same request to a prefill and a decode server at once,
both carrying ``bootstrap_host/bootstrap_port/bootstrap_room``; the decode side waits until the
prefill with that room has finished, then receives its KV.

Here the "pull" is an HTTP call to the prefill simulator (the side channel a real NIXL handshake
uses), so a decode really depends on its prefill: a prefill that died after the handshake makes
the decode fail with a clear 503, and parameters that do not name KV the prefill holds are a 400.
By default the bytes themselves move in simulated time over the decode's
:class:`~tandem.sim.link.AsyncLink` (RTT, then a fair share of ``--kv-link-gbps``). With
``--kv-transport wire`` the prefill engine sends them: the pull's (or the bootstrap's) response
body is the prompt's KV, prompt tokens x the profile's KV bytes per token, so whatever network lies
between the two engines (a shaped link between namespaces, say) really carries it and really
takes its time. Every handshake the decode side receives is recorded and exposed at
``GET /admin/kv`` so tests can assert what arrived.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import httpx
from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tandem.api.models import Role
from tandem.sim.link import AsyncLink

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from tandem.sim.engine import SimRequest
    from tandem.sim.settings import SimSettings

MAX_ROOM = 2**63 - 1
_MAX_HELD = 10_000  # prefill: KV records awaiting a pull (vLLM frees them after a timeout too)
_CHUNK = bytes(256 * 1024)  # wire transport: the KV is sent in pieces of this size
_MAX_ROOMS = 65_536


class KVTransferParams(BaseModel):
    """vLLM's ``kv_transfer_params`` (NixlConnector fields)."""

    model_config = ConfigDict(extra="forbid")

    do_remote_decode: bool = False
    do_remote_prefill: bool = False
    remote_engine_id: str | None = Field(None, min_length=1, max_length=256)
    remote_block_ids: list[int] | None = Field(None, max_length=1_000_000)
    remote_host: str | None = Field(None, min_length=1, max_length=256)
    remote_port: int | None = Field(None, ge=1, le=65535)
    tp_size: int = Field(1, ge=1, le=1024)

    @model_validator(mode="after")
    def _consistent(self) -> KVTransferParams:
        if self.do_remote_decode and self.do_remote_prefill:
            raise ValueError("do_remote_decode and do_remote_prefill cannot both be true")
        if self.do_remote_prefill:
            for name in ("remote_engine_id", "remote_block_ids", "remote_host", "remote_port"):
                if getattr(self, name) is None:
                    raise ValueError(f"{name}: required when do_remote_prefill is true")
            if not self.remote_block_ids:
                raise ValueError("remote_block_ids: must not be empty")
        return self


class BootstrapFields(BaseModel):
    """SGLang's disaggregation fields, top-level in the request body."""

    model_config = ConfigDict(extra="ignore")

    bootstrap_host: str = Field(min_length=1, max_length=256)
    bootstrap_port: int = Field(ge=1, le=65535)
    bootstrap_room: int = Field(ge=0, le=MAX_ROOM)


class HandshakeError(ValueError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class TransferError(RuntimeError):
    """The decode side could not get the KV: ``status`` 400 for bad parameters, 503/504 otherwise."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


@dataclass(frozen=True, slots=True)
class Handshake:
    protocol: Literal["vllm", "sglang"]
    side: Literal["prefill", "decode"]
    vllm: KVTransferParams | None = None
    sglang: BootstrapFields | None = None

    def prepare(self, req: SimRequest) -> None:
        """Shape the engine request: a decode awaits its KV; an SGLang prefill stops after prefill."""
        if self.side == "decode":
            req.kv_ready_at = math.inf
        elif self.protocol == "sglang":
            req.max_tokens = 1


def _first_error(exc: ValidationError, prefix: str) -> HandshakeError:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()))
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if not loc and ": " in msg:  # a model validator names its field as "field: message"
        loc, msg = msg.split(": ", 1)
    param = ".".join(p for p in (prefix, loc) if p) or "body"
    return HandshakeError(f"{param}: {msg}", param)


def parse_handshake(extra: dict[str, Any], role: Role, *, stream: bool) -> Handshake | None:
    """The KV handshake a request carries, checked against this engine's role (None: plain request)."""
    raw_kv = extra.get("kv_transfer_params")
    has_bootstrap = any(k in extra for k in ("bootstrap_host", "bootstrap_port", "bootstrap_room"))
    if raw_kv is not None and has_bootstrap:
        raise HandshakeError("kv_transfer_params and bootstrap_* fields are two protocols; send one",
                             "kv_transfer_params")
    if raw_kv is not None:
        if not isinstance(raw_kv, dict):
            raise HandshakeError("kv_transfer_params: must be an object", "kv_transfer_params")
        try:
            params = KVTransferParams.model_validate(raw_kv)
        except ValidationError as exc:
            raise _first_error(exc, "kv_transfer_params") from None
        if not (params.do_remote_decode or params.do_remote_prefill):
            return None
        side: Literal["prefill", "decode"] = "prefill" if params.do_remote_decode else "decode"
        if role != side:
            raise HandshakeError(f"kv_transfer_params: a {side}-side handshake sent to a {role} engine",
                                 "kv_transfer_params")
        if side == "prefill" and stream:
            raise HandshakeError("stream: the prefill request of a disaggregated handshake must not stream",
                                 "stream")
        return Handshake("vllm", side, vllm=params)
    if has_bootstrap:
        try:
            fields = BootstrapFields.model_validate(extra)
        except ValidationError as exc:
            raise _first_error(exc, "") from None
        if role == "unified":
            raise HandshakeError("bootstrap_room: sent to a unified engine (no disaggregation role)",
                                 "bootstrap_room")
        return Handshake("sglang", "prefill" if role == Role.prefill else "decode", sglang=fields)
    return None


@dataclass(slots=True)
class _Held:
    block_ids: list[int]
    prompt_tokens: int
    expires: float


@dataclass(slots=True)
class _Room:
    created: float
    done: asyncio.Event = field(default_factory=asyncio.Event)
    prompt_tokens: int | None = None
    failed: str | None = None


class KVTransfers:
    """One engine's side of KV transfers: held KV and rooms (prefill), pulls and the link (decode)."""

    def __init__(self, settings: SimSettings, *, kv_bytes_per_token: int, block_size: int,
                 registry: CollectorRegistry) -> None:
        self.settings = settings
        self.role: Role = settings.role
        self.engine_id = settings.engine_id or f"tandem-sim-{uuid.uuid4().hex[:12]}"
        self.kv_bytes_per_token = kv_bytes_per_token
        self.block_size = block_size
        self.held: OrderedDict[int, _Held] = OrderedDict()
        self.rooms: OrderedDict[int, _Room] = OrderedDict()
        self.received: deque[dict[str, Any]] = deque(maxlen=256)
        self.counts: dict[str, int] = {"ok": 0, "rejected": 0, "failed": 0, "pulls_served": 0,
                                       "rooms_served": 0}
        self._block_ids = itertools.count(1)
        self.link: AsyncLink | None = None
        self.client: httpx.AsyncClient | None = None
        self._transfers = Counter("tandem_sim_kv_transfers", "KV transfers received, by result.", ["result"],
                                  registry=registry)
        self._bytes = Counter("tandem_sim_kv_transfer_bytes", "KV bytes received over the link.",
                              registry=registry)

    async def start(self) -> None:
        if self.role == "decode":
            self.link = AsyncLink(self.settings.kv_link_gbps, self.settings.kv_link_per_flow_gbps)
            self.link.start()
            self.client = httpx.AsyncClient(timeout=httpx.Timeout(self.settings.kv_wait_s + 5, connect=2.0))

    async def stop(self) -> None:
        if self.link:
            await self.link.stop()
        if self.client:
            await self.client.aclose()

    # ----- prefill side -------------------------------------------------------------------------
    def hold(self, req: SimRequest, host: str, port: int) -> dict[str, Any]:
        """Keep a finished prefill's KV for a pull; the response's ``kv_transfer_params``."""
        now = time.monotonic()
        self._expire(now)
        blocks = [next(self._block_ids) for _ in range(-(-req.prompt_tokens // self.block_size))]
        self.held[blocks[0]] = _Held(blocks, req.prompt_tokens, now + self.settings.kv_hold_s)
        while len(self.held) > _MAX_HELD:
            self.held.popitem(last=False)
        return {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": self.engine_id,
                "remote_block_ids": blocks, "remote_host": host, "remote_port": port, "tp_size": 1}

    def payload(self, prompt_tokens: int) -> tuple[dict[str, str], AsyncIterator[bytes]]:
        """The wire form of a prompt's KV: headers naming its size, and a body of that many bytes."""
        total = prompt_tokens * self.kv_bytes_per_token

        async def body() -> AsyncIterator[bytes]:
            left = total
            while left > 0:
                n = min(left, len(_CHUNK))
                yield _CHUNK if n == len(_CHUNK) else _CHUNK[:n]
                left -= n

        return {"x-tandem-kv-prompt-tokens": str(prompt_tokens),
                "x-tandem-kv-bytes-per-token": str(self.kv_bytes_per_token),
                "content-length": str(total)}, body()

    def serve_pull(self, engine_id: str, block_ids: list[int]) -> tuple[int, dict[str, Any]]:
        """A decode engine reads held KV; the blocks are freed once read, as after a NIXL read."""
        self._expire(time.monotonic())
        if engine_id != self.engine_id:
            return 404, {"error": f"engine id {engine_id!r} is not this engine ({self.engine_id!r})"}
        record = self.held.get(block_ids[0]) if block_ids else None
        if record is None or record.block_ids != block_ids:
            return 404, {"error": "these blocks hold no KV waiting for a pull (never computed, expired or "
                                  "already read)"}
        del self.held[block_ids[0]]
        self.counts["pulls_served"] += 1
        return 200, {"prompt_tokens": record.prompt_tokens, "kv_bytes_per_token": self.kv_bytes_per_token}

    def room(self, room_id: int) -> _Room:
        now = time.monotonic()
        while self.rooms:
            first = next(iter(self.rooms.values()))
            if now - first.created < self.settings.kv_hold_s and len(self.rooms) < _MAX_ROOMS:
                break
            first_id = next(iter(self.rooms))
            expired = self.rooms.pop(first_id)
            expired.failed = expired.failed or "expired before a decode server asked for it"
            expired.done.set()
        return self.rooms.setdefault(room_id, _Room(now))

    def room_finished(self, room_id: int, req: SimRequest | None, failure: str | None = None) -> None:
        room = self.room(room_id)
        room.prompt_tokens = req.prompt_tokens if req else None
        room.failed = failure
        room.done.set()

    async def serve_bootstrap(self, room_id: int, wait_s: float) -> tuple[int, dict[str, Any]]:
        room = self.room(room_id)
        try:
            async with asyncio.timeout(min(wait_s, self.settings.kv_wait_s)):
                await room.done.wait()
        except TimeoutError:
            return 408, {"error": f"no prefill finished for bootstrap_room {room_id} in time"}
        self.rooms.pop(room_id, None)
        if room.failed:
            return 410, {"error": f"the prefill of bootstrap_room {room_id} failed: {room.failed}"}
        self.counts["rooms_served"] += 1
        return 200, {"prompt_tokens": room.prompt_tokens, "kv_bytes_per_token": self.kv_bytes_per_token}

    def _expire(self, now: float) -> None:
        while self.held and next(iter(self.held.values())).expires <= now:
            self.held.popitem(last=False)

    # ----- decode side --------------------------------------------------------------------------
    async def receive(self, hs: Handshake, req: SimRequest, kv_arrived: Any) -> None:
        """Get ``req``'s KV from its prefill engine, then tell the engine (``kv_arrived(id)``)."""
        record: dict[str, Any] = {"protocol": hs.protocol, "request_id": req.id, "prompt_tokens": req.prompt_tokens,
                                  "at": time.time()}
        if hs.vllm is not None:
            record["kv_transfer_params"] = hs.vllm.model_dump()
        if hs.sglang is not None:
            record["bootstrap"] = hs.sglang.model_dump()
        wire = self.settings.kv_transport == "wire"
        try:
            t0 = time.monotonic()
            tokens, nbytes = await (self._pull_vllm(hs.vllm, wire) if hs.vllm is not None
                                    else self._wait_room(hs.sglang, wire))
            if tokens != req.prompt_tokens:
                raise TransferError(400, f"the remote KV covers {tokens} tokens but this prompt has "
                                         f"{req.prompt_tokens}: the handshake belongs to another request",
                                    "kv_transfer_params" if hs.vllm is not None else "bootstrap_room")
            if wire:
                seconds = time.monotonic() - t0  # the bytes came over the real network path
            else:
                assert self.link is not None
                await asyncio.sleep(self.settings.kv_rtt_ms / 1000)
                nbytes = tokens * self.kv_bytes_per_token
                seconds = await self.link.transfer(nbytes) + self.settings.kv_rtt_ms / 1000
        except TransferError as exc:
            result = "rejected" if exc.status == 400 else "failed"
            self._record(record, result, error=str(exc))
            raise
        kv_arrived(req.id)
        self._bytes.inc(nbytes)
        record.update(transferred_tokens=tokens, transferred_bytes=nbytes, transfer_s=seconds,
                      transport=self.settings.kv_transport)
        self._record(record, "ok")

    def _record(self, record: dict[str, Any], result: str, error: str | None = None) -> None:
        record["result"] = result
        if error:
            record["error"] = error
        self.counts[result] += 1
        self._transfers.labels(result=result).inc()
        self.received.append(record)

    async def _pull_vllm(self, p: KVTransferParams | None, wire: bool) -> tuple[int, int]:
        """(prompt tokens, KV bytes received: 0 unless ``wire``) of a vLLM-style pull."""
        assert p is not None and self.client is not None
        url = f"http://{p.remote_host}:{p.remote_port}/kv/pull"
        body = {"engine_id": p.remote_engine_id, "block_ids": p.remote_block_ids, "payload": wire}
        try:
            async with self.client.stream("POST", url, json=body) as resp:
                if resp.status_code == 404:
                    await resp.aread()
                    raise TransferError(400, f"kv_transfer_params: prefill engine {p.remote_host}:{p.remote_port} "
                                             f"refused the pull: {_error_text(resp)}",
                                        "kv_transfer_params.remote_block_ids")
                if resp.status_code != 200:
                    raise TransferError(503, f"KV transfer failed: prefill engine answered {resp.status_code}",
                                        "kv_transfer_params.remote_host")
                return await _kv_answer(resp, wire)
        except httpx.HTTPError as exc:
            raise TransferError(503, f"KV transfer failed: prefill engine {p.remote_engine_id} at "
                                     f"{p.remote_host}:{p.remote_port} is unreachable or the transfer broke "
                                     f"({type(exc).__name__})", "kv_transfer_params.remote_host") from exc

    async def _wait_room(self, b: BootstrapFields | None, wire: bool) -> tuple[int, int]:
        """(prompt tokens, KV bytes received: 0 unless ``wire``) of an SGLang-style bootstrap wait."""
        assert b is not None and self.client is not None
        url = f"http://{b.bootstrap_host}:{b.bootstrap_port}/bootstrap/{b.bootstrap_room}"
        try:
            async with self.client.stream("GET", url, params={"wait_s": self.settings.kv_wait_s,
                                                              "payload": str(wire).lower()}) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    raise TransferError(504 if resp.status_code == 408 else 503,
                                        f"KV transfer failed: {_error_text(resp)}", "bootstrap_room")
                return await _kv_answer(resp, wire)
        except httpx.HTTPError as exc:
            raise TransferError(503, f"KV transfer failed: prefill bootstrap server {b.bootstrap_host}:"
                                     f"{b.bootstrap_port} is unreachable or the transfer broke "
                                     f"({type(exc).__name__})", "bootstrap_host") from exc

    def snapshot(self) -> dict[str, Any]:
        return {"role": self.role, "engine_id": self.engine_id, "held": len(self.held), "rooms": len(self.rooms),
                "counts": dict(self.counts), "received": list(self.received)}


async def _kv_answer(resp: httpx.Response, wire: bool) -> tuple[int, int]:
    """(prompt tokens, bytes received) of a pull/bootstrap answer: the JSON record, or with ``wire``
    the KV itself, whose length must be what its headers say."""
    if not wire:
        await resp.aread()
        return int(resp.json()["prompt_tokens"]), 0
    tokens = int(resp.headers["x-tandem-kv-prompt-tokens"])
    expected = tokens * int(resp.headers["x-tandem-kv-bytes-per-token"])
    received = 0
    async for chunk in resp.aiter_raw():
        received += len(chunk)
    if received != expected:
        raise TransferError(503, f"KV transfer broke off: {received} of {expected} bytes arrived", "kv_transfer_params")
    return tokens, received


def _error_text(resp: httpx.Response) -> str:
    try:
        return str(resp.json().get("error", resp.text))
    except ValueError:
        return resp.text[:200]


class PullRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    engine_id: str = Field(min_length=1, max_length=256)
    block_ids: list[int] = Field(min_length=1, max_length=1_000_000)
    payload: bool = Field(False, description="send the KV bytes themselves (wire transport), not only their size")
