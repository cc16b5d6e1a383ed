"""The operator's kopf handlers against a Kubernetes API: kmock in CI, a real API server on request.

Every test runs the real operator (``build_registry`` + ``kopf run`` through ``KopfRunner``) and
talks to the API server over HTTP with the operator's own client. Two backends:

* ``kmock`` (always): an in-memory Kubernetes emulator. It has no uid/resourceVersion/generation,
  no schemas, no controllers and no garbage collector, so the test fills in uid/generation itself
  and plays the deployment controller where a test needs ready replicas (a mock: nothing real can
  run here).
* ``real`` (when ``TANDEM_TEST_KUBECONFIG`` names a kubeconfig): a real API server. The CRDs from
  ``crds/`` are applied, every test gets its own namespace, and the ``realk8s`` tests check what
  only a real server does (CEL rejections, the scale and status subresources, garbage collection).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kopf.testing import KopfRunner

from tandem.operator.handlers import build_registry, build_settings
from tandem.operator.kube import (
    CHILD_KINDS,
    CONFIGMAPS,
    DEPLOYMENTS,
    LLMSERVICES,
    REMOTEPREFILLPOOLS,
    SERVICES,
    ApiError,
    Kind,
    KubeClient,
    load_credentials,
)
from tandem.operator.plan import LABEL_INSTANCE, LABEL_MANAGED_BY, MANAGER, OperatorDefaults
from tandem.operator.reconcile import Reconciler

ROOT = Path(__file__).resolve().parent.parent
REAL_KUBECONFIG = os.environ.get("TANDEM_TEST_KUBECONFIG")
CRD_KIND = Kind(group="apiextensions.k8s.io", version="v1", plural="customresourcedefinitions",
                kind="CustomResourceDefinition")
NAMESPACES = Kind(group="", version="v1", plural="namespaces", kind="Namespace")
WAIT = 15.0
TEST_AGENT = "tandem-tests"  # the operator's own requests say "tandem-operator" (and kopf's "kopf/...")

pytestmark = pytest.mark.xdist_group("operator-kopf")


def aggregated(name: str = "llm", **spec: Any) -> dict[str, Any]:
    body = {
        "apiVersion": "serving.tandem.dev/v1alpha1",
        "kind": "LLMService",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": "meta-llama/Llama-3.1-8B-Instruct", "servedName": "llama-8b"},
            "mode": "aggregated",
            "pools": {"unified": {"replicas": 2, "minReplicas": 1, "maxReplicas": 4}},
        },
    }
    body["spec"].update(spec)
    return body


def disaggregated(name: str = "pd", **spec: Any) -> dict[str, Any]:
    body = aggregated(name, **spec)
    body["spec"]["mode"] = "disaggregated"
    body["spec"]["pools"] = {"prefill": {"replicas": 1}, "decode": {"replicas": 2, "maxReplicas": 8}}
    body["spec"].update(spec)
    return body


class Cluster:
    """One API server as the tests see it: the operator's client plus what kmock cannot do itself."""

    def __init__(self, backend: str, client: KubeClient, kubeconfig: Path, namespace: str, kmock: Any = None):
        self.backend = backend
        self.client = client
        self.kubeconfig = kubeconfig
        self.ns = namespace
        self.kmock = kmock

    @property
    def fake(self) -> bool:
        return self.backend == "kmock"

    async def create(self, kind: Kind, body: dict[str, Any]) -> dict[str, Any]:
        body = {**body, "metadata": {**body["metadata"], "namespace": self.ns}}
        if self.fake:  # a real server assigns these
            body["metadata"].update(uid=str(uuid.uuid4()), generation=1, creationTimestamp="2026-01-01T00:00:00Z")
        return await self.client.create(kind, self.ns, body)

    async def get(self, kind: Kind, name: str) -> dict[str, Any] | None:
        return await self.client.get(kind, self.ns, name)

    async def patch_spec(self, kind: Kind, name: str, spec: dict[str, Any]) -> None:
        patch: dict[str, Any] = {"spec": spec}
        if self.fake:  # a real server bumps generation on spec changes
            current = await self.get(kind, name)
            assert current is not None
            patch["metadata"] = {"generation": current["metadata"].get("generation", 1) + 1}
        await self.client.merge_patch(kind, self.ns, name, patch)

    async def children(self, owner: str) -> dict[tuple[str, str], dict[str, Any]]:
        found = {}
        for kind in CHILD_KINDS:
            for obj in await self.client.list(kind, self.ns, {LABEL_INSTANCE: owner, LABEL_MANAGED_BY: MANAGER}):
                found[(kind.kind, obj["metadata"]["name"])] = obj
        return found

    async def mark_deployment_ready(self, name: str) -> None:
        """Play the deployment controller (kmock has none): every desired replica ready and updated."""
        dep = await self.get(DEPLOYMENTS, name)
        assert dep is not None
        n = dep["spec"]["replicas"]
        status = {"replicas": n, "readyReplicas": n, "updatedReplicas": n, "availableReplicas": n}
        await self.client.merge_patch(DEPLOYMENTS, self.ns, name, {"status": status}, "status")


async def eventually(probe: Callable[[], Awaitable[Any]], what: str, timeout: float = WAIT) -> Any:
    """Poll ``probe`` until it returns something truthy (and return that) or fail naming ``what``."""
    deadline = asyncio.get_running_loop().time() + timeout
    last: Any = None
    while asyncio.get_running_loop().time() < deadline:
        with contextlib.suppress(AssertionError, KeyError, TypeError):
            last = await probe()
            if last:
                return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def condition(obj: dict[str, Any] | None, ctype: str) -> dict[str, Any] | None:
    for cond in ((obj or {}).get("status") or {}).get("conditions", []) or []:
        if cond["type"] == ctype:
            return cond
    return None


def _kubeconfig_for(url: str, path: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": url}}],
        "users": [{"name": "kmock", "user": {}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
    }))
    return path


def _declare_kmock_resources(kmock: Any) -> None:
    info = kmock.ResourceInfo
    kmock.resources["serving.tandem.dev/v1alpha1/llmservices"] = info(
        kind="LLMService", namespaced=True, subresources={"status", "scale"}, verbs={"get", "list", "watch", "patch"})
    kmock.resources["serving.tandem.dev/v1alpha1/remoteprefillpools"] = info(
        kind="RemotePrefillPool", namespaced=True, subresources={"status"}, verbs={"get", "list", "watch", "patch"})
    all_verbs = {"get", "list", "watch", "create", "patch", "delete"}
    kmock.resources["apps/v1/deployments"] = info(
        kind="Deployment", namespaced=True, subresources={"status", "scale"}, verbs=all_verbs)
    kmock.resources["v1/services"] = info(kind="Service", namespaced=True, verbs=all_verbs)
    kmock.resources["v1/configmaps"] = info(kind="ConfigMap", namespaced=True, verbs=all_verbs)
    kmock.resources["policy/v1/poddisruptionbudgets"] = info(
        kind="PodDisruptionBudget", namespaced=True, verbs=all_verbs)
    kmock.resources["v1/events"] = info(kind="Event", namespaced=True, verbs={"create"})
    # kopf needs the namespaces resource to be discoverable even when it runs cluster-wide.
    kmock.resources["v1/namespaces"] = info(kind="Namespace", namespaced=False, verbs={"get", "list", "watch"})


@pytest.fixture(params=["kmock", pytest.param("real", marks=pytest.mark.realk8s)])
async def cluster(request: pytest.FixtureRequest, tmp_path: Path, kmock: Any) -> AsyncIterator[Cluster]:
    # kmock starts for both params (it is an in-process server); the real backend ignores it.
    if request.param == "kmock":
        _declare_kmock_resources(kmock)
        kubeconfig = _kubeconfig_for(str(kmock.url).rstrip("/"), tmp_path / "kubeconfig")
        creds = load_credentials(kubeconfig)
        client = KubeClient(creds, creds.ssl_context(), user_agent=TEST_AGENT)
        try:
            yield Cluster("kmock", client, kubeconfig, "default", kmock)
        finally:
            await client.close()
        return
    if not REAL_KUBECONFIG:
        pytest.skip("real API server tests need TANDEM_TEST_KUBECONFIG=<kubeconfig of a test cluster>")
    kubeconfig = Path(REAL_KUBECONFIG)
    creds = await asyncio.to_thread(load_credentials, kubeconfig)
    client = KubeClient(creds, await asyncio.to_thread(creds.ssl_context), user_agent=TEST_AGENT)
    ns = f"tandem-test-{uuid.uuid4().hex[:8]}"
    try:
        for path in sorted((ROOT / "crds").glob("*.yaml")):
            crd = yaml.safe_load(path.read_text())
            existing = await client.get(CRD_KIND, None, crd["metadata"]["name"])  # type: ignore[arg-type]
            if existing is None:
                await client.request("POST", CRD_KIND.path(None), json=crd)
            else:
                crd["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
                await client.request("PUT", CRD_KIND.path(None, crd["metadata"]["name"]), json=crd)
        await client.request("POST", NAMESPACES.path(None), json={"metadata": {"name": ns}})
        await eventually(lambda: client.request("GET", LLMSERVICES.path(ns)), "the CRDs to be served")
        yield Cluster("real", client, kubeconfig, ns)
    finally:
        with contextlib.suppress(ApiError):
            await client.request("DELETE", NAMESPACES.path(None, ns))
        await client.close()


@contextlib.asynccontextmanager
async def operator(cluster: Cluster, resync_seconds: float = 0) -> AsyncIterator[KopfRunner]:
    """The real operator in a thread (KopfRunner), its loop separate from the test's and kmock's."""
    reconciler = Reconciler(OperatorDefaults(), timeout=20)
    # kmock cannot serve GET /api/v1/namespaces (its path parser fails on it), which kopf needs to
    # resolve -n patterns; so on kmock the operator runs cluster-wide (-A), on a real server in the
    # test's namespace. Both of the operator's scopes get exercised that way.
    scope: list[str | None] = [None] if cluster.fake else [cluster.ns]
    registry = build_registry(
        reconciler, kubeconfig=cluster.kubeconfig, namespaces=scope, resync_seconds=resync_seconds
    )
    args = ["run", "--standalone", *(["-A"] if cluster.fake else ["-n", cluster.ns])]
    runner = KopfRunner(args, registry=registry, settings=build_settings(), timeout=30)
    await asyncio.to_thread(runner.__enter__)
    try:
        yield runner
    finally:
        # Joining the thread blocks; do it off the loop that serves kmock so kopf can finish its requests.
        await asyncio.to_thread(runner.__exit__, None, None, None)


async def test_aggregated_service_gets_its_stack_and_status(cluster: Cluster) -> None:
    async with operator(cluster):
        await cluster.create(LLMSERVICES, aggregated())
        kids = await eventually(lambda: _all_children(cluster, "llm", 7), "7 children")
        owner = await cluster.get(LLMSERVICES, "llm")
        assert owner is not None
        for (kind, name), obj in kids.items():
            ref = obj["metadata"]["ownerReferences"][0]
            assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == (
                "LLMService", "llm", owner["metadata"]["uid"], True), (kind, name)
        dep = kids[("Deployment", "llm-unified")]
        assert dep["spec"]["replicas"] == 2
        pod = dep["spec"]["template"]
        assert pod["metadata"]["labels"]["serving.tandem.dev/role"] == "unified"
        assert pod["metadata"]["labels"]["serving.tandem.dev/service"] == "llm"
        assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        gateway = kids[("Deployment", "llm-gateway")]["spec"]["template"]["spec"]["containers"][0]
        assert "--k8s-selector" in gateway["command"]

        status = await eventually(lambda: _status_with(cluster, "llm", "readySummary"), "a status")
        assert status["readySummary"] == "U 0/2"
        assert status["observedGeneration"] == owner["metadata"]["generation"]
        assert condition(await cluster.get(LLMSERVICES, "llm"), "Ready")["status"] == "False"
        assert condition(await cluster.get(LLMSERVICES, "llm"), "InvalidSpec")["status"] == "False"
        assert {e["role"] for e in status["endpoints"]} == {"gateway", "unified"}
        assert status["selector"] == "serving.tandem.dev/service=llm,serving.tandem.dev/role=unified"

        if cluster.fake:  # a real cluster without a kubelet never gets ready pods
            await cluster.mark_deployment_ready("llm-unified")
            await cluster.mark_deployment_ready("llm-gateway")
            ready = await eventually(
                lambda: _ready(cluster, "llm"), "Ready=True after the Deployments report ready replicas")
            assert ready["status"]["readySummary"] == "U 2/2"
            assert ready["status"]["replicas"] == 2


async def _all_children(cluster: Cluster, owner: str, count: int) -> dict[tuple[str, str], dict[str, Any]] | None:
    kids = await cluster.children(owner)
    return kids if len(kids) == count else None


async def _status_with(cluster: Cluster, name: str, key: str) -> dict[str, Any] | None:
    obj = await cluster.get(LLMSERVICES, name)
    status = (obj or {}).get("status") or {}
    return status if key in status else None


async def _ready(cluster: Cluster, name: str) -> dict[str, Any] | None:
    obj = await cluster.get(LLMSERVICES, name)
    cond = condition(obj, "Ready")
    return obj if cond and cond["status"] == "True" else None
