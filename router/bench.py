"""``tandem bench gateway``: what the gateway adds, measured against the same engine in the same run.

One engine simulator and one gateway (in front of it) run as subprocesses. The same load of short
streamed completions is sent directly to the simulator and through the gateway:

* max sustained req/s: closed loop, ``concurrency`` clients sending back to back;
* latency at fixed offered rates (open loop, arrivals on a fixed schedule whatever the answers):
  TTFT (first SSE chunk) and end-to-end, p50/p99, and the difference gateway - direct.

The load generator is an aiohttp client on uvloop in this process. On a small machine the
simulator, the gateway and the client share the cores, so every number is relative to the direct
run measured under the same conditions; the absolute ones say as much about the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from tandem.config import TandemSettings


@dataclass(slots=True)
class LatencyStats:
    target: str
    offered_rps: float
    achieved_rps: float
    ok: int
    errors: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    e2e_p50_ms: float
    e2e_p99_ms: float


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _process(args: list[str], log: Path) -> Iterator[subprocess.Popen]:
    with log.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", *args], stdout=subprocess.DEVNULL, stderr=fh)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class BenchGatewayCommand(TandemSettings):
    """Proxy overhead of the gateway vs direct-to-simulator: added TTFT/e2e p50/p99 and max req/s."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_BENCH_GATEWAY_")

    rates: list[float] = Field([100.0, 300.0, 1000.0], min_length=1, description="offered req/s (open loop)")
    duration: float = Field(5.0, gt=0, description="seconds per measurement")
    concurrency: int = Field(64, gt=0, description="closed-loop clients for the max-throughput test")
    max_tokens: int = Field(4, gt=0, description="output tokens per request (short streamed requests)")
    policy: str = Field("dualmap", description="gateway routing policy")
    gateway_loop: Literal["uvloop", "asyncio"] = Field("uvloop", description="gateway event loop + HTTP parser "
                                                       "(uvloop: uvloop+httptools; asyncio: asyncio+h11)")
    out: Path = Field(Path("out"), description="directory for bench-gateway.json and process logs")

    def cli_cmd(self) -> None:
        try:
            import uvloop
        except ImportError:  # the load generator works without it, only slower
            uvloop = None
        self.out.mkdir(parents=True, exist_ok=True)
        runner = uvloop.run if uvloop else asyncio.run
        report = runner(self._run())
        (self.out / "bench-gateway.json").write_text(json.dumps(report, indent=2))
        self._print(report)

    async def _run(self) -> dict:
        sim_port, gw_port = _free_port(), _free_port()
        sim, gw = f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{gw_port}"
        gw_args = ["gateway", "--port", str(gw_port), "--instances", sim, "--policy", self.policy,
                   "--max-queue", "100000", "--max-queue-per-instance", "100000", "--loop", self.gateway_loop]
        sim_args = ["sim", "--port", str(sim_port), "--max-pending", "100000"]
        with _process(sim_args, self.out / "bench-sim.log") as sim_proc, \
                _process(gw_args, self.out / "bench-gateway.log") as gw_proc:
            import aiohttp

            connector = aiohttp.TCPConnector(limit=4096, limit_per_host=4096, force_close=False)
            async with aiohttp.ClientSession(connector=connector) as session:
                await _wait_ready(session, sim + "/health")
                await _wait_ready(session, gw + "/readyz")
                model = (await (await session.get(sim + "/v1/models")).json())["data"][0]["id"]
                body = json.dumps({"model": model, "prompt": "hello tandem", "max_tokens": self.max_tokens,
                                   "stream": True}).encode()
                for target in (sim, gw):  # warm connections and code paths
                    await _closed_loop(session, target, body, 8, 1.0)
                max_rps: dict[str, float] = {}
                cpu_ms: dict[str, float] = {}
                for name, url, proc in (("direct", sim, sim_proc), ("gateway", gw, gw_proc)):
                    before = _cpu_seconds(proc.pid)
                    rps, done = await _closed_loop(session, url, body, self.concurrency, self.duration)
                    max_rps[name] = rps
                    cpu_ms[name] = (_cpu_seconds(proc.pid) - before) * 1000 / max(1, done)
                latency: list[LatencyStats] = []
                skipped: list[float] = []
                for rate in self.rates:
                    if rate > 0.8 * max_rps["direct"]:
                        # Beyond the simulator's own capacity here: it would measure the engine's queue.
                        skipped.append(rate)
                        continue
                    for name, url in (("direct", sim), ("gateway", gw)):
                        await _wait_idle(session, sim)
                        latency.append(await _open_loop(session, name, url, body, rate, self.duration))
        return {"config": json.loads(self.model_dump_json()), "max_rps": max_rps, "cpu_ms_per_request": cpu_ms,
                "latency": [asdict(s) for s in latency], "skipped_rates": skipped}

    def _print(self, report: dict) -> None:
        from rich.console import Console
        from rich.table import Table

        console = Console()
        mr = report["max_rps"]
        cpu = report["cpu_ms_per_request"]
        console.print(f"max sustained req/s (closed loop, {self.concurrency} clients): direct "
                      f"{mr['direct']:.0f}, gateway {mr['gateway']:.0f} ({mr['gateway'] / mr['direct']:.2f}x of "
                      f"direct) [gateway loop: {self.gateway_loop}, policy: {self.policy}]")
        console.print(f"CPU per request: gateway process {cpu['gateway']:.3f} ms (one core's worth: "
                      f"{1000 / cpu['gateway']:.0f} req/s), simulator {cpu['direct']:.3f} ms "
                      f"(gateway/simulator {cpu['gateway'] / cpu['direct']:.2f}x)")
        table = Table(title="added by the gateway, ms (open loop, short streamed completions)")
        for col in ("req/s", "done d/gw", "TTFT p50", "+p50", "TTFT p99", "+p99", "e2e +p50", "e2e +p99", "err d/gw"):
            table.add_column(col, justify="right")
        rows = report["latency"]
        for d, g in zip(rows[::2], rows[1::2], strict=True):
            table.add_row(f"{d['offered_rps']:.0f}", f"{d['achieved_rps']:.0f}/{g['achieved_rps']:.0f}",
                          f"{d['ttft_p50_ms']:.1f}", f"{g['ttft_p50_ms'] - d['ttft_p50_ms']:+.1f}",
                          f"{d['ttft_p99_ms']:.1f}", f"{g['ttft_p99_ms'] - d['ttft_p99_ms']:+.1f}",
                          f"{g['e2e_p50_ms'] - d['e2e_p50_ms']:+.1f}", f"{g['e2e_p99_ms'] - d['e2e_p99_ms']:+.1f}",
                          f"{d['errors']}/{g['errors']}")
        console.print(table)
        if report["skipped_rates"]:
            console.print(f"skipped rates {report['skipped_rates']} req/s: above 0.8x the simulator's own max here")
        console.print(f"raw numbers: {self.out / 'bench-gateway.json'}")


async def _wait_ready(session: object, url: str, limit_s: float = 60.0) -> None:
    import aiohttp

    deadline = time.monotonic() + limit_s
    while True:
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with session.get(url) as resp:
                if resp.status == 200:
                    return
        if time.monotonic() > deadline:
            raise SystemExit(f"tandem bench gateway: {url} not ready after {limit_s:.0f}s")
        await asyncio.sleep(0.1)


async def _wait_idle(session: object, sim: str, limit_s: float = 30.0) -> None:
    """Let the simulator drain what the previous step left before measuring the next."""
    from tandem.router.enginemetrics import parse_engine_metrics

    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        async with session.get(sim + "/metrics") as resp:
            snap = parse_engine_metrics(await resp.text())
        if not snap.running and not snap.waiting:
            return
        await asyncio.sleep(0.1)


async def _request(session: object, url: str, body: bytes) -> tuple[float, float] | None:
    """(TTFT, e2e) in seconds of one streamed completion, or None on any failure."""
    t0 = time.perf_counter()
    ttft = None
    try:
        async with session.post(url + "/v1/completions", data=body,
                                headers={"content-type": "application/json"}) as resp:
            if resp.status != 200:
                await resp.read()
                return None
            async for chunk in resp.content.iter_any():
                if ttft is None and chunk:
                    ttft = time.perf_counter() - t0
    except Exception:  # a failed request is counted as an error, whatever broke
        return None
    return (ttft if ttft is not None else float("nan")), time.perf_counter() - t0


async def _closed_loop(session: object, url: str, body: bytes, clients: int, duration: float) -> tuple[float, int]:
    done = 0
    stop = time.perf_counter() + duration

    async def client() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            if await _request(session, url, body) is not None:
                done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return done / (time.perf_counter() - t0), done


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc), independent of machine load."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _open_loop(session: object, name: str, url: str, body: bytes, rate: float, duration: float) -> LatencyStats:
    n = max(1, int(rate * duration))
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05

    async def at(i: int) -> tuple[float, float] | None:
        await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
        return await _request(session, url, body)

    t0 = time.perf_counter()
    results = await asyncio.gather(*(at(i) for i in range(n)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if r is not None]
    ttft = np.array([r[0] for r in ok]) * 1000 if ok else np.array([np.nan])
    e2e = np.array([r[1] for r in ok]) * 1000 if ok else np.array([np.nan])
    return LatencyStats(name, rate, len(ok) / wall, len(ok), n - len(ok),
                        float(np.nanpercentile(ttft, 50)), float(np.nanpercentile(ttft, 99)),
                        float(np.nanpercentile(e2e, 50)), float(np.nanpercentile(e2e, 99)))
