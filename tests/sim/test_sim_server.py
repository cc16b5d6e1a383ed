"""The simulator process over real HTTP: OpenAI API, streaming, metrics, bad input, faults."""

import asyncio
import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tandem.bench.harness import Process, free_port, tandem_argv
from tandem.serve import serving
from tandem.sim.server import create_app
from tandem.sim.settings import SimSettings

MODEL = "Llama-3-8B"
PROMPT = "The quick brown fox jumps over the lazy dog. " * 40  # 400 tokens: 25 full 16-token blocks


async def post(client: httpx.AsyncClient, path: str, **body) -> httpx.Response:
    return await client.post(path, json={"model": MODEL, **body})


@pytest.fixture
async def sim():
    async with serving(create_app(SimSettings(metrics="vllm", enable_prompt_tokens_details=True))) as url, \
            httpx.AsyncClient(base_url=url, timeout=10) as client:
        yield client


def metric_samples(text: str) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


async def test_completion_and_stream_give_the_same_text(sim) -> None:
    plain = (await post(sim, "/v1/completions", prompt=PROMPT, max_tokens=8)).json()
    assert plain["usage"]["completion_tokens"] == 8 and plain["usage"]["prompt_tokens"] == 400
    streamed = []
    async with sim.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 8,
                                                            "stream": True}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                streamed.append(json.loads(line[6:])["choices"][0]["text"])
    assert len(streamed) == 8
    assert "".join(streamed) == plain["choices"][0]["text"]


async def test_chat_completion_with_usage(sim) -> None:
    body = (await post(sim, "/v1/chat/completions", messages=[{"role": "user", "content": "hi"}],
                       max_tokens=3)).json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    models = (await sim.get("/v1/models")).json()
    assert models["data"][0]["id"] == MODEL
    assert (await sim.get("/health")).status_code == 200


async def test_metrics_parse_and_show_prefix_hits_after_repeat(sim) -> None:
    first = (await post(sim, "/v1/completions", prompt=PROMPT, max_tokens=2)).json()
    second = (await post(sim, "/v1/completions", prompt=PROMPT, max_tokens=2)).json()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 399  # all but the last token
    samples = metric_samples((await sim.get("/metrics")).text)
    assert samples["vllm:prefix_cache_queries_total"] == 800
    assert samples["vllm:prefix_cache_hits_total"] == 399
    assert samples["vllm:time_to_first_token_seconds_count"] == 2
    assert samples["vllm:generation_tokens_total"] == 4
    assert "vllm:kv_cache_usage_perc" in samples and "vllm:cache_config_info" in samples


async def test_sglang_metric_names() -> None:
    app = create_app(SimSettings(metrics="sglang", role="prefill"))
    async with serving(app) as url, httpx.AsyncClient(base_url=url) as client:
        await post(client, "/v1/completions", prompt=PROMPT, max_tokens=2)
        text = (await client.get("/metrics")).text
    samples = metric_samples(text)
    for name in ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage",
                 "sglang:cache_hit_rate", "sglang:prompt_tokens_total", "sglang:time_to_first_token_seconds_count"):
        assert name in samples, name
    assert 'engine_type="prefill"' in text


async def test_trace_prompt_by_hash_ids(sim) -> None:
    ext = {"hash_ids": [0, 1, 2], "prompt_tokens": 1200, "block_size": 512}
    await post(sim, "/v1/completions", prompt="", x_tandem=ext, max_tokens=1)
    again = (await post(sim, "/v1/completions", x_tandem=ext, max_tokens=1)).json()
    assert again["usage"]["prompt_tokens"] == 1200
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 1199


@pytest.mark.parametrize(("path", "body", "needle"), [
    ("/v1/completions", {"max_tokens": 4}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -3}, "max_tokens"),
    ("/v1/completions", {"prompt": "word " * 140_000, "max_tokens": 4}, "maximum context length"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/completions", {"x_tandem": {"hash_ids": [1, 2, 3], "prompt_tokens": 10}}, "hash_ids"),
])
async def test_bad_input_is_a_400_naming_the_problem(sim, path, body, needle) -> None:
    resp = await post(sim, path, **body)
    assert resp.status_code == 400, resp.text
    assert needle in resp.json()["error"]["message"]


async def test_unknown_model_and_malformed_json(sim) -> None:
    resp = await sim.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"})
    assert resp.status_code == 404 and "gpt-9" in resp.json()["error"]["message"]
    resp = await sim.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert resp.status_code == 400


async def test_fault_error_and_slow_and_hang(sim) -> None:
    base = (await post(sim, "/v1/completions", prompt=PROMPT, max_tokens=1)).elapsed
    await sim.post("/admin/fault", json={"mode": "error", "error_rate": 1.0})
    assert (await post(sim, "/v1/completions", prompt="x", max_tokens=1)).status_code == 500
    await sim.post("/admin/fault", json={"mode": "slow", "slowdown": 20})
    assert (await sim.get("/admin/fault")).json()["slowdown"] == 20
    slow = (await post(sim, "/v1/completions", prompt=PROMPT + "!", max_tokens=1)).elapsed
    assert slow > base  # the 400-token prefill alone takes ~20x longer
    await sim.post("/admin/fault", json={"mode": "hang"})
    with pytest.raises(httpx.ReadTimeout):
        await sim.post("/v1/completions", json={"model": MODEL, "prompt": "x"}, timeout=0.5)
    await sim.post("/admin/fault", json={"mode": "none"})
    assert (await post(sim, "/v1/completions", prompt="x", max_tokens=1)).status_code == 200


async def test_client_disconnect_aborts_the_engine_request() -> None:
    app = create_app(SimSettings())
    async with serving(app) as url, httpx.AsyncClient(base_url=url) as client:
        async with client.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": PROMPT,
                                                                   "max_tokens": 100_000, "stream": True}) as resp:
            async for _ in resp.aiter_lines():
                break
        for _ in range(100):
            if not app.state.sim.engine.running:
                break
            await asyncio.sleep(0.02)
        assert not app.state.sim.engine.running
        assert app.state.sim.engine.counters.aborted_requests == 1


def test_crash_fault_kills_the_process() -> None:
    port = free_port()
    with Process("tandem sim", tandem_argv("sim", "--port", str(port))) as proc:
        proc.wait_http(f"http://127.0.0.1:{port}/health", limit_s=20)
        httpx.post(f"http://127.0.0.1:{port}/admin/fault", json={"mode": "crash"}, timeout=5)
        assert proc.popen.wait(timeout=10) == 1
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)


async def test_time_scale_runs_the_engine_model_faster_than_the_wall_clock() -> None:
    """``--time-scale N``: N engine seconds per wall second (benchmarks replay long traces faster)."""
    import asyncio

    from tandem.sim.wallclock import WallClockDriver

    fast, plain = WallClockDriver(time_scale=8.0), WallClockDriver()
    await asyncio.sleep(0.05)
    assert fast.now() >= 8.0 * 0.05 > plain.now() >= 0.05
    with pytest.raises(ValueError):
        WallClockDriver(time_scale=0)
