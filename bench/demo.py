"""``tandem demo``: simulated engines + the gateway + a slice of the Mooncake trace, per policy.

For each policy the demo starts fresh engine simulators (cold caches, so no policy inherits
another's cache) and a gateway as subprocesses on ephemeral 127.0.0.1 ports, replays the same
trace slice through the gateway over real HTTP (prompts as Mooncake block ids, the simulator's
``x_tandem`` extension; streamed responses), and measures what a client sees. It then prints a
side-by-side table and writes a plot and the raw numbers under ``out/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from tandem.config import TandemSettings
from tandem.serve import serve
from tandem.traces import TRACE_DIR, TraceRequest, load_trace, rescale_to_qps, select


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
    ttfts = np.array([r.ttft for r in ok]) if ok else np.array([float("nan")])
    prompt = sum(r.prompt_tokens for r in ok)
    return Summary(
        policy=policy, requests=len(results), errors=len(results) - len(ok),
        ttft_p50=float(np.percentile(ttfts, 50)), ttft_p90=float(np.percentile(ttfts, 90)),
        ttft_p99=float(np.percentile(ttfts, 99)),
        # A failed request misses the SLO.
        slo_attainment=sum(1 for r in ok if r.ttft <= slo) / max(1, len(results)),
        hit_ratio=sum(r.cached_tokens for r in ok) / prompt if prompt else 0.0,
        throughput_rps=len(ok) / wall if wall > 0 else 0.0,
        output_tps=sum(r.output_tokens for r in ok) / wall if wall > 0 else 0.0,
        wall_s=wall)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Processes:
    """Subprocesses of one run, logging to files under ``logs``; always terminated, even on Ctrl-C."""

    def __init__(self, logs: Path) -> None:
        self.procs: list[tuple[subprocess.Popen, Path]] = []
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, *args: str) -> None:
        log = self.logs / f"{name}.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", *args], stdout=subprocess.DEVNULL,
                                    stderr=fh)
        self.procs.append((proc, log))

    def stop(self) -> None:
        for p, _ in self.procs:
            if p.poll() is None:
                p.terminate()
        for p, _ in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()

    def check(self) -> None:
        for p, log in self.procs:
            if p.poll() is not None:
                err = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{' '.join(map(str, p.args[3:5]))} exited with {p.returncode}:\n{err}")


async def _wait_ready(url: str, procs: _Processes, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    async with httpx.AsyncClient(timeout=1.0, trust_env=False) as c:
        while True:
            procs.check()
            with contextlib.suppress(httpx.HTTPError):
                if (await c.get(url)).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not ready after {limit_s:.0f}s")
            await asyncio.sleep(0.1)


async def _one(client: httpx.AsyncClient, url: str, model: str, req: TraceRequest, max_out: int) -> Result:
    body = {"model": model, "max_tokens": max(1, min(req.output_tokens, max_out)), "stream": True,
            "stream_options": {"include_usage": True},
            "x_tandem": {"hash_ids": list(req.hash_ids), "prompt_tokens": req.input_tokens,
                         "block_size": req.block_size}}
    t0 = time.perf_counter()
    ttft = None
    usage: dict = {}
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                return Result(False, 0.0, time.perf_counter() - t0, req.input_tokens, 0, 0,
                              f"HTTP {resp.status_code}: {text[:200]}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Result(False, 0.0, time.perf_counter() - t0, req.input_tokens, 0, 0,
                                  chunk["error"].get("message", "error"))
                if ttft is None and chunk.get("choices"):
                    ttft = time.perf_counter() - t0
                if chunk.get("usage"):
                    usage = chunk["usage"]
    except httpx.HTTPError as exc:
        return Result(False, 0.0, time.perf_counter() - t0, req.input_tokens, 0, 0, type(exc).__name__)
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    return Result(ttft is not None, ttft or 0.0, time.perf_counter() - t0, int(usage.get("prompt_tokens", 0)),
                  cached, int(usage.get("completion_tokens", 0)))


async def replay(url: str, model: str, reqs: list[TraceRequest], max_out: int,
                 on_done: Callable[[], None] | None = None) -> tuple[list[Result], float]:
    """Open-loop replay: each request is sent at its (rescaled) arrival time, whatever came before."""
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=4096)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0, connect=10.0), limits=limits,
                                 trust_env=False) as client:
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def at(req: TraceRequest) -> Result:
            await asyncio.sleep(max(0.0, start + req.arrival - loop.time()))
            result = await _one(client, url, model, req, max_out)
            if on_done:
                on_done()
            return result

        results = await asyncio.gather(*(at(r) for r in reqs))
        return list(results), loop.time() - start


class DemoCommand(TandemSettings):
    """Replay a Mooncake trace slice through the gateway with each policy; compare what clients see."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_DEMO_")

    instances: int = Field(8, ge=1, le=32, description="simulated engines")
    profile: str = Field("llama3-8b-h100", description="engine performance profile")
    trace: Path = Field(TRACE_DIR / "conversation_trace.jsonl", description="Mooncake JSONL trace")
    skip: int = Field(0, ge=0, description="trace requests to skip before the slice")
    requests: int = Field(400, ge=10, description="requests in the slice")
    qps: float = Field(8.0, gt=0, description="mean arrival rate the slice is rescaled to")
    max_output_tokens: int = Field(16, ge=1, description="cap on output tokens (keeps the run short)")
    policies: list[str] = Field(["round_robin", "dualmap"], min_length=1, description="policies to compare")
    slo_ttft: float = Field(5.0, gt=0, description="TTFT SLO in seconds")
    host_cache_tokens: int = Field(2_000_000, ge=0, description="host-memory KV tier per engine in tokens, as in "
                                   "Mooncake (the GPU alone holds ~30 of these prompts); 0: GPU cache only")
    out: Path = Field(Path("out"), description="directory for demo.png and demo.json")

    def cli_cmd(self) -> None:
        from tandem.router.routing.registry import policy_names

        unknown = [p for p in self.policies if p not in policy_names()]
        if unknown:
            raise SystemExit(f"tandem demo: policies: unknown {unknown}; available: {policy_names()}")
        try:
            trace = load_trace(self.trace)
        except ValueError as exc:
            raise SystemExit(f"tandem demo: trace: {exc}") from exc
        reqs = rescale_to_qps(select(trace, warmup=self.skip, count=self.requests), self.qps)
        if not reqs:
            raise SystemExit("tandem demo: requests: the slice is empty (skip past the end of the trace?)")
        try:
            summaries, raw = asyncio.run(self._run_all(reqs))
        except KeyboardInterrupt:
            raise SystemExit(130) from None
        des = {policy: self._des(policy, reqs) for policy in self.policies}
        self._report(summaries, raw, reqs, des)

    def _des(self, policy: str, reqs: list[TraceRequest]) -> Summary:
        """The same slice in the discrete-event simulator (same engines, scheduler and policy code)."""
        from dataclasses import replace

        from tandem.router.routing.config import RoutingConfig
        from tandem.sim.des.simulator import DESConfig, Simulation, prepare

        capped = [replace(r, output_tokens=max(1, min(r.output_tokens, self.max_output_tokens))) for r in reqs]
        routing = RoutingConfig(slo_ttft_s=self.slo_ttft, max_queued_per_instance=100_000, max_queued_total=100_000)
        config = DESConfig(instances=self.instances, profile=self.profile, host_cache_tokens=self.host_cache_tokens,
                           tick_s=0.25)
        result = Simulation(prepare(capped), policy, routing, config).run()
        results = [Result(r.ttft is not None, r.ttft or 0.0,
                          (r.finished_at or r.arrival) - r.arrival, r.prompt_tokens, r.hit_tokens, r.output_tokens)
                   for r in result.requests]
        return summarise(policy, results, self.slo_ttft, result.end_time)

    async def _run_all(self, reqs: list[TraceRequest]) -> tuple[list[Summary], dict[str, list[Result]]]:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console()
        console.print(f"[bold]tandem demo[/]: {len(reqs)} Mooncake requests at {self.qps:g} req/s "
                      f"({reqs[-1].arrival:.0f} s), {self.instances} x {self.profile} engines, "
                      f"output capped at {self.max_output_tokens} tokens, TTFT SLO {self.slo_ttft:g} s")
        summaries: list[Summary] = []
        raw: dict[str, list[Result]] = {}
        with Progress(TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as progress:
            for policy in self.policies:
                task = progress.add_task(policy, total=len(reqs))
                results, wall = await self._run_policy(policy, reqs, lambda t=task: progress.advance(t))
                raw[policy] = results
                summaries.append(summarise(policy, results, self.slo_ttft, wall))
        return summaries, raw

    async def _run_policy(self, policy: str, reqs: list[TraceRequest], advance: Callable[[], None]
                          ) -> tuple[list[Result], float]:
        """Fresh engines (cold caches) in this process, the gateway as a subprocess (its own core)."""
        from tandem.perf.profile import load_profile
        from tandem.sim.server import create_app
        from tandem.sim.settings import SimSettings

        procs = _Processes(self.out / "logs" / policy)
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(procs.stop)
            sims = []
            for _ in range(self.instances):
                app = create_app(SimSettings(port=0, profile=self.profile, max_pending=100_000,
                                             host_cache_tokens=self.host_cache_tokens))
                sims.append(await stack.enter_async_context(serve(app)))
            gw_port = _free_port()
            gw = f"http://127.0.0.1:{gw_port}"
            # The router's shadow of each cache covers what the engine can hit: GPU and host tier.
            shadow = load_profile(self.profile).kv_capacity_tokens + self.host_cache_tokens
            args = ["gateway", "--port", str(gw_port), "--instances", ",".join(sims), "--policy", policy,
                    "--profile", self.profile, "--slo-ttft", str(self.slo_ttft), "--max-queue", "100000",
                    "--max-queue-per-instance", "100000", "--shadow-capacity-tokens", str(shadow),
                    "--trust-prompt-hints"]  # prompts are Mooncake block ids (x_tandem), until text prompts
            procs.start("gateway", *args)
            await _wait_ready(gw + "/readyz", procs)
            async with httpx.AsyncClient(trust_env=False) as c:
                model = (await c.get(gw + "/v1/models")).json()["data"][0]["id"]
            return await replay(gw + "/v1/completions", model, reqs, self.max_output_tokens, advance)
        raise AssertionError("unreachable")

    def _report(self, summaries: list[Summary], raw: dict[str, list[Result]], reqs: list[TraceRequest],
                des: dict[str, Summary]) -> None:
        from rich.console import Console
        from rich.table import Table

        console = Console()
        base = summaries[0]
        table = Table(title=f"TTFT and cache hits, same trace slice, ratios vs {base.policy}")
        table.add_column("metric", no_wrap=True)
        for s in summaries:
            table.add_column(s.policy, justify="right")

        def row(name: str, fmt: str, attr: str, lower_better: bool | None = None) -> None:
            cells = []
            for s in summaries:
                v = getattr(s, attr)
                cell = format(v, fmt)
                b = getattr(base, attr)
                if s is not base and lower_better is not None and b and v:
                    cell += f" ({v / b:.2f}x)"
                cells.append(cell)
            table.add_row(name, *cells)

        row("TTFT p50 (s)", ".3f", "ttft_p50", True)
        row("TTFT p90 (s)", ".3f", "ttft_p90", True)
        row("TTFT p99 (s)", ".3f", "ttft_p99", True)
        table.add_row(f"SLO attainment (TTFT <= {self.slo_ttft:g}s)", *[f"{s.slo_attainment:.1%}" for s in summaries])
        table.add_row("prefix-hit ratio (engine)", *[f"{s.hit_ratio:.1%}" for s in summaries])
        row("throughput (req/s)", ".2f", "throughput_rps", False)
        row("output tokens/s", ".0f", "output_tps", False)
        table.add_row("errors", *[str(s.errors) for s in summaries])
        console.print(table)
        check = Table(title="live run vs the discrete-event simulator on the same slice")
        check.add_column("policy", no_wrap=True)
        for col in ("hit live", "hit DES", "diff pts", "p50 live", "p50 DES", "live/DES"):
            check.add_column(col, justify="right")
        for s in summaries:
            d = des[s.policy]
            ratio = f"{s.ttft_p50 / d.ttft_p50:.2f}x" if d.ttft_p50 else "-"
            check.add_row(s.policy, f"{s.hit_ratio:.1%}", f"{d.hit_ratio:.1%}",
                          f"{100 * (s.hit_ratio - d.hit_ratio):+.1f}", f"{s.ttft_p50:.3f}s",
                          f"{d.ttft_p50:.3f}s", ratio)
        console.print(check)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "demo.json").write_text(json.dumps({
            "config": json.loads(self.model_dump_json()), "summaries": [asdict(s) for s in summaries],
            "des": [asdict(d) for d in des.values()]}, indent=2))
        png = self.out / "demo.png"
        _plot(summaries, raw, self.slo_ttft, png)
        console.print(f"plot: {png}   numbers: {self.out / 'demo.json'}")
        errors = [r.error for rs in raw.values() for r in rs if not r.ok]
        if errors:
            console.print(f"[yellow]{len(errors)} failed requests; first: {errors[0]}[/]")


def _plot(summaries: list[Summary], raw: dict[str, list[Result]], slo: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for s in summaries:
        t = np.sort([r.ttft for r in raw[s.policy] if r.ok])
        if len(t):
            ax1.plot(t, np.arange(1, len(t) + 1) / len(raw[s.policy]), label=s.policy)
    ax1.axvline(slo, color="grey", linestyle="--", linewidth=1, label=f"SLO {slo:g}s")
    ax1.set_xscale("log")
    ax1.set_xlabel("TTFT seen by the client (s)")
    ax1.set_ylabel("fraction of requests")
    ax1.set_title("TTFT CDF")
    ax1.legend()
    ax1.grid(alpha=0.3)
    names = [s.policy for s in summaries]
    x = np.arange(len(names))
    ax2.bar(x - 0.2, [100 * s.slo_attainment for s in summaries], 0.4, label="SLO attainment %")
    ax2.bar(x + 0.2, [100 * s.hit_ratio for s in summaries], 0.4, label="prefix-hit ratio %")
    ax2.set_xticks(x, names)
    ax2.set_ylim(0, 105)
    ax2.set_title("SLO attainment and cache hits")
    ax2.legend()
    ax2.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
