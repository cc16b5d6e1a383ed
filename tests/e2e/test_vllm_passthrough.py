"""What real vLLM accepts or refuses, the gateway passes through unchanged (issue 21's defect list).

Each case sends one request to an engine directly and the same request through the gateway, and
requires the same status and, for errors and for the engine's own routes, the engine's body byte for
byte. The gateway refuses only what it cannot route (a body that is not JSON, no model); the engine
judges everything else. Then the disaggregated path (the prefill leg must not refuse what the decode
engine takes, the decode engine's refusals reach the client, the unknown-model 404 names PD models),
the observations (the prefix hit ratio as vLLM counts it, output tokens without the role-only
chunk, chat prompt lengths through the chat template) and SSE keep-alive comments, which are no
first token. All on the session's shared engines (``vllm_fixtures``).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from gatewayutil import until
from test_vllm_smoke import counter, metrics
from vllm_fixtures import MODEL, VllmFleet, vllm_gateway_app

from tandem.serve import serving

pytestmark = pytest.mark.vllm

CHAT = [{"role": "user", "content": "hello world"}]
CASES = [
    pytest.param("POST", "/v1/completions", {"model": MODEL, "prompt": "hello world", "max_tokens": 2}, id="text"),
    pytest.param("POST", "/v1/completions", {"model": MODEL, "prompt": [11, 12, 13], "max_tokens": 2},
                 id="token-prompt"),
    pytest.param("POST", "/v1/completions", {"model": MODEL, "prompt": ["a b", "c d"], "max_tokens": 2},
                 id="prompt-batch"),
    pytest.param("POST", "/v1/completions", {"model": MODEL, "prompt": [[11, 12], [13, 14, 15]], "max_tokens": 2},
                 id="token-prompt-batch"),
    pytest.param("POST", "/v1/chat/completions", {"model": MODEL, "max_tokens": 2, "messages": [
        {"role": "developer", "content": "be brief"}, *CHAT]}, id="developer-role"),
    pytest.param("POST", "/v1/chat/completions", {"model": MODEL, "max_tokens": 2, "messages": [
        {"role": "function", "name": "f", "content": "42"}, *CHAT]}, id="function-role"),
    pytest.param("POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2, "temperature": -1},
                 id="bad-temperature"),
    pytest.param("POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 100_000},
                 id="max-tokens-past-the-context"),
    pytest.param("POST", "/v1/chat/completions", {"model": MODEL, "max_tokens": 2}, id="missing-messages"),
    pytest.param("POST", "/v1/completions", {"model": MODEL, "prompt": {"not": "a prompt"}}, id="bad-prompt-shape"),
    pytest.param("POST", "/v1/responses", {"model": MODEL, "input": "hello world", "max_output_tokens": 16},
                 id="responses"),
    pytest.param("GET", "/version", None, id="version"),
    pytest.param("GET", "/health", None, id="health"),
    pytest.param("GET", "/ping", None, id="ping"),
    pytest.param("POST", "/ping", None, id="ping-post"),
    pytest.param("GET", "/load", None, id="load"),
    pytest.param("POST", "/tokenize", {"model": MODEL, "prompt": "hello world"}, id="tokenize"),
    pytest.param("POST", "/tokenize", {"model": MODEL, "messages": CHAT}, id="tokenize-chat"),
    pytest.param("POST", "/tokenize", {"prompt": "no model named"}, id="tokenize-any-engine"),
    pytest.param("POST", "/detokenize", {"model": MODEL, "tokens": [1165, 934, 13]}, id="detokenize"),
]
DETERMINISTIC = {"/version", "/health", "/ping", "/tokenize", "/detokenize"}  # equal bodies, not only status


@pytest.fixture
async def gateway(vllm_fleet: VllmFleet) -> AsyncIterator[str]:
    # One engine behind it: the direct answer and the routed one come from the same process.
    async with serving(vllm_gateway_app(vllm_fleet.unified_urls[:1], tokenizer=vllm_fleet.tokenizer)) as gw:
        yield gw


async def _send(client: httpx.AsyncClient, method: str, url: str, body: dict | bytes | None) -> httpx.Response:
    if isinstance(body, bytes):
        return await client.request(method, url, content=body, headers={"content-type": "application/json"})
    return await client.request(method, url, json=body)


@pytest.mark.parametrize(("method", "path", "body"), CASES)
async def test_the_engine_decides(vllm_fleet: VllmFleet, gateway: str, method: str, path: str,
                                  body: dict | bytes | None) -> None:
    async with httpx.AsyncClient(timeout=60) as c:
        direct = await _send(c, method, vllm_fleet.unified_urls[0] + path, body)
        routed = await _send(c, method, gateway + path, body)
    assert routed.status_code == direct.status_code, routed.text
    if direct.status_code >= 400 or path in DETERMINISTIC:
        assert routed.content == direct.content
        assert routed.headers.get("content-type") == direct.headers.get("content-type")


async def test_what_the_gateway_cannot_route_it_refuses_in_the_openai_shape(vllm_fleet: VllmFleet,
                                                                          gateway: str) -> None:
    """Not JSON, or no model: the gateway cannot pick an engine, so it answers itself, with vLLM's status."""
    async with httpx.AsyncClient(timeout=60) as c:
        for body in (b'{"model": "tiny-llama", "prompt": ', b'{"prompt": "no model"}'):
            direct = await _send(c, "POST", vllm_fleet.unified_urls[0] + "/v1/completions", body)
            routed = await _send(c, "POST", gateway + "/v1/completions", body)
            assert routed.status_code == 400 and set(routed.json()["error"]) == {"message", "type", "param", "code"}
            if body.startswith(b'{"model"'):
                assert direct.status_code == 400  # (vLLM serves a request without a model on its one model)


@pytest.fixture
async def pd_gateway(vllm_fleet: VllmFleet) -> AsyncIterator[str]:
    app = vllm_gateway_app([], prefill_instances=[vllm_fleet.prefill.url], decode_instances=[vllm_fleet.decode.url],
                      pd_engine="vllm", tokenizer=vllm_fleet.tokenizer)
    async with serving(app) as gw:
        await until(lambda: _context_known(gw), limit=30)
        yield gw


async def _context_known(gw: str) -> bool:
    async with httpx.AsyncClient(timeout=5) as c:
        return (await c.get(gw + "/readyz")).status_code == 200


async def test_pd_serves_what_a_unified_engine_serves(vllm_fleet: VllmFleet, pd_gateway: str) -> None:
    """min_tokens (defect 4): the one-token prefill leg drops it; the decode leg honours it."""
    body = {"model": MODEL, "prompt": "hello world " * 40, "max_tokens": 16, "min_tokens": 12}
    async with httpx.AsyncClient(timeout=60) as c:
        assert (await c.post(vllm_fleet.unified_urls[0] + "/v1/completions", json=body)).status_code == 200
        routed = await c.post(pd_gateway + "/v1/completions", json=body)
    assert routed.status_code == 200, routed.text
    assert routed.json()["usage"]["completion_tokens"] >= 12


async def test_pd_decode_refusal_reaches_the_client_as_in_unified_mode(vllm_fleet: VllmFleet,
                                                                       pd_gateway: str) -> None:
    """Defect 5: what only the decode engine sees (stream_options without stream: the prefill leg drops
    both) comes back as vLLM words it, not as a 502; what the gateway can tell cheaply (an output limit
    past the context) is refused before any prefill is computed."""
    prompt = f"decode refusal {uuid.uuid4().hex} " + "hello world " * 30
    async with httpx.AsyncClient(timeout=60) as c:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "stream_options": {"include_usage": True}}
        direct = await c.post(vllm_fleet.unified_urls[0] + "/v1/completions", json=body)
        routed = await c.post(pd_gateway + "/v1/completions", json=body)
        assert direct.status_code == 400 and (routed.status_code, routed.content) == (400, direct.content)

        before = counter(await metrics(c, vllm_fleet.prefill.url), "vllm:prompt_tokens_total")
        too_long = {"model": MODEL, "prompt": prompt, "max_tokens": 100_000}
        assert (await c.post(vllm_fleet.unified_urls[0] + "/v1/completions", json=too_long)).status_code == 400
        routed = await c.post(pd_gateway + "/v1/completions", json=too_long)
        assert routed.status_code == 400 and routed.json()["error"]["param"] == "max_tokens", routed.text
        assert counter(await metrics(c, vllm_fleet.prefill.url), "vllm:prompt_tokens_total") == before


async def test_pd_unknown_model_names_the_served_one(pd_gateway: str) -> None:
    async with httpx.AsyncClient(timeout=60) as c:
        resp = await c.post(pd_gateway + "/v1/completions", json={"model": "nope", "prompt": "hi"})
    assert resp.status_code == 404 and MODEL in resp.json()["error"]["message"]


# --- observations against the engine's own counters ------------------------------------------------------


async def _counts(c: httpx.AsyncClient, gw: str) -> dict:
    resp = await c.get(gw + "/admin/observation-counts", params={"service": MODEL, "window": 300,
                                                                 "now": time.time()})
    assert resp.status_code == 200, resp.text
    return resp.json()


async def test_observed_prefix_hits_agree_with_vllm_counters(vllm_fleet: VllmFleet) -> None:
    """Defect 7: routing keys 512-token blocks, vLLM caches 128-token ones (scraped from cache_config_info);
    the observations count hits in the engine's blocks, as vLLM does, so their ratio is the engines'."""
    urls = vllm_fleet.unified_urls
    run = uuid.uuid4().hex[:8]
    # 3 shared prefixes of ~700 tokens (5 engine blocks and a part, 1 routing block and a part), 4 requests each.
    prefixes = [f"run {run} prefix {p}: " + " ".join(f"w{p}x{i}" for i in range(230)) for p in range(3)]
    async with serving(vllm_gateway_app(urls, tokenizer=vllm_fleet.tokenizer)) as gw, \
            httpx.AsyncClient(timeout=120) as c:
        async def block_sizes_known() -> bool:
            insts = (await c.get(gw + "/admin/instances")).json()["instances"]
            return all((i["engine"] or {}).get("block_size") == 128 for i in insts)
        await until(block_sizes_known, limit=30)
        await asyncio.sleep(0.2)  # a routing tick: the model's engine block size is known to admission
        before = {u: await metrics(c, u) for u in urls}
        for k in range(4):
            for p, prefix in enumerate(prefixes):
                body = {"model": MODEL, "prompt": f"{prefix} question {k} of {p}", "max_tokens": 1}
                assert (await c.post(gw + "/v1/completions", json=body)).status_code == 200
        after = {u: await metrics(c, u) for u in urls}
        counts = await _counts(c, gw)
    hits = sum(counter(after[u], "vllm:prefix_cache_hits_total") - counter(before[u], "vllm:prefix_cache_hits_total")
               for u in urls)
    queries = sum(counter(after[u], "vllm:prefix_cache_queries_total")
                  - counter(before[u], "vllm:prefix_cache_queries_total") for u in urls)
    engine_ratio, observed = hits / queries, counts["hit_tokens"] / counts["prompt_tokens"]
    print(f"vLLM's own hit ratio {engine_ratio:.3f}, observations' {observed:.3f}")
    assert counts["prompt_tokens"] == queries  # the chat-free prompts tokenized exactly as vLLM does
    assert engine_ratio > 0.5 and observed == pytest.approx(engine_ratio, abs=0.02)


async def test_observed_output_and_chat_prompt_tokens_are_the_engines(vllm_fleet: VllmFleet) -> None:
    """Defect 8: a chat stream's role-only first chunk is no token, and with the model's tokenizer and
    chat template the gateway's prompt length is the engine's usage.prompt_tokens."""
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": f"count {uuid.uuid4().hex} " + "hello world " * 20}]
    body = {"model": MODEL, "messages": messages, "max_tokens": 8, "ignore_eos": True}
    async with serving(vllm_gateway_app(vllm_fleet.unified_urls[:1], tokenizer=vllm_fleet.tokenizer)) as gw, \
            httpx.AsyncClient(timeout=60) as c:
        answer = (await c.post(gw + "/v1/chat/completions", json=body)).json()
        async with c.stream("POST", gw + "/v1/chat/completions", json={**body, "stream": True}) as resp:
            raw = b"".join([chunk async for chunk in resp.aiter_raw()])
        assert b'"role":"assistant","content":""' in raw  # vLLM's role-only chunk was relayed
        counts = await _counts(c, gw)
    assert counts["prompt_tokens"] == 2 * answer["usage"]["prompt_tokens"]
    # 8 (the whole answer's usage) + the stream's events: 8, not 9 (the role-only chunk is no token).
    # A loaded vLLM may coalesce tokens into one event (its output processor falls behind the engine),
    # so the stream can count fewer, never more.
    assert 9 <= sum(m["output_tokens"] for m in counts["mix"]) <= 16, counts["mix"]


# --- SSE keep-alive comments ----------------------------------------------------------------------------


async def test_keep_alive_comments_are_not_the_first_token(vllm_fleet: VllmFleet) -> None:
    """Defect 10: engine 1 runs with --sse-keep-alive-interval 1. A stream queued behind long prompts gets
    ': keep-alive' comments before its first token; the gateway's TTFT is the first token's, not theirs."""
    url = vllm_fleet.unified_urls[1]
    async with serving(vllm_gateway_app([url], tokenizer=vllm_fleet.tokenizer, policy="round_robin")) as gw, \
            httpx.AsyncClient(timeout=300) as c:
        # Queued prefill, doubled until the stream waits past a keep-alive comment; kept short, since the
        # engine shares its core with the PD pair's decode engine (a long starvation breaks their NIXL link).
        for load in (2, 4, 8, 16):
            run = uuid.uuid4().hex
            long_prompt = [prompt_of(vllm_fleet, 2000, f"load {run} {i}") for i in range(load)]
            ttft_before = _ttft_sum(await metrics(c, gw))
            background = [asyncio.create_task(c.post(url + "/v1/completions", json={
                "model": MODEL, "prompt": p, "max_tokens": 1})) for p in long_prompt]
            await asyncio.sleep(0.3)  # queued at the engine first
            t0 = time.monotonic()
            first_data = None
            raw = b""
            async with c.stream("POST", gw + "/v1/completions", json={
                    "model": MODEL, "prompt": f"stream {run}", "max_tokens": 2, "stream": True}) as resp:
                assert resp.status_code == 200
                async for chunk in resp.aiter_raw():
                    raw += chunk
                    if first_data is None and b"data:" in raw:
                        first_data = time.monotonic() - t0
            await asyncio.gather(*background)
            ttft = _ttft_sum(await metrics(c, gw)) - ttft_before
            if raw.startswith(b": keep-alive") and first_data is not None and first_data > 1.6:
                break
        else:
            pytest.fail("the engine never sent a keep-alive comment before the first token")
    # Counted at the comment (~1 s), the TTFT would be at least ~0.6 s short of the first token's time.
    assert first_data - 0.3 <= ttft <= first_data + 0.3, (ttft, first_data)


def prompt_of(fleet: VllmFleet, tokens: int, tag: str) -> str:
    """A prompt of about ``tokens`` tokens of the fleet's model (under its 4096-token context)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(fleet.tokenizer))
    words = [tag]
    while len(tok.encode(" ".join(words)).ids) < tokens:
        words += [f"v{len(words) + j}" for j in range(50)]
    return " ".join(words)


def _ttft_sum(text: str) -> float:
    for line in text.splitlines():
        if line.startswith("tandem_time_to_first_token_seconds_sum"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
