"""Observations of several gateway replicas (docs/gateway.md, "Observations for the autoscaler").

* Pure: real :class:`Observer` objects fed the same requests, once whole and once split between two
  replicas whose monotonic clocks differ; the merged counts build exactly the report of the whole.
  Engine gauges seen by both replicas are taken once.
* Live: two real gateways sharing Redis (as the chart runs several replicas) in front of one
  simulated engine; the autoscaler's own source adds their traffic up, takes each one's own
  in-flight requests (not the peers' share Redis folds in), leaves out a replica that is down or
  silent and says so, and fails when none answers.
* Workers: ``tandem gateway --workers 2`` answers for both workers, whichever takes the call.
* Discovery: the gateway replicas are found as pods by label selector in kmock's API server.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from gatewayutil import ROOT, RedisServer, free_port, sim_app, until
from kubeutil import kmock_kubeconfig
from test_gateway_observations import MODEL, ext_body, gateway_app  # a gateway that trusts ext_body's hints

from tandem.api.observations import (
    InstanceLoad,
    ObservationCounts,
    Observations,
    OffloadCounts,
    build_report,
    merge_counts,
)
from tandem.autoscaler.actuator import (
    PODS,
    GatewayCoverage,
    GatewayObservationSource,
    KubernetesGateways,
    ObservationUnavailable,
    gateway_urls,
    parse_label_selector,
)
from tandem.kube import KubeClient, load_credentials
from tandem.router.observations import Observer
from tandem.serve import serving

# Output tokens of a stream that outlasts the test (~40 s; the test leaves it after its first chunk).
ENDLESS = 5000

# --- pure: split requests, merged counts == one replica that saw them all -----------------------


@dataclass(frozen=True)
class Req:
    """One request's life, in wall-clock seconds (times are multiples of 1/4: sums stay exact)."""

    t: float
    role: str
    prompt: int
    hit: int
    wait: float | None  # left the gateway's queue after this long (None: never routed)
    prefill: float | None  # disaggregated: the prefill leg answered
    first: float | None
    end: float
    outcome: str  # ok, whole (non-streamed ok), or an error outcome
    out: int


def script(seed: int = 7) -> list[Req]:
    rng = random.Random(seed)
    reqs = []
    for k in range(160):
        t = (40.0 if k < 40 else 100.0) + 0.25 * k  # 40 finish long before the window, then a busy minute
        role = rng.choice(["unified", "unified", "prefill"])
        prompt = rng.choice([300, 1200, 5000, 20000])
        wait = rng.choice([0.0, 0.25, 0.5, None] if k % 9 else [None])
        outcome = rng.choice(["ok", "ok", "ok", "whole", "engine_error", "client_gone"]) if wait is not None \
            else "overloaded"
        first = None if wait is None or outcome == "whole" or k % 7 == 0 else wait + rng.choice([0.25, 0.75, 2.0])
        prefill = wait + rng.choice([0.25, 1.5]) if role == "prefill" and wait is not None else None
        end = max(x for x in (wait, prefill, first, 0.0) if x is not None) + rng.choice([0.5, 4.0, 8.0])
        reqs.append(Req(t, role, prompt, rng.choice([0, 512, 1024]) if wait is not None else 0, wait, prefill,
                        first, end, outcome, rng.choice([1, 20, 300])))
    return reqs


def play(obs: Observer, reqs: list[Req], offset: float, until: float) -> None:
    """Feed ``obs`` the requests' events up to wall time ``until`` in time order, on a monotonic clock
    ``offset`` s behind the wall (what has not ended by then is in flight)."""
    events: list[tuple[float, int, int, str]] = []
    for i, r in enumerate(reqs):
        for step, (name, at) in enumerate((("arrive", 0.0), ("route", r.wait), ("prefill", r.prefill),
                                           ("first", r.first), ("end", r.end))):
            if at is not None and r.t + at <= until:
                events.append((r.t + at, i, step, name))
    traces: dict[int, Any] = {}
    for at, i, _, name in sorted(events):
        r, now = reqs[i], at - offset
        if name == "arrive":
            traces[i] = obs.arrived("svc", r.role, r.prompt, now)  # type: ignore[arg-type]
        elif name == "route":
            obs.routed(traces[i], r.hit, now)
        elif name == "prefill":
            obs.prefill_done(traces[i], now)
        elif name == "first":
            obs.first_token(traces[i], now)
        elif r.outcome == "whole":
            obs.finished(traces[i], r.out, now, streamed=False)
        else:
            obs.ended(traces[i], r.outcome, r.out, now)


def engines(share: tuple[int, int], age: float) -> list[InstanceLoad]:
    """The engines as one replica sees them: ``share`` = (its queued, its in-flight) on each; the
    engine's own gauges are the same for every replica (one scrape of one engine)."""
    queued, inflight = share

    def one(pod: str, role: str, **kw: Any) -> InstanceLoad:
        fields = {"routable": True, "draining": False, "queued": queued, "inflight": inflight,
                  "engine_waiting": 3, "kv_usage": 0.5, **kw}
        return InstanceLoad(service="svc", role=role, pod=pod, scrape_age_s=age, **fields)

    return [one("u-0", "unified"), one("u-1", "unified", draining=True, routable=False, kv_usage=0.9),
            one("p-0", "prefill", engine_waiting=7, kv_usage=0.25), one("d-0", "decode", inflight=2 * inflight),
            InstanceLoad(service="other", role="unified", pod="o-0", routable=True, draining=False, queued=5,
                         inflight=5, engine_waiting=5, kv_usage=1.0)]


# the busy stretch's end; one bucket; more than the horizon (clamped)
@pytest.mark.parametrize(("window", "now"), [(20.0, 135.0), (1.0, 120.0), (5000.0, 160.0)])
def test_merged_replicas_report_what_one_replica_seeing_everything_reports(window: float, now: float) -> None:
    reqs = script()
    rng = random.Random(1)
    split = [rng.random() < 0.35 for _ in reqs]
    a_reqs = [r for r, s in zip(reqs, split, strict=True) if s]
    b_reqs = [r for r, s in zip(reqs, split, strict=True) if not s]
    # Different processes, different monotonic clocks: each Observer knows its own offset to the wall.
    new = {"slo_ttft_s": 1.0, "slo_tpot_s": 0.1, "attainable_tokens": 4096, "horizon_s": 120.0}
    whole, a, b = Observer(**new), Observer(**new, clock_offset_s=1000.5), Observer(**new, clock_offset_s=-55.25)
    play(whole, reqs, 0.0, now)  # now: wall clock, as the autoscaler sends it
    play(a, a_reqs, 1000.5, now)
    play(b, b_reqs, -55.25, now)
    truth = whole.counts("svc", window, now, engines((3, 3), 0.5))
    parts = [a.counts("svc", window, now - 1000.5, engines((1, 2), 0.5)),
             b.counts("svc", window, now + 55.25, engines((2, 1), 2.0))]
    assert all(p.arrivals > 0 for p in parts) and truth.ttft_n > 0 and truth.prefill_n > 0
    merged = merge_counts(parts)
    assert merged.model_dump(exclude={"instances"}) == truth.model_dump(exclude={"instances"})
    assert build_report(merged, 7.0) == whole.report("svc", window, now, engines((3, 3), 0.5), time_s=7.0)
    o = Observations.model_validate(build_report(merged, 7.0)["observations"])
    alone = [Observations.model_validate(build_report(p, 7.0)["observations"]) for p in parts]
    assert o.arrival_rate == pytest.approx(sum(x.arrival_rate for x in alone))  # not one replica's share
    assert o.roles["unified"].queue_depth == 3 + 3  # queues added (1 + 2), the engine's waiting 3 once
    assert (o.roles["unified"].ready, o.roles["unified"].draining) == (1, 1)
    assert o.roles["unified"].kv_usage == 0.5 and o.roles["prefill"].queue_depth == 3 + 7


def test_horizon_mix_is_the_fallback_of_the_merge_too() -> None:
    """A window in which nothing finished reports the horizon's mix; merged, it is the sum of the
    replicas' horizons, and one replica's finished request in the window takes precedence."""
    new = {"slo_ttft_s": 1.0, "slo_tpot_s": 0.1, "attainable_tokens": 4096, "horizon_s": 60.0}
    a, b = Observer(**new), Observer(**new)
    for obs, prompt in ((a, 1000), (b, 3000)):
        t = obs.arrived("svc", "unified", prompt, 10.0)
        obs.finished(t, 50, 11.0)
    quiet = [obs.counts("svc", 5.0, 40.0, []) for obs in (a, b)]
    assert not any(c.mix for c in quiet) and all(c.horizon_mix for c in quiet)
    mix = Observations.model_validate(build_report(merge_counts(quiet), 0.0)["observations"]).length_mix
    assert [(m.input_tokens, m.weight) for m in mix] == [(1000, 0.5), (3000, 0.5)]
    t = b.arrived("svc", "unified", 200, 39.0)
    b.finished(t, 10, 39.5)
    mixed = merge_counts([a.counts("svc", 5.0, 40.0, []), b.counts("svc", 5.0, 40.0, [])])
    assert mixed.horizon_mix == [] and [(m.prompt_tokens, m.count) for m in mixed.mix] == [(200, 1)]


def test_offload_of_replicas_merges_into_what_the_autoscaler_sizes_with() -> None:
    """The threshold in force is the largest replica's (most prefill left local); each replica's backlog
    at the remote pool and other models' link traffic are its own and add up; a replica without a
    remote pool adds nothing; the report turns the backlog into seconds per remote instance."""
    new = {"slo_ttft_s": 1.0, "slo_tpot_s": 0.1, "attainable_tokens": 4096}
    a, b, c = (Observer(**new).counts("svc", 5.0, 40.0, []) for _ in range(3))
    a = a.model_copy(update={"offload": OffloadCounts(threshold_tokens=8192, remote_instances=4,
                                                      remote_queue_tokens=30_000, remote_per_token_s=1e-4,
                                                      link_other_gbps=1.5)})
    b = b.model_copy(update={"offload": OffloadCounts(threshold_tokens=12288, remote_instances=4,
                                                      remote_queue_tokens=10_000, remote_per_token_s=1e-4,
                                                      link_other_gbps=0.5)})
    merged = merge_counts([a, b, c]).offload
    assert merged == OffloadCounts(threshold_tokens=12288, remote_instances=4, remote_queue_tokens=40_000,
                                   remote_per_token_s=1e-4, link_other_gbps=2.0)
    obs = Observations.model_validate(build_report(merge_counts([a, b, c]), 0.0)["observations"])
    assert obs.offload_threshold == 12288
    assert obs.remote_queue_s == pytest.approx(40_000 * 1e-4 / 4)
    assert obs.link_other_gbps == 2.0
    plain = Observations.model_validate(build_report(c, 0.0)["observations"])
    assert (plain.offload_threshold, plain.remote_queue_s, plain.link_other_gbps) == (None, 0.0, 0.0)


def test_engine_gauges_come_from_the_freshest_scrape_and_views_of_one_pod_fold() -> None:
    def view(age: float | None, **kw: Any) -> ObservationCounts:
        fields = {"routable": True, "draining": False, "queued": 1, "inflight": 1, "engine_waiting": 0,
                  "kv_usage": 0.0, **kw}
        return ObservationCounts(service="svc", window_s=10.0, bucket_s=1.0, arrivals=5, instances=[
            InstanceLoad(service="svc", role="unified", pod="u-0", scrape_age_s=age, **fields)])

    fresh = view(0.2, engine_waiting=4, kv_usage=0.6)
    stale = view(3.0, engine_waiting=9, kv_usage=0.2, queued=2, draining=True)  # it has seen the drain
    never = view(None, engine_waiting=50, kv_usage=1.0, routable=False)  # never scraped it
    for order in ([fresh, stale, never], [never, stale, fresh], [stale, never, fresh]):
        merged = merge_counts(order)
        (inst,) = merged.instances
        assert (inst.engine_waiting, inst.kv_usage, inst.scrape_age_s) == (4, 0.6, 0.2)
        assert (inst.queued, inst.inflight, inst.draining, inst.routable) == (4, 3, True, True)
        assert merged.arrivals == 15
    report = build_report(merge_counts([fresh, never]), 0.0)
    role = report["observations"]["roles"]["unified"]
    assert (role["ready"], role["queue_depth"], role["kv_usage"]) == (1, 2 + 4, 0.6)
    assert report["inflight"] == {"u-0": 2}
    assert merge_counts([fresh]) == fresh
    assert merge_counts([fresh.model_copy(update={"missing": ["worker 1"]}), stale,
                         never.model_copy(update={"missing": ["worker 3"]})]).missing == ["worker 1", "worker 3"]
    with pytest.raises(ValueError, match="window"):
        merge_counts([fresh, fresh.model_copy(update={"window_s": 20.0})])
    with pytest.raises(ValueError, match="nothing"):
        merge_counts([])


# --- live: two real gateways sharing Redis --------------------------------------------------------


@pytest.fixture
def redis_server() -> Any:
    server = RedisServer()
    yield server
    server.kill()


@pytest.fixture
async def silent_replica() -> AsyncIterator[str]:
    """A 'gateway' that accepts connections and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        for w in held:
            w.close()
        server.close()


async def test_source_adds_up_live_gateway_replicas(redis_server: RedisServer, silent_replica: str) -> None:
    async with serving(sim_app(port=0)) as engine, \
            serving(gateway_app([engine], redis_url=redis_server.url, state_sync_interval=0.05)) as g1, \
            serving(gateway_app([engine], redis_url=redis_server.url, state_sync_interval=0.05)) as g2, \
            httpx.AsyncClient(timeout=30) as c:
        window = 60.0  # the gateways are new: every request is in it
        for i in range(9):  # 6 through one replica, 3 through the other
            r = await c.post((g2 if i % 3 == 0 else g1) + "/v1/completions", json=ext_body([1, 2, i]))
            assert r.status_code == 200

        one, both = GatewayObservationSource(g1), GatewayObservationSource([g1, g2])
        try:
            alone = await one.report("default", MODEL, window, 5.0)
            rep = await both.report("default", MODEL, window, 5.0)
            assert alone.observations.arrival_rate == pytest.approx(6 / window)  # what one replica sees
            assert rep.observations.arrival_rate == pytest.approx(9 / window)
            assert rep.observations.completed == 9 and rep.observations.roles["unified"].ready == 1
            assert rep.gateways == GatewayCoverage(answered=2, failed=[])
            # a replica reporting on itself: /admin/observations is the same builder on its own counts
            # (asked again when a scrape changed an engine's gauges between the two questions)
            async def same_report() -> bool:
                own = (await c.get(g1 + "/admin/observations", params={"service": MODEL, "window": window,
                                                                       "now": 5.0})).json()
                counts = (await c.get(g1 + "/admin/observation-counts", params={
                    "service": MODEL, "window": window, "now": time.time()})).json()
                return build_report(ObservationCounts.model_validate(counts), 5.0) == own
            await until(same_report)

            # one stream in flight through each replica: Redis tells each replica of the other's, so its
            # /admin/observations says 2; its counts keep its own 1, which add up to the true 2
            async with c.stream("POST", g1 + "/v1/completions", json=ext_body([7], max_tokens=ENDLESS, stream=True)) \
                    as s1, c.stream("POST", g2 + "/v1/completions",
                                    json=ext_body([8], max_tokens=ENDLESS, stream=True)) as s2:
                kept = [s1.aiter_raw(), s2.aiter_raw()]  # kept: a collected iterator closes the response
                for chunks in kept:
                    await chunks.__anext__()

                async def peers_synced() -> bool:
                    inflight = (await c.get(g1 + "/admin/observations", params={"service": MODEL})).json()["inflight"]
                    return inflight.get(engine) == 2
                await until(peers_synced)
                assert (await both.report("default", MODEL, window, 5.0)).inflight == {engine: 2}

            # a replica that is down and one that never answers: the report is the others', and says so
            dead = f"http://127.0.0.1:{free_port()}"
            partial = GatewayObservationSource([g1, dead, g2, silent_replica], timeout_s=0.5)
            try:
                rep = await partial.report("default", MODEL, window, 5.0)
                assert rep.observations.arrival_rate == pytest.approx(11 / window)  # the 2 streams arrived too
                assert rep.gateways == GatewayCoverage(answered=2, failed=sorted([dead, silent_replica]))
                with pytest.raises(ObservationUnavailable, match="no gateway replica reported"):
                    await partial.report("default", "no-such-model", window, 5.0)  # those that answer: unseen
            finally:
                await partial.close()
            none = GatewayObservationSource([dead], timeout_s=0.5)
            try:
                with pytest.raises(ObservationUnavailable, match=dead):
                    await none.report("default", MODEL, window, 5.0)
            finally:
                await none.close()
        finally:
            await one.close()
            await both.close()

        # the wall clock is checked: a monotonic time sent by mistake would count the wrong seconds
        bad = await c.get(g1 + "/admin/observation-counts", params={"service": MODEL, "now": time.monotonic()})
        assert bad.status_code == 422 and "now" in bad.text


def start_logged(log: Path, *args: str) -> subprocess.Popen:
    """``tandem <args>`` as a subprocess, its output kept in ``log`` (said when it exits early)."""
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "tandem.cli", *args], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)


async def test_a_gateway_with_workers_answers_for_all_of_them(redis_server: RedisServer,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """``tandem gateway --workers 2`` (the real supervisor): requests sent to each worker on its
    private socket; whichever worker takes the observation call answers for both."""
    # Where the supervisor puts the workers' private sockets: short (pytest's tmp_path can exceed the
    # 108 bytes of a Unix socket path), and only this test's.
    short = tempfile.TemporaryDirectory(prefix="tw", dir="/tmp")
    tmp_path = Path(short.name)
    monkeypatch.setenv("TMPDIR", short.name)
    async with serving(sim_app(port=0)) as engine:
        port = free_port()
        log = tmp_path / "gateway.log"
        proc = start_logged(log, "gateway", "--port", str(port), "--instances", engine, "--workers", "2",
                            "--redis-url", redis_server.url, "--state-sync-interval", "0.05", "--trust-prompt-hints")
        gw = f"http://127.0.0.1:{port}"

        def worker(i: int) -> httpx.AsyncClient:
            (path,) = tmp_path.glob(f"tandem-gw-*/worker-{i}.sock")
            return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(path)), base_url="http://worker",
                                     timeout=30)
        try:
            async def ready() -> bool:
                assert proc.poll() is None, f"the gateway exited: {log.read_text()[-2000:]}"
                try:
                    for i in range(2):
                        async with worker(i) as c:
                            if (await c.get("/readyz")).status_code != 200:
                                return False
                    return True
                except (httpx.HTTPError, ValueError):  # ValueError: no socket yet
                    return False
            await until(ready, limit=60)
            for i, n in ((0, 2), (1, 5)):
                async with worker(i) as c:
                    for k in range(n):
                        assert (await c.post("/v1/completions", json=ext_body([3, i, k]))).status_code == 200
            params = {"service": MODEL, "window": 60}
            for i, n in ((0, 2), (1, 5)):
                async with worker(i) as c:
                    alone = (await c.get("/admin/observation-counts", params=params,
                                         headers={"x-tandem-forwarded": "1"})).json()
                    assert alone["arrivals"] == n  # each worker saw its own share only
                    counts = ObservationCounts.model_validate(
                        (await c.get("/admin/observation-counts", params={**params, "now": time.time()})).json())
                    assert counts.arrivals == counts.ttft_n == 7 and counts.missing == []
                    rep = (await c.get("/admin/observations", params=params)).json()
                    assert rep["observations"]["arrival_rate"] == pytest.approx(7 / 60)
                    assert rep["gateways"] == {"answered": 2, "failed": []}
            source = GatewayObservationSource(gw)  # the port, through whichever worker accepts
            try:
                assert (await source.report("default", MODEL, 60.0, 1.0)).observations.completed == 7
            finally:
                await source.close()
        finally:
            proc.terminate()
            proc.wait(15)
            short.cleanup()


# --- discovery: the replicas are pods by label -------------------------------------------------


def gateway_pod(name: str, url: str | None, labels: dict[str, str], phase: str = "Running",
                port_name: str = "http") -> dict[str, Any]:
    """A gateway pod as the API server shows it; ``url`` where it listens (None: not scheduled yet)."""
    host, port = (url.removeprefix("http://").rsplit(":", 1) if url else (None, "8080"))
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": labels},
            "spec": {"containers": [{"name": "gateway", "image": "example.invalid/tandem:0",
                                     "ports": [{"name": port_name, "containerPort": int(port)}]}]},
            "status": {"phase": phase, **({"podIP": host} if host else {})}}


def test_gateway_urls_of_pods() -> None:
    pods = [gateway_pod("a", "http://10.0.0.1:8080", {}), gateway_pod("b", None, {}, phase="Pending"),
            gateway_pod("c", "http://10.0.0.3:9000", {}, port_name="web"),
            gateway_pod("d", "http://10.0.0.4:8080", {}, phase="Succeeded"),
            {**gateway_pod("e", "http://10.0.0.5:8080", {}), "status": {"phase": "Running", "podIP": "fd00::5"}}]
    assert gateway_urls(pods, "http") == ["http://10.0.0.1:8080", "http://[fd00::5]:8080"]
    assert gateway_urls(pods, "7000") == ["http://10.0.0.1:7000", "http://10.0.0.3:7000", "http://[fd00::5]:7000"]
    assert parse_label_selector("a=b, c==d") == {"a": "b", "c": "d"}
    for bad in ("", "a!=b", "a in (b)", "=b"):
        with pytest.raises(ValueError):
            parse_label_selector(bad)


async def test_replicas_discovered_from_kubernetes_are_added_up(tmp_path: Path, kmock: Any) -> None:
    kmock.resources["v1/pods"] = kmock.ResourceInfo(kind="Pod", namespaced=True, subresources={"status"},
                                                    verbs={"get", "list", "create"})
    creds = load_credentials(kmock_kubeconfig(kmock, tmp_path))
    client = KubeClient(creds, creds.ssl_context(), user_agent="tandem-tests")
    labels = {"app.kubernetes.io/instance": "tandem", "app.kubernetes.io/component": "gateway"}
    try:
        async with serving(sim_app(port=0)) as engine, serving(gateway_app([engine])) as g1, \
                serving(gateway_app([engine])) as g2, httpx.AsyncClient(timeout=30) as c:
            for name, url, pod_labels, phase in (
                    ("gw-1", g1, labels, "Running"), ("gw-2", g2, labels, "Running"),
                    ("gw-3", None, labels, "Pending"),  # not started: no address, not asked
                    ("other", g1, {**labels, "app.kubernetes.io/instance": "other"}, "Running")):
                await client.create(PODS, "tandem-system", gateway_pod(name, url, pod_labels, phase))
            window = 60.0
            for i, gw in enumerate((g1, g2, g2)):
                assert (await c.post(gw + "/v1/completions", json=ext_body([5, i]))).status_code == 200
            found = KubernetesGateways(client, "app.kubernetes.io/instance=tandem,app.kubernetes.io/component=gateway",
                                       namespace="tandem-system")
            assert sorted(await found.urls("llm")) == sorted([g1, g2])
            source = GatewayObservationSource(found)
            try:
                rep = await source.report("llm", MODEL, window, 5.0)
            finally:
                await source.close()
            assert rep.observations.arrival_rate == pytest.approx(3 / window)
            assert rep.gateways == GatewayCoverage(answered=2, failed=[])
            # no namespace given: the LLMService's own (where the operator puts its gateway)
            assert await KubernetesGateways(client, "app.kubernetes.io/component=gateway").urls("llm") == []
    finally:
        await client.close()
