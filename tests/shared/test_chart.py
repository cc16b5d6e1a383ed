"""The Helm chart, through the real Helm library (helm-sdkpy), without a cluster.

* ``helm lint`` (helm-sdkpy's Lint) on the chart as shipped and with every feature on.
* Rendering: helm-sdkpy has no ``template`` action, so the chart goes through Helm's real install
  path against kmock, an in-memory Kubernetes API (a mock: no cluster can run here). Helm renders,
  validates the values against values.schema.json, installs the CRDs and creates every object; the
  test reads the manifests back from the release and from kmock. Release storage is Helm's
  ``memory`` driver (kmock cannot decode the protobuf Secrets the default driver writes); Go reads
  it from the environment only at process start, so installs run in a child process (helmrun.py).
  The rendered objects are then checked against the Kubernetes OpenAPI schemas (kubernetes-validate)
  and their command lines against the real ``tandem`` CLIs.
* With ``TANDEM_TEST_KUBECONFIG`` set, the same install runs against that real API server.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from promstack import CHART_RELABELINGS

helm = pytest.importorskip("helm_sdkpy", reason="make test installs helm-sdkpy (--ignore-requires-python)")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
kmock = pytest.importorskip("kmock")
from kmock._internal import parsing as kmock_parsing  # noqa: E402
from kmock._internal.apps import Server  # noqa: E402

_KMOCK_PARSE_PATH = kmock_parsing.parse_path

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "tandem"
sys.path.insert(0, str(ROOT / "tools"))
import sync_chart  # noqa: E402

KUBE_VERSION = "1.34.0"
REAL_KUBECONFIG = os.environ.get("TANDEM_TEST_KUBECONFIG")
ALL_VERBS = ["get", "list", "watch", "create", "update", "patch", "delete"]
# Every kind the chart can create: (apiVersion/plural, kind, namespaced).
KINDS = [
    ("v1/secrets", "Secret", True), ("v1/configmaps", "ConfigMap", True), ("v1/services", "Service", True),
    ("v1/serviceaccounts", "ServiceAccount", True), ("v1/namespaces", "Namespace", False),
    ("apps/v1/deployments", "Deployment", True), ("apps/v1/statefulsets", "StatefulSet", True),
    ("policy/v1/poddisruptionbudgets", "PodDisruptionBudget", True),
    ("networking.k8s.io/v1/networkpolicies", "NetworkPolicy", True),
    ("rbac.authorization.k8s.io/v1/clusterroles", "ClusterRole", False),
    ("rbac.authorization.k8s.io/v1/clusterrolebindings", "ClusterRoleBinding", False),
    ("rbac.authorization.k8s.io/v1/roles", "Role", True),
    ("rbac.authorization.k8s.io/v1/rolebindings", "RoleBinding", True),
    ("apiextensions.k8s.io/v1/customresourcedefinitions", "CustomResourceDefinition", False),
    ("monitoring.coreos.com/v1/servicemonitors", "ServiceMonitor", True),
    ("monitoring.coreos.com/v1/podmonitors", "PodMonitor", True),
    ("monitoring.coreos.com/v1/prometheusrules", "PrometheusRule", True),
]
FULL_VALUES: dict[str, Any] = {
    "engines": {"namespaces": ["llm-a", "llm-b"]},
    "gateway": {"replicas": 3, "workers": 2, "apiKeys": {"existingSecret": "tandem-keys"}, "rateLimitRpm": 600,
                "adminKey": {"existingSecret": "tandem-admin"}},
    "redis": {"enabled": True},
    "monitoring": {"serviceMonitor": {"enabled": True, "labels": {"release": "kps"}},
                   "podMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
}


def _parse_path(path: str) -> Any:
    """kmock's request path parser, except that /api/v1/namespaces[/NAME] is the cluster-scoped
    Namespace resource (kmock reads it as the prefix of a namespaced path and fails on it)."""
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and len(parts) <= 4:
        return kmock_parsing.ParsedPath("", "v1", "namespaces", None, parts[3] if len(parts) == 4 else None, None)
    return _KMOCK_PARSE_PATH(path)


@contextlib.asynccontextmanager
async def api_server(tmp_path: Path, namespaces: tuple[str, ...] = ()) -> AsyncIterator[tuple[Path, Any]]:
    """kmock serving discovery for the chart's kinds; yields (kubeconfig, emulator).

    ``namespaces`` exist as Namespace objects. Without ``kube-system`` among them Helm's ``lookup``
    finds nothing, as in ``helm template``; with it, kmock answers like a cluster.
    """
    with mock.patch.object(kmock_parsing, "parse_path", _parse_path):
        async with _emulator(tmp_path, namespaces) as served:
            yield served


@contextlib.asynccontextmanager
async def _emulator(tmp_path: Path, namespaces: tuple[str, ...]) -> AsyncIterator[tuple[Path, Any]]:
    async with kmock.KubernetesEmulator() as k, Server(k):
        for path, kind, namespaced in KINDS:
            k.resources[path] = k.ResourceInfo(kind=kind, namespaced=namespaced, verbs=set(ALL_VERBS))
        major, minor, _ = KUBE_VERSION.split(".")
        k["get /version"] << {"major": major, "minor": minor, "gitVersion": f"v{KUBE_VERSION}",
                              "platform": "linux/amd64"}
        # kmock's own core-group list says groupVersion "/v1", which client-go's REST mapper rejects.
        k["get /api/v1"] << {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "v1", "resources": [
            {"name": p.split("/")[-1], "kind": kind, "namespaced": ns, "singularName": kind.lower(), "verbs": ALL_VERBS}
            for p, kind, ns in KINDS if p.startswith("v1/")]}
        kubeconfig = tmp_path / "kubeconfig"
        server = str(k.url).rstrip("/")
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": server}}],
            "users": [{"name": "kmock", "user": {}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}]}))
        for name in namespaces:
            k.objects[kmock.resource("", "v1", "namespaces"), None, name] = {
                "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
        yield kubeconfig, k


async def install(kubeconfig: Path, values: dict[str, Any] | None, release: str = "tandem",
                  namespace: str = "tandem-system") -> dict[str, Any]:
    """``helm install`` (no wait) in a child process: {"release": ...} or {"error": message}."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "tests" / "helmrun.py"), "install", str(kubeconfig), namespace, release,
        str(CHART), json.dumps(values or {}), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "HELM_DRIVER": "memory"})
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 90)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()[-2000:]
    return json.loads(out.decode().strip().splitlines()[-1])


async def render(tmp_path: Path, values: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], Any]:
    """The release's manifests (templates) and the emulator holding what Helm created (CRDs too), on
    a cluster where the namespaces the values name exist (Helm's lookup sees them)."""
    engines = ((values or {}).get("engines") or {}).get("namespaces") or []
    async with api_server(tmp_path, ("kube-system", "default", *engines)) as (kubeconfig, k):
        outcome = await install(kubeconfig, values)
        assert "error" not in outcome, outcome["error"]
        release = outcome["release"]
        assert release["info"]["status"] == "deployed"
        docs = [d for d in yaml.safe_load_all(release["manifest"]) if d]
        return docs, [dict(o) for o in k.objects.values()]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {f"{d['metadata'].get('namespace', '')}/{d['metadata']['name']}": d for d in docs if d["kind"] == kind}


def one(docs: list[dict[str, Any]], kind: str, suffix: str) -> dict[str, Any]:
    found = [d for key, d in by_kind(docs, kind).items() if key.endswith(suffix)]
    assert len(found) == 1, (kind, suffix, list(by_kind(docs, kind)))
    return found[0]


def pods(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {f"{d['kind']}/{d['metadata']['name']}": d["spec"]["template"]["spec"]
            for d in docs if d["kind"] in {"Deployment", "StatefulSet"}}


def args_of(docs: list[dict[str, Any]], name_suffix: str) -> list[str]:
    return one(docs, "Deployment", name_suffix)["spec"]["template"]["spec"]["containers"][0]["args"]


def lint(chart: Path) -> list[dict[str, Any]]:
    result = asyncio.run(helm.Lint(helm.Configuration(namespace="tandem-system")).run(str(chart)))
    return result["Messages"] or []


def chart_copy(tmp_path: Path, values: dict[str, Any]) -> Path:
    """The chart with values.yaml replaced (helm-sdkpy's lint takes no values of its own)."""
    dest = tmp_path / "tandem"
    shutil.copytree(CHART, dest)
    merged = merge(yaml.safe_load((CHART / "values.yaml").read_text()), values)
    (dest / "values.yaml").write_text(yaml.safe_dump(merged))
    return dest


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# --- lint -----------------------------------------------------------------------------------------

INFO, WARNING, ERROR = 1, 2, 3  # Helm's support.Severity


def test_lint_clean_as_shipped_and_with_everything_on(tmp_path: Path) -> None:
    for chart in (CHART, chart_copy(tmp_path, FULL_VALUES)):
        problems = [m for m in lint(chart) if m["Severity"] >= WARNING]
        assert problems == [], chart


def test_lint_reports_values_that_break_the_schema(tmp_path: Path) -> None:
    messages = lint(chart_copy(tmp_path, {"gateway": {"replicas": "two"}}))
    assert {(m["Severity"], m["Path"]) for m in messages} >= {(ERROR, "values.yaml")}


# --- files the chart carries ----------------------------------------------------------------------


def test_chart_copies_are_byte_identical() -> None:
    assert sync_chart.drift() == []
    top = {p.name: p.read_bytes() for p in (ROOT / "crds").glob("*.yaml")}
    assert top and top == {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}


def test_values_are_documented_field_by_field() -> None:
    """Every key of values.yaml, at any depth, has its own comment line right above it."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    keys = [(i, line.strip().split(":")[0]) for i, line in enumerate(lines)
            if line.strip() and not line.lstrip().startswith(("#", "-")) and ":" in line]
    assert len(keys) > 100
    assert [key for i, key in keys if not lines[i - 1].lstrip().startswith("#")] == []
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert set(yaml.safe_load((CHART / "values.yaml").read_text())) <= set(schema["properties"])


# --- rendering (Helm's install path against kmock) ------------------------------------------------


async def test_default_install(tmp_path: Path) -> None:
    docs, created = await render(tmp_path)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ServiceAccount", "ClusterRole", "Role", "RoleBinding",
            "NetworkPolicy", "PodDisruptionBudget", "ConfigMap"} <= kinds
    # Nothing is granted cluster-wide: every role is bound in a namespace (the gateway's ClusterRole too).
    assert "ClusterRoleBinding" not in kinds
    assert "StatefulSet" not in kinds and "ServiceMonitor" not in kinds  # Redis and monitoring are opt-in
    # The CRDs went in first, exactly as in crds/.
    crds = {o["metadata"]["name"]: o for o in created if o.get("kind") == "CustomResourceDefinition"}
    for path in (ROOT / "crds").glob("*.yaml"):
        want = yaml.safe_load(path.read_text())
        assert crds[want["metadata"]["name"]]["spec"] == want["spec"]
    # In-memory gateway state: no Redis URL anywhere.
    gateway = one(docs, "Deployment", "/tandem-gateway")["spec"]["template"]["spec"]["containers"][0]
    assert "TANDEM_GATEWAY_REDIS_URL" not in {e["name"] for e in gateway["env"]}
    assert gateway["image"] == "ghcr.io/tandem-serving/tandem:0.1.0"


async def test_every_pod_is_hardened(tmp_path: Path) -> None:
    docs, _ = await render(tmp_path, FULL_VALUES)
    specs = pods(docs)
    assert len(specs) == 4  # operator, gateway, autoscaler, redis
    for name, spec in specs.items():
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], name
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], name
            # A read-only root needs somewhere to write: every writable path is an emptyDir.
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            for mount in c.get("volumeMounts", []):
                assert "emptyDir" in volumes[mount["name"]] or mount.get("readOnly"), (name, mount)


def shipped_rules(file: str, kind: str) -> list[dict[str, Any]]:
    return next(d for d in yaml.safe_load_all((ROOT / "deploy" / "rbac" / file).read_text())
                if d and d["kind"] == kind)["rules"]


async def test_rbac_matches_the_operator_issue(tmp_path: Path) -> None:
    docs, _ = await render(tmp_path)
    assert one(docs, "ClusterRole", "/tandem-gateway")["rules"] == shipped_rules("gateway.yaml", "ClusterRole")
    # The autoscaler: deploy/rbac/autoscaler.yaml's rules, in a Role where LLMServices live (16.11).
    assert one(docs, "Role", "tandem-system/tandem-autoscaler")["rules"] == shipped_rules("autoscaler.yaml",
                                                                                         "ClusterRole")
    # Namespaced by default (the operator runs with --namespace): a Role where LLMServices live.
    assert "--all-namespaces" not in args_of(docs, "/tandem-operator")
    role = one(docs, "Role", "tandem-system/tandem-operator")
    assert role["rules"] == shipped_rules("operator-namespaced.yaml", "Role")
    operator = one(docs, "Deployment", "/tandem-operator")["spec"]
    assert operator["replicas"] == 1 and operator["strategy"] == {"type": "Recreate"}
    binding = one(docs, "RoleBinding", "tandem-system/tandem-operator")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tandem-operator", "namespace": "tandem-system"}]
    assert binding["roleRef"]["kind"] == "Role"
    assert not any(d["metadata"]["name"] == "tandem-operator" for d in docs if d["kind"] == "ClusterRole")
    # Cluster-wide only when asked (operator.allNamespaces): the ClusterRole of deploy/rbac/operator.yaml.
    (tmp_path / "all").mkdir()
    wide, _ = await render(tmp_path / "all", {"operator": {"allNamespaces": True}})
    assert one(wide, "ClusterRole", "/tandem-operator")["rules"] == shipped_rules("operator.yaml", "ClusterRole")
    binding = one(wide, "ClusterRoleBinding", "/tandem-operator")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tandem-operator", "namespace": "tandem-system"}]
    # The operator's per-service gateways run as the chart's gateway ServiceAccount.
    assert "--gateway-service-account=tandem-gateway" in args_of(docs, "/tandem-operator")
    assert "tandem-system/tandem-gateway" in by_kind(docs, "ServiceAccount")


async def test_full_install(tmp_path: Path) -> None:
    docs, _ = await render(tmp_path, FULL_VALUES)
    redis = one(docs, "StatefulSet", "/tandem-redis")
    assert redis["spec"]["replicas"] == 1
    gateway = one(docs, "Deployment", "/tandem-gateway")
    assert gateway["spec"]["replicas"] == 3
    container = gateway["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TANDEM_GATEWAY_REDIS_URL"] == "redis://tandem-redis.tandem-system.svc:6379/0"
    assert "--api-keys-file=/etc/tandem/keys/keys.yaml" in container["args"]
    assert "--rate-limit-rpm=600" in container["args"]
    assert "--workers=2" in container["args"]
    assert "--k8s-namespace=llm-a" in container["args"]  # discovers engines where LLMServices live
    volumes = {v["name"]: v for v in gateway["spec"]["template"]["spec"]["volumes"]}
    assert volumes["api-keys"]["secret"]["secretName"] == "tandem-keys"
    operator_args = args_of(docs, "/tandem-operator")
    assert {"--namespace=llm-a", "--namespace=llm-b"} <= set(operator_args)
    assert "--all-namespaces" not in operator_args
    # The gateway ServiceAccount, its binding and the engine NetworkPolicy exist where services live.
    for ns in ("llm-a", "llm-b"):
        assert f"{ns}/tandem-gateway" in by_kind(docs, "ServiceAccount")
        assert f"{ns}/tandem-gateway" in by_kind(docs, "RoleBinding")
        assert f"{ns}/tandem-engines" in by_kind(docs, "NetworkPolicy")
    # Monitoring: ServiceMonitor for the chart's services, PodMonitors for engines and service gateways.
    monitor = one(docs, "ServiceMonitor", "/tandem")
    assert monitor["metadata"]["labels"]["release"] == "kps"
    # Both endpoints keep the series' own labels: the gateway's `instance` (an engine), the
    # autoscaler's `namespace` and `service` (the LLMService, not the autoscaler's own Service).
    assert {e["port"]: e.get("honorLabels") for e in monitor["spec"]["endpoints"]} == {"http": True, "metrics": True}
    # The real-Prometheus tier (tests/promstack.py) reproduces exactly these relabelings.
    assert {f"servicemonitor/{e['port']}": e["relabelings"] for e in monitor["spec"]["endpoints"]} \
        | {name.removeprefix("tandem-system/tandem-"): pm["spec"]["podMetricsEndpoints"][0]["relabelings"]
           for name, pm in by_kind(docs, "PodMonitor").items()} == CHART_RELABELINGS
    podmonitors = by_kind(docs, "PodMonitor")
    assert set(podmonitors) == {"tandem-system/tandem-engines", "tandem-system/tandem-service-gateways",
                                "tandem-system/tandem-endpoint-pickers"}
    assert {"key": "app.kubernetes.io/component", "operator": "In", "values": ["endpoint-picker"]} in \
        podmonitors["tandem-system/tandem-endpoint-pickers"]["spec"]["selector"]["matchExpressions"]
    for pm in podmonitors.values():
        assert pm["spec"]["namespaceSelector"] == {"matchNames": ["llm-a", "llm-b"]}
        targets = {r["targetLabel"] for r in pm["spec"]["podMetricsEndpoints"][0]["relabelings"]}
        assert {"role", "service"} <= targets  # the dashboards group engine series by role
    rule = one(docs, "PrometheusRule", "/tandem")
    assert rule["spec"] == yaml.safe_load((ROOT / "deploy" / "prometheus" / "tandem-rules.yaml").read_text())


async def test_dashboards_are_configmaps_for_the_grafana_sidecar(tmp_path: Path) -> None:
    docs, _ = await render(tmp_path)
    maps = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("tandem-dashboard-")]
    files = {p.name: p.read_text() for p in (ROOT / "deploy" / "grafana").glob("*.json")}
    assert len(maps) == len(files) == 3
    for cm in maps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["annotations"]["grafana_folder"] == "Tandem"
        (name, text), = cm["data"].items()
        assert json.loads(text) == json.loads(files[name])


async def test_network_policies(tmp_path: Path) -> None:
    docs, _ = await render(tmp_path, FULL_VALUES)
    engines = one(docs, "NetworkPolicy", "llm-a/tandem-engines")
    assert engines["spec"]["podSelector"] == {
        "matchExpressions": [{"key": "serving.tandem.dev/role", "operator": "Exists"}]}
    peers = [peer for rule in engines["spec"]["ingress"] for peer in rule["from"]]
    # Gateways (per-service and the chart's), other engines (KV transfer), Prometheus; nobody else.
    assert {"podSelector": {"matchLabels": {"app.kubernetes.io/component": "gateway"}}} in peers
    pickers = {"matchLabels": {"app.kubernetes.io/name": "tandem", "app.kubernetes.io/component": "endpoint-picker"}}
    assert {"podSelector": pickers} in peers  # they scrape the engines and follow their KV events
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}} in peers
    assert all(set(p) <= {"podSelector", "namespaceSelector"} and p for p in peers)
    assert not any(p == {"podSelector": {}} or p == {"namespaceSelector": {}} for p in peers)
    gateway = one(docs, "NetworkPolicy", "/tandem-gateway")["spec"]["ingress"]
    assert gateway == [{"ports": [{"port": "http", "protocol": "TCP"}]}]  # the exposed component
    control = one(docs, "NetworkPolicy", "/tandem-control")["spec"]
    assert [list(p) for r in control["ingress"] for p in r["from"]] == [["namespaceSelector"]]
    # Pickers: ext_proc from anyone (the Gateway's proxies; pickerIngressFrom narrows it), HTTP from
    # Prometheus and the autoscaler.
    picker = one(docs, "NetworkPolicy", "llm-a/tandem-endpoint-pickers")["spec"]
    assert picker["podSelector"] == pickers
    assert picker["ingress"][0] == {"ports": [{"port": "grpc", "protocol": "TCP"}]}
    assert [list(p) for p in picker["ingress"][1]["from"]] == [["namespaceSelector"],
                                                               ["namespaceSelector", "podSelector"]]
    # Redis: gateways and pickers only; the chart's (release namespace) and the per-service ones where
    # LLMServices live.
    redis = one(docs, "NetworkPolicy", "/tandem-redis")["spec"]["ingress"][0]["from"]
    service_gateways = {"matchLabels": {"app.kubernetes.io/name": "tandem"}, "matchExpressions": [
        {"key": "app.kubernetes.io/component", "operator": "In", "values": ["gateway", "endpoint-picker"]}]}
    assert redis == [{"podSelector": {"matchLabels": {"app.kubernetes.io/component": "gateway"}}},
                     {"podSelector": pickers},
                     *[{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
                        "podSelector": service_gateways} for ns in ("llm-a", "llm-b")]]
    (tmp_path / "all").mkdir()
    docs, _ = await render(tmp_path / "all", {"redis": {"enabled": True}, "operator": {"allNamespaces": True}})
    redis = one(docs, "NetworkPolicy", "/tandem-redis")["spec"]["ingress"][0]["from"]
    assert redis[2:] == [{"namespaceSelector": {}, "podSelector": service_gateways}]
    # With an InferencePool, the Gateway's proxies call the engines and the pickers: the values say who.
    proxies = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateways"}}}]
    (tmp_path / "pool").mkdir()
    docs, _ = await render(tmp_path / "pool", {"engines": {"namespaces": ["llm-a"]}, "networkPolicy": {
        "engineIngressFrom": proxies, "pickerIngressFrom": proxies}})
    assert {"from": proxies, "ports": [{"port": "http", "protocol": "TCP"}]} in \
        one(docs, "NetworkPolicy", "llm-a/tandem-engines")["spec"]["ingress"]
    assert one(docs, "NetworkPolicy", "llm-a/tandem-endpoint-pickers")["spec"]["ingress"][0] == {
        "ports": [{"port": "grpc", "protocol": "TCP"}], "from": proxies}
    # The per-service gateways' pods carry those labels (the operator's plan).
    from tandem.api.models import LLMService
    from tandem.operator.plan import OperatorDefaults, plan_service

    svc = LLMService.model_validate({"metadata": {"name": "s", "namespace": "llm-a", "uid": "u"},
                                     "spec": {"model": {"name": "m"}, "pools": {"unified": {}}}})
    gw = next(c for c in plan_service(svc, OperatorDefaults(), {}).children if c["metadata"]["name"] == "s-gateway")
    assert service_gateways["matchLabels"].items() <= gw["spec"]["template"]["metadata"]["labels"].items()
    pool = LLMService.model_validate({"metadata": {"name": "s", "namespace": "llm-a", "uid": "u"}, "spec": {
        "model": {"name": "m"}, "pools": {"unified": {}}, "gateway": {"type": "inference-pool"}}})
    epp = next(c for c in plan_service(pool, OperatorDefaults(), {}).children  # the per-service pickers' pods
               if c["kind"] == "Deployment" and c["metadata"]["labels"]["app.kubernetes.io/component"] != "unified")
    assert pickers["matchLabels"].items() <= epp["spec"]["template"]["metadata"]["labels"].items()


async def test_egress_network_policies(tmp_path: Path) -> None:
    """Issue 16.11: every Tandem pod's egress is bounded (before, the policies covered ingress only)."""
    docs, _ = await render(tmp_path, FULL_VALUES)
    dns = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
           "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}
    dns_rule = {"to": [dns], "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}
    api_rule = {"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}],
                "ports": [{"port": 443, "protocol": "TCP"}, {"port": 6443, "protocol": "TCP"}]}
    engines = {"matchExpressions": [{"key": "serving.tandem.dev/role", "operator": "Exists"}]}
    for key in ("tandem-system/tandem-gateway-egress", "llm-a/tandem-service-gateway-egress",
                "llm-b/tandem-service-gateway-egress"):
        spec = one(docs, "NetworkPolicy", key)["spec"]
        assert spec["policyTypes"] == ["Egress"]
        selector = spec["podSelector"]
        assert selector["matchLabels"]["app.kubernetes.io/name"] == "tandem"  # never another app's pods
        components = {e["key"]: set(e["values"]) for e in selector.get("matchExpressions", [])}.get(
            "app.kubernetes.io/component", {selector["matchLabels"].get("app.kubernetes.io/component")})
        # The chart's gateway; where LLMServices live, the per-service gateways and the pickers.
        assert components == ({"gateway"} if key.startswith("tandem-system/") else {"gateway", "endpoint-picker"})
        to_engines, to_redis, *rest = spec["egress"]
        assert to_engines == {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
                                      "podSelector": engines} for ns in ("llm-a", "llm-b")],
                              "ports": [{"port": "http", "protocol": "TCP"}, {"port": "kv-events", "protocol": "TCP"},
                                        {"port": "kv-replay", "protocol": "TCP"}]}  # the engines' KV-cache events
        assert to_redis["ports"] == [{"port": "redis", "protocol": "TCP"}]
        assert to_redis["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "redis"
        assert rest == [dns_rule, api_rule]
    for ns in ("llm-a", "llm-b"):  # engines: each other, DNS, HTTPS for weights; not the API server
        spec = one(docs, "NetworkPolicy", f"{ns}/tandem-engines-egress")["spec"]
        assert spec["podSelector"] == engines
        assert spec["egress"] == [{"to": [{"podSelector": engines}]}, dns_rule,
                                  {"ports": [{"port": 443, "protocol": "TCP"}]}]
    assert one(docs, "NetworkPolicy", "/tandem-operator-egress")["spec"]["egress"] == [dns_rule, api_rule]
    scaler = one(docs, "NetworkPolicy", "/tandem-autoscaler-egress")["spec"]["egress"]
    assert scaler[1:] == [dns_rule, api_rule]
    assert {p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for p in scaler[0]["to"]} == {
        "llm-a", "llm-b", "tandem-system"}  # the gateways it asks for their load
    assert {p["podSelector"]["matchExpressions"][0]["values"] == ["gateway", "endpoint-picker"]  # or the pickers
            for p in scaler[0]["to"]} == {True}
    redis = one(docs, "NetworkPolicy", "/tandem-redis-egress")["spec"]
    assert redis["policyTypes"] == ["Egress"] and not redis.get("egress")  # nowhere
    # Narrowed: the API server's own addresses, weights from a volume (no HTTPS for engines).
    (tmp_path / "narrow").mkdir()
    docs, _ = await render(tmp_path / "narrow", {"networkPolicy": {"egress": {
        "apiServerCidrs": ["10.0.0.1/32"], "engineRules": []}}})
    assert one(docs, "NetworkPolicy", "/tandem-operator-egress")["spec"]["egress"][1]["to"] == [
        {"ipBlock": {"cidr": "10.0.0.1/32"}}]
    assert one(docs, "NetworkPolicy", "tandem-system/tandem-engines-egress")["spec"]["egress"] == [
        {"to": [{"podSelector": engines}]}, dns_rule]


async def test_autoscaler_may_annotate_pods_only_where_llmservices_live(tmp_path: Path) -> None:
    """Issue 16.11: its ClusterRole let it patch any pod in the cluster; now a Role per engine namespace."""
    docs, _ = await render(tmp_path, FULL_VALUES)
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")
                and "autoscaler" in d["metadata"]["name"]]
    for ns in ("llm-a", "llm-b"):
        rules = one(docs, "Role", f"{ns}/tandem-autoscaler")["rules"]
        assert {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "patch"]} in rules
        binding = one(docs, "RoleBinding", f"{ns}/tandem-autoscaler")
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": "tandem-autoscaler"}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tandem-autoscaler",
                                        "namespace": "tandem-system"}]
    # The chart's gateways (release namespace) are only listed there, never patched.
    assert one(docs, "Role", "tandem-system/tandem-autoscaler-gateways")["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]
    assert "tandem-system/tandem-autoscaler" not in by_kind(docs, "Role")


async def test_operator_gives_service_gateways_the_charts_redis(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The chart's Redis (redis.enabled, else gateway.redis.url) becomes the operator's default for the
    per-service gateways, through its environment (not its args); off with operator.shareGatewayRedis."""
    from tandem.operator.cli import OperatorRunCommand

    def operator_env(docs: list[dict[str, Any]]) -> dict[str, str]:
        c = one(docs, "Deployment", "/tandem-operator")["spec"]["template"]["spec"]["containers"][0]
        return {e["name"]: e["value"] for e in c.get("env", [])}

    cases = [
        ({"redis": {"enabled": True}}, "redis://tandem-redis.tandem-system.svc:6379/0"),
        ({"gateway": {"redis": {"url": "rediss://cache.example:6380/2"}}}, "rediss://cache.example:6380/2"),
        ({"redis": {"enabled": True}, "operator": {"shareGatewayRedis": False}}, None),
        ({}, None),
    ]
    for i, (values, url) in enumerate(cases):
        (tmp_path / str(i)).mkdir()
        docs, _ = await render(tmp_path / str(i), values)
        env = operator_env(docs)
        assert env.get("TANDEM_OPERATOR_GATEWAY_REDIS_URL") == url, values
        args = args_of(docs, "/tandem-operator")
        assert not any("redis" in a for a in args)
        with monkeypatch.context() as m:
            for name, value in env.items():
                m.setenv(name, value)
            parsed = OperatorRunCommand(_cli_parse_args=args[2:]).gateway_redis_url
        assert (parsed.get_secret_value() if parsed else None) == url
    # Extra env of the operator still comes along beside it.
    (tmp_path / "extra").mkdir()
    docs, _ = await render(tmp_path / "extra", {"redis": {"enabled": True},
                                                "operator": {"extraEnv": [{"name": "X", "value": "1"}]}})
    assert operator_env(docs) == {"TANDEM_OPERATOR_GATEWAY_REDIS_URL": cases[0][1], "X": "1"}


async def test_autoscaler_reaches_every_gateway_replica(tmp_path: Path) -> None:
    """Other gateway pods (per-service ones) by selector, in each LLMService's namespace; fixed URLs;
    and a gateway whose callers are restricted still lets the autoscaler ask it."""
    from tandem.autoscaler.cli import AutoscalerCommand

    clients = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "apps"}}}]
    docs, _ = await render(tmp_path, {"gateway": {"enabled": False},
                                      "autoscaler": {"gatewaySelector": "app.kubernetes.io/component=gateway"}})
    scaler = AutoscalerCommand(_cli_parse_args=args_of(docs, "/tandem-autoscaler")[1:])
    assert (scaler.gateway_discovery, scaler.gateway_selector, scaler.gateway_namespace) == (
        "kubernetes", "app.kubernetes.io/component=gateway", None)
    (tmp_path / "urls").mkdir()
    docs, _ = await render(tmp_path / "urls", {"autoscaler": {"gatewayUrl": "http://gw-0:8080,http://gw-1:8080"},
                                               "networkPolicy": {"gatewayIngressFrom": clients}})
    scaler = AutoscalerCommand(_cli_parse_args=args_of(docs, "/tandem-autoscaler")[1:])
    assert (scaler.gateway_discovery, scaler.gateway_url) == ("static", ["http://gw-0:8080", "http://gw-1:8080"])
    ingress = one(docs, "NetworkPolicy", "/tandem-gateway")["spec"]["ingress"]
    autoscaler_labels = one(docs, "Deployment", "/tandem-autoscaler")["spec"]["template"]["metadata"]["labels"]
    assert ingress == [{"ports": [{"port": "http", "protocol": "TCP"}], "from": clients},
                       {"ports": [{"port": "http", "protocol": "TCP"}],
                        "from": [{"podSelector": {"matchLabels": autoscaler_labels}}]}]


async def test_manifests_pass_the_kubernetes_schemas(tmp_path: Path) -> None:
    docs, _ = await render(tmp_path, FULL_VALUES)
    checked = 0
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # the Prometheus Operator's CRDs are not in kubernetes-validate's schema set
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        checked += 1
    assert checked >= 20
    broken = copy.deepcopy(one(docs, "Deployment", "/tandem-gateway"))
    broken["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBE_VERSION, strict=True)


async def test_command_lines_are_accepted_by_the_real_cli(tmp_path: Path) -> None:
    """The flags the chart passes parse in `tandem operator run`, `gateway` and `autoscaler` as they are."""
    from tandem.autoscaler.actuator import parse_label_selector
    from tandem.autoscaler.cli import AutoscalerCommand
    from tandem.operator.cli import OperatorRunCommand
    from tandem.router.settings import GatewaySettings

    for i, values in enumerate((None, FULL_VALUES)):
        (tmp_path / str(i)).mkdir()
        docs, _ = await render(tmp_path / str(i), values)
        operator = args_of(docs, "/tandem-operator")
        assert operator[:2] == ["operator", "run"]
        parsed = OperatorRunCommand(_cli_parse_args=operator[2:])
        assert parsed.gateway_image == "ghcr.io/tandem-serving/tandem:0.1.0"
        gateway = args_of(docs, "/tandem-gateway")
        assert gateway[0] == "gateway"
        settings = GatewaySettings(_cli_parse_args=gateway[1:])
        assert settings.discovery == "kubernetes" and settings.host == "0.0.0.0"
        autoscaler = args_of(docs, "/tandem-autoscaler")
        assert autoscaler[0] == "autoscaler"
        scaler = AutoscalerCommand(_cli_parse_args=autoscaler[1:])
        # every replica of the chart's gateway is asked: the pods of its Deployment, at their named port
        gw_pod = one(docs, "Deployment", "/tandem-gateway")["spec"]["template"]
        assert scaler.gateway_discovery == "kubernetes" and scaler.gateway_namespace == "tandem-system"
        assert parse_label_selector(scaler.gateway_selector) == gw_pod["metadata"]["labels"]
        assert scaler.gateway_port in {p["name"] for p in gw_pod["spec"]["containers"][0]["ports"]}
        assert scaler.namespaces == (["llm-a", "llm-b"] if values else ["tandem-system"])
        ports = one(docs, "Deployment", "/tandem-autoscaler")["spec"]["template"]["spec"]["containers"][0]["ports"]
        assert ports == [{"name": "metrics", "containerPort": scaler.metrics_port, "protocol": "TCP"}]


@pytest.mark.parametrize(("values", "field"), [
    ({"gateway": {"replicas": "two"}}, "replicas"),
    ({"gateway": {"replicaz": 2}}, "replicaz"),
    ({"containerSecurityContext": {"readOnlyRootFilesystem": False}}, "readOnlyRootFilesystem"),
    ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
    ({"gateway": {"redis": {"url": "http://not-redis"}}}, "url"),
    ({"gateway": {"replicas": 3}}, "gateway.replicas"),  # several gateways need shared state
    ({"gateway": {"workers": 4}}, "gateway.workers"),  # so do several workers of one
    ({"gateway": {"enabled": False}}, "autoscaler.gatewayUrl"),  # the autoscaler needs a gateway
    ({"operator": {"replicas": 2}}, "replicas"),  # one operator only (kopf without peering)
])
async def test_bad_values_fail_the_install_naming_the_field(tmp_path: Path, values: dict[str, Any],
                                                            field: str) -> None:
    async with api_server(tmp_path) as (kubeconfig, k):
        outcome = await install(kubeconfig, values)
        assert "release" not in outcome
        assert outcome["error"].startswith("InstallError") and field in outcome["error"], outcome["error"]
        assert not [o for o in k.objects.values() if o.get("kind") == "Deployment"]


async def test_engine_namespaces_must_exist(tmp_path: Path) -> None:
    """Issue 18: an upgrade with an engine namespace that did not exist failed half-way (`namespaces
    "llm-a" not found`) and left a failed revision. The chart now refuses it before creating anything,
    naming the value and the namespace; where Helm cannot look (`helm template`), it cannot check."""
    async with api_server(tmp_path, ("kube-system", "llm-a")) as (kubeconfig, k):
        outcome = await install(kubeconfig, FULL_VALUES)  # llm-a and llm-b
        assert "release" not in outcome
        assert 'engines.namespaces: namespace "llm-b" does not exist' in outcome["error"], outcome["error"]
        assert "kubectl create namespace llm-b" in outcome["error"] and "engines.createNamespaces" in outcome["error"]
        assert [o["kind"] for o in k.objects.values() if o.get("kind") != "Namespace"
                and o.get("kind") != "CustomResourceDefinition"] == []
    (tmp_path / "template").mkdir()
    async with api_server(tmp_path / "template") as (kubeconfig, _):  # no kube-system: lookup sees nothing
        assert "release" in await install(kubeconfig, FULL_VALUES)


async def test_create_namespaces_creates_only_the_missing_ones_and_keeps_them(tmp_path: Path) -> None:
    values = merge(FULL_VALUES, {"engines": {"createNamespaces": True}})
    ours = {"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": "llm-c", "labels": {"app.kubernetes.io/managed-by": "Helm"},
        "annotations": {"meta.helm.sh/release-name": "tandem", "meta.helm.sh/release-namespace": "tandem-system"}}}
    values["engines"]["namespaces"].append("llm-c")
    async with api_server(tmp_path, ("kube-system", "llm-a")) as (kubeconfig, k):
        k.objects[kmock.resource("", "v1", "namespaces"), None, "llm-c"] = ours  # this release's, from before
        outcome = await install(kubeconfig, values)
        assert "error" not in outcome, outcome["error"]
        docs = [d for d in yaml.safe_load_all(outcome["release"]["manifest"]) if d]
        namespaces = by_kind(docs, "Namespace")
        # llm-a is someone else's (used as is), llm-b is missing, llm-c was created by this release;
        # the release namespace is Helm's own business.
        assert sorted(namespaces) == ["/llm-b", "/llm-c"]
        assert all(n["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep" for n in namespaces.values())
        created = {o["metadata"]["name"] for o in k.objects.values() if o.get("kind") == "Namespace"}
        assert created >= {"llm-a", "llm-b", "llm-c"}
        assert "/llm-b/tandem-gateway" not in by_kind(docs, "ServiceAccount") and "llm-b/tandem-gateway" in by_kind(
            docs, "ServiceAccount")
        assert "created where missing" in outcome["release"]["info"]["notes"]


@pytest.mark.realk8s
def test_install_on_a_real_api_server_and_reconcile_an_example(tmp_path: Path) -> None:
    """helm install, then the operator, running with the chart's ServiceAccount and RBAC, turns
    deploy/examples/aggregated-8b.yaml into Deployments; helm uninstall leaves no cluster-scoped object.

    The release has a name of its own (its ClusterRoles are named after it), so the test neither
    collides with another run nor replaces a `tandem` release or deploy/rbac/ installed on the cluster.
    """
    if not REAL_KUBECONFIG:
        pytest.skip("real API server tests need TANDEM_TEST_KUBECONFIG=<kubeconfig of a test cluster>")
    from kubernetes import client, config
    from kubeutil import service_account_kubeconfig, unique_name

    release, release_ns, engine_ns = unique_name("tandem"), unique_name("tandem-chart"), unique_name("llm")
    api = config.new_client_from_config(REAL_KUBECONFIG)
    core, apps, custom = client.CoreV1Api(api), client.AppsV1Api(api), client.CustomObjectsApi(api)
    rbac = client.RbacAuthorizationV1Api(api)
    core.create_namespace({"metadata": {"name": engine_ns}})
    helm_config = helm.Configuration(namespace=release_ns, kubeconfig=REAL_KUBECONFIG)
    operator = None
    uninstalled = False
    try:
        # An engine namespace that does not exist is refused before anything is created (issue 18).
        missing = unique_name("llm-missing")
        with pytest.raises(helm.HelmError, match=f'engines.namespaces: namespace "{missing}" does not exist'):
            asyncio.run(helm.Install(helm_config).run(
                f"{release}-refused", str(CHART), values={"engines": {"namespaces": [missing]}}, wait=False,
                timeout=120, create_namespace=True))
        assert rbac.list_cluster_role(label_selector=f"app.kubernetes.io/instance={release}-refused").items == []
        # Where the cluster serves InferencePools (the GIE CRDs installed), the chart's pool and picker too:
        # the server's own schema then validates what the chart renders.
        pools = any(g.name == "inference.networking.k8s.io" and any(v.version == "v1" for v in g.versions)
                    for g in client.ApisApi(api).get_api_versions().groups)
        values: dict[str, Any] = {"engines": {"namespaces": [engine_ns]}, "inferencePool": {"enabled": pools}}
        outcome = asyncio.run(helm.Install(helm_config).run(
            release, str(CHART), values=values, wait=False, timeout=120, create_namespace=True))
        assert outcome["info"]["status"] == "deployed"
        manifests = [d for d in yaml.safe_load_all(outcome["manifest"]) if d]
        # The operator and the autoscaler are namespaced by default (Roles in the engine namespaces).
        assert {d["metadata"]["name"] for d in manifests if d["kind"] == "ClusterRole"} == {f"{release}-gateway"}
        assert {d["metadata"]["name"] for d in manifests if d["kind"] == "Role"} >= {
            f"{release}-operator", f"{release}-autoscaler"}
        if pools:
            pool = custom.get_namespaced_custom_object("inference.networking.k8s.io", "v1", engine_ns,
                                                       "inferencepools", release)
            assert pool["spec"]["endpointPickerRef"]["name"] == f"{release}-epp"
        # Credentials of the chart's operator ServiceAccount: the operator gets exactly the chart's RBAC.
        sa_config = service_account_kubeconfig(core, release_ns, f"{release}-operator", Path(REAL_KUBECONFIG),
                                               tmp_path / "operator-kubeconfig")
        args = args_of(manifests, f"/{release}-operator")
        operator = subprocess.Popen(
            [sys.executable, "-m", "tandem.cli", *[a for a in args if not a.startswith("--liveness-port")],
             "--liveness-port=0", f"--kubeconfig={sa_config}"], cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        example = yaml.safe_load((ROOT / "deploy" / "examples" / "aggregated-8b.yaml").read_text())
        custom.create_namespaced_custom_object("serving.tandem.dev", "v1alpha1", engine_ns, "llmservices", example)
        name = example["metadata"]["name"]
        wanted = {f"{name}-unified", f"{name}-gateway"}
        for _ in range(120):
            found = {d.metadata.name for d in apps.list_namespaced_deployment(engine_ns).items}
            if wanted <= found:
                break
            time.sleep(0.5)
        assert wanted <= found
        unified = apps.read_namespaced_deployment(f"{name}-unified", engine_ns)
        assert unified.spec.replicas == example["spec"]["replicas"]  # the primary pool's size: spec.replicas
        gateway = apps.read_namespaced_deployment(f"{name}-gateway", engine_ns)
        assert gateway.spec.template.spec.service_account_name == "tandem-gateway"
        assert core.read_namespaced_service_account("tandem-gateway", engine_ns)  # the chart put it there
        asyncio.run(helm.Uninstall(helm_config).run(release, wait=False))
        uninstalled = True
        selector = f"app.kubernetes.io/instance={release}"
        assert rbac.list_cluster_role(label_selector=selector).items == []
        assert rbac.list_cluster_role_binding(label_selector=selector).items == []
    finally:
        if operator is not None and operator.poll() is None:
            operator.terminate()
            operator.wait(10)
        if not uninstalled:  # a failed install may still have left a release behind
            with contextlib.suppress(Exception):
                asyncio.run(helm.Uninstall(helm_config).run(release, wait=False))
        for ns in (engine_ns, release_ns):
            with contextlib.suppress(Exception):
                core.delete_namespace(ns)


async def test_admin_key_reaches_the_gateway_and_the_autoscaler(tmp_path: Path) -> None:
    """With client keys, /admin needs its own key (issue 10): the gateway gets it as its admin key and
    the autoscaler, which reads /admin/observations, as the key it sends; both from the same Secret."""
    docs, _ = await render(tmp_path, FULL_VALUES)
    ref = {"secretKeyRef": {"name": "tandem-admin", "key": "admin-key"}}
    gateway = one(docs, "Deployment", "/tandem-gateway")["spec"]["template"]["spec"]["containers"][0]
    autoscaler = one(docs, "Deployment", "/tandem-autoscaler")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "TANDEM_GATEWAY_ADMIN_API_KEYS", "valueFrom": ref} in gateway["env"]
    assert {"name": "TANDEM_AUTOSCALER_GATEWAY_ADMIN_KEY", "valueFrom": ref} in autoscaler["env"]
    (tmp_path / "default").mkdir()
    docs, _ = await render(tmp_path / "default")
    autoscaler = one(docs, "Deployment", "/tandem-autoscaler")["spec"]["template"]["spec"]["containers"][0]
    assert "env" not in autoscaler or all("ADMIN" not in e["name"] for e in autoscaler["env"])
