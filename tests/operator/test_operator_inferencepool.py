"""``spec.gateway.type: inference-pool``: an InferencePool and Tandem's endpoint picker instead of the gateway.

The plan is checked as data (pure), then one reconcile against an API server (kmock, or
TANDEM_TEST_KUBECONFIG's real one): with the InferencePool API served, and without it (its CRD
belongs to the Gateway API Inference Extension release and may be missing).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
from kubeutil import cluster_role_rules, permissions_used
from pydantic import ValidationError
from pydantic_settings import CliApp
from test_operator_kopf import Cluster, aggregated, cluster, condition  # noqa: F401

from tandem.api.models import LLMService
from tandem.kube import DEPLOYMENTS, INFERENCEPOOLS, LLMSERVICES, SERVICES, ApiError, KubeClient, load_credentials
from tandem.operator.plan import OperatorDefaults, PlanError, plan_service
from tandem.operator.reconcile import Reconciler
from tandem.router.eppsettings import EppSettings

RBAC = Path(__file__).resolve().parents[2] / "deploy" / "rbac"


def _service(**gateway: Any) -> LLMService:
    body = aggregated(gateway={"type": "inference-pool", **gateway})
    body["metadata"].update(namespace="team", uid="u-1")
    return LLMService.model_validate(body)


def _by(children: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(c["kind"], c["metadata"]["name"]): c for c in children}


def test_plan_replaces_the_gateway_with_a_pool_and_its_picker() -> None:
    children = _by(plan_service(_service(inferencePool={"failureMode": "FailOpen"}), OperatorDefaults(), {}).children)
    assert ("Deployment", "llm-gateway") not in children and ("Service", "llm") not in children
    pool = children[("InferencePool", "llm")]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    engines = children[("Deployment", "llm-unified")]["spec"]["template"]
    labels = engines["metadata"]["labels"]
    # The pool selects exactly the unified engine pods, on the port their container serves.
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["containerPort"] for p in engines["spec"]["containers"][0]["ports"]}
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [8000] and 8000 in ports
    ref = pool["spec"]["endpointPickerRef"]
    assert ref["failureMode"] == "FailOpen"
    picker_service = children[("Service", ref["name"])]
    grpc_port = next(p for p in picker_service["spec"]["ports"] if p["port"] == ref["port"]["number"])
    assert grpc_port["name"] == "grpc" and grpc_port["appProtocol"] == "kubernetes.io/h2c"
    picker = children[("Deployment", "llm-epp")]
    pod = picker["spec"]["template"]
    assert picker_service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    container = pod["spec"]["containers"][0]
    assert container["readinessProbe"]["grpc"] == {"port": 9002, "service": "readiness"}
    assert container["livenessProbe"]["grpc"] == {"port": 9002, "service": "liveness"}
    assert pod["spec"]["serviceAccountName"] == "tandem-gateway"  # pods get/list/watch: its discovery
    assert ("PodDisruptionBudget", "llm-epp") in children


def test_picker_command_is_accepted_by_the_real_cli() -> None:
    children = _by(plan_service(_service(), OperatorDefaults(), {}).children)
    argv = children[("Deployment", "llm-epp")]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert argv[:2] == ["tandem", "epp"]
    settings = CliApp.run(EppSettings, cli_args=argv[2:], cli_settings_source=None)
    assert settings.discovery == "kubernetes" and settings.k8s_namespace == "team"
    assert settings.k8s_selector == "serving.tandem.dev/service=llm,serving.tandem.dev/role=unified"
    assert (settings.grpc_port, settings.port, settings.host) == (9002, 9090, "0.0.0.0"), shlex.join(argv)


def test_picker_replicas_share_state_through_redis() -> None:
    with pytest.raises(PlanError) as exc:
        plan_service(_service(replicas=2), OperatorDefaults(), {})
    assert exc.value.field == "spec.gateway.replicas"
    url = "redis://redis.tandem-system.svc:6379/0"
    children = _by(plan_service(_service(replicas=2), OperatorDefaults(gateway_redis_url=url), {}).children)
    container = children[("Deployment", "llm-epp")]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "TANDEM_EPP_REDIS_URL", "value": url} in container["env"]
    assert container["command"][-2:] == ["--redis-prefix", "tandem/team/llm"]


@pytest.mark.parametrize(("change", "message"), [
    ({"mode": "disaggregated", "pools": {"prefill": {}, "decode": {}}}, "disaggregated mode needs the embedded"),
    ({"gateway": {"type": "inference-pool", "workers": 2}}, "use replicas, not workers"),
])
def test_what_an_inference_pool_cannot_serve_is_refused(change: dict[str, Any], message: str) -> None:
    body = aggregated(gateway={"type": "inference-pool"})
    body["spec"].update(change)
    body["metadata"].update(namespace="team", uid="u-1")
    with pytest.raises(ValidationError, match=message):
        LLMService.model_validate(body)


async def _reconcile(c: Cluster, defaults: OperatorDefaults | None = None) -> Any:
    creds = load_credentials(c.kubeconfig)
    reconciler = Reconciler(defaults or OperatorDefaults(), timeout=20)
    await reconciler.use_client(KubeClient(creds, creds.ssl_context(), user_agent="tandem-operator"))
    try:
        return await reconciler.reconcile(c.ns, "llm")
    finally:
        await reconciler.close()


async def _pools_served(c: Cluster) -> bool:
    """Whether the real API server serves inference.networking.k8s.io/v1 InferencePools (its CRD
    comes from the GIE release, not from Tandem: installed or not, both cases are tested)."""
    try:
        await c.client.request("GET", INFERENCEPOOLS.path(c.ns))
    except ApiError as exc:
        if exc.status == 404:
            return False
        raise
    return True


async def _serve_inference_pools(c: Cluster) -> None:
    """kmock: serve the InferencePool API; a real server must have the GIE CRDs installed (checked
    with v1.6.0's config/crd/bases/inference.networking.k8s.io_inferencepools.yaml)."""
    if c.fake:
        c.kmock.resources["inference.networking.k8s.io/v1/inferencepools"] = c.kmock.ResourceInfo(
            kind="InferencePool", namespaced=True, verbs={"get", "list", "watch", "create", "patch", "delete"})
    elif not await _pools_served(c):
        pytest.skip("needs the Gateway API Inference Extension CRDs on the real API server")


@pytest.mark.xdist_group("operator-kopf")
async def test_reconcile_creates_the_pool_then_switching_back_removes_it(cluster: Cluster) -> None:  # noqa: F811
    """On a real server with the GIE CRD, its schema validates what the operator writes."""
    await _serve_inference_pools(cluster)
    await cluster.create(LLMSERVICES, aggregated(gateway={"type": "inference-pool"}))
    result = await _reconcile(cluster)
    assert result.invalid is None
    assert {"InferencePool/llm", "Deployment/llm-epp", "Service/llm-epp"} <= set(result.created)
    assert "Deployment/llm-gateway" not in result.created
    pool = await cluster.get(INFERENCEPOOLS, "llm")
    # (A real server adds the CRD's defaults: group "" and kind Service.)
    assert {"name": "llm-epp", "port": {"number": 9002}, "failureMode": "FailClose"}.items() <= \
        pool["spec"]["endpointPickerRef"].items()
    assert pool["spec"]["endpointPickerRef"].keys() <= {"name", "port", "failureMode", "group", "kind"}
    status = (await cluster.get(LLMSERVICES, "llm"))["status"]
    assert status["endpoints"][0] == {"name": "llm-epp", "role": "endpoint-picker",
                                      "url": f"grpc://llm-epp.{cluster.ns}.svc:9002"}
    again = await _reconcile(cluster)
    assert again.created == [] and "InferencePool/llm" not in again.patched  # converged, server defaults too

    await cluster.client.merge_patch(INFERENCEPOOLS, cluster.ns, "llm", {"spec": {"targetPorts": [{"number": 1}]}})
    assert "InferencePool/llm" in (await _reconcile(cluster)).patched  # drift corrected
    await cluster.patch_spec(LLMSERVICES, "llm", {"gateway": {"type": "embedded"}})
    result = await _reconcile(cluster)
    assert {"InferencePool/llm", "Deployment/llm-epp", "Service/llm-epp"} <= set(result.deleted)
    assert await cluster.get(INFERENCEPOOLS, "llm") is None
    assert await cluster.get(DEPLOYMENTS, "llm-gateway") is not None
    assert await cluster.get(SERVICES, "llm") is not None


@pytest.mark.xdist_group("operator-kopf")
async def test_without_the_inference_pool_api_the_rest_is_served_and_degraded_says_why(
        cluster: Cluster) -> None:  # noqa: F811
    if cluster.fake:  # kmock accepts objects of any resource: make it answer as a server without the CRD does
        cluster.kmock[f"/apis/inference.networking.k8s.io/v1/namespaces/{cluster.ns}/inferencepools"] << 404
    elif await _pools_served(cluster):
        pytest.skip("this real API server has the GIE CRDs installed")
    await cluster.create(LLMSERVICES, aggregated(gateway={"type": "inference-pool"}))
    result = await _reconcile(cluster)
    assert result.invalid is None and "Deployment/llm-epp" in result.created
    assert "InferencePool/llm" not in result.created
    degraded = condition(await cluster.get(LLMSERVICES, "llm"), "Degraded")
    assert degraded["status"] == "True"
    assert "inference.networking.k8s.io/v1 (inferencepools) is not served" in degraded["message"]


@pytest.mark.parametrize("cluster", ["kmock"], indirect=True)  # reads kmock's request log
@pytest.mark.xdist_group("operator-kopf")
async def test_rbac_covers_the_inference_pool_requests(cluster: Cluster) -> None:  # noqa: F811
    """What the operator did with InferencePools above is what deploy/rbac/operator.yaml grants it."""
    await test_reconcile_creates_the_pool_then_switching_back_removes_it(cluster)
    used = {p for p in permissions_used(cluster.kmock, ("tandem-operator",))
            if p[0] == "inference.networking.k8s.io"}
    granted = {g for g in cluster_role_rules(RBAC / "operator.yaml") if g[0] == "inference.networking.k8s.io"}
    namespaced = cluster_role_rules(RBAC / "operator-namespaced.yaml", "Role")
    assert granted <= namespaced
    assert used == granted == {("inference.networking.k8s.io", "inferencepools", v)
                               for v in ("list", "create", "patch", "delete")}
