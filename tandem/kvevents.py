"""Engine KV-cache events on the wire: ZMQ frames of msgpack batches -> typed events, and back.

vLLM (``--kv-events-config``, publisher ``zmq``) and SGLang (the same flag, the same framing) tell
subscribers which prefix-cache blocks they stored and removed. The format, as observed on vLLM
0.32.0 (recorded under ``tests/fixtures/vllm-0.32``) and read in both engines' sources:

* **PUB socket**, multipart ``[topic, seq, payload]``: ``topic`` the configured topic in UTF-8
  (default empty), ``seq`` an unsigned 8-byte big-endian counter from 0 per publisher (it starts
  at 0 again when the engine process restarts), ``payload`` one msgpack batch.
* **Batch**: an array ``[ts, events]`` or ``[ts, events, data_parallel_rank]``.
* **Event**: vLLM >= 0.11 encodes a map with a ``"type"`` key (``BlockStored``, ``BlockRemoved``,
  ``AllBlocksCleared``) and omits fields at their default; SGLang and older vLLM an array whose
  first element is the type name and whose other elements are the fields in declaration order.
* **Block hashes** are unsigned 64-bit integers (vLLM's default) or bytes (vLLM with
  ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0``); they are opaque here.
* **Replay**: a DEALER sends ``[b"", start_seq]`` (8 bytes, big-endian) to the ROUTER and gets one
  message per buffered batch with ``seq >= start_seq``, ``[b"", topic, seq, payload]`` from vLLM
  or ``[b"", seq, payload]`` from SGLang, then an end marker whose seq is -1 (signed) and whose
  payload is empty.

Pure: bytes in, dataclasses out (and the reverse for ``tandem sim``, which publishes the same
format). A malformed message raises :class:`KVEventFormatError`; an event type this module does
not know is skipped (engines add types; a subscriber must not die of one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

BlockHash = int | bytes
END_SEQ = -1


class KVEventFormatError(ValueError):
    """A message that is not a KV-event batch in the documented framing."""


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Full blocks the engine cached, in chain order: ``token_ids`` holds every token of them.

    ``keyed``: the engine hashed more than the tokens into these blocks (a LoRA adapter, a
    multimodal input or a cache salt), so a prompt of the same tokens without them does not hit.
    """

    block_hashes: tuple[BlockHash, ...]
    parent_block_hash: BlockHash | None
    token_ids: tuple[int, ...]
    block_size: int
    medium: str | None = None
    group_idx: int | None = None
    keyed: bool = False


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: tuple[BlockHash, ...]
    medium: str | None = None
    group_idx: int | None = None


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """The engine dropped its whole prefix cache (vLLM: ``/reset_prefix_cache``; SGLang: ``/flush_cache``)."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class EventBatch:
    ts: float
    events: tuple[KVEvent, ...]
    dp_rank: int | None = None


@dataclass(frozen=True, slots=True)
class KVMessage:
    topic: bytes
    seq: int
    batch: EventBatch


# Field order of the array encoding (msgspec ``array_like``): SGLang's and older vLLM's.
_ARRAY_FIELDS: dict[str, tuple[str, ...]] = {
    "BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium",
                    "lora_name", "extra_keys", "group_idx"),
    "BlockRemoved": ("block_hashes", "medium", "group_idx"),
    "AllBlocksCleared": (),
}


def _hashes(value: Any, what: str) -> tuple[BlockHash, ...]:
    if not isinstance(value, list) or not all(isinstance(h, int | bytes) and not isinstance(h, bool) for h in value):
        raise KVEventFormatError(f"{what}: block_hashes must be a list of integers or bytes")
    return tuple(value)


def _opt_int(value: Any, field: str) -> int | None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise KVEventFormatError(f"{field} must be an integer or nil")
    return value


def _opt_str(value: Any, field: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise KVEventFormatError(f"{field} must be a string or nil")
    return value


def _event(raw: Any) -> KVEvent | None:
    if isinstance(raw, dict):
        kind = raw.get("type")
        fields = raw
    elif isinstance(raw, list) and raw and isinstance(raw[0], str):
        kind = raw[0]
        fields = dict(zip(_ARRAY_FIELDS.get(kind, ()), raw[1:], strict=False))
    else:
        raise KVEventFormatError(f"an event must be a map or a tagged array, got {type(raw).__name__}")
    if kind == "BlockStored":
        tokens = fields.get("token_ids")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise KVEventFormatError("BlockStored.token_ids must be a list of integers")
        size = fields.get("block_size")
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise KVEventFormatError("BlockStored.block_size must be a positive integer")
        parent = fields.get("parent_block_hash")
        if parent is not None and not isinstance(parent, int | bytes):
            raise KVEventFormatError("BlockStored.parent_block_hash must be an integer, bytes or nil")
        extra = fields.get("extra_keys")
        keyed = (fields.get("lora_name") is not None or fields.get("lora_id") is not None
                 or (isinstance(extra, list) and any(e is not None for e in extra)))
        return BlockStored(_hashes(fields.get("block_hashes"), "BlockStored"), parent, tuple(tokens), size,
                           _opt_str(fields.get("medium"), "BlockStored.medium"),
                           _opt_int(fields.get("group_idx"), "BlockStored.group_idx"), keyed)
    if kind == "BlockRemoved":
        return BlockRemoved(_hashes(fields.get("block_hashes"), "BlockRemoved"),
                            _opt_str(fields.get("medium"), "BlockRemoved.medium"),
                            _opt_int(fields.get("group_idx"), "BlockRemoved.group_idx"))
    if kind == "AllBlocksCleared":
        return AllBlocksCleared()
    return None  # a type this version does not know


def decode_batch(payload: bytes) -> EventBatch:
    """One msgpack batch ``[ts, events(, dp_rank)]`` -> :class:`EventBatch` (unknown event types dropped)."""
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise KVEventFormatError(f"payload is not msgpack: {exc}") from None
    if not isinstance(raw, list) or len(raw) not in (2, 3):
        raise KVEventFormatError("a batch must be an array [ts, events] or [ts, events, data_parallel_rank]")
    ts, events = raw[0], raw[1]
    if not isinstance(ts, int | float) or isinstance(ts, bool):
        raise KVEventFormatError("batch ts must be a number")
    if not isinstance(events, list):
        raise KVEventFormatError("batch events must be an array")
    dp_rank = _opt_int(raw[2], "data_parallel_rank") if len(raw) == 3 else None
    return EventBatch(float(ts), tuple(e for r in events if (e := _event(r)) is not None), dp_rank)


def _seq(frame: bytes, signed: bool = False) -> int:
    if len(frame) != 8:
        raise KVEventFormatError(f"a sequence number is 8 bytes, got {len(frame)}")
    return int.from_bytes(frame, "big", signed=signed)


def decode_pub(frames: Sequence[bytes]) -> KVMessage:
    """A PUB message ``[topic, seq, payload]``."""
    if len(frames) != 3:
        raise KVEventFormatError(f"a published message has 3 frames (topic, seq, payload), got {len(frames)}")
    return KVMessage(bytes(frames[0]), _seq(frames[1]), decode_batch(frames[2]))


def replay_request(start_seq: int) -> list[bytes]:
    """What a DEALER sends to the replay ROUTER to get every buffered batch from ``start_seq`` on."""
    if start_seq < 0:
        raise ValueError("start_seq must be >= 0")
    return [b"", start_seq.to_bytes(8, "big")]


def decode_replay(frames: Sequence[bytes]) -> KVMessage | None:
    """One replay answer as a DEALER receives it; ``None`` for the end marker.

    vLLM: ``[b"", topic, seq, payload]``; SGLang: ``[b"", seq, payload]`` (no topic frame).
    """
    if len(frames) not in (3, 4) or frames[0] != b"":
        raise KVEventFormatError("a replay answer is [empty, (topic,) seq, payload]")
    topic, seq_frame, payload = (frames[1], frames[2], frames[3]) if len(frames) == 4 else (b"", frames[1], frames[2])
    if _seq(seq_frame, signed=True) == END_SEQ:
        return None
    return KVMessage(bytes(topic), _seq(seq_frame), decode_batch(payload))


# ----- encoding (the simulator publishes what vLLM 0.32 publishes) --------------------------

def _encode_event(e: KVEvent) -> dict[str, Any]:
    if isinstance(e, BlockStored):
        out: dict[str, Any] = {"type": "BlockStored", "block_hashes": list(e.block_hashes),
                               "parent_block_hash": e.parent_block_hash, "token_ids": list(e.token_ids),
                               "block_size": e.block_size, "lora_id": None, "medium": e.medium, "lora_name": None}
        if e.group_idx is not None:
            out["group_idx"] = e.group_idx
        return out
    if isinstance(e, BlockRemoved):
        out = {"type": "BlockRemoved", "block_hashes": list(e.block_hashes), "medium": e.medium}
        if e.group_idx is not None:
            out["group_idx"] = e.group_idx
        return out
    return {"type": "AllBlocksCleared"}


def encode_batch(batch: EventBatch) -> bytes:
    return msgpack.packb([batch.ts, [_encode_event(e) for e in batch.events], batch.dp_rank], use_bin_type=True)


def encode_pub(topic: bytes, seq: int, payload: bytes) -> list[bytes]:
    return [topic, seq.to_bytes(8, "big"), payload]


def encode_replay(topic: bytes, seq: int, payload: bytes) -> list[bytes]:
    """One replay answer after the ROUTER's identity frame (vLLM's layout, with the topic)."""
    return [b"", topic, seq.to_bytes(8, "big"), payload]


def end_of_replay() -> list[bytes]:
    return [b"", b"", END_SEQ.to_bytes(8, "big", signed=True), b""]


# ----- where an engine publishes (static flag, pod annotation) ------------------------------

@dataclass(frozen=True, slots=True)
class KVEventsSource:
    """An engine's event sockets: the PUB endpoint, the replay ROUTER (optional) and the topic."""

    endpoint: str
    replay: str | None = None
    topic: str = ""

    def spec(self) -> str:
        out = self.endpoint
        if self.replay:
            out += f",replay={self.replay}"
        if self.topic:
            out += f",topic={self.topic}"
        return out


def _zmq_endpoint(value: str, host: str, what: str) -> str:
    if value.isdigit():
        port = int(value)
        if not 0 < port < 65536:
            raise ValueError(f"{what}: port {port} out of range")
        return f"tcp://{host}:{port}"
    if not value.startswith(("tcp://", "ipc://", "inproc://")) or "*" in value:
        raise ValueError(f"{what}: {value!r} is neither a port nor a tcp://, ipc:// endpoint to connect to")
    return value


def parse_kv_events(spec: str, host: str) -> KVEventsSource:
    """``PUB[,replay=REPLAY][,topic=TOPIC]``; PUB and REPLAY are ZMQ endpoints or bare ports on
    ``host`` (the engine's address: what an operator-written pod annotation can say before the
    pod has an IP). E.g. ``5557,replay=5558`` or ``tcp://10.0.0.7:5557,topic=kv-events``."""
    parts = [p.strip() for p in spec.split(",")]
    if not parts[0] or "=" in parts[0]:
        raise ValueError(f"kv-events {spec!r}: starts with the PUB endpoint or port")
    endpoint = _zmq_endpoint(parts[0], host, "kv-events")
    replay: str | None = None
    topic = ""
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if key == "replay" and sep and value:
            replay = _zmq_endpoint(value, host, "kv-events replay")
        elif key == "topic" and sep:
            topic = value
        else:
            raise ValueError(f"kv-events {spec!r}: unknown part {part!r} (replay=..., topic=...)")
    return KVEventsSource(endpoint, replay, topic)
