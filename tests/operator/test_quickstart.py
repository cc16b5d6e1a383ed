"""docs/operator.md's quick start: its kubectl commands, in their order, work on a fresh cluster.

Issue 18: following it on a real cluster failed (`namespaces "tandem-system" not found`: the RBAC
file came before the file that created the namespace). The static tests read the commands from the
document and check, without a cluster, that everything each object needs exists before it; the
``realk8s`` test runs them against the API server of ``TANDEM_TEST_KUBECONFIG``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubeutil import service_account_kubeconfig
from manifests import ROOT, Step, kubectl, order_problems, quick_start, read_manifests, renamed

from tandem.operator.plan import OperatorDefaults

REAL_KUBECONFIG = os.environ.get("TANDEM_TEST_KUBECONFIG")
GATEWAY_SA = OperatorDefaults().gateway_service_account


def test_quick_start_creates_everything_before_it_is_used() -> None:
    steps = quick_start()
    assert order_problems(steps, GATEWAY_SA) == []
    kinds = {o["kind"] for s in steps for o in s.objects}
    assert {"CustomResourceDefinition", "Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
            "RoleBinding", "Deployment", "LLMService"} <= kinds  # the commands were read, not skipped
    service = next(o for s in steps for o in s.objects if o["kind"] == "LLMService")
    assert service["metadata"]["namespace"] not in {"default", "tandem-system"}  # a namespace of its own


def test_order_check_refuses_what_a_cluster_refuses(tmp_path: Path) -> None:
    """The check finds issue 18's failures: RBAC before the namespace, an example before its CRD or
    where no gateway ServiceAccount is, and kubectl's refusal of `-n X` for an object of namespace Y."""
    def steps(*commands: str) -> list[Step]:
        return [Step(c, kubectl(c.split())) for c in commands]

    old_order = steps("kubectl apply -f crds/", "kubectl apply -f deploy/rbac/operator.yaml",
                      "kubectl apply -f deploy/namespace.yaml")
    assert [p.split(": ", 2)[1:] for p in order_problems(old_order)] == [
        ["ServiceAccount tandem-system/tandem-operator", "namespace 'tandem-system' does not exist yet"],
        ["ClusterRoleBinding tandem-operator",
         "ServiceAccount tandem-system/tandem-operator does not exist yet"]]
    example = "kubectl apply -f deploy/examples/aggregated-8b.yaml"
    assert order_problems(steps(example)) == [
        f"{example}: LLMService default/llama-8b: no CRD serves LLMService (serving.tandem.dev) yet"]
    assert order_problems(steps("kubectl apply -f crds/", example)) == [
        f"{example}: LLMService default/llama-8b: the gateway pods' ServiceAccount 'tandem-gateway' does not "
        "exist in 'default'"]
    pinned = tmp_path / "pinned.yaml"
    pinned.write_text("apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: x, namespace: default}\n")
    with pytest.raises(ValueError, match="the namespace from the provided object 'default' does not match"):
        kubectl(["kubectl", "apply", "-n", "llm", "-f", str(pinned)])
    with pytest.raises(ValueError, match="not a kubectl apply"):
        kubectl(["kubectl", "delete", "-f", "deploy/namespace.yaml"])


def test_every_deploy_manifest_needs_only_deploy_namespace() -> None:
    """deploy/rbac/autoscaler.yaml is not in the quick start but has the same need: each namespaced
    object of deploy/ either names no namespace (kubectl -n places it) or one deploy/namespace.yaml creates."""
    created = {o["metadata"]["name"] for o in read_manifests(ROOT / "deploy" / "namespace.yaml")}
    assert created == {"tandem-system"}
    files = [*sorted((ROOT / "deploy" / "rbac").glob("*.yaml")), ROOT / "deploy" / "operator.yaml"]
    named = {(f.name, o["metadata"]["namespace"]) for f in files for o in read_manifests(f)
             if "namespace" in o["metadata"]}
    assert {ns for _, ns in named} == created, named
    assert ("autoscaler.yaml", "tandem-system") in named


def test_renaming_for_a_shared_cluster_keeps_the_sequence_valid() -> None:
    """What the realk8s test runs: the same steps, every namespace and ClusterRole(Binding) suffixed
    and every reference to them following, so no name the chart or deploy/ uses is touched."""
    steps = quick_start()
    moved = renamed(steps, "t1")
    assert order_problems(moved, GATEWAY_SA) == []
    assert [len(s.objects) for s in moved] == [len(s.objects) for s in steps]
    objects = [o for s in moved for o in s.objects]
    for obj in objects:
        if obj["kind"] in {"Namespace", "ClusterRole", "ClusterRoleBinding"}:
            assert obj["metadata"]["name"].endswith("-t1"), obj
        assert obj["metadata"].get("namespace") in {None, "tandem-system-t1", "llm-t1"}, obj
        if obj.get("roleRef"):
            assert obj["roleRef"]["name"].endswith("-t1"), obj
        assert all(s.get("namespace") in {None, "tandem-system-t1"} for s in obj.get("subjects", [])), obj
    assert {o["metadata"]["name"] for o in objects if o["kind"] == "CustomResourceDefinition"} == {
        "llmservices.serving.tandem.dev", "remoteprefillpools.serving.tandem.dev"}  # the API itself, unchanged


# --- against a real API server ------------------------------------------------------------------


def _apply(dynamic: Any, obj: dict[str, Any]) -> None:
    resource = dynamic.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
    dynamic.server_side_apply(resource, body=obj, namespace=obj["metadata"].get("namespace"),
                              field_manager="tandem-quickstart-test", force_conflicts=True)


def _wait_established(extensions: Any, names: list[str], within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while True:
        pending = [n for n in names if not any(
            c.type == "Established" and c.status == "True"
            for c in (extensions.read_custom_resource_definition(n).status.conditions or []))]
        if not pending:
            return
        assert time.monotonic() < deadline, f"CRDs not established: {pending}"
        time.sleep(0.2)


@pytest.mark.realk8s
def test_quick_start_on_a_real_api_server(tmp_path: Path) -> None:
    """Runs docs/operator.md's quick start, command by command and in its order, against
    ``TANDEM_TEST_KUBECONFIG``'s API server, then the operator under the quick start's RBAC.

    kubectl is not a dependency of the tests (and may be missing), so each command's objects (read
    from the files it names, placed in namespaces as kubectl does: tests/manifests.py) are applied
    with the kubernetes Python client, by server-side apply as ``kubectl apply --server-side`` would,
    in the same order. On a shared cluster the namespaces and ClusterRole(Binding)s it creates get
    this run's suffix (the sequence stays the same: tests/manifests.py:renamed), so nothing of the
    chart or of another run is replaced; they are deleted at the end. The CRDs are applied as they are.
    """
    if not REAL_KUBECONFIG:
        pytest.skip("real API server tests need TANDEM_TEST_KUBECONFIG=<kubeconfig of a test cluster>")
    from kubernetes import client, config
    from kubernetes.dynamic import DynamicClient
    from kubernetes.dynamic.exceptions import ResourceNotFoundError

    suffix = uuid.uuid4().hex[:8]
    steps = renamed(quick_start(), suffix)
    api = config.new_client_from_config(REAL_KUBECONFIG)
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    extensions, rbac = client.ApiextensionsV1Api(api), client.RbacAuthorizationV1Api(api)
    dynamic = DynamicClient(api, cache_file=str(tmp_path / "discovery-0.json"))
    created = [o for s in steps for o in s.objects if o["kind"] in {"Namespace", "ClusterRole", "ClusterRoleBinding"}]
    operator = None
    try:
        for i, step in enumerate(steps):
            for obj in step.objects:
                try:
                    _apply(dynamic, obj)
                except client.ApiException as exc:  # what kubectl would have printed, and stopped
                    pytest.fail(f"{step.command}: {obj['kind']} {obj['metadata']['name']}: "
                                f"HTTP {exc.status} {exc.body}")
                except ResourceNotFoundError as exc:  # kubectl: "no matches for kind"
                    pytest.fail(f"{step.command}: {exc}")
            crds = [o["metadata"]["name"] for o in step.objects if o["kind"] == "CustomResourceDefinition"]
            if crds:  # what kubectl's next command would find: the new kinds served and discovered
                _wait_established(extensions, crds)
                dynamic = DynamicClient(api, cache_file=str(tmp_path / f"discovery-{i + 1}.json"))
        deployment = next(o for s in steps for o in s.objects if o["kind"] == "Deployment")
        service = next(o for s in steps for o in s.objects if o["kind"] == "LLMService")
        service_ns, name = service["metadata"]["namespace"], service["metadata"]["name"]
        # The operator, as deploy/operator.yaml runs it, but locally (no kubelet runs its pod) with the
        # credentials of its ServiceAccount, so it holds deploy/rbac/operator.yaml's rules and nothing
        # else; scoped to the quick start's namespace instead of --all-namespaces, to leave other runs'
        # LLMServices on the cluster alone.
        pod = deployment["spec"]["template"]["spec"]
        sa_config = service_account_kubeconfig(core, deployment["metadata"]["namespace"], pod["serviceAccountName"],
                                                Path(REAL_KUBECONFIG), tmp_path / "operator-kubeconfig")
        command = pod["containers"][0]["command"]
        assert command[:4] == ["tandem", "operator", "run", "--all-namespaces"]
        operator = subprocess.Popen(
            [sys.executable, "-m", "tandem.cli", "operator", "run", f"--namespace={service_ns}", "--liveness-port=0",
             f"--kubeconfig={sa_config}"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wanted = {f"{name}-unified", f"{name}-gateway"}
        for _ in range(120):
            found = {d.metadata.name for d in apps.list_namespaced_deployment(service_ns).items}
            if wanted <= found:
                break
            time.sleep(0.5)
        assert wanted <= found, found
        gateway = apps.read_namespaced_deployment(f"{name}-gateway", service_ns)
        assert gateway.spec.template.spec.service_account_name == GATEWAY_SA
        assert core.read_namespaced_service_account(GATEWAY_SA, service_ns)  # from deploy/rbac/gateway.yaml
    finally:
        if operator is not None and operator.poll() is None:
            operator.terminate()
            operator.wait(10)
        for obj in reversed(created):
            delete = {"Namespace": core.delete_namespace, "ClusterRole": rbac.delete_cluster_role,
                      "ClusterRoleBinding": rbac.delete_cluster_role_binding}[obj["kind"]]
            with contextlib.suppress(client.ApiException):
                delete(obj["metadata"]["name"])
