"""The exact cache view end to end: simulated engines publishing KV-cache events, real gateways.

* one gateway, a mixed fleet (two engines publishing events, one not): hits estimated from the
  engines' events equal what the engines then serve from cache; a cache reset is a miss at once;
  the engine without events is routed on the shadow view;
* two gateway processes sharing a real redis-server: a reset only one of them can see (it alone
  follows the engine's events) clears the other's shadow view too;
* restarts of each engine kind, seen in /metrics: vLLM's process start time, SGLang's counters.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from gatewayutil import ROOT, RedisServer, gateway_app, until

from tandem.bench.harness import Process, free_port, restartable_port, tandem_argv
from tandem.serve import serving
from tandem.sim.server import create_app
from tandem.sim.settings import SimSettings

MODEL = "Llama-3-8B"
# 401 word pieces: 25 full 16-token blocks and one token (what the engine recomputes).
PROMPT = "The quick brown fox jumps over the lazy dog . " * 40 + "end"


def sim_settings(tmp: Path, name: str, **kw: object) -> SimSettings:
    return SimSettings(kv_events=f"ipc://{tmp}/{name}.pub", kv_events_replay=f"ipc://{tmp}/{name}.replay",
                       enable_prompt_tokens_details=True, **kw)


async def complete(client: httpx.AsyncClient, prompt: str) -> tuple[str, int]:
    """(the instance that served it, the prompt tokens the engine served from its cache)."""
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2})
    assert r.status_code == 200, r.text
    return r.headers["x-tandem-instance"], r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


async def last_decision(client: httpx.AsyncClient) -> dict:
    return (await client.get("/admin/decisions", params={"limit": 1})).json()["decisions"][-1]


async def exact_state(client: httpx.AsyncClient, url: str) -> dict | None:
    for inst in (await client.get("/admin/instances")).json()["instances"]:
        if inst["id"] == url:
            return inst["exact_cache_view"]
    return None


async def test_exact_view_estimates_what_the_engine_serves_and_resets_at_once(tmp_path: Path) -> None:
    async with serving(create_app(sim_settings(tmp_path, "a"))) as a, \
            serving(create_app(sim_settings(tmp_path, "b"))) as b, \
            serving(create_app(SimSettings(enable_prompt_tokens_details=True))) as c:
        events = {a: f"ipc://{tmp_path}/a.pub,replay=ipc://{tmp_path}/a.replay",
                  b: f"ipc://{tmp_path}/b.pub,replay=ipc://{tmp_path}/b.replay"}
        app = gateway_app([a, b, c], kv_events=events, expose_topology=True)  # engine URLs in headers, metrics
        async with serving(app) as gw, httpx.AsyncClient(base_url=gw, timeout=10) as client:
            async def live() -> bool:
                return all([(await exact_state(client, u) or {}).get("live") for u in (a, b)])

            await until(live)
            assert await exact_state(client, c) is None  # no events from that one: shadow view
            # Find a prompt whose candidates are the two engines with events.
            prompt = next(p for k in range(50) if set(ring_candidates(app, p := f"{k} {PROMPT}")) == {a, b})
            first, cached = await complete(client, prompt)
            assert cached == 0 and (await last_decision(client))["hit_tokens"] == 0

            async def stored() -> bool:
                return ((await exact_state(client, first)) or {}).get("blocks", 0) >= 25

            await until(stored)  # the engine's BlockStored reached the gateway
            again, cached = await complete(client, prompt)
            d = await last_decision(client)
            assert again == first and d["cache_views"] == {a: "exact", b: "exact"}
            assert d["hit_tokens"] == cached == 400  # the estimate is what the engine then served
            # The engine drops its cache: the next request is estimated as the miss it is.
            async with httpx.AsyncClient(base_url=first) as engine:
                assert (await engine.post("/reset_prefix_cache")).status_code == 200

            async def cleared() -> bool:
                return ((await exact_state(client, first)) or {}).get("blocks", -1) == 0

            await until(cleared)
            again, cached = await complete(client, prompt)
            assert (await last_decision(client))["hit_tokens"] == 0 == cached
            # The engine without events: its candidate's hit comes from the shadow view.
            other = next(p for k in range(50) if c in ring_candidates(app, p := f"x{k} {PROMPT}"))
            await complete(client, other)
            assert (await last_decision(client))["cache_views"][c] == "shadow"
            metrics = (await client.get("/metrics")).text
            assert f'tandem_engine_cache_resets_total{{instance="{first}",reason="cleared"}} 1.0' in metrics


def ring_candidates(app, prompt: str) -> tuple[str, ...]:
    """The two instances DualMap's rings give a prompt (routing's own functions, no request sent)."""
    from tandem.router.admission import route_request
    from tandem.router.requestview import read_view

    gw = app.state.gateway
    pool = gw.pools[MODEL]
    policy = pool.scheduler(gw.settings.policy).policy
    rreq, _ = route_request(read_view({"model": MODEL, "prompt": prompt}, "completion"), gw.settings.block_size,
                            gw.tokenizer)
    pair = policy.rings.candidates(policy.keyer.key(rreq)[0], lambda iid: True)
    return tuple(pair) if pair else ()


def gateway_process(port: int, engine: str, redis_url: str, *extra: str) -> Process:
    return Process(f"gateway {port}", tandem_argv("gateway", "--port", str(port), "--instances", engine,
                                                  "--redis-url", redis_url, "--state-sync-interval", "0.1",
                                                  "--scrape-interval", "0.2", "--block-size", "16", *extra),
                   cwd=ROOT)


async def test_replicas_agree_after_a_reset_only_one_of_them_saw(tmp_path: Path) -> None:
    """Gateway A follows the engine's events, gateway B does not (shadow view). The engine drops
    its cache: A sees AllBlocksCleared and publishes the reset through Redis; B, which cannot see it
    itself, clears its shadow and estimates the next request as the miss it is."""
    redis = RedisServer()
    port = free_port()
    engine = f"http://127.0.0.1:{port}"
    pub, replay = f"ipc://{tmp_path}/e.pub", f"ipc://{tmp_path}/e.replay"
    pa, pb = free_port(), free_port()
    try:
        with Process("sim", tandem_argv("sim", "--port", str(port), "--kv-events", pub, "--kv-events-replay", replay,
                                        "--enable-prompt-tokens-details"), cwd=ROOT) as sim, \
                gateway_process(pa, engine, redis.url, "--kv-events", f"{engine}={pub},replay={replay}") as ga, \
                gateway_process(pb, engine, redis.url) as gb:
            sim.wait_http(engine + "/health", 30)
            ga.wait_http(f"http://127.0.0.1:{pa}/healthz", 30)
            gb.wait_http(f"http://127.0.0.1:{pb}/healthz", 30)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{pa}", timeout=10) as a, \
                    httpx.AsyncClient(base_url=f"http://127.0.0.1:{pb}", timeout=10) as b:
                await until(lambda: _live(a, engine), limit=30)
                await complete(b, PROMPT)
                _, cached = await complete(b, PROMPT)
                assert (await last_decision(b))["hit_tokens"] == 400 == cached  # B's shadow says hit
                async with httpx.AsyncClient(base_url=engine) as e:
                    assert (await e.post("/reset_prefix_cache")).status_code == 200

                async def b_cleared() -> bool:
                    return 'reason="cleared"} 1.0' in (await b.get("/metrics")).text

                await until(b_cleared, limit=10)
                _, cached = await complete(b, PROMPT)
                assert (await last_decision(b))["hit_tokens"] == 0 == cached
    finally:
        redis.kill()


async def _live(client: httpx.AsyncClient, url: str) -> bool:
    try:
        return bool((await exact_state(client, url) or {}).get("live"))
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize("flavor, reason", [("vllm", "restart"), ("sglang", "counters")])
async def test_engine_restart_seen_in_metrics_clears_the_view(flavor: str, reason: str) -> None:
    """vLLM exports its process start time; SGLang's counters start over. Either way the shadow
    view of the restarted engine is cleared and its next request estimated as a miss."""
    port = restartable_port()
    engine = f"http://127.0.0.1:{port}"
    argv = tandem_argv("sim", "--port", str(port), "--metrics", flavor, "--enable-prompt-tokens-details")
    app = gateway_app([engine], stale_after=30.0, block_size=16)  # routing blocks as the engine's: shadow hits
    with Process("sim", argv, cwd=ROOT) as sim:
        sim.wait_http(engine + "/health", 30)
        async with serving(app) as gw, httpx.AsyncClient(base_url=gw, timeout=10) as client:
            await complete(client, PROMPT)
            await complete(client, PROMPT)
            assert (await last_decision(client))["hit_tokens"] == 400
            await asyncio.sleep(0.5)  # a scrape with the counters up
            sim.stop()
            with Process("sim again", argv, cwd=ROOT) as again:
                again.wait_http(engine + "/health", 30)

                async def reset_seen() -> bool:
                    try:  # (the kept-alive connection may have idled out during the restart: asked again)
                        return f'reason="{reason}"}} 1.0' in (await client.get("/metrics")).text
                    except httpx.TransportError:
                        return False

                await until(reset_seen, limit=15)
                _, cached = await complete(client, PROMPT)
                assert (await last_decision(client))["hit_tokens"] == 0 == cached
