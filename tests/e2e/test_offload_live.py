"""Offload over a real shaped link: the remote prefill engine in its own network namespace behind a
tbf-shaped veth pair, KV bytes pulled over it by a local decode engine, the gateway measuring it.

Real parts: ``tandem sim`` engines and ``tandem gateway`` as processes, a real link (veth + tbf),
real bytes on it. Skipped where network namespaces cannot be made (not root, no iproute2).
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tandem.bench.offload_live import LIVE_MODEL, Procs, live_profiles, tandem_argv, wait_ready
from tandem.bench.shaped_link import ShapedLink, unavailable

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=f"no shaped link: {unavailable()}")
RATE_MBIT = 16.0
KVB = LIVE_MODEL.kv_bytes_per_token


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _send(c: httpx.AsyncClient, gw: str, tokens: int, rid: int) -> tuple[str, float]:
    body = {"model": "live-4l", "prompt": "x", "max_tokens": 2, "stream": True,
            "x_tandem": {"hash_ids": [rid * 100 + j for j in range(tokens // 512)], "prompt_tokens": tokens,
                         "block_size": 512}}
    t0 = time.monotonic()
    async with c.stream("POST", gw + "/v1/completions", json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        await resp.aread()
        return resp.headers["x-tandem-prefill-route"], time.monotonic() - t0


@pytest.mark.timeout(90)  # ~25 s on a quiet 2-core VM, 57 s at a load average of 35; the bound is a safety net
async def test_kv_crosses_the_shaped_link_and_the_gateway_follows_its_rate(tmp_path) -> None:
    local_p, remote_p = live_profiles(tmp_path)
    procs = Procs(tmp_path)
    with ShapedLink(RATE_MBIT) as link:
        try:
            ports = [_port() for _ in range(3)]
            procs.start("local", tandem_argv("sim", "--port", str(ports[0]), "--role", "prefill", "--profile",
                                             str(local_p)))
            procs.start("remote", link.argv(*tandem_argv("sim", "--host", link.remote_ip, "--port", "8100", "--role",
                                                          "prefill", "--profile", str(remote_p))))
            procs.start("decode", tandem_argv("sim", "--port", str(ports[1]), "--role", "decode", "--profile",
                                              str(local_p), "--kv-transport", "wire"))
            local, remote, decode = (f"http://127.0.0.1:{ports[0]}", f"http://{link.remote_ip}:8100",
                                     f"http://127.0.0.1:{ports[1]}")
            # The configured link is 10x the shaped one: what the gateway reads must come from the
            # transfers. The threshold is pinned low, so every prompt here goes remote (re-solving it
            # from the measured link is the unit tests' and `tandem bench offload-live`'s subject).
            procs.start("gateway", tandem_argv(
                "gateway", "--port", str(ports[2]), "--prefill-instances", local, "--remote-prefill-instances",
                remote, "--decode-instances", decode, "--profile", str(local_p), "--remote-profile", str(remote_p),
                "--remote-link-gbps", str(10 * RATE_MBIT / 1000), "--scrape-interval", "0.5",
                "--offload-threshold", "1024", "--offload", json.dumps({"link_window_s": 4.0}),
                "--trust-prompt-hints"))  # its prompts: x_tandem
            gw = f"http://127.0.0.1:{ports[2]}"
            await asyncio.gather(*(wait_ready(u, procs) for u in (local + "/health", remote + "/health",
                                                                   decode + "/health", gw + "/readyz")))
            async with httpx.AsyncClient(timeout=30, trust_env=False) as c:
                async def offload() -> dict:
                    return (await c.get(gw + "/admin/offload")).json()["models"]["live-4l"]

                # Long prompts: the remote engine prefills 8k tokens in ~0.2 s, the local one in ~1.7 s.
                sent0 = link.sent_bytes()
                routes = [await _send(c, gw, 8192, i) for i in range(4)]
                remote_n = sum(r == "remote" for r, _ in routes)
                assert remote_n == 4, routes
                # The KV bytes really crossed the shaped link, as the decode engine received them.
                moved = link.sent_bytes() - sent0
                assert moved >= remote_n * 8192 * KVB
                kv = (await c.get(decode + "/admin/kv")).json()
                wired = [r for r in kv["received"] if r["result"] == "ok"]
                assert all(r["transport"] == "wire" and r["transferred_bytes"] == 8192 * KVB for r in wired)
                # 2 MB over 16 Mbit/s takes ~1 s: the request waited for its KV.
                assert max(t for r, t in routes if r == "remote") > 8192 * KVB * 8 / (RATE_MBIT * 1e6)

                st = await offload()
                measured = st["link_measured_gbps"]
                assert measured is not None and 0.5 * RATE_MBIT / 1000 <= measured <= 1.1 * RATE_MBIT / 1000, st
                assert st["link_gbps"] == measured and st["link_committed_bytes"] == 0

                # The shaped rate drops to a quarter: new transfers take 4x as long and the gateway's
                # reading follows within its 4 s window.
                link.set_rate(RATE_MBIT / 4)
                slow = [await _send(c, gw, 4096, 10 + i) for i in range(3)]
                assert all(r == "remote" for r, _ in slow), slow
                await asyncio.sleep(0.6)  # the reading is refreshed at most every 0.5 s
                after = await offload()
                assert after["link_measured_gbps"] <= 0.6 * measured, (st, after)
                assert after["link_measured_gbps"] <= 1.1 * RATE_MBIT / 4 / 1000
                assert after["side_choices"] == {"remote:threshold": 7}
        finally:
            procs.stop()
