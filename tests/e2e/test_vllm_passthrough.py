"""What real vLLM accepts or refuses, the gateway must pass through unchanged (issue 21's defect list).

Each case sends one request to an engine directly and the same request through the gateway, and
requires the same status and, for errors, the engine's body byte for byte. The cases the gateway
still gets wrong are strict xfails naming the defect: fixing one turns its xfail into a failure
that asks for the marker to go.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from gatewayutil import gateway_app
from vllm_fixtures import MODEL, VllmFleet

from tandem.serve import serving

pytestmark = pytest.mark.vllm


def defect(number: int, what: str) -> Any:
    return pytest.mark.xfail(strict=True, reason=f"issue 21 defect {number}: {what}")


CHAT = [{"role": "user", "content": "hello world"}]
CASES = [
    pytest.param("POST", "/v1/completions", {"model": MODEL, "prompt": "hello world", "max_tokens": 2}, id="text"),
    pytest.param("POST", "/v1/completions", {"model": MODEL, "prompt": [11, 12, 13], "max_tokens": 2},
                 id="token-prompt", marks=defect(1, "token-id prompts refused")),
    pytest.param("POST", "/v1/completions", {"model": MODEL, "prompt": ["a b", "c d"], "max_tokens": 2},
                 id="prompt-batch", marks=defect(1, "batches of prompts refused")),
    pytest.param("POST", "/v1/chat/completions", {"model": MODEL, "max_tokens": 2, "messages": [
        {"role": "developer", "content": "be brief"}, *CHAT]}, id="developer-role"),
    pytest.param("POST", "/v1/chat/completions", {"model": MODEL, "max_tokens": 2, "messages": [
        {"role": "function", "name": "f", "content": "42"}, *CHAT]}, id="function-role",
                 marks=defect(2, "roles outside the gateway's five refused")),
    pytest.param("POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2, "temperature": -1},
                 id="bad-temperature", marks=defect(3, "the gateway rewrites vLLM's error")),
    pytest.param("POST", "/v1/chat/completions", {"model": MODEL, "max_tokens": 2}, id="missing-messages",
                 marks=defect(3, "the gateway rewrites vLLM's error")),
    pytest.param("POST", "/v1/completions", b'{"model": "tiny-llama", "prompt": ', id="bad-json",
                 marks=defect(3, "the gateway rewrites vLLM's error")),
    pytest.param("GET", "/version", None, id="version", marks=defect(9, "/version not proxied")),
    pytest.param("POST", "/tokenize", {"model": MODEL, "prompt": "hello world"}, id="tokenize",
                 marks=defect(9, "/tokenize not proxied")),
]


@pytest.fixture
async def gateway(vllm_fleet: VllmFleet) -> AsyncIterator[str]:
    # One engine behind it: the direct answer and the routed one come from the same process.
    async with serving(gateway_app(vllm_fleet.unified_urls[:1], tokenizer=vllm_fleet.tokenizer)) as gw:
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
    if direct.status_code >= 400:
        assert routed.content == direct.content


@pytest.fixture
async def pd_gateway(vllm_fleet: VllmFleet) -> AsyncIterator[str]:
    app = gateway_app([], prefill_instances=[vllm_fleet.prefill.url], decode_instances=[vllm_fleet.decode.url],
                      pd_engine="vllm", tokenizer=vllm_fleet.tokenizer)
    async with serving(app) as gw:
        yield gw


@defect(4, "the prefill leg keeps min_tokens with max_tokens=1")
async def test_pd_serves_what_a_unified_engine_serves(vllm_fleet: VllmFleet, pd_gateway: str) -> None:
    body = {"model": MODEL, "prompt": "hello world " * 40, "max_tokens": 16, "min_tokens": 12}
    async with httpx.AsyncClient(timeout=60) as c:
        assert (await c.post(vllm_fleet.unified_urls[0] + "/v1/completions", json=body)).status_code == 200
        routed = await c.post(pd_gateway + "/v1/completions", json=body)
    assert routed.status_code == 200, routed.text


@defect(6, "with PD-only pools the 404 lists '<none yet>'")
async def test_pd_unknown_model_names_the_served_one(pd_gateway: str) -> None:
    async with httpx.AsyncClient(timeout=60) as c:
        resp = await c.post(pd_gateway + "/v1/completions", json={"model": "nope", "prompt": "hi"})
    assert resp.status_code == 404 and MODEL in resp.text
