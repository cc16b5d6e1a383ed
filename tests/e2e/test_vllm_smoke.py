"""The gateway in front of real vLLM-CPU engines (the session's shared fleet, ``vllm_fixtures``).

Smoke tests of the real-engine tier: the ``openai`` client through ``tandem gateway`` to two unified
engines (chat and text completions, streamed and not) and through the two-phase PD path to a
prefill + decode pair that moves the KV cache over NIXL. With temperature 0 the engines' random
(dummy) weights are the same on every engine, so the gateway's answer can be compared token for
token with the engine's own.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections.abc import AsyncIterator

import httpx
import pytest
import zmq
from gatewayutil import ROOT, free_port, sse_text
from openai import AsyncOpenAI
from tokenizers import Tokenizer
from vllm_fixtures import MODEL, VllmFleet, vllm_gateway_app

from tandem.serve import serving

pytestmark = pytest.mark.vllm

PROMPT = "Tell me a story about the world and the kalomi of sarute, please. " * 20


def counter(metrics: str, name: str, **labels: str) -> float:
    """Sum of a vLLM counter's samples whose labels include ``labels``."""
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}\{{([^}}]*)\}} ([0-9.e+-]+)$", metrics, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


async def metrics(client: httpx.AsyncClient, url: str) -> str:
    return (await client.get(url + "/metrics")).text


@pytest.fixture
async def unified_gateway(vllm_fleet: VllmFleet) -> AsyncIterator[str]:
    async with serving(vllm_gateway_app(vllm_fleet.unified_urls, tokenizer=vllm_fleet.tokenizer,
                                   expose_topology=True)) as gw:  # instances named by URL in the headers
        yield gw


async def test_chat_completion_plain_and_streamed(vllm_fleet: VllmFleet, unified_gateway: str) -> None:
    client = AsyncOpenAI(base_url=unified_gateway + "/v1", api_key="unused", timeout=60, max_retries=0)
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": PROMPT}]
    raw = await client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=8,
                                                                 temperature=0, extra_body={"ignore_eos": True})
    answer = raw.parse()
    assert raw.headers["x-tandem-instance"] in vllm_fleet.unified_urls
    assert answer.model == MODEL and answer.choices[0].message.role == "assistant"
    assert answer.usage.completion_tokens == 8 and answer.choices[0].finish_reason == "length"
    # The engine's count includes the chat template; the prompt alone is shorter.
    bare = len(Tokenizer.from_file(str(vllm_fleet.tokenizer)).encode(PROMPT).ids)
    assert answer.usage.prompt_tokens > bare
    # Started with --enable-prompt-tokens-details: the engine reports cached tokens, the gateway relays them.
    assert answer.usage.prompt_tokens_details is not None

    stream = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                  stream=True, stream_options={"include_usage": True},
                                                  extra_body={"ignore_eos": True})
    chunks = [chunk async for chunk in stream]
    # vLLM's first chat chunk carries only the role; the last one only the usage.
    assert chunks[0].choices[0].delta.role == "assistant" and not chunks[0].choices[0].delta.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer.choices[0].message.content  # same greedy tokens, streamed or not
    assert chunks[-1].usage.prompt_tokens == answer.usage.prompt_tokens


async def test_text_completion_through_the_gateway_command_equals_the_engine(vllm_fleet: VllmFleet) -> None:
    """``tandem gateway --instances ...`` as a user starts it; its answers equal the engine's own."""
    port = free_port()
    gw = f"http://127.0.0.1:{port}"
    proc = await _start_gateway(port, "--instances", ",".join(vllm_fleet.unified_urls),
                                "--tokenizer", str(vllm_fleet.tokenizer))
    try:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
        async with httpx.AsyncClient(timeout=60) as c:
            await _until_ready(c, gw, proc)
            direct = (await c.post(vllm_fleet.unified_urls[0] + "/v1/completions", json=body)).json()
            routed = await c.post(gw + "/v1/completions", json=body)
            assert routed.status_code == 200, routed.text
            got = routed.json()
            assert got["choices"][0]["text"] == direct["choices"][0]["text"]
            # The same counts (prompt_tokens_details.cached_tokens differs: the direct call warmed the cache).
            assert (got["usage"]["prompt_tokens"], got["usage"]["completion_tokens"]) == (
                direct["usage"]["prompt_tokens"], 6)
            async with c.stream("POST", gw + "/v1/completions",
                                json={**body, "stream": True, "stream_options": {"include_usage": True}}) as resp:
                assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
                raw = "".join([t async for t in resp.aiter_text()])
        assert sse_text(raw) == direct["choices"][0]["text"]
        assert raw.rstrip().endswith("data: [DONE]") and '"completion_tokens":6' in raw.replace(" ", "")
    finally:
        proc.terminate()
        await proc.wait()


async def _start_gateway(port: int, *args: str) -> asyncio.subprocess.Process:
    # The timeouts of vllm_gateway_app, for the same niced engines on two busy cores.
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tandem.cli", "gateway", "--port", str(port), "--scrape-interval", "0.2",
        "--shutdown-grace", "0", "--first-byte-timeout", "120", "--stream-idle-timeout", "120",
        "--scrape-timeout", "5", "--stale-after", "60", *args,
        cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)


async def _until_ready(client: httpx.AsyncClient, url: str, proc: asyncio.subprocess.Process,
                       limit: float = 30.0) -> None:
    """The gateway is ready once it found a routable engine (``/readyz`` 200)."""
    end = time.monotonic() + limit
    while True:
        try:
            if (await client.get(url + "/readyz")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.returncode is None, "tandem gateway exited"
        assert time.monotonic() < end, "tandem gateway not ready"
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_pd_two_phase_moves_the_kv_over_nixl(vllm_fleet: VllmFleet, stream: bool) -> None:
    """``--pd-engine vllm``: the prefill engine computes the prompt and one token, the decode engine
    gets every prompt token by KV transfer (vLLM's own counter says so) and generates the rest."""
    prefill, decode = vllm_fleet.prefill.url, vllm_fleet.decode.url
    # Distinct from the first token on: neither engine has any of this prompt cached yet.
    body = {"model": MODEL, "prompt": ("Streamed. " if stream else "Plain. ") + PROMPT, "max_tokens": 6,
            "temperature": 0, "ignore_eos": True}
    app = vllm_gateway_app([], prefill_instances=[prefill], decode_instances=[decode], pd_engine="vllm",
                      tokenizer=vllm_fleet.tokenizer, expose_topology=True)
    async with serving(app) as gw, httpx.AsyncClient(timeout=60) as c:
        before_p, before_d = await metrics(c, prefill), await metrics(c, decode)
        if stream:
            async with c.stream("POST", gw + "/v1/completions", json={
                    **body, "stream": True, "stream_options": {"include_usage": True}}) as resp:
                assert resp.status_code == 200, await resp.aread()
                headers = resp.headers
                raw = "".join([t async for t in resp.aiter_text()])
            assert raw.rstrip().endswith("data: [DONE]") and sse_text(raw)
        else:
            resp = await c.post(gw + "/v1/completions", json=body)
            assert resp.status_code == 200, resp.text
            headers = resp.headers
            assert resp.json()["usage"]["completion_tokens"] == 6
        assert headers["x-tandem-decision"] == "pd"
        assert (headers["x-tandem-prefill-instance"], headers["x-tandem-decode-instance"]) == (prefill, decode)
        after_p, after_d = await metrics(c, prefill), await metrics(c, decode)
    prompt_tokens = counter(after_p, "vllm:prompt_tokens_total") - counter(before_p, "vllm:prompt_tokens_total")
    assert prompt_tokens > 100
    assert counter(after_p, "vllm:generation_tokens_total") - counter(before_p, "vllm:generation_tokens_total") == 1
    transferred = (counter(after_d, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer")
                   - counter(before_d, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer"))
    computed = (counter(after_d, "vllm:prompt_tokens_by_source_total", source="local_compute")
                - counter(before_d, "vllm:prompt_tokens_by_source_total", source="local_compute"))
    # Every full KV block (128 tokens on CPU) came over NIXL; the decode computed at most the partial tail.
    assert transferred >= prompt_tokens - 128 and transferred > 0 and computed < 128
    assert counter(after_d, "vllm:generation_tokens_total") - counter(before_d, "vllm:generation_tokens_total") >= 5


def test_unified_engines_publish_kv_cache_events(vllm_fleet: VllmFleet) -> None:
    """The fleet's engines publish on their ``--kv-events-config`` socket: ``[topic, seq, msgpack batch]``
    (tests/fixtures/vllm-0.32/README.md), one batch with a BlockStored when a prompt fills a block."""
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    try:
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(vllm_fleet.kv_events[1].endpoint)
        # A prompt no other test sent (a cached one stores no block), again with a new opening until a
        # batch comes: the subscription reaches the publisher in its own time, and what is published
        # before that is not delivered.
        for attempt in range(6):
            body = {"model": MODEL, "prompt": f"Events {attempt} {time.time_ns()}. " + PROMPT, "max_tokens": 1}
            assert httpx.post(vllm_fleet.unified_urls[1] + "/v1/completions", json=body, timeout=60).status_code == 200
            if sub.poll(5_000):
                break
        else:
            pytest.fail("no KV-event message after 6 new prompts")
        topic, seq, payload = sub.recv_multipart()
    finally:
        sub.close(linger=0)
        ctx.term()
    assert topic == b"" and len(seq) == 8 and b"BlockStored" in payload
