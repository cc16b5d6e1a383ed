"""Operator faults (issue 10): killed mid-reconcile and restarted, API server answering 409/500
transiently, an LLMService deleted while scaling.

The API server is kmock (in-process emulator) or, with TANDEM_TEST_KUBECONFIG, a real one (the
``cluster`` fixture of test_operator_kopf). Transient API errors are injected by a small aiohttp
server in front of the emulator's role: a mock, since no real API server can be made to fail on
cue here. kmock has no garbage collector: there the test asserts every child carries a controller
ownerReference to the service (what the real collector acts on) and that nothing is re-created for
a deleted service; against a real server it waits for the collector to remove the children.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web
from test_operator_kopf import Cluster, aggregated, cluster, disaggregated, eventually  # noqa: F401

from tandem.kube import (
    CHILD_KINDS,
    DEPLOYMENTS,
    LLMSERVICES,
    ApiError,
    KubeClient,
    KubeCredentials,
    is_transient,
    load_credentials,
    retry_delay,
)
from tandem.operator.plan import OperatorDefaults
from tandem.operator.reconcile import Reconciler

pytestmark = pytest.mark.xdist_group("operator-kopf")


def test_backoff_and_what_is_transient() -> None:
    assert [retry_delay(a, 0.2, 5.0) for a in (1, 2, 3, 4, 10)] == [0.2, 0.4, 0.8, 1.6, 5.0]
    assert retry_delay(1, 0.2, 5.0, "3") == 3.0 and retry_delay(1, 0.2, 5.0, "600") == 5.0
    assert retry_delay(2, 0.2, 5.0, "soon") == 0.4  # an HTTP-date or garbage: our own backoff
    for status in (409, 429, 500, 502, 503, 504):
        assert is_transient(status, "Whatever")
    assert not is_transient(409, "AlreadyExists")
    for status in (400, 401, 403, 404, 422):
        assert not is_transient(status, "Whatever")


class FlakyApi:
    """A stand-in API server: answers the scripted failures first, then 200 with a fixed object."""

    def __init__(self, script: list[tuple[int, str, dict[str, str]]]) -> None:
        self.script = list(script)
        self.calls = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        if self.script:
            status, reason, headers = self.script.pop(0)
            return web.json_response({"kind": "Status", "reason": reason, "message": "injected"}, status=status,
                                     headers=headers)
        return web.json_response({"kind": "ConfigMap", "metadata": {"name": "x"}})


async def _flaky(script: list[tuple[int, str, dict[str, str]]]) -> tuple[FlakyApi, web.AppRunner, str]:
    api = FlakyApi(script)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", api.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return api, runner, f"http://127.0.0.1:{port}"


async def test_transient_409_429_500_are_retried_with_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    script = [(500, "InternalError", {}), (409, "Conflict", {}), (429, "TooManyRequests", {"Retry-After": "1"}),
              (503, "ServiceUnavailable", {})]
    api, runner, url = await _flaky(script)
    slept: list[float] = []
    real_sleep = asyncio.sleep

    async def fake_sleep(delay: float) -> None:  # record the backoff instead of waiting it out
        slept.append(delay)
        await real_sleep(0)

    monkeypatch.setattr("tandem.kube.asyncio.sleep", fake_sleep)
    client = KubeClient(KubeCredentials(server=url), False, retries=4, backoff=0.2)
    try:
        got = await client.request("PATCH", "/api/v1/namespaces/d/configmaps/x", json={})
        assert got["metadata"]["name"] == "x" and api.calls == 5
        assert slept == [0.2, 0.4, 1.0, 1.6]  # exponential, the 429's Retry-After honoured
        # More failures than retries: the last error surfaces (the next event or resync retries).
        api.script = [(500, "InternalError", {})] * 3
        api.calls = 0
        with pytest.raises(ApiError) as err:
            await KubeClient(KubeCredentials(server=url), False, retries=2, backoff=0.01).request("GET", "/x")
        assert err.value.status == 500 and api.calls == 3
        # Not transient: AlreadyExists and 4xx are answered at once.
        for status, reason in ((409, "AlreadyExists"), (422, "Invalid"), (403, "Forbidden")):
            api.script, api.calls = [(status, reason, {})], 0
            with pytest.raises(ApiError):
                await client.request("POST", "/x", json={})
            assert api.calls == 1
    finally:
        await client.close()
        await runner.cleanup()


async def test_connection_refused_is_retried_then_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    import aiohttp
    from gatewayutil import free_port

    slept: list[float] = []

    async def fake_sleep(delay: float) -> None:
        slept.append(delay)

    monkeypatch.setattr("tandem.kube.asyncio.sleep", fake_sleep)
    client = KubeClient(KubeCredentials(server=f"http://127.0.0.1:{free_port()}"), False, retries=3, backoff=0.1)
    try:
        with pytest.raises(aiohttp.ClientConnectionError):
            await client.request("GET", "/api")
        assert slept == [0.1, 0.2, 0.4]
    finally:
        await client.close()


def _client(c: Cluster) -> KubeClient:
    creds = load_credentials(c.kubeconfig)
    return KubeClient(creds, creds.ssl_context(), user_agent="tandem-operator")


def _owned_by(obj: dict[str, Any], uid: str) -> bool:
    refs = obj["metadata"].get("ownerReferences") or []
    return any(r.get("uid") == uid and r.get("controller") and r.get("kind") == "LLMService" for r in refs)


async def test_operator_killed_mid_reconcile_converges_without_duplicates(cluster: Cluster) -> None:  # noqa: F811
    svc = await cluster.create(LLMSERVICES, disaggregated())
    first = Reconciler(OperatorDefaults(), timeout=20)
    client = _client(cluster)
    await first.use_client(client)
    real_create = client.create
    created = 0

    async def create_then_die(kind: Any, ns: str, body: dict[str, Any]) -> dict[str, Any]:
        nonlocal created
        out = await real_create(kind, ns, body)
        created += 1
        if created == 3:  # the process dies right after its third write
            raise asyncio.CancelledError
        return out

    client.create = create_then_die  # type: ignore[method-assign]
    with pytest.raises(asyncio.CancelledError):
        await first.reconcile(cluster.ns, "pd")
    await first.close()
    partial = await cluster.children("pd")
    assert len(partial) == 3

    second = Reconciler(OperatorDefaults(), timeout=20)  # the restarted operator: no memory of the first
    await second.use_client(_client(cluster))
    try:
        result = await second.reconcile(cluster.ns, "pd")
        kids = await cluster.children("pd")
        assert len(kids) == 10  # the full disaggregated stack
        assert not {f"{k}/{n}" for k, n in partial} & set(result.created)  # what existed was not re-created
        assert len(result.created) == 10 - 3
        for kind in CHILD_KINDS:  # one object per name, per kind
            items = await cluster.client.list(kind, cluster.ns, {"serving.tandem.dev/service": "pd"})
            names = [o["metadata"]["name"] for o in items]
            assert len(names) == len(set(names))
        uid = (await cluster.get(LLMSERVICES, "pd"))["metadata"]["uid"]
        assert uid == svc["metadata"]["uid"] and all(_owned_by(o, uid) for o in kids.values())
        again = await second.reconcile(cluster.ns, "pd")
        assert again.created == [] and again.patched == []  # converged
    finally:
        await second.close()


async def test_service_deleted_while_scaling_leaves_nothing_behind(cluster: Cluster) -> None:  # noqa: F811
    await cluster.create(LLMSERVICES, aggregated(replicas=2))
    rec = Reconciler(OperatorDefaults(), timeout=20)
    await rec.use_client(_client(cluster))
    try:
        await rec.reconcile(cluster.ns, "llm")
        uid = (await cluster.get(LLMSERVICES, "llm"))["metadata"]["uid"]
        kids = await cluster.children("llm")
        assert kids and all(_owned_by(o, uid) for o in kids.values())
        # Scale up and delete before the pass that would apply it has finished.
        await cluster.client.merge_patch(LLMSERVICES, cluster.ns, "llm", {"spec": {"replicas": 4}})
        scaling = asyncio.create_task(rec.reconcile(cluster.ns, "llm"))
        await cluster.client.delete(LLMSERVICES, cluster.ns, "llm")
        await asyncio.gather(scaling, return_exceptions=True)
        result = await rec.reconcile(cluster.ns, "llm")  # the events after the deletion
        assert result.gone and result.created == [] and result.patched == []
        if cluster.fake:
            # No collector in kmock: what remains is exactly what the collector deletes, all owned.
            left = await cluster.children("llm")
            assert left and all(_owned_by(o, uid) for o in left.values())
            assert {k for k in left} <= {k for k in kids} | {("Deployment", "llm-unified")}
        else:
            await eventually(lambda: _none_left(cluster, "llm"), "children garbage-collected", within=60)
    finally:
        await rec.close()


async def _none_left(c: Cluster, owner: str) -> bool:
    return await c.children(owner) == {}


async def test_deletion_in_progress_is_not_reconciled(cluster: Cluster) -> None:  # noqa: F811
    """A service being deleted (foreground: deletionTimestamp set, children going) gets no new children."""
    if not cluster.fake:
        pytest.skip("sets deletionTimestamp by hand, which only the emulator allows")
    await cluster.create(LLMSERVICES, aggregated())
    await cluster.client.merge_patch(LLMSERVICES, cluster.ns, "llm",
                                     {"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}})
    rec = Reconciler(OperatorDefaults(), timeout=20)
    await rec.use_client(_client(cluster))
    try:
        result = await rec.reconcile(cluster.ns, "llm")
        assert result.gone and result.created == []
        assert await cluster.client.list(DEPLOYMENTS, cluster.ns, {"serving.tandem.dev/service": "llm"}) == []
    finally:
        await rec.close()
