"""``tandem autoscaler``'s shell against a Kubernetes API: kmock always, a real server on request.

The Kubernetes side is kmock's in-memory API server (no controllers: the test creates the pods a
Deployment would have, and plays their readiness), or a real API server when
``TANDEM_TEST_KUBECONFIG`` is set. The load side is a stand-in gateway on a loopback port serving
the documented ``/admin/observation-counts`` contract over real HTTP (a stand-in because the gateway
process is not part of this test); everything in between - the observation source, the pure core,
the patches, status, events, drain annotations and metrics - is the real code.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from gatewayutil import free_port
from kubeutil import NAMESPACES, apply_crds, cluster_role_rules, kmock_kubeconfig, permissions_used
from prometheus_client import CollectorRegistry, generate_latest

from tandem.api.labels import LABEL_ROLE, LABEL_SERVICE
from tandem.api.observations import InstanceLoad, LengthBucket, MixCount, ObservationCounts
from tandem.autoscaler.actuator import (
    ANN_DELETION_COST,
    ANN_DRAINING,
    EVENTS,
    PODS,
    Actuator,
    GatewayObservationSource,
    KubernetesGateways,
    count_pods,
)
from tandem.autoscaler.models import AutoscalerSpec
from tandem.kube import LLMSERVICES, ApiError, KubeClient, load_credentials
from tandem.serve import serving

ROOT = Path(__file__).resolve().parents[2]
REAL_KUBECONFIG = os.environ.get("TANDEM_TEST_KUBECONFIG")
MIX = [LengthBucket(input_tokens=2000, output_tokens=200)]


def service(name: str = "pd") -> dict[str, Any]:
    return {
        "apiVersion": "serving.tandem.dev/v1alpha1", "kind": "LLMService", "metadata": {"name": name},
        "spec": {
            "model": {"name": "meta-llama/Llama-3.1-8B-Instruct", "servedName": "llama-8b"},
            "mode": "disaggregated",
            "replicas": 1,  # the primary (decode) pool: the scale subresource's field
            "pools": {"prefill": {"replicas": 1, "minReplicas": 1, "maxReplicas": 12},
                      "decode": {"minReplicas": 1, "maxReplicas": 12}},
            "slo": {"ttftSeconds": 2.0, "tpotSeconds": 0.08, "attainment": 0.95},
            "autoscaling": {"enabled": True, "profile": "llama3-8b-h100", "cooldownSeconds": 60},
        },
    }


class FakeGateway:
    """One gateway replica's admin API as the autoscaler sees it (``/admin/observation-counts``);
    load set by the test (the length mix per window asked: ``long_mix`` for windows of 300 s and more)."""

    def __init__(self) -> None:
        self.rate = 1.0
        self.inflight: dict[str, int] = {}
        self.long_mix = MIX
        self.missing: list[str] = []  # worker processes of this replica that did not answer it
        self.windows: list[float] = []
        self.app = FastAPI()
        self.app.get("/admin/observation-counts")(self.counts)

    async def counts(self, namespace: str, service: str, window: float, now: float) -> dict[str, Any]:
        self.windows.append(window)
        mix = self.long_mix if window >= 300 else MIX
        cells = [MixCount(prompt_class=b.input_tokens.bit_length(), output_class=b.output_tokens.bit_length(),
                          count=n, prompt_tokens=n * b.input_tokens, output_tokens=n * b.output_tokens)
                 for b in mix for n in [round(1000 * b.weight)]]
        pods = [InstanceLoad(service=service, role="", pod=pod, routable=True, draining=False, queued=0, inflight=n,
                             engine_waiting=0, kv_usage=0.0) for pod, n in self.inflight.items()]
        return ObservationCounts(service=service, window_s=window, bucket_s=1.0, arrivals=round(self.rate * window),
                                 mix=cells, instances=pods, missing=self.missing).model_dump(mode="json")


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(params=["kmock", pytest.param("real", marks=pytest.mark.realk8s)])
async def api(request: pytest.FixtureRequest, tmp_path: Path, kmock: Any) -> AsyncIterator[tuple[str, KubeClient, str]]:
    if request.param == "kmock":
        info = kmock.ResourceInfo
        kmock.resources["serving.tandem.dev/v1alpha1/llmservices"] = info(
            kind="LLMService", namespaced=True, subresources={"status", "scale"},
            verbs={"get", "list", "watch", "patch", "create"})
        kmock.resources["v1/pods"] = info(kind="Pod", namespaced=True, subresources={"status"},
                                          verbs={"get", "list", "patch", "create"})
        kmock.resources["v1/events"] = info(kind="Event", namespaced=True, verbs={"create", "list"})
        creds = load_credentials(kmock_kubeconfig(kmock, tmp_path))
        client = KubeClient(creds, creds.ssl_context(), user_agent="tandem-tests")
        try:
            yield "kmock", client, "default"
        finally:
            await client.close()
        return
    if not REAL_KUBECONFIG:
        pytest.skip("real API server tests need TANDEM_TEST_KUBECONFIG=<kubeconfig of a test cluster>")
    creds = await asyncio.to_thread(load_credentials, Path(REAL_KUBECONFIG))
    client = KubeClient(creds, await asyncio.to_thread(creds.ssl_context), user_agent="tandem-tests")
    ns = f"tandem-as-{uuid.uuid4().hex[:8]}"
    try:
        await apply_crds(client)
        await client.request("POST", NAMESPACES.path(None), json={"metadata": {"name": ns}})
        for _ in range(100):
            with contextlib.suppress(ApiError):
                await client.request("GET", LLMSERVICES.path(ns))
                break
            await asyncio.sleep(0.1)
        yield "real", client, ns
    finally:
        with contextlib.suppress(ApiError):
            await client.request("DELETE", NAMESPACES.path(None, ns))
        await client.close()


async def add_pod(client: KubeClient, ns: str, svc: str, role: str, i: int, ready: bool = True) -> None:
    body = {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{svc}-{role}-{i}", "namespace": ns,
                         "labels": {LABEL_SERVICE: svc, LABEL_ROLE: role},
                         "creationTimestamp": f"2026-01-01T00:00:{i:02d}Z"},
            "spec": {"containers": [{"name": "engine", "image": "example.invalid/engine:0"}]},
            "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}
    await client.create(PODS, ns, body)


def spec_defaults() -> AutoscalerSpec:
    return AutoscalerSpec(startup_delay_s=30, scale_up_cooldown_s=10, scale_down_stabilization_s=60)


async def test_scale_up_patches_spec_status_event_and_metrics(api) -> None:
    backend, client, ns = api
    gateway = FakeGateway()
    gateway.rate = 60.0
    await client.create(LLMSERVICES, ns, {**service(), "metadata": {"name": "pd", "namespace": ns}})
    if backend == "kmock":
        await add_pod(client, ns, "pd", "prefill", 0)
        await add_pod(client, ns, "pd", "decode", 0)
    registry = CollectorRegistry()
    async with serving(gateway.app) as url:
        source = GatewayObservationSource(url)
        actuator = Actuator(client, source, namespaces=[ns], defaults=spec_defaults(), registry=registry,
                            clock=Clock())
        decisions = await actuator.tick_once()
        await source.close()
    decision = decisions[(ns, "pd")]
    assert decision.replicas["prefill"] >= 3 and decision.replicas["decode"] >= 2
    obj = await client.get(LLMSERVICES, ns, "pd")
    assert obj["spec"]["pools"]["prefill"]["replicas"] == decision.replicas["prefill"]
    assert obj["spec"]["replicas"] == decision.replicas["decode"]
    assert "replicas" not in obj["spec"]["pools"]["decode"]
    last = obj["status"]["lastScalingDecision"]
    assert last["replicas"] == decision.replicas and "R-hat" in last["reason"]
    events = (await client.request("GET", EVENTS.path(ns)))["items"]
    scaled = [e for e in events if e["involvedObject"]["name"] == "pd" and e["reason"] == "Scaled"]
    assert scaled and "prefill 1->" in scaled[0]["message"]
    text = generate_latest(registry).decode()
    assert f'tandem_autoscaler_desired_replicas{{namespace="{ns}",role="prefill",service="pd"}} ' \
           f'{float(decision.replicas["prefill"])}' in text
    assert "tandem_autoscaler_scaling_actions_total" in text and "tandem_autoscaler_forecast_rps" in text


async def test_replicas_are_added_up_and_a_silent_one_is_counted(api) -> None:
    """Two gateway replicas with half the load each size the pools as one replica with all of it;
    a third that is down, and a worker process one replica could not reach, show in the metrics."""
    _, client, ns = api
    await client.create(LLMSERVICES, ns, {**service(), "metadata": {"name": "pd", "namespace": ns}})
    halves, whole = (FakeGateway(), FakeGateway()), FakeGateway()
    for g in halves:
        g.rate = 30.0
    whole.rate = 60.0
    halves[1].missing = ["worker worker-1.sock: ReadTimeout"]
    dead = f"http://127.0.0.1:{free_port()}"
    registry = CollectorRegistry()
    async with serving(halves[0].app) as a, serving(halves[1].app) as b, serving(whole.app) as w:
        decided = {}
        for key, urls, reg in (("split", [a, dead, b], registry), ("whole", [w], CollectorRegistry())):
            source = GatewayObservationSource(urls, timeout_s=2.0)
            actuator = Actuator(client, source, namespaces=[ns], defaults=spec_defaults(), registry=reg,
                                clock=Clock())
            decided[key] = (await actuator._decide(ns, await client.get(LLMSERVICES, ns, "pd"), 1000.0))[3]
            await source.close()
    assert decided["split"].replicas == decided["whole"].replicas
    assert decided["split"].forecast_rps == decided["whole"].forecast_rps > 0
    text = generate_latest(registry).decode()
    for state, n in (("answered", 2), ("failed", 2)):
        assert f'tandem_autoscaler_gateway_replicas{{namespace="{ns}",service="pd",state="{state}"}} {n:.1f}' in text


async def test_scale_down_drains_first(api) -> None:
    backend, client, ns = api
    if backend != "kmock":
        pytest.skip("needs pods with controllable readiness: kmock only")
    body = service()
    body["spec"]["replicas"] = 6
    body["spec"]["pools"]["prefill"]["replicas"] = 6
    await client.create(LLMSERVICES, ns, {**body, "metadata": {"name": "pd", "namespace": ns}})
    for role in ("prefill", "decode"):
        for i in range(6):
            await add_pod(client, ns, "pd", role, i)
    gateway = FakeGateway()
    gateway.rate = 2.0
    gateway.inflight = {f"pd-prefill-{i}": 3 for i in range(6)}
    clock = Clock()
    async with serving(gateway.app) as url:
        source = GatewayObservationSource(url)
        actuator = Actuator(client, source, namespaces=[ns], defaults=spec_defaults(), registry=CollectorRegistry(),
                            clock=clock)
        first = (await actuator.tick_once())[(ns, "pd")]
        assert first.replicas == {"prefill": 6, "decode": 6}  # no shrink before a stabilization window
        decision = first
        for _ in range(10):
            clock.t += 15
            decision = (await actuator.tick_once())[(ns, "pd")]
            if decision.roles["prefill"].drain:
                break
        p = decision.roles["prefill"]
        assert p.drain > 0 and p.target < 6
        # busy draining pods keep the pool at 6 and carry the drain annotations
        assert p.replicas == 6
        pods = await client.list(PODS, ns, {LABEL_SERVICE: "pd", LABEL_ROLE: "prefill"})
        marked = [x for x in pods if ANN_DRAINING in (x["metadata"].get("annotations") or {})]
        assert len(marked) == p.drain
        assert all(x["metadata"]["annotations"][ANN_DELETION_COST] == "-1000" for x in marked)
        obj = await client.get(LLMSERVICES, ns, "pd")
        assert obj["spec"]["pools"]["prefill"]["replicas"] == 6
        # the gateway reports them idle: now the pool shrinks by exactly those
        for x in marked:
            gateway.inflight[x["metadata"]["name"]] = 0
        clock.t += 15
        after = (await actuator.tick_once())[(ns, "pd")]
        await source.close()
    assert after.roles["prefill"].replicas == 6 - len(marked)
    obj = await client.get(LLMSERVICES, ns, "pd")
    assert obj["spec"]["pools"]["prefill"]["replicas"] == 6 - len(marked)


async def test_length_mix_comes_from_the_longer_window(api) -> None:
    """Rate and attainment from the short window, the length mix from the long one: prompts 4x
    longer in the long window's mix need more prefill instances than the short window's would."""
    backend, client, ns = api
    if backend != "kmock":
        pytest.skip("kmock only: compares three actuator runs on one service")
    await client.create(LLMSERVICES, ns, {**service(), "metadata": {"name": "pd", "namespace": ns}})
    await add_pod(client, ns, "pd", "prefill", 0)
    await add_pod(client, ns, "pd", "decode", 0)

    async def prefill_after_one_tick(long_mix: list[LengthBucket], mix_window_s: float) -> tuple[int, list[float]]:
        gateway = FakeGateway()
        gateway.rate, gateway.long_mix = 10.0, long_mix
        async with serving(gateway.app) as url:
            source = GatewayObservationSource(url)
            actuator = Actuator(client, source, namespaces=[ns], defaults=spec_defaults(), window_s=30.0,
                                mix_window_s=mix_window_s, clock=Clock())
            decisions = await actuator.tick_once()
            await source.close()
        return decisions[(ns, "pd")].roles["prefill"].target, gateway.windows

    long = [LengthBucket(input_tokens=8000, output_tokens=200)]
    with_long, windows = await prefill_after_one_tick(long, 300.0)
    assert windows == [30.0, 300.0]
    short_only, windows = await prefill_after_one_tick(long, 30.0)
    assert windows == [30.0]
    assert with_long > short_only


async def test_disabled_services_are_left_alone(api) -> None:
    _, client, ns = api
    body = service("off")
    body["spec"]["autoscaling"]["enabled"] = False
    await client.create(LLMSERVICES, ns, {**body, "metadata": {"name": "off", "namespace": ns}})
    gateway = FakeGateway()
    async with serving(gateway.app) as url:
        source = GatewayObservationSource(url)
        actuator = Actuator(client, source, namespaces=[ns], defaults=spec_defaults(), clock=Clock())
        assert await actuator.tick_once() == {}
        await source.close()
    obj = await client.get(LLMSERVICES, ns, "off")
    assert "lastScalingDecision" not in (obj.get("status") or {})


def test_count_pods_roles() -> None:
    from datetime import UTC, datetime, timedelta

    now = datetime(2026, 1, 1, tzinfo=UTC)
    old = (now - timedelta(seconds=600)).isoformat()
    recent = (now - timedelta(seconds=5)).isoformat()

    def pod(name, ready=True, drain=None, deleting=False):
        meta = {"name": name, "annotations": {ANN_DRAINING: drain} if drain else {}}
        if deleting:
            meta["deletionTimestamp"] = recent
        return {"metadata": meta, "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}

    pods = [pod("a"), pod("b", ready=False), pod("c", drain=recent), pod("d", drain=recent), pod("e", drain=old),
            pod("f", deleting=True)]
    o = count_pods(pods, {"c": 2, "d": 0, "e": 5}, now, drain_timeout_s=300)
    assert (o.ready, o.starting, o.draining, o.drained) == (1, 1, 1, 2)


async def test_global_gpu_budget_across_services(api) -> None:
    _, client, ns = api
    for name in ("a", "b"):
        await client.create(LLMSERVICES, ns, {**service(name), "metadata": {"name": name, "namespace": ns}})
    gateway = FakeGateway()
    gateway.rate = 80.0
    async with serving(gateway.app) as url:
        source = GatewayObservationSource(url)
        actuator = Actuator(client, source, namespaces=[ns], defaults=spec_defaults(), gpu_budget=8,
                            registry=CollectorRegistry(), clock=Clock())
        decisions = await actuator.tick_once()
        await source.close()
    assert set(decisions) == {(ns, "a"), (ns, "b")}
    total = 0
    for name in ("a", "b"):
        obj = await client.get(LLMSERVICES, ns, name)
        pools = obj["spec"]["pools"]
        assert pools["prefill"]["replicas"] >= 1 and obj["spec"]["replicas"] >= 1
        total += pools["prefill"]["replicas"] + obj["spec"]["replicas"]
        assert "GPU budget 8" in obj["status"]["lastScalingDecision"]["reason"]
    assert total <= 8


# Rules of deploy/rbac/autoscaler.yaml the kmock scenario below cannot exercise, each with its reason.
RBAC_NOT_EXERCISED: dict[tuple[str, str, str], str] = {}


@pytest.mark.parametrize("api", ["kmock"], indirect=True)  # reads kmock's request log
async def test_rbac_allows_everything_the_autoscaler_does_and_no_more(api, kmock: Any, tmp_path: Path) -> None:
    """deploy/rbac/autoscaler.yaml against the requests `tandem autoscaler` really makes (its client's
    User-Agent), as tests/operator/test_operator_kopf.py does for the operator: a service that drains and
    shrinks, its gateway replica found by label (--gateway-discovery kubernetes). The chart's role is
    kept equal to the file by tests/shared/test_chart.py::test_rbac_matches_the_operator_issue."""
    _, setup, ns = api
    creds = load_credentials(kmock_kubeconfig(kmock, tmp_path))
    client = KubeClient(creds, creds.ssl_context(), user_agent="tandem-autoscaler")  # as autoscaler/cli.py
    body = service()
    body["spec"]["replicas"] = 6
    body["spec"]["pools"]["prefill"]["replicas"] = 6
    await setup.create(LLMSERVICES, ns, {**body, "metadata": {"name": "pd", "namespace": ns}})
    for role in ("prefill", "decode"):
        for i in range(6):
            await add_pod(setup, ns, "pd", role, i)
    gateway = FakeGateway()
    gateway.rate = 2.0
    gateway.inflight = {f"pd-prefill-{i}": 3 for i in range(6)}
    clock = Clock()
    try:
        async with serving(gateway.app) as url:
            await setup.create(PODS, ns, {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "gw-0", "namespace": ns, "labels": {"app.kubernetes.io/component": "gateway"}},
                "spec": {"containers": [{"name": "gateway", "image": "example.invalid/tandem:0",
                                         "ports": [{"name": "http", "containerPort": int(url.rsplit(":", 1)[1])}]}]},
                "status": {"phase": "Running", "podIP": "127.0.0.1"}})
            source = GatewayObservationSource(KubernetesGateways(client, "app.kubernetes.io/component=gateway"))
            actuator = Actuator(client, source, namespaces=[ns], defaults=spec_defaults(),
                                registry=CollectorRegistry(), clock=clock)
            for _ in range(12):
                await actuator.tick_once()
                if (await setup.get(LLMSERVICES, ns, "pd"))["spec"]["pools"]["prefill"]["replicas"] < 6:
                    break
                for pod in await setup.list(PODS, ns, {LABEL_SERVICE: "pd", LABEL_ROLE: "prefill"}):
                    if ANN_DRAINING in (pod["metadata"].get("annotations") or {}):
                        gateway.inflight[pod["metadata"]["name"]] = 0  # drained: idle now
                clock.t += 15
            await source.close()
    finally:
        await client.close()
    assert (await setup.get(LLMSERVICES, ns, "pd"))["spec"]["pools"]["prefill"]["replicas"] < 6, "it shrank"
    used = permissions_used(kmock, ("tandem-autoscaler",))
    granted = cluster_role_rules(ROOT / "deploy" / "rbac" / "autoscaler.yaml")
    assert used - granted == set(), "the autoscaler needs permissions deploy/rbac/autoscaler.yaml lacks"
    assert granted - used - set(RBAC_NOT_EXERCISED) == set(), "deploy/rbac/autoscaler.yaml grants more than it uses"
    # The writes that matter were really made (so the comparison above is not vacuous).
    assert {("serving.tandem.dev", "llmservices", "patch"), ("serving.tandem.dev", "llmservices/status", "patch"),
            ("", "pods", "patch"), ("", "events", "create"), ("", "pods", "list")} <= used
    # Every request stays in the namespace it scales: Roles there are enough (the chart binds no
    # ClusterRole, issue 16.11).
    outside = [f"{r.method} {r.url.path}" for r in kmock if r.headers.get("User-Agent", "").startswith(
        "tandem-autoscaler") and len(r.url.path.split("/")) > 4 and f"/namespaces/{ns}/" not in r.url.path]
    assert outside == []
