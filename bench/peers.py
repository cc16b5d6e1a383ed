"""``tandem bench peers``: Tandem against the routers users would otherwise run, side by side, live.

Each router configuration (``tandem:<policy>``, ``sglang:<policy>``, ``vllm:<policy>``, or
``direct``: the client spreading requests over the engines itself, round robin) is measured on
fresh engines every time (cold caches, so no configuration inherits another's cache) with the
same trace slice replayed as prompt text (``tandem.bench.prompts``: the peers route on text and
ignore Tandem's hints), over real HTTP, streamed:

* **capacity**: the highest rate whose share of requests within the TTFT SLO reaches the target,
  by bisection between ``--rate-lo`` and ``--rate-hi`` (the first probe, the midpoint, is the same
  rate for every configuration: the "common rate" row);
* TTFT p50/p90/p99, attainment, throughput and errors at every probe, and the engines' own
  prefix-cache hit ratio (``vllm:prefix_cache_hits_total / queries_total``, scraped before and after);
* **added latency** at light load: short distinct prompts sent alternately through the router and
  straight to an engine on the same engines, TTFT p50/p99 of each (drift weighs on both alike).

``--replicas K`` runs K instances of each router behind a client-side round robin over them, as a
Kubernetes Service spreads connections; Tandem's replicas share state through Redis unless the
configuration is named ``tandem-local:<policy>`` (each replica alone). ``--fresh-connections``
opens one connection per request (sglang-router 0.3.2 holds the first SSE event ~40 ms on kept-alive
connections; with fresh connections that does not dominate). ``--time-scale N`` runs the simulated
engines N times faster than the wall clock and replays the trace N times faster (every reported
time is in engine seconds), so a long slice fits a short run; routers see N times the request rate.

The peer routers install from PyPI into their own virtualenv (``--peers-venv``; created on first
use unless ``--no-install-peers``). Every process is stopped at the end, also on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from tandem.bench.harness import HarnessError, Process, RedisServer, free_port, tandem_argv
from tandem.bench.stats import quantiles
from tandem.bench.trace_client import Result, Summary, completion_body, replay, send, summarise
from tandem.config import TandemSettings
from tandem.traces import TRACE_DIR, TraceRequest, load_trace, rescale_to_qps, select

ROUTER_KINDS = ("tandem", "tandem-local", "sglang", "vllm", "direct")
DEFAULT_CONFIGS = ["tandem:dualmap", "tandem:round_robin", "sglang:cache_aware", "sglang:round_robin",
                   "sglang:power_of_two", "vllm:cache_aware", "vllm:round_robin", "vllm:kv_aware", "direct"]
# kind -> (PyPI requirement, launcher module, its name for the warning log level)
PEER_PACKAGES = {"sglang": ("sglang-router==0.3.2", "sglang_router.launch_router", "warn"),
                 "vllm": ("vllm-router==0.1.17", "vllm_router.launch_router", "warning")}


@dataclass(slots=True)
class Probe:
    """One configuration at one offered rate."""

    config: str
    rate: float
    summary: Summary
    engine_hit_ratio: float


@dataclass(slots=True)
class Light:
    """Added TTFT at light load: through the router vs straight to an engine, interleaved."""

    config: str
    router_p50_ms: float
    router_p99_ms: float
    direct_p50_ms: float
    direct_p99_ms: float

    @property
    def added_p50_ms(self) -> float:
        return self.router_p50_ms - self.direct_p50_ms

    @property
    def added_p99_ms(self) -> float:
        return self.router_p99_ms - self.direct_p99_ms


@dataclass(slots=True)
class ConfigResult:
    config: str
    probes: list[Probe] = field(default_factory=list)
    capacity: float | None = None  # None: not even --rate-lo met the target
    light: Light | None = None
    error: str = ""


class BenchPeers(TandemSettings):
    """Tandem's policies vs sglang-router and vllm-router on the same engines and trace, live."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_BENCH_PEERS_")

    trace: Path = Field(TRACE_DIR / "conversation_trace.jsonl", description="Mooncake JSONL or Azure CSV trace")
    skip: int = Field(0, ge=0, description="trace requests to skip before the slice")
    requests: int = Field(2000, ge=10, description="requests per probe (the issue's floor is 2,000)")
    engines: int = Field(4, ge=1, le=64, description="simulated engines behind each router")
    profile: str = Field("llama3-8b-h100", description="engine performance profile")
    host_cache_tokens: int = Field(2_000_000, ge=0, description="host-memory KV tier per engine (tokens)")
    max_output_tokens: int = Field(16, ge=1, description="cap on output tokens per request")
    slo_ttft: float = Field(5.0, gt=0, description="TTFT SLO in seconds")
    target: float = Field(0.9, gt=0, lt=1, description="share of requests within the SLO that defines capacity")
    configs: list[str] = Field(DEFAULT_CONFIGS, min_length=1, description="router configurations, KIND:POLICY "
                               "(kinds: tandem, tandem-local, sglang, vllm) or direct")
    rate_lo: float = Field(1.0, gt=0, description="lowest rate bisected (req/s)")
    rate_hi: float = Field(16.0, gt=0, description="highest rate bisected (req/s)")
    bisect_steps: int = Field(4, ge=1, le=12, description="probes per configuration")
    replicas: int = Field(1, ge=1, le=16, description="router instances per configuration (client round robin)")
    fresh_connections: bool = Field(False, description="one connection per request (no keep-alive)")
    time_scale: float = Field(1.0, gt=0, le=50, description="engine seconds per wall-clock second")
    light_requests: int = Field(200, ge=0, description="requests per path for the added-latency measurement "
                                "(0: skip it)")
    light_rate: float = Field(5.0, gt=0, description="rate of the added-latency measurement (wall req/s)")
    parallel: int = Field(1, ge=1, le=16, description="configurations measured at the same time (each has its "
                          "own engines; keep engines x parallel below the CPUs)")
    peers_venv: Path = Field(Path.home() / ".cache" / "tandem" / "peers-venv",
                             description="virtualenv holding sglang-router and vllm-router")
    install_peers: bool = Field(True, description="create the peers' virtualenv when it is missing")
    budget_s: float = Field(3600.0, gt=0, description="wall-clock budget; probes past it are skipped")
    out: Path = Field(Path("out/peers"), description="directory for peers.json, peers.md and peers.png")

    @field_validator("configs")
    @classmethod
    def _known(cls, configs: list[str]) -> list[str]:
        for c in configs:
            kind, _, policy = c.partition(":")
            if kind not in ROUTER_KINDS or (kind == "direct") != (not policy):
                raise ValueError(f"{c!r}: expected KIND:POLICY with KIND one of tandem, tandem-local, sglang, "
                                 "vllm, or plain 'direct'")
        return configs

    def cli_cmd(self) -> None:
        if self.rate_lo >= self.rate_hi:
            raise SystemExit("tandem bench peers: rate_lo: must be below rate_hi")
        try:
            trace = load_trace(self.trace)
        except ValueError as exc:
            raise SystemExit(f"tandem bench peers: trace: {exc}") from exc
        slice_ = select(trace, warmup=self.skip, count=self.requests)
        if not slice_:
            raise SystemExit("tandem bench peers: requests: the slice is empty")
        kinds = {c.partition(":")[0] for c in self.configs}
        try:
            python = self._peer_python() if kinds & set(PEER_PACKAGES) else None
            results = self._run(slice_, python)
        except HarnessError as exc:
            raise SystemExit(f"tandem bench peers: {exc}") from exc
        except KeyboardInterrupt:
            raise SystemExit(130) from None
        self._report(results)

    # --- peers' virtualenv -----------------------------------------------------------------

    def _peer_python(self) -> Path:
        """The peers' interpreter, after installing them when asked; a clear error otherwise."""
        python = self.peers_venv / "bin" / "python"
        wanted = [pkg for pkg, _, _ in PEER_PACKAGES.values()]
        if python.exists() and _imports(python, [m.split(".")[0] for _, m, _ in PEER_PACKAGES.values()]):
            return python
        if not self.install_peers:
            raise SystemExit(f"tandem bench peers: peers_venv: {self.peers_venv} lacks {' and '.join(wanted)}; "
                             f"install them with: python3 -m venv {self.peers_venv} && "
                             f"{python} -m pip install {' '.join(wanted)}")
        print(f"installing {', '.join(wanted)} into {self.peers_venv} ...", file=sys.stderr)
        try:
            subprocess.run([sys.executable, "-m", "venv", str(self.peers_venv)], check=True, timeout=300)
            subprocess.run([str(python), "-m", "pip", "install", "-q", *wanted], check=True, timeout=900)
        except (subprocess.SubprocessError, OSError) as exc:
            raise SystemExit(f"tandem bench peers: cannot install the peer routers ({exc}); run "
                             f"'{python} -m pip install {' '.join(wanted)}' by hand or pass --configs without "
                             "sglang:/vllm: entries") from exc
        return python

    # --- measurement -----------------------------------------------------------------------

    def _run(self, slice_: list[TraceRequest], python: Path | None) -> list[ConfigResult]:
        """Each configuration in a thread of its own (``parallel`` at a time): its processes are
        started and stopped synchronously, its replays run in an event loop of their own."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        deadline = time.monotonic() + self.budget_s
        results = [ConfigResult(c) for c in self.configs]
        with Progress(TextColumn("{task.description:<22}"), BarColumn(), TextColumn("{task.fields[note]}"),
                      TimeElapsedColumn()) as progress:

            def one(res: ConfigResult) -> None:
                task = progress.add_task(res.config, total=self.bisect_steps + (1 if self.light_requests else 0),
                                         note="")
                try:
                    self._measure(res, slice_, python, deadline,
                                  lambda note: progress.update(task, advance=1, note=note))
                except HarnessError as exc:
                    res.error = str(exc)
                    progress.update(task, note=f"failed: {exc}"[:70])

            with ThreadPoolExecutor(self.parallel) as pool:
                list(pool.map(one, results))
        return results

    def _measure(self, res: ConfigResult, slice_: list[TraceRequest], python: Path | None, deadline: float,
                 step: Callable[[str], None]) -> None:
        lo, hi = self.rate_lo, self.rate_hi
        for i in range(self.bisect_steps):
            if time.monotonic() > deadline:
                res.error = "time budget spent"
                return
            rate = (lo + hi) / 2 if i else (self.rate_lo + self.rate_hi) / 2
            probe = self._probe(res.config, slice_, rate, python)
            res.probes.append(probe)
            if probe.summary.slo_attainment >= self.target:
                lo = res.capacity = rate
            else:
                hi = rate
            step(f"{rate:.2f} req/s: {probe.summary.slo_attainment:.1%}")
        if res.capacity is None and time.monotonic() < deadline:  # does the floor itself fail?
            probe = self._probe(res.config, slice_, self.rate_lo, python)
            res.probes.append(probe)
            res.capacity = self.rate_lo if probe.summary.slo_attainment >= self.target else None
        if self.light_requests and time.monotonic() < deadline:
            res.light = self._light(res.config, python)
            step("light load")

    def _probe(self, config: str, slice_: list[TraceRequest], rate: float, python: Path | None) -> Probe:
        reqs = rescale_to_qps(slice_, rate)
        with self._stack(config, python) as (urls, engine_urls, model):
            before = _prefix_counters(engine_urls)
            results, wall = asyncio.run(replay(urls, model, reqs, self.max_output_tokens,
                                               fresh_connections=self.fresh_connections,
                                               time_scale=self.time_scale))
            after = _prefix_counters(engine_urls)
        hits, queries = after[0] - before[0], after[1] - before[1]
        return Probe(config, rate, summarise(config, results, self.slo_ttft, wall),
                     hits / queries if queries > 0 else 0.0)

    def _light(self, config: str, python: Path | None) -> Light:
        """Short distinct prompts, max_tokens 1, alternately through the router and to an engine."""

        async def interleaved(urls: list[str], engine_urls: list[str], model: str) -> tuple[list[Result], ...]:
            router: list[Result] = []
            direct: list[Result] = []
            limits = httpx.Limits(max_keepalive_connections=0 if self.fresh_connections else 64)
            async with httpx.AsyncClient(timeout=30.0, trust_env=False, limits=limits) as client:
                for i in range(self.light_requests):
                    body = completion_body(model, f"light request {i} of {config}: " + " ".join(["word"] * 48), 1)
                    router.append(await send(client, urls[i % len(urls)], body))
                    direct.append(await send(client, engine_urls[i % len(engine_urls)] + "/v1/completions", body))
                    await asyncio.sleep(1 / self.light_rate)
            return router, direct

        with self._stack(config, python) as (urls, engine_urls, model):
            router, direct = asyncio.run(interleaved(urls, engine_urls, model))
        r50, r99 = quantiles((r.ttft * 1000 for r in router if r.ok), (0.5, 0.99))
        d50, d99 = quantiles((r.ttft * 1000 for r in direct if r.ok), (0.5, 0.99))
        return Light(config, r50, r99, d50, d99)

    @contextlib.contextmanager
    def _stack(self, config: str, python: Path | None) -> Iterator[tuple[list[str], list[str], str]]:
        """Fresh engines and the configuration's routers; yields (client URLs, engine URLs, model)."""
        kind, _, policy = config.partition(":")
        with contextlib.ExitStack() as stack:
            engine_urls = []
            for _ in range(self.engines):
                port = free_port()
                args = ["sim", "--port", str(port), "--profile", self.profile, "--max-pending", "100000",
                        "--host-cache-tokens", str(self.host_cache_tokens), "--time-scale", str(self.time_scale),
                        "--enable-prompt-tokens-details"]  # the cached tokens the client reads
                proc = stack.enter_context(Process(f"sim:{port}", tandem_argv(*args), self._log(f"sim-{port}")))
                url = f"http://127.0.0.1:{port}"
                proc.wait_http(url + "/health", 60.0)
                engine_urls.append(url)
            model = httpx.get(engine_urls[0] + "/v1/models", timeout=5, trust_env=False).json()["data"][0]["id"]
            if kind == "direct":
                yield [u + "/v1/completions" for u in engine_urls], engine_urls, model
                return
            redis = None
            if kind == "tandem" and self.replicas > 1:
                redis = stack.enter_context(RedisServer(self._log("redis")))
                redis.wait_ready()
            urls = []
            for r in range(self.replicas):
                port = free_port()
                argv = self._router_argv(kind, policy, port, engine_urls, python, redis)
                proc = stack.enter_context(Process(f"{config}#{r}", argv, self._log(f"{kind}-{policy}-{r}")))
                url = f"http://127.0.0.1:{port}"
                _wait_serving(proc, url, model)
                urls.append(url + "/v1/completions")
            yield urls, engine_urls, model

    def _router_argv(self, kind: str, policy: str, port: int, engines: list[str], python: Path | None,
                     redis: RedisServer | None) -> list[str]:
        if kind in ("tandem", "tandem-local"):
            from tandem.perf.profile import load_profile

            shadow = load_profile(self.profile).kv_capacity_tokens + self.host_cache_tokens
            args = ["gateway", "--port", str(port), "--instances", ",".join(engines), "--policy", policy,
                    "--profile", self.profile, "--slo-ttft", str(self.slo_ttft), "--max-queue", "100000",
                    "--max-queue-per-instance", "100000", "--shadow-capacity-tokens", str(shadow)]
            if redis is not None:
                args += ["--redis-url", redis.url]
            return tandem_argv(*args)
        assert python is not None
        _, module, warning = PEER_PACKAGES[kind]
        return [str(python), "-m", module, "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *engines,
                "--policy", policy, "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
                "--log-level", warning]

    def _log(self, name: str) -> Path:
        path = self.out / "logs" / f"{name}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    # --- report ----------------------------------------------------------------------------

    def _report(self, results: list[ConfigResult]) -> None:
        from rich.console import Console

        console = Console()
        self.out.mkdir(parents=True, exist_ok=True)
        md = report_markdown(results, self)
        (self.out / "peers.md").write_text(md)
        (self.out / "peers.json").write_text(json.dumps({
            "config": json.loads(self.model_dump_json()),
            "results": [{**asdict(r), "light": ({**asdict(r.light), "added_p50_ms": r.light.added_p50_ms,
                                                 "added_p99_ms": r.light.added_p99_ms} if r.light else None)}
                        for r in results]}, indent=2, default=str))
        _plot(results, self.target, self.out / "peers.png")
        console.print(md)
        console.print(f"numbers: {self.out / 'peers.json'}   plot: {self.out / 'peers.png'}")


def report_markdown(results: list[ConfigResult], bench: BenchPeers) -> str:
    """One table: capacity (and its ratio to the best peer and to round robin), the common-rate row, light load."""
    peers = [r for r in results if r.config.partition(":")[0] in PEER_PACKAGES and r.capacity]
    best_peer = max((r.capacity for r in peers if r.capacity), default=None)
    rr = max((r.capacity for r in results if r.config.endswith("round_robin") and r.capacity), default=None)
    common = (bench.rate_lo + bench.rate_hi) / 2
    lines = [f"{bench.requests} requests of {bench.trace.name} per probe, {bench.engines} x {bench.profile} engines "
             f"(host tier {bench.host_cache_tokens:,} tokens), TTFT SLO {bench.slo_ttft:g} s, capacity at "
             f">= {bench.target:.0%} within it; {bench.replicas} replica(s) per router; "
             f"{'fresh connections' if bench.fresh_connections else 'kept-alive connections'}; "
             f"time scale {bench.time_scale:g}", "",
             f"| config | capacity (req/s) | vs best peer | vs best round robin | attainment @ {common:g} | "
             f"TTFT p50/p90/p99 @ {common:g} (s) | engine hit ratio @ {common:g} | errors | "
             "added TTFT p50 / p99 (ms) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        at = next((p for p in r.probes if math.isclose(p.rate, common)), None)
        cap = "-" if r.capacity is None else f"{r.capacity:.2f}"
        if r.error and not r.probes:
            cap = f"failed: {r.error[:60]}"
        vs_peer = f"{r.capacity / best_peer:.2f}x" if r.capacity and best_peer else "-"
        vs_rr = f"{r.capacity / rr:.2f}x" if r.capacity and rr else "-"
        cells = ["-", "-", "-", "-"]
        if at is not None:
            s = at.summary
            cells = [f"{s.slo_attainment:.1%}", f"{s.ttft_p50:.2f} / {s.ttft_p90:.2f} / {s.ttft_p99:.2f}",
                     f"{at.engine_hit_ratio:.1%}", str(s.errors)]
        light = (f"{r.light.added_p50_ms:+.2f} / {r.light.added_p99_ms:+.2f}" if r.light else "-")
        lines.append(f"| {r.config} | {cap} | {vs_peer} | {vs_rr} | {' | '.join(cells)} | {light} |")
    return "\n".join(lines) + "\n"


def _plot(results: list[ConfigResult], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in results:
        pts = sorted((p.rate, p.summary.slo_attainment) for p in r.probes)
        if pts:
            ax.plot([x for x, _ in pts], [100 * y for _, y in pts], marker="o", label=r.config)
    ax.axhline(100 * target, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("offered rate (req/s)")
    ax.set_ylabel("requests within the TTFT SLO (%)")
    ax.set_title("SLO attainment vs rate, per router")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _imports(python: Path, modules: list[str]) -> bool:
    code = "import importlib.util, sys; sys.exit(0 if all(importlib.util.find_spec(m) for m in sys.argv[1:]) else 1)"
    try:
        return subprocess.run([str(python), "-c", code, *modules], timeout=60, env={**os.environ}).returncode == 0
    except (subprocess.SubprocessError, OSError):
        return False


def _wait_serving(proc: Process, url: str, model: str, limit_s: float = 90.0) -> None:
    """Until a one-token completion through the router succeeds (every router's own readiness differs)."""
    body = {"model": model, "prompt": "ready?", "max_tokens": 1}

    def ready() -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.post(url + "/v1/completions", json=body, timeout=5, trust_env=False).status_code == 200
        return False

    proc.wait_until(ready, f"{url} serving completions", limit_s)


def _prefix_counters(engine_urls: list[str]) -> tuple[float, float]:
    """Summed ``vllm:prefix_cache_hits_total`` and ``..._queries_total`` of the engines."""
    hits = queries = 0.0
    with httpx.Client(timeout=10.0, trust_env=False) as client:
        for url in engine_urls:
            text = client.get(url + "/metrics").text
            for line in text.splitlines():
                if line.startswith("vllm:prefix_cache_hits_total"):
                    hits += float(line.rsplit(" ", 1)[1])
                elif line.startswith("vllm:prefix_cache_queries_total"):
                    queries += float(line.rsplit(" ", 1)[1])
    return hits, queries
