"""``tandem bench offload-live``: cross-datacenter offload through the gateway, over a real shaped link.

The remote prefill pool's engines (``tandem sim``) run in a network namespace of their own, joined
to this one by a veth pair whose egress from the namespace is shaped with ``tbf``
(:mod:`tandem.bench.shaped_link`). Decode engines run here with ``--kv-transport wire``: they pull
each prompt's KV *bytes* from the prefill engine over HTTP, so a remote prefill's KV really
crosses the shaped link and takes the time the link gives it (the local prefills' KV crosses
loopback). The gateway routes as in production: it measures the link from the transfers it sees
(hand-off to the decode's first byte), re-solves the offload threshold from that, and picks each
request's side.

Phases, each through a fresh gateway on the same engines, the same requests (own prefix ids) at
the same Poisson arrival rate:

* ``homogeneous``: every prefill on the local pool (the whole budget as local engines);
* ``naive``: every prefill on the remote pool (the budget at the remote GPU's price);
* ``selective``: half the budget each side, the gateway's offload controller deciding;
* ``tracking``: selective again, with the shaped rate changed (``tc qdisc change``) halfway: the
  gateway's measured link capacity and threshold are sampled from ``/admin/offload`` every 0.5 s,
  the link's own byte counter (``tc -s``) every 0.5 s.

Engines keep simulated GPU time on the wall clock (profiles with Llama-3-8B's H20 and H200
prefill coefficients and a small model shape, so KV is 256 B per token and the link can bind
at tens of Mbit/s on a 2-core machine). Decode engines are the same in every phase and not part of
the budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from tandem.bench.pd import lognormal_mix
from tandem.bench.shaped_link import LinkUnavailable, ShapedLink, unavailable
from tandem.bench.stats import quantile
from tandem.config import TandemSettings
from tandem.perf.profile import ModelShape, Profile, load_profile

# A small model shape: 4 layers, 2 KV heads of 8 dims, bf16 -> 2 x 4 x 2 x 8 x 2 = 256 B of KV per token.
LIVE_MODEL = ModelShape(name="live-4l", num_layers=4, hidden_size=256, num_attention_heads=4, num_kv_heads=2,
                        head_dim=8, intermediate_size=512, vocab_size=1024, max_model_len=131072)
PHASES = ("homogeneous", "naive", "selective", "tracking")


def live_profiles(directory: Path) -> tuple[Path, Path]:
    """(local, remote) profile files: H20 and H200 prefill/decode coefficients on the small shape."""
    out = []
    for name, base in (("live-local", "llama3-8b-h20"), ("live-remote", "llama3-8b-h200")):
        src = load_profile(base)
        prof = Profile(name=name, source=src.source, model=LIVE_MODEL, gpu=src.gpu, params=src.params,
                       kv_block_size=src.kv_block_size, max_num_seqs=src.max_num_seqs,
                       max_num_batched_tokens=src.max_num_batched_tokens)
        path = directory / f"{name}.json"
        path.write_text(prof.model_dump_json(indent=2))
        out.append(path)
    return out[0], out[1]


@dataclass
class Sample:
    """One request as the client saw it."""

    sent: float
    prompt_tokens: int
    status: int = 0
    ttft: float | None = None
    done: float | None = None
    route: str = ""


@dataclass
class PhaseResult:
    name: str
    samples: list[Sample]
    wall_s: float
    link_bytes: int
    link_windows: list[float]  # utilisation of each ~2 s window, from the qdisc's byte counter
    offload: list[dict[str, Any]] = field(default_factory=list)  # /admin/offload samples
    changed_at: float | None = None


class OffloadLiveBench(TandemSettings):
    """Homogeneous vs naive vs selective offload through the gateway, over a tbf-shaped veth link."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_BENCH_OFFLOAD_LIVE_")

    rate_mbit: float = Field(50.0, gt=0, le=10_000, description="shaped link rate (remote to local), Mbit/s")
    change_to_mbit: float = Field(16.0, gt=0, le=10_000, description="tracking phase: rate set halfway through")
    qps: float = Field(5.0, gt=0, le=100, description="Poisson arrival rate of every phase")
    duration_s: float = Field(30.0, gt=1, le=600, description="seconds of arrivals per phase")
    mu: float = Field(8.3, description="log-normal prompt length: mu (truncated to the range)")
    sigma: float = Field(1.0, gt=0, description="log-normal prompt length: sigma")
    min_tokens: int = Field(128, gt=0, description="shortest prompt")
    max_tokens: int = Field(32_768, gt=0, description="longest prompt")
    output_tokens: int = Field(8, gt=0, le=4096, description="tokens decoded per request")
    budget: int = Field(4, ge=2, le=64, description="prefill engines of the homogeneous phase (local units)")
    remote_cost: float = Field(2.0, gt=0, description="a remote engine costs this many local ones")
    decode: int = Field(2, ge=1, le=16, description="decode engines (every phase; not in the budget)")
    slo_ttft: float = Field(5.0, gt=0, description="TTFT SLO (s): goodput counts requests within it")
    phases: str = Field(",".join(PHASES), description="comma-separated phases to run")
    link_window_s: float = Field(5.0, gt=0, description="gateway: window of the link measurement")
    resolve_every_s: float = Field(1.0, gt=0, description="gateway: threshold re-solve period")
    seed: int = Field(0, ge=0)
    logs: Path | None = Field(None, description="directory for the processes' logs (default: a temp dir)")
    json_out: Path | None = Field(None, alias="json", description="write the results as JSON here")

    def cli_cmd(self) -> None:
        why = unavailable()
        if why:
            raise SystemExit(f"tandem bench offload-live: cannot shape a link here: {why}")
        names = [p.strip() for p in self.phases.split(",") if p.strip()]
        if not names or any(p not in PHASES for p in names):
            raise SystemExit(f"tandem bench offload-live: phases: choose from {', '.join(PHASES)}")
        if self.min_tokens >= self.max_tokens:
            raise SystemExit("tandem bench offload-live: min_tokens must be below max_tokens")
        try:
            out = asyncio.run(run_live(self, names))
        except LinkUnavailable as exc:
            raise SystemExit(f"tandem bench offload-live: cannot shape a link here: {exc}") from exc
        print_table(out, self)
        if self.json_out:
            self.json_out.write_text(json.dumps(out, indent=2))


# ----- processes ---------------------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Procs:
    """Child processes, logged to files; all terminated on exit."""

    def __init__(self, logs: Path) -> None:
        self.logs, self.procs = logs, []  # type: ignore[var-annotated]

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        with (self.logs / f"{name}.log").open("ab") as fh:
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=fh)
        self.procs.append((name, proc))
        return proc

    def check(self) -> None:
        for name, p in self.procs:
            if p.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text(errors="replace")[-1500:]
                raise RuntimeError(f"{name} exited with {p.returncode}:\n{tail}")

    def stop(self, proc: subprocess.Popen | None = None) -> None:
        chosen = [(n, p) for n, p in self.procs if proc is None or p is proc]
        for _, p in chosen:
            if p.poll() is None:
                p.terminate()
        for _, p in chosen:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = [(n, p) for n, p in self.procs if (n, p) not in chosen]


def tandem_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "tandem.cli", *args]


async def wait_ready(url: str, procs: Procs, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    async with httpx.AsyncClient(timeout=1.0, trust_env=False) as c:
        while True:
            procs.check()
            with contextlib.suppress(httpx.HTTPError):
                if (await c.get(url)).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not ready after {limit_s:.0f}s")
            await asyncio.sleep(0.2)


@dataclass
class Engines:
    local: list[str]
    remote: list[str]
    decode: list[str]
    local_profile: Path
    remote_profile: Path


async def start_engines(procs: Procs, link: ShapedLink, profiles: tuple[Path, Path], n_local: int, n_remote: int,
                        n_decode: int) -> Engines:
    local_p, remote_p = profiles
    eng = Engines([], [], [], local_p, remote_p)
    for i in range(n_local):
        port = _free_port()
        procs.start(f"local{i}", tandem_argv("sim", "--port", str(port), "--role", "prefill", "--profile",
                                             str(local_p), "--engine-id", f"local{i}"))
        eng.local.append(f"http://127.0.0.1:{port}")
    for i in range(n_remote):  # the namespace is ours alone: fixed ports are free there
        port = 8100 + i
        procs.start(f"remote{i}", link.argv(*tandem_argv("sim", "--host", link.remote_ip, "--port", str(port),
                                                          "--role", "prefill", "--profile", str(remote_p),
                                                          "--engine-id", f"remote{i}")))
        eng.remote.append(f"http://{link.remote_ip}:{port}")
    for i in range(n_decode):
        port = _free_port()
        procs.start(f"decode{i}", tandem_argv("sim", "--port", str(port), "--role", "decode", "--profile",
                                              str(local_p), "--kv-transport", "wire", "--engine-id", f"decode{i}"))
        eng.decode.append(f"http://127.0.0.1:{port}")
    await asyncio.gather(*(wait_ready(u + "/health", procs) for u in eng.local + eng.remote + eng.decode))
    return eng


def gateway_argv(port: int, eng: Engines, local: list[str], remote: list[str], *, link_gbps: float,
                 bench: OffloadLiveBench) -> list[str]:
    args = ["gateway", "--port", str(port), "--decode-instances", ",".join(eng.decode), "--profile",
            str(eng.local_profile), "--remote-profile", str(eng.remote_profile), "--slo-ttft", str(bench.slo_ttft),
            "--remote-link-gbps", f"{link_gbps:g}", "--scrape-interval", "0.5", "--trust-prompt-hints",
            "--offload", json.dumps({"link_window_s": bench.link_window_s, "resolve_every_s": bench.resolve_every_s,
                                     "min_samples": 10, "window": 200})]
    if local:
        args += ["--prefill-instances", ",".join(local)]
    if remote:
        args += ["--remote-prefill-instances", ",".join(remote)]
    return tandem_argv(*args)


# ----- load --------------------------------------------------------------------------------------
def workload(bench: OffloadLiveBench) -> list[tuple[float, int]]:
    """(arrival offset, prompt tokens) of one phase: truncated log-normal lengths, Poisson arrivals."""
    count = max(2, round(bench.qps * bench.duration_s))
    reqs = lognormal_mix(count, mu=bench.mu, sigma=bench.sigma, low=bench.min_tokens, high=bench.max_tokens,
                         output_tokens=bench.output_tokens, seed=bench.seed, tail="truncate")
    return [(r.arrival / bench.qps, r.input_tokens) for r in reqs]


async def one(client: httpx.AsyncClient, url: str, model: str, tokens: int, ids: list[int], out: int,
              sample: Sample) -> None:
    body = {"model": model, "prompt": "offload", "max_tokens": out, "stream": True,
            "x_tandem": {"hash_ids": ids, "prompt_tokens": tokens, "block_size": 512}}
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            sample.status, sample.route = resp.status_code, resp.headers.get("x-tandem-prefill-route", "")
            async for line in resp.aiter_lines():
                if line.startswith("data:") and sample.ttft is None and line.strip() != "data: [DONE]":
                    sample.ttft = time.monotonic() - sample.sent
        sample.done = time.monotonic()
    except httpx.HTTPError:
        sample.status = sample.status or -1


async def run_phase(name: str, gw: str, reqs: list[tuple[float, int]], bench: OffloadLiveBench, link: ShapedLink,
                    id_base: int, change: tuple[float, float] | None = None) -> PhaseResult:
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0, connect=5.0), trust_env=False,
                                 limits=httpx.Limits(max_connections=1000)) as client:
        model = (await client.get(gw + "/v1/models")).json()["data"][0]["id"]
        samples: list[Sample] = []
        offload: list[dict[str, Any]] = []
        windows: list[float] = []
        t0 = time.monotonic()
        bytes0 = link.sent_bytes()
        stop = asyncio.Event()
        changed: list[float] = []

        async def watch() -> None:
            last_t, last_b, last_rate = t0, bytes0, link.rate_mbit
            while not stop.is_set():
                await asyncio.sleep(0.5)
                before = time.monotonic()
                try:
                    sent = await asyncio.to_thread(link.sent_bytes)
                except (subprocess.TimeoutExpired, LinkUnavailable):  # an overloaded machine: skip a sample
                    continue
                now = (before + time.monotonic()) / 2  # the counter was read during the call
                if now - last_t >= 2.0:  # ~2 s windows of the qdisc's counter, against the rate(s) in force
                    at = t0 + changed[0] if changed else now
                    capacity = last_rate * max(0.0, min(at, now) - last_t) \
                        + link.rate_mbit * max(0.0, now - max(at, last_t))
                    windows.append((sent - last_b) * 8 / 1e6 / capacity)
                    last_t, last_b, last_rate = now, sent, link.rate_mbit
                if change is not None and not changed and now - t0 >= change[0]:
                    await asyncio.to_thread(link.set_rate, change[1])
                    changed.append(time.monotonic() - t0)
                with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
                    st = (await client.get(gw + "/admin/offload")).json()["models"][model]
                    offload.append({"t": round(now - t0, 2), "rate_mbit": link.rate_mbit,
                                    "threshold": st["threshold_tokens"], "link_gbps": st["link_gbps"],
                                    "measured_gbps": st["link_measured_gbps"], "egress_gbps": st["link_egress_gbps"],
                                    "committed_bytes": st["link_committed_bytes"], "choices": st["side_choices"],
                                    "transfers": st["link_transfers"]})

        watcher = asyncio.create_task(watch())
        tasks = []
        for k, (at, tokens) in enumerate(reqs):
            delay = t0 + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            ids = [id_base + k * 1000 + j for j in range(max(1, math.ceil(tokens / 512)))]
            s = Sample(time.monotonic(), tokens)
            samples.append(s)
            tasks.append(asyncio.create_task(one(client, gw, model, tokens, ids, bench.output_tokens, s)))
        await asyncio.gather(*tasks)
        wall = time.monotonic() - t0
        stop.set()
        await watcher
        return PhaseResult(name, samples, wall, link.sent_bytes() - bytes0, windows, offload,
                           changed[0] if changed else None)


def summarise(r: PhaseResult, bench: OffloadLiveBench) -> dict[str, Any]:
    ok = [s for s in r.samples if s.status == 200 and s.ttft is not None]
    ttfts = [s.ttft if s.status == 200 and s.ttft is not None else math.inf for s in r.samples]
    first = min(s.sent for s in r.samples)
    last = max((s.done or s.sent) for s in r.samples)
    span = max(1e-9, last - first)
    out: dict[str, Any] = {
        "requests": len(r.samples), "ok": len(ok), "throughput_rps": round(len(ok) / span, 3),
        "goodput_rps": round(sum(1 for s in ok if s.ttft is not None and s.ttft <= bench.slo_ttft) / span, 3),
        "ttft_p50": round(quantile(ttfts, 0.5), 3), "ttft_p90": round(quantile(ttfts, 0.9), 3),
        "offloaded": round(sum(s.route == "remote" for s in ok) / max(1, len(ok)), 3),
        "link_mbytes": round(r.link_bytes / 1e6, 2), "link_util_max": round(max(r.link_windows, default=0.0), 3),
        "link_util_mean": round(statistics.fmean(r.link_windows) if r.link_windows else 0.0, 3),
        "wall_s": round(r.wall_s, 1),
    }
    if r.offload:
        out["threshold_last"] = r.offload[-1]["threshold"]
        out["measured_gbps_last"] = r.offload[-1]["measured_gbps"]
        out["choices"] = r.offload[-1]["choices"]
    if r.changed_at is not None:
        out.update(tracking(r, bench))
    return out


def tracking(r: PhaseResult, bench: OffloadLiveBench) -> dict[str, Any]:
    """How the gateway's view followed the change of the shaped rate."""
    at = r.changed_at or 0.0
    before = [o for o in r.offload if at - bench.link_window_s <= o["t"] < at and o["measured_gbps"]]
    after = [o for o in r.offload if o["t"] >= at]
    new_gbps = bench.change_to_mbit / 1000
    settled = next((o["t"] for o in after if o["measured_gbps"] and o["measured_gbps"] <= 1.25 * new_gbps), None)
    t_before = before[-1]["threshold"] if before else None
    moved = next((o["t"] for o in after if t_before is not None and o["threshold"] != t_before), None)
    tail = [o["measured_gbps"] for o in after if o["t"] >= at + bench.link_window_s and o["measured_gbps"]]
    return {
        "changed_at_s": round(at, 2), "rate_before_mbit": bench.rate_mbit, "rate_after_mbit": bench.change_to_mbit,
        "measured_before_mbit": round(statistics.fmean(o["measured_gbps"] for o in before) * 1000, 2)
        if before else None,
        "measured_after_mbit": round(statistics.fmean(tail) * 1000, 2) if tail else None,
        "measured_settled_after_s": round(settled - at, 2) if settled is not None else None,
        "threshold_before": t_before, "threshold_after": after[-1]["threshold"] if after else None,
        "threshold_moved_after_s": round(moved - at, 2) if moved is not None else None,
        "committed_mbytes_max": round(max((o["committed_bytes"] for o in r.offload), default=0) / 1e6, 2),
    }


async def run_live(bench: OffloadLiveBench, names: list[str]) -> dict[str, Any]:
    reqs = workload(bench)
    n_remote = max(1, round(bench.budget / bench.remote_cost))  # naive: the budget at the remote price
    half_local = max(1, bench.budget // 2)
    half_remote = max(1, round(bench.budget / 2 / bench.remote_cost))
    results: dict[str, Any] = {"phases": {}, "config": {
        **bench.model_dump(mode="json", by_alias=False, exclude={"json_out", "logs"}),
        "requests_per_phase": len(reqs), "mean_prompt": round(statistics.fmean(t for _, t in reqs), 1),
        "kv_bytes_per_token": LIVE_MODEL.kv_bytes_per_token,
        "pools": {"homogeneous": [bench.budget, 0], "naive": [0, n_remote],
                  "selective": [half_local, half_remote]}}}
    with tempfile.TemporaryDirectory(prefix="tandem-offload-live-") as tmp:
        logs = bench.logs or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        procs = Procs(logs)
        with ShapedLink(bench.rate_mbit) as link:
            results["config"]["link"] = {"namespace": link.ns, "local_ip": link.local_ip,
                                         "remote_ip": link.remote_ip}
            try:
                eng = await start_engines(procs, link, live_profiles(Path(tmp)), bench.budget,
                                          max(n_remote, half_remote), bench.decode)
                for k, name in enumerate(names):
                    link.set_rate(bench.rate_mbit)
                    local, remote = {"homogeneous": (eng.local, []), "naive": ([], eng.remote[:n_remote])}.get(
                        name, (eng.local[:half_local], eng.remote[:half_remote]))
                    port = _free_port()
                    gw_proc = procs.start(f"gateway-{name}", gateway_argv(port, eng, local, remote,
                                                                           link_gbps=bench.rate_mbit / 1000,
                                                                           bench=bench))
                    gw = f"http://127.0.0.1:{port}"
                    try:
                        await wait_ready(gw + "/readyz", procs)
                        change = (bench.duration_s / 2, bench.change_to_mbit) if name == "tracking" else None
                        res = await run_phase(name, gw, reqs, bench, link, (k + 1) * 10**9, change)
                    finally:
                        procs.stop(gw_proc)
                    results["phases"][name] = summarise(res, bench)
                    if name == "tracking":
                        results["phases"][name]["timeline"] = res.offload
                    brief = {k2: v for k2, v in results["phases"][name].items() if k2 != "timeline"}
                    print(f"{name}: {json.dumps(brief)}", file=sys.stderr)
            finally:
                procs.stop()
    return results


def print_table(out: dict[str, Any], bench: OffloadLiveBench) -> None:
    from rich.console import Console
    from rich.table import Table

    cfg = out["config"]
    table = Table(title=f"live offload over a {bench.rate_mbit:g} Mbit/s tbf link; {cfg['requests_per_phase']} "
                  f"requests per phase at {bench.qps:g} req/s, mean prompt {cfg['mean_prompt']:,.0f} tokens")
    for col in ("phase", "local+remote", "req/s", f"goodput (TTFT<={bench.slo_ttft:g}s)", "TTFT p50", "TTFT p90",
                "offloaded", "t (last)", "link MB", "link max", "measured Mbit/s"):
        table.add_column(col, justify="right")
    for name, r in out["phases"].items():
        pools = cfg["pools"].get("selective" if name == "tracking" else name, ["-", "-"])
        meas = r.get("measured_gbps_last")
        table.add_row(name, f"{pools[0]}+{pools[1]}", f"{r['throughput_rps']:.2f}", f"{r['goodput_rps']:.2f}",
                      f"{r['ttft_p50']:.2f}", f"{r['ttft_p90']:.2f}", f"{r['offloaded']:.2f}",
                      str(r.get("threshold_last", "-")), f"{r['link_mbytes']:.1f}", f"{r['link_util_max']:.2f}",
                      f"{meas * 1000:.1f}" if meas else "-")
    Console(width=160).print(table)
    if "tracking" in out["phases"]:
        tr = out["phases"]["tracking"]
        Console(width=160).print(
            f"tracking: rate {tr['rate_before_mbit']:g} -> {tr['rate_after_mbit']:g} Mbit/s at "
            f"{tr['changed_at_s']:.1f}s; gateway measured {tr['measured_before_mbit']} -> {tr['measured_after_mbit']} "
            f"Mbit/s (settled {tr['measured_settled_after_s']} s after); threshold {tr['threshold_before']} -> "
            f"{tr['threshold_after']} (moved {tr['threshold_moved_after_s']} s after); link max "
            f"{tr['link_util_max']:.2f} of the rate in 2 s windows")
