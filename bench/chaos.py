"""``tandem bench chaos``: a soak under faults that proves nothing is lost and nothing is doubled.

Real processes on loopback ports: ``engines`` simulators, a redis-server, and two gateways sharing
it. ``clients`` streaming clients (each: a request, a think time, the next) run for ``duration``
seconds while a fixed schedule of faults plays, one phase each: an engine killed (then restarted on
its port), one hung (accepts, never answers), one slowed x10, one answering 500, Redis restarted,
and one gateway restarted (SIGTERM: it drains; its clients fail over to the other gateway).

A client fails over to the other gateway only when its gateway did not take the request
(connection refused, or 503 "shutting down"), so a failover can never run a request twice. Every
response is checked: a completion is a 200 stream with exactly one final chunk and one ``[DONE]``;
a stream with more is *duplicated*; no full answer within ``timeout`` seconds is *lost*.

The bookkeeping (:class:`Tally`, :func:`phase_plan`, :func:`parse_stream`) is pure and unit-tested;
the rest is the I/O shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, Field
from pydantic_settings import SettingsConfigDict

from tandem.bench.harness import HarnessError, Process, RedisServer, restartable_port, tandem_argv
from tandem.bench.stats import quantile
from tandem.config import TandemSettings

PHASES = ("baseline", "engine_killed", "engine_hung", "engine_slow", "engine_5xx", "redis_restart",
          "gateway_restart", "recovery")


def phase_plan(duration: float) -> list[tuple[float, str]]:
    """(start offset in seconds, phase) for every phase: equal slices of the run."""
    step = duration / len(PHASES)
    return [(i * step, name) for i, name in enumerate(PHASES)]


def phase_at(plan: list[tuple[float, str]], offset: float) -> str:
    """The phase at ``offset``; a fault phase is split into its first half (``:during``, the fault is
    on) and its second (``:after``, cleared: recovery and re-admission)."""
    name, begin = plan[0][1], 0.0
    for start, phase in plan:
        if offset >= start:
            name, begin = phase, start
    if name in ("baseline", "recovery"):
        return name
    step = plan[1][0] if len(plan) > 1 else float("inf")
    return f"{name}:{'during' if offset - begin < step / 2 else 'after'}"


def phase_labels() -> list[str]:
    return [p if p in ("baseline", "recovery") else f"{p}:{half}" for p in PHASES for half in ("during", "after")
            if p not in ("baseline", "recovery") or half == "during"]


@dataclass(slots=True)
class StreamCheck:
    """What one SSE body says: how many final chunks and [DONE] markers, and whether it carried an error."""

    finishes: int = 0
    done_markers: int = 0
    error: str | None = None


def parse_stream(body: bytes) -> StreamCheck:
    out = StreamCheck()
    for line in body.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            out.done_markers += 1
            continue
        try:
            event = json.loads(data)
        except ValueError:
            out.error = out.error or "malformed_event"
            continue
        if not isinstance(event, dict):
            out.error = out.error or "malformed_event"
        elif "error" in event:
            out.error = out.error or "stream_error"
        else:
            out.finishes += sum(1 for c in event.get("choices") or [] if c.get("finish_reason"))
    return out


Outcome = str  # "completed" | "duplicated" | "lost" | a failure label ("500", "503", "stream_error", ...)


@dataclass
class Tally:
    """Every logical request's outcome, by the phase it was sent in."""

    outcomes: Counter[Outcome] = field(default_factory=Counter)
    ttft: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    failovers: int = 0
    sent: int = 0
    longest: dict[str, float] = field(default_factory=dict)  # phase -> longest request (s), whatever its end

    def record(self, phase: str, outcome: Outcome, ttft: float | None, duration: float | None = None) -> None:
        self.outcomes[outcome] += 1
        if ttft is not None and outcome == "completed":
            self.ttft[phase].append(ttft)
        if duration is not None:
            self.longest[phase] = max(self.longest.get(phase, 0.0), duration)

    def report(self) -> dict:
        failed = {k: v for k, v in sorted(self.outcomes.items()) if k not in ("completed", "duplicated", "lost")}
        out = {
            "sent": self.sent,
            "completed": self.outcomes["completed"],
            "failed_by_status": failed,
            "lost": self.outcomes["lost"],
            "duplicated": self.outcomes["duplicated"],
            "ttft_p99_by_phase": {p: round(quantile(v, 0.99) * 1000, 1)
                                  for p in phase_labels() if (v := self.ttft.get(p))},
            "failovers": self.failovers,
            "max_request_s": round(max(self.longest.values(), default=0.0), 2),
            "max_request_s_by_phase": {p: round(self.longest[p], 2) for p in phase_labels() if p in self.longest},
        }
        p99 = out["ttft_p99_by_phase"]
        if p99.get("baseline"):  # the same run's fault-free phase is the yardstick
            out["ttft_p99_vs_baseline"] = {k: round(v / p99["baseline"], 2) for k, v in p99.items()}
        return out


def classify(status: int | None, check: StreamCheck | None) -> Outcome:
    """The outcome of one answered request (``status`` None: the connection broke mid-answer)."""
    if status is None:
        return "disconnected"
    if status != 200:
        return str(status)
    assert check is not None
    if check.finishes > 1 or check.done_markers > 1:
        return "duplicated"
    if check.error:
        return check.error
    if check.finishes == 1 and check.done_markers == 1:
        return "completed"
    return "truncated"


class InstanceTimes(BaseModel):
    fault: str
    instance: str
    eject_s: float | None = Field(description="fault applied -> the gateway stopped routing to it (None: never)")
    readmit_s: float | None = Field(description="fault cleared -> routable again (None: not within the phase)")


# --- the I/O shell -----------------------------------------------------------------------------


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class BenchChaosCommand(TandemSettings):
    """Soak under faults (engine killed/hung/slow/5xx, Redis and gateway restarts): 0 lost, 0 duplicated."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_BENCH_CHAOS_")

    duration: float = Field(80.0, gt=0, description="seconds of load; the fault phases split it evenly")
    clients: int = Field(200, gt=0, le=20_000, description="concurrent streaming clients (sized for 2 cores; "
                         "the soak target is 1000)")
    engines: int = Field(5, ge=4, le=64, description="simulated engines (four get a fault, one stays clean)")
    think_time: float = Field(1.0, ge=0, description="mean pause between a client's requests (s, exponential)")
    max_tokens: int = Field(16, gt=0, description="output tokens per request")
    timeout: float = Field(30.0, gt=0, description="a request without a full answer by then is lost (s)")
    seed: int = Field(0, description="seed of the clients' think times")
    out: Path = Field(Path("out/chaos"), description="directory for the process logs")
    json_out: Path | None = Field(None, alias="json", description="write the report as JSON here")

    def cli_cmd(self) -> None:
        if shutil.which("redis-server") is None:
            raise SystemExit("tandem bench chaos: redis-server not found (make test installs it)")
        try:
            import uvloop
        except ImportError:
            uvloop = None
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            report = (uvloop.run if uvloop else asyncio.run)(_Chaos(self).run())
        except HarnessError as exc:
            raise SystemExit(f"tandem bench chaos: {exc}") from exc
        text = json.dumps(report, indent=2)
        if self.json_out:
            self.json_out.parent.mkdir(parents=True, exist_ok=True)
            self.json_out.write_text(text)
        print(text)
        if report["lost"] or report["duplicated"]:
            raise SystemExit(1)


class _Chaos:
    def __init__(self, cfg: BenchChaosCommand) -> None:
        self.cfg = cfg
        self.tally = Tally()
        self.plan = phase_plan(cfg.duration)
        self.t0 = 0.0
        self.ids = itertools.count()
        self.routable: dict[str, bool] = {}
        self.times: list[InstanceTimes] = []
        # Every process is restarted on its port during the run: ports below the ephemeral range.
        self.redis = RedisServer(cfg.out / "redis.log", port=restartable_port())
        self.engine_urls: list[str] = []
        self.engines: list[Process] = []
        for i in range(cfg.engines):
            port = restartable_port()
            self.engine_urls.append(f"http://127.0.0.1:{port}")
            self.engines.append(Process(f"engine {i}", tandem_argv("sim", "--port", str(port), "--seed", str(i),
                                                                   "--metrics", "sglang" if i % 2 else "vllm"),
                                        cfg.out / f"engine-{i}.log"))
        self.gw_urls: list[str] = []
        self.gateways: list[Process] = []
        for i in range(2):
            port = restartable_port()
            self.gw_urls.append(f"http://127.0.0.1:{port}")
            self.gateways.append(Process(f"gateway {i}", tandem_argv(
                # The gateways' defaults throughout (timeouts, breaker, queues, drain): what the soak shows
                # is what a production install gets.
                "gateway", "--port", str(port), "--instances", ",".join(self.engine_urls),
                "--redis-url", self.redis.url), cfg.out / f"gateway-{i}.log"))

    def phase(self) -> str:
        return phase_at(self.plan, time.monotonic() - self.t0)

    async def run(self) -> dict:
        import aiohttp

        procs = [self.redis, *self.engines, *self.gateways]
        for p in procs:
            p.start()
        try:
            connector = aiohttp.TCPConnector(limit=0, force_close=False)
            async with aiohttp.ClientSession(connector=connector) as session:
                for url, engine in zip(self.engine_urls, self.engines, strict=True):
                    await engine.until_http(url + "/health")
                for url, gateway in zip(self.gw_urls, self.gateways, strict=True):
                    await gateway.until_http(url + "/readyz")
                model = (await (await session.get(self.engine_urls[0] + "/v1/models")).json())["data"][0]["id"]
                rss_start = _rss_mb(self.gateways[1].pid)
                self.t0 = time.monotonic()
                stop = self.t0 + self.cfg.duration
                monitor = asyncio.create_task(self._monitor(session))
                faults = asyncio.create_task(self._faults(session))
                rng = random.Random(self.cfg.seed)
                clients = asyncio.gather(*(self._client(session, model, i, stop, random.Random(rng.random()))
                                           for i in range(self.cfg.clients)))
                await asyncio.wait((clients, faults), return_when=asyncio.FIRST_COMPLETED)
                if faults.done() and not faults.cancelled() and faults.exception() is not None:
                    # A fault was not applied or not undone (a restarted process did not come back): void run.
                    clients.cancel()
                    monitor.cancel()
                    await asyncio.gather(clients, monitor, return_exceptions=True)
                    raise faults.exception()
                await clients
                faults.cancel()
                monitor.cancel()
                await asyncio.gather(faults, monitor, return_exceptions=True)
                rss_end = _rss_mb(self.gateways[1].pid)
        finally:
            for p in procs:
                p.stop()
        report = self.tally.report()
        report.update({"rss_mb_start": round(rss_start, 1), "rss_mb_end": round(rss_end, 1),
                       "eject_readmit": [t.model_dump() for t in self.times],
                       "gateway_timeouts": _gateway_timeouts(),
                       "config": {"duration": self.cfg.duration, "clients": self.cfg.clients,
                                  "engines": self.cfg.engines, "think_time": self.cfg.think_time,
                                  "max_tokens": self.cfg.max_tokens, "timeout": self.cfg.timeout,
                                  "cpus": os.cpu_count()}})
        return report

    # --- clients --------------------------------------------------------------------------------

    async def _client(self, session: object, model: str, i: int, stop: float, rng: random.Random) -> None:
        await asyncio.sleep(rng.random() * min(2.0, self.cfg.duration / 10))  # spread the start
        home = i % 2
        while time.monotonic() < stop:
            rid = next(self.ids)
            phase = self.phase()
            # 16 shared prefixes so routing has cache affinity to keep and lose.
            prompt = f"system prompt {i % 16} " * 40 + f"question {rid}"
            body = json.dumps({"model": model, "prompt": prompt, "max_tokens": self.cfg.max_tokens,
                               "stream": True}).encode()
            self.tally.sent += 1
            t0 = time.monotonic()
            outcome, ttft = await self._one(session, body, home)
            self.tally.record(phase, outcome, ttft, time.monotonic() - t0)
            await asyncio.sleep(rng.expovariate(1 / self.cfg.think_time) if self.cfg.think_time else 0)

    async def _one(self, session: object, body: bytes, home: int) -> tuple[Outcome, float | None]:
        import aiohttp

        t0 = time.monotonic()
        deadline = t0 + self.cfg.timeout
        order = [home, 1 - home]
        attempt = 0
        while True:
            gw = self.gw_urls[order[attempt % 2]]
            left = deadline - time.monotonic()
            if left <= 0:
                return "lost", None
            ttft = None
            try:
                async with asyncio.timeout(left):
                    async with session.post(gw + "/v1/completions", data=body,
                                            headers={"content-type": "application/json"}) as resp:
                        if resp.status == 503 and "shutting down" in await resp.text():
                            raise _NotTaken
                        if resp.status != 200:
                            await resp.read()
                            return classify(resp.status, None), None
                        parts = []
                        async for chunk in resp.content.iter_any():
                            if ttft is None:
                                ttft = time.monotonic() - t0
                            parts.append(chunk)
                        return classify(200, parse_stream(b"".join(parts))), ttft
            except TimeoutError:
                return "lost", None
            except (_NotTaken, aiohttp.ClientConnectorError):
                # The gateway did not take the request (restarting): the other one may.
                self.tally.failovers += 1
                attempt += 1
                await asyncio.sleep(min(0.05 * attempt, 0.5))
            except (aiohttp.ClientError, OSError):
                return "disconnected", ttft

    # --- faults and measurements ----------------------------------------------------------------

    async def _monitor(self, session: object) -> None:
        """Which engines the surviving gateway routes to, every 100 ms."""
        while True:
            with contextlib.suppress(Exception):  # a missed poll is just a gap in the timeline
                async with session.get(self.gw_urls[1] + "/admin/instances") as resp:
                    for inst in (await resp.json())["instances"]:
                        self.routable[inst["url"]] = (inst["breaker"] == "closed" and not inst["suspect"]
                                                      and not inst["draining"])
            await asyncio.sleep(0.1)

    async def _wait_routable(self, url: str, want: bool, limit: float) -> float | None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit:
            if self.routable.get(url) is want:
                return time.monotonic() - t0
            await asyncio.sleep(0.05)
        return None

    async def _until(self, offset: float) -> None:
        await asyncio.sleep(max(0.0, self.t0 + offset - time.monotonic()))

    async def _engine_fault(self, session: object, idx: int, fault: str, end: float) -> None:
        url, proc = self.engine_urls[idx], self.engines[idx]
        if fault == "crash":
            proc.signal(signal.SIGKILL)
        else:
            payload = {"mode": {"hang": "hang", "slow": "slow", "error": "error"}[fault], "slowdown": 10.0,
                       "error_rate": 1.0}
            async with session.post(url + "/admin/fault", json=payload) as resp:
                resp.raise_for_status()
        limit = max(0.5, end - (time.monotonic() - self.t0) - 0.5)
        eject = await self._wait_routable(url, False, limit)
        await self._until(end - self.plan[1][0] / 2)  # the fault lasts half the phase; re-admission the rest
        if fault == "crash":
            proc.start()
            await proc.until_http(url + "/health")
        else:
            async with session.post(url + "/admin/fault", json={"mode": "none"}) as resp:
                resp.raise_for_status()
        # Never ejected (a slow engine is still an engine): nothing to re-admit.
        readmit = await self._wait_routable(url, True, self.cfg.duration) if eject is not None else None
        self.times.append(InstanceTimes(fault=fault, instance=url, eject_s=_r(eject), readmit_s=_r(readmit)))

    async def _faults(self, session: object) -> None:
        starts = dict((name, start) for start, name in self.plan)
        step = self.plan[1][0]
        for phase, idx, fault in (("engine_killed", 0, "crash"), ("engine_hung", 1, "hang"),
                                  ("engine_slow", 2, "slow"), ("engine_5xx", 3, "error")):
            await self._until(starts[phase])
            await self._engine_fault(session, idx, fault, starts[phase] + step)
        await self._until(starts["redis_restart"])
        self.redis.signal(signal.SIGKILL)
        await self.redis.exit_within(5)
        await asyncio.sleep(min(2.0, step / 3))
        self.redis.start()
        await self._until(starts["gateway_restart"])
        gw = self.gateways[0]
        gw.signal(signal.SIGTERM)  # a rolling restart: it drains, its clients fail over to the other
        await gw.exit_within(self.cfg.timeout + 10)
        gw.start()
        await gw.until_http(self.gw_urls[0] + "/readyz")


def _gateway_timeouts() -> dict[str, float]:
    """The gateways' default timeouts (the soak runs them unchanged): the bounds its requests keep."""
    from tandem.router.settings import GatewaySettings

    fields = GatewaySettings.model_fields
    return {name: fields[name].default for name in ("connect_timeout", "first_byte_timeout", "stream_idle_timeout",
                                                     "request_timeout", "queue_timeout", "max_attempts",
                                                     "breaker_cooldown", "drain_timeout")}


class _NotTaken(Exception):
    """The gateway answered that it is shutting down: the request was not started anywhere."""


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 2)
