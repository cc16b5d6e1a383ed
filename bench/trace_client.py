"""Replaying a trace over HTTP as a client would: text prompts, streamed answers, what the client sees.

Shared by ``tandem demo`` and ``tandem bench peers``: each trace request becomes its prompt text
(:func:`tandem.bench.prompts.trace_prompt`), is sent at its arrival time whatever came before (open
loop), streamed, and timed to its first token; the engine's usage (with the cached prompt tokens
when it reports them) comes from the stream's last chunk. Several URLs (router replicas behind a
Service, or engines addressed directly) are taken in turn, one request each, as a Kubernetes
Service spreads connections.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx

from tandem.bench.prompts import trace_prompt
from tandem.bench.stats import attainment, quantiles
from tandem.traces import TraceRequest


@dataclass(slots=True)
class Result:
    ok: bool
    ttft: float
    e2e: float
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    error: str = ""


@dataclass(slots=True)
class Summary:
    policy: str
    requests: int
    errors: int
    ttft_p50: float
    ttft_p90: float
    ttft_p99: float
    slo_attainment: float
    hit_ratio: float
    throughput_rps: float
    output_tps: float
    wall_s: float


def summarise(policy: str, results: list[Result], slo: float, wall: float) -> Summary:
    ok = [r for r in results if r.ok]
    p50, p90, p99 = quantiles((r.ttft for r in ok), (0.5, 0.9, 0.99))
    prompt = sum(r.prompt_tokens for r in ok)
    return Summary(
        policy=policy, requests=len(results), errors=len(results) - len(ok),
        ttft_p50=p50, ttft_p90=p90, ttft_p99=p99,
        # A failed request misses the SLO.
        slo_attainment=attainment((r.ttft for r in ok), slo, total=len(results)),
        hit_ratio=sum(r.cached_tokens for r in ok) / prompt if prompt else 0.0,
        throughput_rps=len(ok) / wall if wall > 0 else 0.0,
        output_tps=sum(r.output_tokens for r in ok) / wall if wall > 0 else 0.0,
        wall_s=wall)


def completion_body(model: str, prompt: str, max_tokens: int) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}


async def send(client: httpx.AsyncClient, url: str, body: dict, time_scale: float = 1.0) -> Result:
    """One streamed completion; times are multiplied by ``time_scale`` (engine seconds per wall second)."""
    t0 = time.perf_counter()
    ttft = None
    usage: dict = {}

    def failed(error: str) -> Result:
        return Result(False, 0.0, (time.perf_counter() - t0) * time_scale, 0, 0, 0, error)

    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                return failed(f"HTTP {resp.status_code}: {text[:200]}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return failed(str((chunk["error"] or {}).get("message", "error")))
                if ttft is None and any((c.get("text") or (c.get("delta") or {}).get("content"))
                                        for c in chunk.get("choices") or ()):
                    ttft = time.perf_counter() - t0
                if chunk.get("usage"):
                    usage = chunk["usage"]
    except httpx.HTTPError as exc:
        return failed(type(exc).__name__)
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    return Result(ttft is not None, (ttft or 0.0) * time_scale, (time.perf_counter() - t0) * time_scale,
                  int(usage.get("prompt_tokens", 0)), cached, int(usage.get("completion_tokens", 0)))


async def replay(urls: Sequence[str], model: str, reqs: list[TraceRequest], max_out: int,
                 on_done: Callable[[], None] | None = None, *, fresh_connections: bool = False,
                 time_scale: float = 1.0) -> tuple[list[Result], float]:
    """Open-loop replay of ``reqs`` (arrival times in engine seconds) over ``urls`` in turn.

    ``fresh_connections``: one connection per request (no keep-alive), as many short-lived
    clients would open; otherwise connections are kept alive and reused."""
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=0 if fresh_connections else 4096)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0, connect=10.0), limits=limits,
                                 trust_env=False) as client:
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def at(i: int, req: TraceRequest) -> Result:
            await asyncio.sleep(max(0.0, start + req.arrival / time_scale - loop.time()))
            body = completion_body(model, trace_prompt(req, i), max(1, min(req.output_tokens, max_out)))
            result = await send(client, urls[i % len(urls)], body, time_scale)
            if on_done:
                on_done()
            return result

        results = await asyncio.gather(*(at(i, r) for i, r in enumerate(reqs)))
        return list(results), (loop.time() - start) * time_scale
