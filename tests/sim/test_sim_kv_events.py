"""``tandem sim --kv-events``: the engine's cache journal and its ZMQ publication in vLLM's format."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import zmq
import zmq.asyncio

from tandem.kvevents import AllBlocksCleared, BlockRemoved, BlockStored, decode_pub, decode_replay, replay_request
from tandem.kvindex import BlockIndex, PromptTokens
from tandem.prefix import word_ids
from tandem.serve import serving
from tandem.sim.kvcache import BlockMeta, EngineKVCache
from tandem.sim.server import create_app
from tandem.sim.settings import SimSettings

MODEL = "Llama-3-8B"


def _metas(hashes: list[int], tokens: list[int], bs: int) -> list[BlockMeta | None]:
    return [BlockMeta(hashes[i - 1] if i else None, tuple(tokens[i * bs:(i + 1) * bs])) for i in range(len(hashes))]


def test_cache_journal_stores_offloads_evicts_and_clears() -> None:
    cache = EngineKVCache(host_capacity_tokens=8, events=True)
    toks = list(range(16))
    cache.add_pinned([1, 2], [8, 8], _metas([1, 2], toks, 8))
    assert cache.take_events() == [BlockStored((1, 2), None, tuple(toks), 8, "GPU")]
    cache.add_pinned([1, 2, 3], [8, 8, 4], [None, None, None])  # shared blocks, a partial tail: no event
    assert cache.take_events() == []
    cache.release([1, 2, 3])
    cache.release([1, 2])
    cache.fit(0)  # everything leaves GPU; the host tier (8 tokens) keeps one block at a time
    events = cache.take_events()
    assert BlockRemoved((2,), "GPU") in events and BlockRemoved((1,), "GPU") in events
    stored_cpu = [e for e in events if isinstance(e, BlockStored)]
    assert [e.medium for e in stored_cpu] == ["CPU", "CPU"]
    assert BlockRemoved((2,), "CPU") in events  # the host tier evicted the first offloaded block
    # Replaying the journal into an index says what the engine holds: block 1 on host only.
    index = BlockIndex()
    index.apply([BlockStored((1, 2), None, tuple(toks), 8, "GPU"), *events])
    keys = PromptTokens(toks).keys(8)
    assert index.prefix_blocks(keys) == 1 and 1 in cache.host and 2 not in cache.host
    cache.clear()
    assert cache.take_events() == [AllBlocksCleared()]


@pytest.fixture
async def sim_with_events(tmp_path):
    pub, replay = f"ipc://{tmp_path}/kv.pub", f"ipc://{tmp_path}/kv.replay"
    app = create_app(SimSettings(kv_events=pub, kv_events_replay=replay, kv_events_topic="kv"))
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        yield client, pub, replay


async def _recv(sub: zmq.asyncio.Socket, limit: float = 5.0):
    return decode_pub(await asyncio.wait_for(sub.recv_multipart(), limit))


async def test_sim_publishes_vllm_wire_format_with_replay_and_reset(sim_with_events) -> None:
    client, pub, replay = sim_with_events
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv")
    sub.connect(pub)
    await asyncio.sleep(0.2)  # ZMQ's slow joiner: the subscription must reach the publisher first
    try:
        prompt = "The quick brown fox jumps over the lazy dog. " * 10  # 100 word pieces: 6 blocks of 16
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2})
        assert r.status_code == 200
        msg = await _recv(sub)
        assert msg.topic == b"kv" and msg.seq == 0
        (stored,) = msg.batch.events
        assert isinstance(stored, BlockStored) and stored.block_size == 16 and stored.medium == "GPU"
        assert list(stored.token_ids) == word_ids(prompt)[:96]  # the ids the gateway matches them with
        index = BlockIndex()
        index.apply(msg.batch.events)
        assert index.prefix_blocks(PromptTokens(word_ids(prompt)).keys(16)) == 6
        # Replay: everything buffered from seq 0, then the end marker.
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(replay)
        await dealer.send_multipart(replay_request(0))
        got = decode_replay(await asyncio.wait_for(dealer.recv_multipart(), 5))
        assert got is not None and (got.seq, got.batch) == (0, msg.batch)
        assert decode_replay(await asyncio.wait_for(dealer.recv_multipart(), 5)) is None
        dealer.close(linger=0)
        # vLLM's dev route: the cache is dropped and AllBlocksCleared published.
        assert (await client.post("/reset_prefix_cache")).status_code == 200
        cleared = await _recv(sub)
        assert cleared.seq == 1 and cleared.batch.events == (AllBlocksCleared(),)
        metrics = (await client.get("/metrics")).text
        assert "process_start_time_seconds" in metrics
    finally:
        ctx.destroy(linger=0)


def test_kv_events_settings_name_the_bad_field() -> None:
    with pytest.raises(ValueError, match="kv_events: 'localhost:5' is not"):
        SimSettings(kv_events="localhost:5")
    with pytest.raises(ValueError, match="kv_events_replay: needs kv_events"):
        SimSettings(kv_events_replay="ipc:///tmp/x")
