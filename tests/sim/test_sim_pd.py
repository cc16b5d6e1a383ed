"""The simulator's PD roles over real HTTP: vLLM and SGLang KV handshakes, checks, failures."""

import asyncio
import json
import random
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tandem.serve import serving
from tandem.sim.server import create_app
from tandem.sim.settings import SimSettings

MODEL = "Llama-3-8B"
KVB = 131072  # Llama-3-8B: 2 x 32 layers x 8 kv heads x 128 x 2 bytes
PROMPT = {"hash_ids": [1, 2], "prompt_tokens": 1000, "block_size": 512}
INITIAL = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
           "remote_block_ids": None, "remote_host": None, "remote_port": None}


async def stream_tokens(client: httpx.AsyncClient, url: str, body: dict) -> tuple[int, list[str]]:
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            await resp.aread()
            return resp.status_code, [resp.text]
        out = []
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[6:])["choices"][0]["text"])
        return 200, out


async def engine_load(client: httpx.AsyncClient, url: str) -> tuple[float, float]:
    """(running, waiting) from the engine's /metrics."""
    out = {}
    for family in text_string_to_metric_families((await client.get(f"{url}/metrics")).text):
        for sample in family.samples:
            out[sample.name] = sample.value
    return out["vllm:num_requests_running"], out["vllm:num_requests_waiting"]


@pytest.fixture
async def pd():
    prefill = create_app(SimSettings(role="prefill", engine_id="prefill-0"))
    decode = create_app(SimSettings(role="decode", kv_link_gbps=10.0, kv_rtt_ms=5.0,
                                    enable_prompt_tokens_details=True))
    async with serving(prefill) as p_url, serving(decode) as d_url, httpx.AsyncClient(timeout=10) as client:
        yield p_url, d_url, client


async def vllm_prefill(client: httpx.AsyncClient, p_url: str, x_tandem: dict = PROMPT) -> dict:
    resp = await client.post(f"{p_url}/v1/completions", json={
        "model": MODEL, "x_tandem": x_tandem, "max_tokens": 1, "stream": False, "kv_transfer_params": INITIAL})
    assert resp.status_code == 200, resp.text
    return resp.json()


async def test_vllm_handshake_end_to_end(pd) -> None:
    p_url, d_url, client = pd
    pre = await vllm_prefill(client, p_url)
    params = pre["kv_transfer_params"]
    port = int(p_url.rsplit(":", 1)[1])
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert params["remote_engine_id"] == "prefill-0" and params["remote_port"] == port
    assert params["remote_host"] == "127.0.0.1" and params["tp_size"] == 1
    assert len(params["remote_block_ids"]) == -(-1000 // 16)  # one id per 16-token KV block
    assert (await client.get(f"{p_url}/admin/kv")).json()["held"] == 1

    status, tokens = await stream_tokens(client, f"{d_url}/v1/completions", {
        "model": MODEL, "x_tandem": PROMPT, "max_tokens": 6, "stream": True, "kv_transfer_params": params})
    assert status == 200 and len(tokens) == 6

    got = (await client.get(f"{d_url}/admin/kv")).json()
    assert got["counts"]["ok"] == 1
    record = got["received"][-1]
    assert record["protocol"] == "vllm" and record["result"] == "ok"
    assert record["kv_transfer_params"] == {**params}
    assert record["transferred_tokens"] == 1000
    expected = 0.005 + 1000 * KVB * 8 / 10e9  # RTT + bytes over 10 Gbit/s
    assert record["transfer_s"] == pytest.approx(expected, rel=0.05)
    prefill_side = (await client.get(f"{p_url}/admin/kv")).json()
    assert prefill_side["held"] == 0 and prefill_side["counts"]["pulls_served"] == 1  # freed once read
    metrics = (await client.get(f"{d_url}/metrics")).text
    assert 'tandem_sim_kv_transfers_total{result="ok"} 1.0' in metrics
    # The decode engine only recomputed the last prompt token: its prefix cache now holds the prompt.
    usage = (await client.post(f"{d_url}/v1/completions", json={
        "model": MODEL, "x_tandem": PROMPT, "max_tokens": 1})).json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 999


async def test_the_same_kv_cannot_be_pulled_twice_or_by_another_prompt(pd) -> None:
    p_url, d_url, client = pd
    params = (await vllm_prefill(client, p_url))["kv_transfer_params"]
    other = {"hash_ids": [7], "prompt_tokens": 700, "block_size": 512}
    resp = await client.post(f"{d_url}/v1/completions", json={
        "model": MODEL, "x_tandem": other, "max_tokens": 2, "kv_transfer_params": params})
    assert resp.status_code == 400 and "1000 tokens but this prompt has 700" in resp.json()["error"]["message"]
    resp = await client.post(f"{d_url}/v1/completions", json={
        "model": MODEL, "x_tandem": PROMPT, "max_tokens": 2, "kv_transfer_params": params})
    assert resp.status_code == 400  # the first (wrong) pull consumed the blocks
    assert resp.json()["error"]["param"] == "kv_transfer_params.remote_block_ids"
    got = (await client.get(f"{d_url}/admin/kv")).json()
    assert got["counts"]["rejected"] == 2 and got["counts"]["ok"] == 0


@pytest.mark.parametrize(("change", "param"), [
    ({"remote_block_ids": None}, "kv_transfer_params.remote_block_ids"),
    ({"remote_port": 70000}, "kv_transfer_params.remote_port"),
    ({"remote_block_ids": []}, "kv_transfer_params.remote_block_ids"),
    ({"surprise": 1}, "kv_transfer_params.surprise"),
    ({"do_remote_decode": True}, "kv_transfer_params"),
    ({"remote_engine_id": "prefill-9"}, "kv_transfer_params.remote_block_ids"),  # prefill refuses the pull
])
async def test_malformed_or_unknown_params_are_a_400_naming_the_field(pd, change, param) -> None:
    p_url, d_url, client = pd
    params = (await vllm_prefill(client, p_url))["kv_transfer_params"]
    resp = await client.post(f"{d_url}/v1/completions", json={
        "model": MODEL, "x_tandem": PROMPT, "max_tokens": 2, "kv_transfer_params": {**params, **change}})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param
    assert await engine_load(client, d_url) == (0.0, 0.0)  # the refused request left nothing behind


async def test_role_mismatch_and_streamed_prefill_are_refused(pd) -> None:
    p_url, d_url, client = pd
    resp = await client.post(f"{d_url}/v1/completions", json={
        "model": MODEL, "x_tandem": PROMPT, "max_tokens": 1, "kv_transfer_params": INITIAL})
    assert resp.status_code == 400 and "decode engine" in resp.json()["error"]["message"]
    resp = await client.post(f"{p_url}/v1/completions", json={
        "model": MODEL, "x_tandem": PROMPT, "max_tokens": 1, "stream": True, "kv_transfer_params": INITIAL})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "stream"


async def test_prefill_dead_after_handshake_is_a_prompt_503_not_a_hang() -> None:
    decode = create_app(SimSettings(role="decode"))
    async with serving(decode) as d_url, httpx.AsyncClient(timeout=10) as client:
        async with serving(create_app(SimSettings(role="prefill"))) as p_url:
            params = (await vllm_prefill(client, p_url))["kv_transfer_params"]
        # the prefill engine is gone now; its KV with it
        t0 = time.monotonic()
        resp = await client.post(f"{d_url}/v1/completions", json={
            "model": MODEL, "x_tandem": PROMPT, "max_tokens": 2, "stream": True, "kv_transfer_params": params})
        assert time.monotonic() - t0 < 3
        assert resp.status_code == 503 and "unreachable" in resp.json()["error"]["message"]
        got = (await client.get(f"{d_url}/admin/kv")).json()
        assert got["counts"]["failed"] == 1
        assert await engine_load(client, d_url) == (0.0, 0.0)


async def test_sglang_bootstrap_decode_waits_for_the_prefill_of_its_room(pd) -> None:
    p_url, d_url, client = pd
    host, port = p_url.removeprefix("http://").split(":")
    room = random.getrandbits(63)
    boot = {"bootstrap_host": host, "bootstrap_port": int(port), "bootstrap_room": room}
    body = {"model": MODEL, "x_tandem": PROMPT, "max_tokens": 5, **boot}
    decode_task = asyncio.create_task(stream_tokens(client, f"{d_url}/v1/completions", {**body, "stream": True}))
    await asyncio.sleep(0.3)  # the decode side is waiting; its prefill has not even been sent
    assert not decode_task.done()
    t_prefill = time.monotonic()
    pre = await client.post(f"{p_url}/v1/completions", json=body)
    assert pre.status_code == 200 and pre.json()["usage"]["completion_tokens"] == 1
    status, tokens = await decode_task
    assert status == 200 and len(tokens) == 5
    assert time.monotonic() - t_prefill > 0.005  # at least the RTT after the prefill finished
    record = (await client.get(f"{d_url}/admin/kv")).json()["received"][-1]
    assert record["protocol"] == "sglang" and record["result"] == "ok"
    assert record["bootstrap"] == boot and record["transferred_tokens"] == 1000
    assert (await client.get(f"{p_url}/admin/kv")).json()["counts"]["rooms_served"] == 1


async def test_sglang_bad_bootstrap_fields(pd) -> None:
    _, d_url, client = pd
    resp = await client.post(f"{d_url}/v1/completions", json={
        "model": MODEL, "x_tandem": PROMPT, "bootstrap_host": "127.0.0.1", "bootstrap_port": 1,
        "bootstrap_room": -5})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "bootstrap_room"
    resp = await client.post(f"{d_url}/v1/completions", json={
        "model": MODEL, "x_tandem": PROMPT, "bootstrap_room": 5})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "bootstrap_host"


async def test_wire_transport_sends_the_kv_bytes_themselves() -> None:
    """--kv-transport wire: the decode engine reads prompt tokens x KV bytes per token from the
    prefill engine over HTTP (so a real network path carries them), for both handshakes."""
    small = {"hash_ids": [7], "prompt_tokens": 64, "block_size": 512}
    prefill = create_app(SimSettings(role="prefill", engine_id="prefill-w"))
    decode = create_app(SimSettings(role="decode", kv_transport="wire", kv_link_gbps=0.001))
    async with serving(prefill) as p_url, serving(decode) as d_url, httpx.AsyncClient(timeout=20) as client:
        pre = await vllm_prefill(client, p_url, small)
        t0 = time.monotonic()
        status, tokens = await stream_tokens(client, f"{d_url}/v1/completions", {
            "model": MODEL, "x_tandem": small, "max_tokens": 3, "stream": True,
            "kv_transfer_params": pre["kv_transfer_params"]})
        # The simulated 1 Mbit/s link would take 4 s for 8 MB: the bytes went over loopback instead.
        assert status == 200 and len(tokens) == 3 and time.monotonic() - t0 < 3.0
        host, port = p_url.removeprefix("http://").split(":")
        boot = {"bootstrap_host": host, "bootstrap_port": int(port), "bootstrap_room": 12345}
        body = {"model": MODEL, "x_tandem": small, "max_tokens": 2, **boot}
        decode_task = asyncio.create_task(stream_tokens(client, f"{d_url}/v1/completions", {**body, "stream": True}))
        await asyncio.sleep(0.1)
        assert (await client.post(f"{p_url}/v1/completions", json=body)).status_code == 200
        assert (await decode_task)[0] == 200
        got = (await client.get(f"{d_url}/admin/kv")).json()
        assert [(r["protocol"], r["transport"], r["transferred_bytes"]) for r in got["received"]] == [
            ("vllm", "wire", 64 * KVB), ("sglang", "wire", 64 * KVB)]
        metrics = {s.name: s.value for f in text_string_to_metric_families((await client.get(f"{d_url}/metrics")).text)
                   for s in f.samples}
        assert metrics["tandem_sim_kv_transfer_bytes_total"] == 2 * 64 * KVB
        # A pull asks for the bytes only once: the KV is gone after it.
        again = await client.post(f"{p_url}/kv/pull", json={
            "engine_id": "prefill-w", "block_ids": pre["kv_transfer_params"]["remote_block_ids"], "payload": True})
        assert again.status_code == 404
