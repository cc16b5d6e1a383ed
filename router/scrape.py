"""Polls every instance's ``/metrics`` concurrently on the event loop and feeds routing state.

Scrapes never block requests: each is a bounded GET, their starts spread over the interval. A
failed or unparseable scrape counts an error; an instance without a good scrape for ``stale_after`` seconds
is *suspect* and not routable until a scrape succeeds again (a crashed or wedged engine usually
stops answering /metrics before the circuit breaker has seen enough failed requests). Two good
scrapes that tell of different engine processes (a new start time, counters gone backwards) are
reported as a restart: the engine's cache is gone (``tandem.router.cachereset``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Iterable

from tandem.router.cachereset import CacheReset, restart_from_metrics
from tandem.router.discovery import Endpoint
from tandem.router.enginemetrics import EngineMetricsError, EngineSnapshot, parse_engine_metrics
from tandem.router.http1 import HTTP1Client, HTTPConnectError, HTTPConnectionError, HTTPPoolBusy
from tandem.router.metrics import GatewayMetrics
from tandem.router.pool import Instance
from tandem.router.routing.capabilities import CapacityAware

log = logging.getLogger("tandem.gateway.scrape")


def apply_snapshot(inst: Instance, snap: EngineSnapshot, now: float) -> None:
    """Fold one good scrape into the instance's routing state (pure apart from the mutation)."""
    inst.snapshot = snap
    inst.last_scrape_ok = now
    inst.scrape_failures = 0
    inst.suspect = False
    s = inst.state
    if isinstance(s.exact, CapacityAware):
        s.exact.engine_config(snap.block_size, snap.kv_blocks)
    s.engine_running = int(snap.running or 0)
    s.engine_waiting = int(snap.waiting or 0)
    s.kv_usage = float(snap.kv_usage or 0.0)


def calibrate(inst: Instance, snap: EngineSnapshot, restarted: bool) -> None:
    """Fold one good scrape into the instance's prefill factor (a restarted engine starts over at 1.0)."""
    cal = inst.calibration
    if cal is None:
        return
    if restarted:
        cal.reset()
    inst.state.prefill_scale = cal.observe(snap)


def mark_failure(inst: Instance, now: float, stale_after: float) -> bool:
    """Count a failed scrape; returns True when this made the instance suspect."""
    inst.scrape_failures += 1
    age = now - inst.last_scrape_ok if inst.last_scrape_ok else float("inf")
    became = not inst.suspect and age >= stale_after
    inst.suspect = inst.suspect or age >= stale_after
    return became


class Scraper:
    def __init__(self, instances: Callable[[], Iterable[Instance]], metrics: GatewayMetrics, *,
                 interval: float, timeout: float, stale_after: float, max_bytes: int = 4 * 1024 * 1024,
                 ssl_context: ssl.SSLContext | None = None,
                 headers: Callable[[Endpoint], dict[str, str]] = lambda ep: {},
                 on_restart: Callable[[CacheReset], None] = lambda reset: None) -> None:
        self.instances, self.metrics = instances, metrics
        self.on_restart = on_restart
        self.headers = headers
        self.interval, self.timeout, self.stale_after = interval, timeout, stale_after
        self.max_bytes = max_bytes
        # The gateway's own HTTP/1.1 client, as for requests: httpx costs several times its CPU per
        # exchange, on the loop every request shares, once per engine and interval.
        self.client = HTTP1Client(max_connections=256, max_idle_per_host=1, ssl_context=ssl_context)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="scraper")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.client.close()

    async def _run(self) -> None:
        """Each instance once per interval, the starts spread evenly over it.

        Started together, the answers came back together and were parsed in one run of the loop:
        a pause of about a millisecond per engine that every request in flight waited out (seen
        as TTFT p99 in ``tandem bench gateway``). Spread, the same work comes in small pieces. An
        instance whose previous scrape is still running (a slow engine) is not asked again."""
        running: dict[str, asyncio.Task[None]] = {}
        try:
            while True:
                insts = [i for i in self.instances() if not i.removed]
                if not insts:
                    await asyncio.sleep(self.interval)
                    continue
                gap = self.interval / len(insts)
                for inst in insts:
                    started = time.monotonic()
                    if inst.id not in running:
                        task = running[inst.id] = asyncio.create_task(self.scrape(inst))
                        task.add_done_callback(lambda _t, iid=inst.id: running.pop(iid, None))
                    await asyncio.sleep(max(0.0, gap - (time.monotonic() - started)))
        finally:
            for task in list(running.values()):
                task.cancel()
            await asyncio.gather(*running.values(), return_exceptions=True)

    async def _fetch(self, url: str, headers: dict[str, str]) -> str:
        """The body, read up to ``max_bytes`` (a runaway exporter must not grow the gateway's memory)."""
        resp = await self.client.get(url, headers, connect_timeout=self.timeout, read_timeout=self.timeout)
        try:
            if resp.status != 200:
                raise EngineMetricsError(f"/metrics answered HTTP {resp.status}")
            parts: list[bytes] = []
            size = 0
            while chunk := await resp.read_chunk():
                size += len(chunk)
                if size > self.max_bytes:
                    raise EngineMetricsError(f"/metrics larger than {self.max_bytes} bytes")
                parts.append(chunk)
        finally:
            resp.close()  # no-op once the body was read (the connection is back in the pool)
        return b"".join(parts).decode("utf-8", errors="replace")

    async def scrape(self, inst: Instance) -> None:
        t0 = time.monotonic()
        self.metrics.scrapes.labels(inst.label).inc()
        try:
            # The whole scrape is bounded (the client bounds each read only): a trickling engine is cut off too.
            async with asyncio.timeout(self.timeout):
                text = await self._fetch(inst.endpoint.url + "/metrics", self.headers(inst.endpoint))
            snap = parse_engine_metrics(text)
        except (HTTPConnectError, HTTPConnectionError, HTTPPoolBusy, EngineMetricsError, TimeoutError) as exc:
            self.metrics.scrape_errors.labels(inst.label).inc()
            now = time.monotonic()
            if mark_failure(inst, now, self.stale_after):
                log.warning("instance %s is suspect: no good /metrics for %.1fs (%s)", inst.id, self.stale_after,
                            type(exc).__name__)
            inst.refresh_health(now)
            return
        now = time.monotonic()
        self.metrics.scrape_duration.observe(now - t0)
        prev, prev_at = inst.snapshot, inst.last_scrape_ok
        apply_snapshot(inst, snap, now)
        inst.refresh_health(now)
        reset = None if prev is None else restart_from_metrics(inst.id, prev, snap, time.time() - (now - prev_at))
        calibrate(inst, snap, restarted=reset is not None)
        self.metrics.prefill_scale.labels(inst.label).set(inst.state.prefill_scale)
        if reset is not None:
            self.on_restart(reset)
