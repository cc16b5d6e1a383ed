"""Reconciler concurrency: passes for one service are serialised and concurrent triggers coalesce;
and one pass against an API server (kmock, or TANDEM_TEST_KUBECONFIG's) for the gateway's shared state."""

from __future__ import annotations

import asyncio

import pytest
from test_operator_kopf import Cluster, aggregated, cluster, condition  # noqa: F401

from tandem.kube import DEPLOYMENTS, LLMSERVICES, KubeClient, load_credentials
from tandem.operator.plan import OperatorDefaults
from tandem.operator.reconcile import Reconciler, ReconcileResult


class GatedReconciler(Reconciler):
    """The real scheduling logic; the pass itself is replaced by a gate (no API server involved)."""

    def __init__(self) -> None:
        super().__init__(OperatorDefaults(), timeout=5)
        self.passes: list[str] = []
        self.running = 0
        self.max_running = 0
        self.gate = asyncio.Event()

    async def _reconcile(self, namespace: str, name: str) -> ReconcileResult:
        self.passes.append(name)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        await self.gate.wait()
        self.running -= 1
        return ReconcileResult()


async def test_triggers_during_a_pass_coalesce_into_one_follow_up() -> None:
    r = GatedReconciler()
    tasks = [asyncio.create_task(r.reconcile("ns", "a")) for _ in range(6)]
    await asyncio.sleep(0.01)
    r.gate.set()
    results = await asyncio.gather(*tasks)
    assert r.passes == ["a", "a"]  # the running pass + one follow-up that reads the newest state
    assert sum(res.skipped for res in results) == 4
    assert r.max_running == 1


async def test_a_trigger_after_the_follow_up_started_gets_its_own_pass() -> None:
    r = GatedReconciler()
    first = asyncio.create_task(r.reconcile("ns", "a"))
    follow_up = asyncio.create_task(r.reconcile("ns", "a"))
    await asyncio.sleep(0.01)
    r.gate.set()
    await first
    await asyncio.sleep(0)  # the follow-up takes the lock
    r.gate.clear()
    late = asyncio.create_task(r.reconcile("ns", "a"))
    await asyncio.sleep(0.01)
    r.gate.set()
    assert not (await late).skipped
    await follow_up
    assert len(r.passes) == 3


async def test_services_reconcile_in_parallel() -> None:
    r = GatedReconciler()
    tasks = [asyncio.create_task(r.reconcile("ns", name)) for name in ("a", "b", "c")]
    await asyncio.sleep(0.01)
    assert r.max_running == 3
    r.gate.set()
    await asyncio.gather(*tasks)
    r.forget("ns", "a")
    assert ("ns", "a") not in r._locks


@pytest.mark.xdist_group("operator-kopf")
async def test_several_gateways_need_redis_then_share_the_operators(cluster: Cluster) -> None:  # noqa: F811
    """Two gateway replicas and no Redis anywhere: InvalidSpec naming the field, nothing created. The
    same object under an operator with a default Redis: the gateway gets the URL and its own prefix."""
    await cluster.create(LLMSERVICES, aggregated(gateway={"replicas": 2}))
    creds = load_credentials(cluster.kubeconfig)
    plain = Reconciler(OperatorDefaults(), timeout=20)
    await plain.use_client(KubeClient(creds, creds.ssl_context()))
    try:
        result = await plain.reconcile(cluster.ns, "llm")
    finally:
        await plain.close()
    reason = ("more than one gateway replica needs shared state in Redis: set spec.gateway.redisSecretRef "
              "or run the operator with --gateway-redis-url")
    assert result.invalid == f"spec.gateway.replicas: {reason}" and result.created == []
    obj = await cluster.get(LLMSERVICES, "llm")
    invalid = condition(obj, "InvalidSpec")
    assert invalid["status"] == "True" and invalid["message"] == f"spec.gateway.replicas: {reason}"
    assert await cluster.children("llm") == {}

    url = "redis://tandem-redis.tandem-system.svc:6379/0"
    shared = Reconciler(OperatorDefaults(gateway_redis_url=url), timeout=20)
    await shared.use_client(KubeClient(creds, creds.ssl_context()))
    try:
        result = await shared.reconcile(cluster.ns, "llm")
    finally:
        await shared.close()
    assert result.invalid is None and "Deployment/llm-gateway" in result.created
    assert condition(await cluster.get(LLMSERVICES, "llm"), "InvalidSpec")["status"] == "False"
    gateway = await cluster.get(DEPLOYMENTS, "llm-gateway")
    assert gateway["spec"]["replicas"] == 2
    c = gateway["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "TANDEM_GATEWAY_REDIS_URL", "value": url} in c["env"]
    assert c["command"][-2:] == ["--redis-prefix", f"tandem/{cluster.ns}/llm"]
