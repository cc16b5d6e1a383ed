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
from kubeutil import (
    CLUSTER_ROLE_BINDINGS,
    CLUSTER_ROLES,
    NAMESPACES,
    apply_crds,
    cluster_role_bound,
    cluster_role_rules,
    kmock_kubeconfig,
    permissions_used,
    unique_name,
    until_allowed,
)

from tandem.kube import (
    CHILD_KINDS,
    CONFIGMAPS,
    DEPLOYMENTS,
    LLMSERVICES,
    PDBS,
    REMOTEPREFILLPOOLS,
    SERVICES,
    ApiError,
    Kind,
    KubeClient,
    load_credentials,
)
from tandem.operator.handlers import build_registry, build_settings
from tandem.operator.plan import LABEL_INSTANCE, LABEL_MANAGED_BY, MANAGER, OperatorDefaults
from tandem.operator.reconcile import Reconciler

ROOT = Path(__file__).resolve().parents[2]
REAL_KUBECONFIG = os.environ.get("TANDEM_TEST_KUBECONFIG")
# Optional: credentials of the user "tandem-operator". The operator then runs with nothing but the
# ClusterRole of deploy/rbac/operator.yaml (bound to that user by the fixture), which checks the RBAC
# file against a real authorizer too.
OPERATOR_KUBECONFIG = os.environ.get("TANDEM_TEST_OPERATOR_KUBECONFIG")
SERVICEACCOUNTS = Kind(group="", version="v1", plural="serviceaccounts", kind="ServiceAccount")
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
            "replicas": 2,
            "pools": {"unified": {"minReplicas": 1, "maxReplicas": 4}},
        },
    }
    body["spec"].update(spec)
    return body


def disaggregated(name: str = "pd", **spec: Any) -> dict[str, Any]:
    body = aggregated(name, **spec)
    body["spec"]["mode"] = "disaggregated"
    body["spec"]["pools"] = {"prefill": {"replicas": 1}, "decode": {"maxReplicas": 8}}
    body["spec"].update(spec)
    return body


class Cluster:
    """One API server as the tests see it: the operator's client plus what kmock cannot do itself."""

    def __init__(
        self,
        backend: str,
        client: KubeClient,
        kubeconfig: Path,
        namespace: str,
        kmock: Any = None,
        operator_kubeconfig: Path | None = None,
    ):
        self.backend = backend
        self.client = client
        self.kubeconfig = kubeconfig
        self.operator_kubeconfig = operator_kubeconfig or kubeconfig
        self.ns = namespace
        self.kmock = kmock

    @property
    def fake(self) -> bool:
        return self.backend == "kmock"

    async def create(self, kind: Kind, body: dict[str, Any]) -> dict[str, Any]:
        body = {**body, "metadata": {**body["metadata"], "namespace": self.ns}}
        if self.fake:  # a real server assigns these
            body["metadata"].update(
                uid=str(uuid.uuid4()), generation=1, creationTimestamp="2026-01-01T00:00:00Z"
            )
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
            for obj in await self.client.list(
                kind, self.ns, {LABEL_INSTANCE: owner, LABEL_MANAGED_BY: MANAGER}
            ):
                found[(kind.kind, obj["metadata"]["name"])] = obj
        return found

    async def mark_deployment_ready(self, name: str) -> None:
        """Play the deployment controller (kmock has none): every desired replica ready and updated."""
        dep = await self.get(DEPLOYMENTS, name)
        assert dep is not None
        n = dep["spec"]["replicas"]
        status = {"replicas": n, "readyReplicas": n, "updatedReplicas": n, "availableReplicas": n}
        await self.client.merge_patch(DEPLOYMENTS, self.ns, name, {"status": status}, "status")


async def eventually(probe: Callable[[], Awaitable[Any]], what: str, within: float = WAIT) -> Any:
    """Poll ``probe`` until it returns something truthy (and return that) or fail naming ``what``."""
    deadline = asyncio.get_running_loop().time() + within
    last: Any = None
    while asyncio.get_running_loop().time() < deadline:
        with contextlib.suppress(AssertionError, KeyError, TypeError):
            last = await probe()
            if last:
                return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {within}s waiting for {what}; last: {last!r}")


def condition(obj: dict[str, Any] | None, ctype: str) -> dict[str, Any] | None:
    for cond in ((obj or {}).get("status") or {}).get("conditions", []) or []:
        if cond["type"] == ctype:
            return cond
    return None


def _declare_kmock_resources(kmock: Any) -> None:
    info = kmock.ResourceInfo
    kmock.resources["serving.tandem.dev/v1alpha1/llmservices"] = info(
        kind="LLMService",
        namespaced=True,
        subresources={"status", "scale"},
        verbs={"get", "list", "watch", "patch"},
    )
    kmock.resources["serving.tandem.dev/v1alpha1/remoteprefillpools"] = info(
        kind="RemotePrefillPool",
        namespaced=True,
        subresources={"status"},
        verbs={"get", "list", "watch", "patch"},
    )
    all_verbs = {"get", "list", "watch", "create", "patch", "delete"}
    kmock.resources["apps/v1/deployments"] = info(
        kind="Deployment", namespaced=True, subresources={"status", "scale"}, verbs=all_verbs
    )
    kmock.resources["v1/services"] = info(kind="Service", namespaced=True, verbs=all_verbs)
    kmock.resources["v1/configmaps"] = info(kind="ConfigMap", namespaced=True, verbs=all_verbs)
    kmock.resources["policy/v1/poddisruptionbudgets"] = info(
        kind="PodDisruptionBudget", namespaced=True, verbs=all_verbs
    )
    kmock.resources["v1/events"] = info(kind="Event", namespaced=True, verbs={"create"})
    # kopf needs the namespaces resource to be discoverable even when it runs cluster-wide.
    kmock.resources["v1/namespaces"] = info(
        kind="Namespace", namespaced=False, verbs={"get", "list", "watch"}
    )


@pytest.fixture(params=["kmock", pytest.param("real", marks=pytest.mark.realk8s)])
async def cluster(request: pytest.FixtureRequest, tmp_path: Path, kmock: Any) -> AsyncIterator[Cluster]:
    # kmock starts for both params (it is an in-process server); the real backend ignores it.
    if request.param == "kmock":
        _declare_kmock_resources(kmock)
        kubeconfig = kmock_kubeconfig(kmock, tmp_path)
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
    ns = unique_name("tandem-test")
    cleanup = contextlib.AsyncExitStack()
    try:
        await apply_crds(client)
        await client.request(
            "POST",
            NAMESPACES.path(None),
            json={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
        )
        # What deploy/rbac/gateway.yaml provides per namespace: the gateway pods' ServiceAccount.
        await client.request(
            "POST",
            SERVICEACCOUNTS.path(ns),
            json={"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "tandem-gateway"}},
        )
        await eventually(lambda: client.request("GET", LLMSERVICES.path(ns)), "the CRDs to be served")
        if OPERATOR_KUBECONFIG:
            await _bind_operator_role(client, cleanup, Path(OPERATOR_KUBECONFIG), ns)
        yield Cluster(
            "real",
            client,
            kubeconfig,
            ns,
            operator_kubeconfig=Path(OPERATOR_KUBECONFIG) if OPERATOR_KUBECONFIG else None,
        )
    finally:
        await cleanup.aclose()
        with contextlib.suppress(ApiError):
            await client.request("DELETE", NAMESPACES.path(None, ns))
        await client.close()


async def _bind_operator_role(
    client: KubeClient, cleanup: contextlib.AsyncExitStack, operator_kubeconfig: Path, ns: str
) -> None:
    """deploy/rbac/operator.yaml's rules, as a ClusterRole of the test's own bound to the user
    "tandem-operator" (removed by ``cleanup``); returns once that user may read the test's namespace."""
    role = next(
        d for d in yaml.safe_load_all((ROOT / "deploy" / "rbac" / "operator.yaml").read_text())
        if d["kind"] == "ClusterRole"
    )
    user = {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "tandem-operator"}
    await cleanup.enter_async_context(cluster_role_bound(client, role["rules"], user, "tandem-operator-test"))
    creds = await asyncio.to_thread(load_credentials, operator_kubeconfig)
    operator_client = KubeClient(creds, await asyncio.to_thread(creds.ssl_context), user_agent=TEST_AGENT)
    try:
        await until_allowed(operator_client, LLMSERVICES.path(ns))
    finally:
        await operator_client.close()


async def test_real_tier_rbac_has_names_of_its_own_and_leaves_nothing(kmock: Any, tmp_path: Path) -> None:
    """Issue 18: the real-server fixture replaced ClusterRole `tandem-operator` (the chart's and
    deploy/rbac/'s name) and left it and its binding behind. Run here against kmock: two runs side by
    side get distinct names, the existing `tandem-operator` role is untouched, and both runs clean up."""
    info = kmock.ResourceInfo
    verbs = {"get", "list", "create", "delete"}
    kmock.resources["rbac.authorization.k8s.io/v1/clusterroles"] = info(kind="ClusterRole", namespaced=False,
                                                                       verbs=verbs)
    kmock.resources["rbac.authorization.k8s.io/v1/clusterrolebindings"] = info(
        kind="ClusterRoleBinding", namespaced=False, verbs=verbs)
    creds = load_credentials(kmock_kubeconfig(kmock, tmp_path))
    client = KubeClient(creds, creds.ssl_context(), user_agent=TEST_AGENT)
    roles, bindings = CLUSTER_ROLES.path(None), CLUSTER_ROLE_BINDINGS.path(None)

    async def names(path: str) -> dict[str, Any]:
        return {o["metadata"]["name"]: o for o in (await client.request("GET", path))["items"]}

    charts = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
              "metadata": {"name": "tandem-operator"}, "rules": [{"apiGroups": [""], "resources": ["pods"],
                                                                  "verbs": ["get"]}]}
    await client.request("POST", roles, json=charts)
    rules = [{"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["list"]}]
    user = {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "tandem-operator"}
    try:
        async with (cluster_role_bound(client, rules, user, "tandem-operator-test") as a,
                    cluster_role_bound(client, rules, user, "tandem-operator-test") as b):
            assert a != b and {a, b}.isdisjoint({"tandem-operator"})
            assert (await names(roles))[a]["rules"] == rules
            assert (await names(bindings))[b]["roleRef"]["name"] == b
        assert set(await names(roles)) == {"tandem-operator"} and await names(bindings) == {}
        assert (await names(roles))["tandem-operator"]["rules"] == charts["rules"]
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def operator(cluster: Cluster, resync_seconds: float = 0, namespaced: bool = False
                   ) -> AsyncIterator[KopfRunner]:
    """The real operator in a thread (KopfRunner), its loop separate from the test's and kmock's.

    kmock cannot serve GET /api/v1/namespaces (its path parser fails on it), which kopf's scanning
    needs to resolve -n patterns; so on kmock the operator runs cluster-wide (-A) unless ``namespaced``
    (tandem operator run --namespace: no scanning, exactly the named namespace), and on a real server
    in the test's namespace. The operator's scopes get exercised that way."""
    reconciler = Reconciler(OperatorDefaults(), timeout=20)
    clusterwide = cluster.fake and not namespaced
    scope: list[str | None] = [None] if clusterwide else [cluster.ns]
    registry = build_registry(
        reconciler, kubeconfig=cluster.operator_kubeconfig, namespaces=scope, resync_seconds=resync_seconds
    )
    args = ["run", "--standalone", *(["-A"] if clusterwide else ["-n", cluster.ns])]
    runner = KopfRunner(args, registry=registry, settings=build_settings(namespaced=namespaced), timeout=30)
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
                "LLMService",
                "llm",
                owner["metadata"]["uid"],
                True,
            ), (kind, name)
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
                lambda: _ready(cluster, "llm"), "Ready=True after the Deployments report ready replicas"
            )
            assert ready["status"]["readySummary"] == "U 2/2"
            assert ready["status"]["replicas"] == 2


async def _all_children(
    cluster: Cluster, owner: str, count: int
) -> dict[tuple[str, str], dict[str, Any]] | None:
    kids = await cluster.children(owner)
    return kids if len(kids) == count else None


async def _children_named(cluster: Cluster, owner: str, names: set[str]) -> dict[tuple[str, str], Any] | None:
    kids = await cluster.children(owner)
    return kids if {name for _, name in kids} == names else None


async def _status_with(cluster: Cluster, name: str, key: str) -> dict[str, Any] | None:
    obj = await cluster.get(LLMSERVICES, name)
    status = (obj or {}).get("status") or {}
    return status if key in status else None


async def _ready(cluster: Cluster, name: str) -> dict[str, Any] | None:
    obj = await cluster.get(LLMSERVICES, name)
    cond = condition(obj, "Ready")
    return obj if cond and cond["status"] == "True" else None


async def _writes(cluster: Cluster) -> list[tuple[str, str]]:
    """(method, path) of every write the operator sent to kmock so far."""
    return [
        (r.method, r.url.path)
        for r in cluster.kmock
        if r.headers.get("User-Agent") == "tandem-operator" and r.method in {"POST", "PATCH", "PUT", "DELETE"}
    ]


async def test_reconcile_is_idempotent(cluster: Cluster) -> None:
    async with operator(cluster, resync_seconds=0.2):
        await cluster.create(LLMSERVICES, disaggregated())
        await eventually(lambda: _all_children(cluster, "pd", 10), "10 children")
        await eventually(lambda: _status_with(cluster, "pd", "readySummary"), "a status")
        await asyncio.sleep(0.5)  # let the creation events settle
        before = _fingerprints(await cluster.children("pd"), cluster.fake)
        writes = await _writes(cluster) if cluster.fake else []
        service = await cluster.get(LLMSERVICES, "pd")
        await asyncio.sleep(1.5)  # several periodic passes plus the events of the service itself
        assert _fingerprints(await cluster.children("pd"), cluster.fake) == before
        after = await cluster.get(LLMSERVICES, "pd")
        assert after is not None and service is not None
        assert after["metadata"].get("generation") == service["metadata"].get("generation")
        if cluster.fake:
            assert await _writes(cluster) == writes
            reads = [r for r in cluster.kmock if r.headers.get("User-Agent") == "tandem-operator"]
            assert len(reads) > 40, "the periodic passes did run (and only read)"


def _fingerprints(kids: dict[tuple[str, str], dict[str, Any]], fake: bool) -> dict[tuple[str, str], Any]:
    """What only the operator's writes change: whole objects on kmock; on a real server the
    generation (spec writes) or, for kinds without one, the resourceVersion, since controllers
    legitimately keep writing Deployment and PDB status."""
    if fake:
        return kids
    return {k: o["metadata"].get("generation") or o["metadata"]["resourceVersion"] for k, o in kids.items()}


async def test_deleted_or_edited_children_are_restored(cluster: Cluster) -> None:
    async with operator(cluster):
        await cluster.create(LLMSERVICES, aggregated())
        kids = await eventually(lambda: _all_children(cluster, "llm", 7), "7 children")
        original_uid = kids[("Service", "llm")]["metadata"].get("uid")
        await cluster.client.delete(SERVICES, cluster.ns, "llm")
        await eventually(
            lambda: _recreated(cluster, SERVICES, "llm", original_uid), "the gateway Service back"
        )

        await cluster.client.merge_patch(
            DEPLOYMENTS,
            cluster.ns,
            "llm-unified",
            {
                "spec": {"replicas": 5, "template": {"spec": {"nodeSelector": {"sneaky": "edit"}}}},
            },
        )
        dep = await eventually(
            lambda: _deployment_where(
                cluster,
                "llm-unified",
                lambda d: (
                    d["spec"]["replicas"] == 2
                    and "sneaky" not in (d["spec"]["template"]["spec"].get("nodeSelector") or {})
                ),
            ),
            "replicas and nodeSelector restored",
        )
        assert dep["spec"]["template"]["spec"]["containers"][0]["name"] == "engine"

        await cluster.client.merge_patch(
            CONFIGMAPS, cluster.ns, "llm-config", {"data": {"service.json": "{}"}}
        )
        await eventually(
            lambda: _config_where(cluster, "llm-config", lambda d: d["service"] == "llm"),
            "service.json restored",
        )


async def _recreated(cluster: Cluster, kind: Kind, name: str, old_uid: str | None) -> bool:
    obj = await cluster.get(kind, name)
    return obj is not None and (cluster.fake or obj["metadata"]["uid"] != old_uid)


async def _deployment_where(
    cluster: Cluster, name: str, pred: Callable[[dict[str, Any]], bool]
) -> dict[str, Any] | None:
    dep = await cluster.get(DEPLOYMENTS, name)
    return dep if dep is not None and pred(dep) else None


async def _config_where(
    cluster: Cluster, name: str, pred: Callable[[dict[str, Any]], bool]
) -> dict[str, Any] | None:
    import json

    cm = await cluster.get(CONFIGMAPS, name)
    if cm is None:
        return None
    data = json.loads(cm["data"]["service.json"])
    return data if pred(data) else None


async def test_spec_changes_roll_out_and_mode_switch_replaces_roles(cluster: Cluster) -> None:
    async with operator(cluster):
        await cluster.create(LLMSERVICES, aggregated())
        await eventually(lambda: _all_children(cluster, "llm", 7), "7 children")
        await cluster.patch_spec(LLMSERVICES, "llm", {"model": {"args": ["--max-model-len", "8192"]}})
        dep = await eventually(
            lambda: _deployment_where(
                cluster,
                "llm-unified",
                lambda d: "8192" in d["spec"]["template"]["spec"]["containers"][0]["command"],
            ),
            "the new engine argument in the pod template",
        )
        assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}

        await cluster.patch_spec(
            LLMSERVICES,
            "llm",
            {
                "mode": "disaggregated",
                "replicas": 3,
                "pools": {"unified": None, "prefill": {"replicas": 1}, "decode": {}},
            },
        )
        want = {"llm-config", "llm", "llm-gateway", "llm-prefill", "llm-decode"}
        kids = await eventually(
            lambda: _children_named(cluster, "llm", want), "unified replaced by prefill+decode"
        )
        assert len(kids) == 10
        assert kids[("Deployment", "llm-decode")]["spec"]["replicas"] == 3
        command = kids[("Deployment", "llm-prefill")]["spec"]["template"]["spec"]["containers"][0]["command"]
        assert (
            command[command.index("--kv-transfer-config") + 1]
            == '{"kv_connector":"NixlConnector","kv_role":"kv_both"}'
        )
        status = await eventually(
            lambda: _status_where(cluster, "llm", lambda s: set(s.get("roles", {})) == {"prefill", "decode"}),
            "status roles follow the mode",
        )
        assert status["readySummary"] == "P 0/1 D 0/3"


async def _status_where(
    cluster: Cluster, name: str, pred: Callable[[dict[str, Any]], bool]
) -> dict[str, Any] | None:
    obj = await cluster.get(LLMSERVICES, name)
    status = (obj or {}).get("status") or {}
    return status if pred(status) else None


BAD_SPECS = [
    pytest.param(
        {"replicas": 1, "pools": {"unified": {"minReplicas": 2}}},
        "spec",
        "replicas must lie within pools.unified.minReplicas..maxReplicas",
        id="replicas-below-min",
    ),
    pytest.param(
        {"mode": "disaggregated"},
        "spec",
        "disaggregated mode needs pools.prefill and pools.decode",
        id="disaggregated-without-pools",
    ),
    pytest.param(
        {"offload": {"remotePrefill": "x", "auto": True}},
        "spec",
        "offload to a remote prefill pool needs disaggregated mode",
        id="offload-in-aggregated",
    ),
]


@pytest.mark.parametrize(("spec", "field", "reason"), BAD_SPECS)
async def test_invalid_spec_is_refused_and_nothing_is_applied(
    cluster: Cluster, spec: dict[str, Any], field: str, reason: str
) -> None:
    body = aggregated("bad", **spec)
    if not cluster.fake:
        # The API server's schema and CEL rules refuse it before the operator ever sees it.
        with pytest.raises(ApiError) as refused:
            await cluster.create(LLMSERVICES, body)
        assert refused.value.status == 422
        assert reason in refused.value.message
        return
    async with operator(cluster):
        await cluster.create(LLMSERVICES, body)
        obj = await eventually(
            lambda: _condition_is(cluster, "bad", "InvalidSpec", "True"), "InvalidSpec=True"
        )
        cond = condition(obj, "InvalidSpec")
        assert cond["message"] == f"{field}: {reason}"
        assert condition(obj, "Ready")["status"] == "False"
        assert obj["status"]["observedGeneration"] == 1
        assert await cluster.children("bad") == {}


async def _condition_is(cluster: Cluster, name: str, ctype: str, value: str) -> dict[str, Any] | None:
    obj = await cluster.get(LLMSERVICES, name)
    cond = condition(obj, ctype)
    return obj if cond and cond["status"] == value else None


# A real API server refuses such an update itself (test_invalid_spec_is_refused_and_nothing_is_applied).
@pytest.mark.parametrize("cluster", ["kmock"], indirect=True)
async def test_invalid_update_leaves_the_running_stack_alone(cluster: Cluster) -> None:
    async with operator(cluster):
        await cluster.create(LLMSERVICES, aggregated())
        before = await eventually(lambda: _all_children(cluster, "llm", 7), "7 children")
        await cluster.patch_spec(LLMSERVICES, "llm", {"replicas": 9})  # > maxReplicas 4
        obj = await eventually(
            lambda: _condition_is(cluster, "llm", "InvalidSpec", "True"), "InvalidSpec=True"
        )
        message = condition(obj, "InvalidSpec")["message"]
        assert message == "spec: replicas must lie within pools.unified.minReplicas..maxReplicas"
        assert obj["status"]["observedGeneration"] == 2
        assert await cluster.children("llm") == before  # nothing half-applied
        await cluster.patch_spec(LLMSERVICES, "llm", {"replicas": 3})
        await eventually(lambda: _condition_is(cluster, "llm", "InvalidSpec", "False"), "InvalidSpec=False")
        await eventually(
            lambda: _deployment_where(cluster, "llm-unified", lambda d: d["spec"]["replicas"] == 3),
            "the fixed spec applied",
        )


def remote_pool(name: str = "west") -> dict[str, Any]:
    return {
        "apiVersion": "serving.tandem.dev/v1alpha1",
        "kind": "RemotePrefillPool",
        "metadata": {"name": name},
        "spec": {
            "endpoints": ["https://prefill.west.example:8000"],
            "linkBandwidthGbps": 100,
            "rttMilliseconds": 12,
            "credentialsSecretRef": {"name": "west-token"},
        },
    }


async def test_remote_prefill_pool_missing_then_created(cluster: Cluster) -> None:
    async with operator(cluster):
        await cluster.create(
            LLMSERVICES, disaggregated(offload={"remotePrefill": "west", "lengthThreshold": 8192})
        )
        obj = await eventually(lambda: _condition_is(cluster, "pd", "Degraded", "True"), "Degraded=True")
        assert "spec.offload.remotePrefill" in condition(obj, "Degraded")["message"]
        await eventually(
            lambda: _config_where(cluster, "pd-config", lambda d: d["offload"] is None), "no offload yet"
        )

        await cluster.create(REMOTEPREFILLPOOLS, remote_pool())
        await eventually(lambda: _condition_is(cluster, "pd", "Degraded", "False"), "Degraded=False")
        config = await eventually(
            lambda: _config_where(cluster, "pd-config", lambda d: d["offload"] is not None),
            "offload in service.json",
        )
        assert config["offload"]["endpoints"] == ["https://prefill.west.example:8000"]
        assert config["offload"]["lengthThreshold"] == 8192
        gateway = await cluster.get(DEPLOYMENTS, "pd-gateway")
        env = {e["name"]: e for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["TANDEM_GATEWAY_REMOTE_PREFILL_TOKEN"]["valueFrom"]["secretKeyRef"] == {
            "name": "west-token",
            "key": "token",
        }
        pool = await cluster.get(REMOTEPREFILLPOOLS, "west")
        assert condition(pool, "InvalidSpec")["status"] == "False"


# ---------------------------------------------------------------------------------------------
# RBAC: deploy/rbac/operator.yaml against the requests the operator really makes.

# Rules the kmock scenario cannot exercise, each with the reason it is still needed.
RBAC_NOT_EXERCISED = {
    (
        "serving.tandem.dev",
        "llmservices/finalizers",
        "update",
    ): "a real API server's OwnerReferencesPermissionEnforcement checks it for blockOwnerDeletion",
    ("", "namespaces", "list"): "kopf resolves -n patterns against namespaces (kmock runs cluster-wide)",
    ("", "namespaces", "watch"): "kopf follows namespaces appearing at run time (kmock runs cluster-wide)",
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"): "kopf follows CRDs (kmock serves none)",
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"): "kopf follows CRDs (kmock serves none)",
    ("", "events", "create"): "kopf posts an Event when a handler fails (none fails in the scenario)",
    **{
        ("inference.networking.k8s.io", "inferencepools", verb): "test_operator_inferencepool.py exercises it "
        "(the scenario's cluster serves no InferencePool API, an optional CRD)"
        for verb in ("create", "patch", "delete")
    },
}


@pytest.mark.parametrize("cluster", ["kmock"], indirect=True)  # reads kmock's request log
async def test_rbac_allows_everything_the_operator_does_and_no_more(cluster: Cluster) -> None:
    async with operator(cluster, resync_seconds=0.3):
        await cluster.create(LLMSERVICES, disaggregated(offload={"remotePrefill": "west", "auto": True}))
        await cluster.create(REMOTEPREFILLPOOLS, remote_pool())
        await eventually(lambda: _condition_is(cluster, "pd", "Degraded", "False"), "offload configured")
        await cluster.client.delete(SERVICES, cluster.ns, "pd")
        await eventually(lambda: cluster.get(SERVICES, "pd"), "gateway Service restored")
        for kind, name, edit in [
            (SERVICES, "pd-decode", {"spec": {"selector": {"app": "other"}}}),
            (PDBS, "pd-decode", {"spec": {"maxUnavailable": 5}}),
            (CONFIGMAPS, "pd-config", {"data": {"service.json": "{}"}}),
            (DEPLOYMENTS, "pd-gateway", {"spec": {"replicas": 7}}),
        ]:
            await cluster.client.merge_patch(kind, cluster.ns, name, edit)
        await eventually(
            lambda: _deployment_where(cluster, "pd-gateway", lambda d: d["spec"]["replicas"] == 1),
            "edits reverted",
        )
        await cluster.patch_spec(
            LLMSERVICES,
            "pd",
            {
                "mode": "aggregated",
                "offload": None,
                "replicas": 1,
                "pools": {"prefill": None, "decode": None, "unified": {}},
            },
        )
        await eventually(
            lambda: _children_named(cluster, "pd", {"pd-config", "pd", "pd-gateway", "pd-unified"}),
            "roles replaced",
        )
        await asyncio.sleep(0.5)  # one periodic pass
    used = permissions_used(cluster.kmock, ("tandem-operator", "kopf/"))
    granted = cluster_role_rules(ROOT / "deploy" / "rbac" / "operator.yaml")
    assert used - granted == set(), "the operator needs permissions deploy/rbac/operator.yaml lacks"
    unexplained = granted - used - set(RBAC_NOT_EXERCISED)
    assert unexplained == set(), "deploy/rbac/operator.yaml grants more than the operator uses"
    assert set(RBAC_NOT_EXERCISED) <= granted
    # The writes that matter were really made (so the comparison above is not vacuous).
    assert {
        ("apps", "deployments", "create"),
        ("apps", "deployments", "delete"),
        ("", "services", "create"),
        ("serving.tandem.dev", "llmservices/status", "patch"),
        ("apps", "deployments", "watch"),
    } <= used


@pytest.mark.parametrize("cluster", ["kmock"], indirect=True)  # reads kmock's request log
async def test_namespaced_operator_needs_only_its_role(cluster: Cluster) -> None:
    """``tandem operator run --namespace NS``: every request is inside NS and allowed by the Role of
    deploy/rbac/operator-namespaced.yaml; nothing cluster-wide (no namespaces, no CRDs)."""
    async with operator(cluster, resync_seconds=0.3, namespaced=True):
        await cluster.create(LLMSERVICES, disaggregated(offload={"remotePrefill": "west", "auto": True}))
        await cluster.create(REMOTEPREFILLPOOLS, remote_pool())
        await eventually(lambda: _condition_is(cluster, "pd", "Degraded", "False"), "offload configured")
        await cluster.client.delete(SERVICES, cluster.ns, "pd")
        await eventually(lambda: cluster.get(SERVICES, "pd"), "gateway Service restored")
        await asyncio.sleep(0.5)  # one periodic pass
    agents = ("tandem-operator", "kopf/")
    used = permissions_used(cluster.kmock, agents)
    outside = [f"{r.method} {r.url.path}" for r in cluster.kmock
               if r.headers.get("User-Agent", "").startswith(agents) and r.url.path.startswith(("/api/", "/apis/"))
               and len(r.url.path.split("/")) > 4 and f"/namespaces/{cluster.ns}/" not in r.url.path]
    assert outside == [], "the namespaced operator made requests outside its namespace"
    granted = cluster_role_rules(ROOT / "deploy" / "rbac" / "operator-namespaced.yaml", "Role")
    assert used - granted == set(), "the namespaced operator needs permissions its Role lacks"
    assert granted == cluster_role_rules(ROOT / "deploy" / "rbac" / "operator.yaml") - {
        p for p in RBAC_NOT_EXERCISED if p[1] in (
        "namespaces", "customresourcedefinitions")}  # the cluster-wide rules less what only scanning needs
    assert {("apps", "deployments", "create"), ("serving.tandem.dev", "llmservices/status", "patch")} <= used


# ---------------------------------------------------------------------------------------------
# What only a real API server (with kube-controller-manager) does.


@pytest.mark.realk8s
@pytest.mark.parametrize("cluster", ["real"], indirect=True)
async def test_real_scale_subresource_drives_the_primary_pool(cluster: Cluster) -> None:
    async with operator(cluster):
        await cluster.create(LLMSERVICES, disaggregated())
        await eventually(lambda: _status_with(cluster, "pd", "selector"), "status with a selector")
        path = LLMSERVICES.path(cluster.ns, "pd", "scale")
        scale = await cluster.client.request("GET", path)
        assert scale["kind"] == "Scale"
        assert scale["spec"]["replicas"] == 2  # spec.replicas, defaulted or set, always exists
        assert scale["status"]["selector"] == "serving.tandem.dev/service=pd,serving.tandem.dev/role=decode"
        gateway_before = await cluster.get(DEPLOYMENTS, "pd-gateway")
        await cluster.client.merge_patch(LLMSERVICES, cluster.ns, "pd", {"spec": {"replicas": 5}}, "scale")
        obj = await cluster.get(LLMSERVICES, "pd")
        assert obj["spec"]["replicas"] == 5
        await eventually(
            lambda: _deployment_where(cluster, "pd-decode", lambda d: d["spec"]["replicas"] == 5),
            "decode Deployment scaled through the scale subresource",
        )
        prefill = await cluster.get(DEPLOYMENTS, "pd-prefill")
        assert prefill["spec"]["replicas"] == 1
        gateway_after = await cluster.get(DEPLOYMENTS, "pd-gateway")
        assert (
            gateway_after["metadata"]["generation"] == gateway_before["metadata"]["generation"]
        )  # no restart
        # Deployment -> ReplicaSet -> Pods (kube-controller-manager), counted back into the status.
        pods = await eventually(
            lambda: _pods(cluster, "serving.tandem.dev/service=pd,serving.tandem.dev/role=decode", 5),
            "5 decode pods from Deployment -> ReplicaSet -> Pods",
        )
        labels = pods[0]["metadata"]["labels"]
        assert (
            labels["serving.tandem.dev/model"] == "llama-8b" and labels["serving.tandem.dev/engine"] == "vllm"
        )
        assert pods[0]["metadata"]["ownerReferences"][0]["kind"] == "ReplicaSet"
        await eventually(
            lambda: _status_where(cluster, "pd", lambda s: s.get("replicas") == 5),
            "status.replicas (scale statusReplicasPath) from the decode Deployment",
        )


@pytest.mark.realk8s
@pytest.mark.parametrize("cluster", ["real"], indirect=True)
async def test_real_status_subresource_and_garbage_collection(cluster: Cluster) -> None:
    async with operator(cluster):
        await cluster.create(LLMSERVICES, aggregated())
        await eventually(lambda: _all_children(cluster, "llm", 7), "7 children")
        await eventually(lambda: _status_with(cluster, "llm", "readySummary"), "a status")
        # Writing status through the main resource is ignored when the status subresource is on.
        await cluster.client.merge_patch(
            LLMSERVICES, cluster.ns, "llm", {"status": {"readySummary": "forged"}}
        )
        assert (await cluster.get(LLMSERVICES, "llm"))["status"]["readySummary"] != "forged"
    # With the operator stopped, deleting the owner removes every child through ownerReferences.
    await cluster.client.delete(LLMSERVICES, cluster.ns, "llm")
    await eventually(lambda: _no_children(cluster, "llm"), "children garbage-collected", within=60)


async def _pods(cluster: Cluster, selector: str, count: int) -> list[dict[str, Any]] | None:
    data = await cluster.client.request(
        "GET", f"/api/v1/namespaces/{cluster.ns}/pods", params={"labelSelector": selector}
    )
    return data["items"] if len(data["items"]) == count else None


async def _no_children(cluster: Cluster, owner: str) -> bool:
    return await cluster.children(owner) == {}


@pytest.mark.parametrize("cluster", ["kmock"], indirect=True)
async def test_tandem_operator_run_command_end_to_end(cluster: Cluster) -> None:
    """The installed CLI path: `tandem operator run` in its own process, stopped with SIGTERM."""
    import signal
    import socket
    import sys

    import aiohttp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tandem.cli",
        "operator",
        "run",
        "--all-namespaces",
        "--kubeconfig",
        str(cluster.kubeconfig),
        "--liveness-host",
        "127.0.0.1",
        "--liveness-port",
        str(port),
        "--resync-seconds",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        await cluster.create(LLMSERVICES, aggregated())
        await eventually(
            lambda: _all_children(cluster, "llm", 7), "7 children from the CLI's operator", within=30
        )

        async def healthy() -> bool:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{port}/healthz") as r,
            ):
                return r.status == 200

        await eventually(healthy, "the liveness endpoint")
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            output, _ = await asyncio.wait_for(proc.communicate(), 30)
        except TimeoutError:
            proc.kill()
            raise
    assert proc.returncode == 0, output.decode()[-2000:]


@pytest.mark.realk8s
@pytest.mark.parametrize("cluster", ["real"], indirect=True)
async def test_real_server_refusing_a_child_is_reported_as_degraded(cluster: Cluster) -> None:
    # The CRD does not check label syntax; the Deployment's own validation does.
    body = aggregated(pools={"unified": {"nodeSelector": {"bad key!": "x"}}})
    async with operator(cluster):
        await cluster.create(LLMSERVICES, body)
        obj = await eventually(lambda: _condition_is(cluster, "llm", "Degraded", "True"), "Degraded=True")
        assert "Deployment llm-unified" in condition(obj, "Degraded")["message"]
        assert await cluster.get(DEPLOYMENTS, "llm-gateway") is not None  # the rest was applied


# A real API server refuses the invalid pool itself (schema: linkBandwidthGbps > 0).
@pytest.mark.parametrize("cluster", ["kmock"], indirect=True)
async def test_invalid_remote_prefill_pool_is_reported_on_both_objects(cluster: Cluster) -> None:
    bad = remote_pool()
    bad["spec"]["linkBandwidthGbps"] = -1
    async with operator(cluster):
        await cluster.create(REMOTEPREFILLPOOLS, bad)
        await cluster.create(LLMSERVICES, disaggregated(offload={"remotePrefill": "west", "auto": True}))
        pool = await eventually(
            lambda: _pool_condition_is(cluster, "west", "InvalidSpec", "True"), "the pool's InvalidSpec=True"
        )
        assert (
            condition(pool, "InvalidSpec")["message"]
            == "spec.linkBandwidthGbps: Input should be greater than 0"
        )
        obj = await eventually(lambda: _condition_is(cluster, "pd", "Degraded", "True"), "Degraded=True")
        assert (
            "RemotePrefillPool 'west' is invalid (spec.linkBandwidthGbps"
            in condition(obj, "Degraded")["message"]
        )
        assert await cluster.get(DEPLOYMENTS, "pd-decode") is not None  # the service runs without offload


async def _pool_condition_is(cluster: Cluster, name: str, ctype: str, value: str) -> dict[str, Any] | None:
    obj = await cluster.get(REMOTEPREFILLPOOLS, name)
    cond = condition(obj, ctype)
    return obj if cond and cond["status"] == value else None


@pytest.mark.realk8s
@pytest.mark.parametrize("cluster", ["real"], indirect=True)
async def test_real_gateway_without_its_service_account_is_degraded(cluster: Cluster) -> None:
    await cluster.client.delete(SERVICEACCOUNTS, cluster.ns, "tandem-gateway")
    async with operator(cluster):
        await cluster.create(LLMSERVICES, aggregated())
        obj = await eventually(
            lambda: _condition_is(cluster, "llm", "Degraded", "True"), "Degraded=True", within=30
        )
        message = condition(obj, "Degraded")["message"]
        assert message.startswith("llm-gateway: ") and "tandem-gateway" in message


@pytest.mark.realk8s
@pytest.mark.parametrize("cluster", ["real"], indirect=True)
async def test_real_name_too_long_is_reported_at_metadata_name(cluster: Cluster) -> None:
    """The CEL rule on the root carries fieldPath .metadata.name (issue 18: it was reported as `<nil>`)."""
    from tandem.api.models import MAX_NAME_LENGTH

    await cluster.create(LLMSERVICES, aggregated("x" * MAX_NAME_LENGTH))  # the longest name allowed
    with pytest.raises(ApiError) as refused:
        await cluster.create(LLMSERVICES, aggregated("x" * (MAX_NAME_LENGTH + 1)))
    assert refused.value.status == 422
    message = refused.value.message
    # "metadata.name: Invalid value[: "object"]: must be at most 55 ..." (whether the value's type is
    # printed depends on the Kubernetes version).
    field, _, detail = message.partition(" is invalid: ")[2].partition(": Invalid value")
    assert field == "metadata.name", message
    assert detail.endswith(f"must be at most {MAX_NAME_LENGTH} characters (children append '-gateway')"), message
