"""Set-up shared by the tests that run against a real Kubernetes API server (TANDEM_TEST_KUBECONFIG)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import yaml

from tandem.kube import ApiError, Kind, KubeClient

CRD_KIND = Kind(group="apiextensions.k8s.io", version="v1", plural="customresourcedefinitions",
                kind="CustomResourceDefinition")
NAMESPACES = Kind(group="", version="v1", plural="namespaces", kind="Namespace")
CLUSTER_ROLES = Kind(group="rbac.authorization.k8s.io", version="v1", plural="clusterroles", kind="ClusterRole")
CLUSTER_ROLE_BINDINGS = Kind(group="rbac.authorization.k8s.io", version="v1", plural="clusterrolebindings",
                             kind="ClusterRoleBinding")
CRD_DIR = Path(__file__).resolve().parent.parent / "crds"
# Every cluster-scoped object a test creates carries this label, so leftovers of a killed run are
# easy to find (kubectl delete clusterrole,clusterrolebinding -l app.kubernetes.io/managed-by=tandem-tests).
TEST_LABELS = {"app.kubernetes.io/managed-by": "tandem-tests"}


def kmock_kubeconfig(kmock: Any, tmp_path: Path) -> Path:
    """A kubeconfig for kmock's in-memory API server (no credentials), as a cluster's would be."""
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": str(kmock.url).rstrip("/")}}],
        "users": [{"name": "kmock", "user": {}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}]}))
    return path


def unique_name(prefix: str) -> str:
    """``prefix-<8 hex>``: a name no other run (nor the chart, nor deploy/) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@contextlib.asynccontextmanager
async def cluster_role_bound(client: KubeClient, rules: list[dict[str, Any]], subject: dict[str, Any],
                             prefix: str) -> AsyncIterator[str]:
    """A ClusterRole holding ``rules`` and a ClusterRoleBinding of it to ``subject``, both named
    ``prefix-<random>``; yields that name and deletes both on exit.

    Cluster-scoped objects are shared by every run on a cluster: a fixed name (``tandem-operator``)
    would replace the ClusterRole of an installed chart or of deploy/rbac/, and a leftover would make
    the next ``helm install`` fail on ownership (issue 18). A name of its own avoids both.
    """
    name = unique_name(prefix)
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": name, "labels": TEST_LABELS}, "rules": rules}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": name, "labels": TEST_LABELS},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
               "subjects": [subject]}
    try:
        await client.request("POST", CLUSTER_ROLES.path(None), json=role)
        await client.request("POST", CLUSTER_ROLE_BINDINGS.path(None), json=binding)
        yield name
    finally:
        for kind in (CLUSTER_ROLE_BINDINGS, CLUSTER_ROLES):
            with contextlib.suppress(ApiError):
                await client.request("DELETE", kind.path(None, name))


async def until_allowed(client: KubeClient, path: str, within: float = 15.0) -> None:
    """Wait until ``client`` may GET ``path`` (a new binding reaches the authorizer's cache)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        try:
            await client.request("GET", path)
            return
        except ApiError as exc:
            if exc.status != 403 or asyncio.get_running_loop().time() > deadline:
                raise
        await asyncio.sleep(0.1)


async def apply_crds(client: KubeClient) -> None:
    """Create the repository's CRDs, or update them in place when an older version is installed."""
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        existing = await client.get(CRD_KIND, None, crd["metadata"]["name"])  # type: ignore[arg-type]
        if existing is None:
            await client.request("POST", CRD_KIND.path(None), json=crd)
        else:
            crd["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
            await client.request("PUT", CRD_KIND.path(None, crd["metadata"]["name"]), json=crd)


def cluster_role_rules(path: Path, kind: str = "ClusterRole") -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) of every rule of the ClusterRole (or the first ``kind``) in ``path``."""
    role = next(d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == kind)
    return {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]}


def request_permission(method: str, path: str, params: dict[str, str]) -> tuple[str, str, str] | None:
    """The (apiGroup, resource[/subresource], verb) RBAC checks for one request; None: discovery."""
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["api"] and len(parts) >= 3:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 4:
        group, rest = parts[1], parts[3:]
    else:
        return None  # /api, /apis, /apis/g/v, /version: non-resource discovery URLs
    if rest[:1] == ["namespaces"] and len(rest) >= 3:
        rest = rest[2:]
    resource, name, sub = rest[0], (rest[1] if len(rest) > 1 else None), (rest[2] if len(rest) > 2 else None)
    verb = {
        "GET": "watch" if params.get("watch") in {"true", "1"} else ("get" if name else "list"),
        "POST": "create",
        "PATCH": "patch",
        "PUT": "update",
        "DELETE": "delete" if name else "deletecollection",
    }[method]
    return group, f"{resource}/{sub}" if sub else resource, verb


def permissions_used(kmock: Any, user_agents: tuple[str, ...]) -> set[tuple[str, str, str]]:
    """What RBAC would have checked for every request kmock logged from a client whose User-Agent
    starts with one of ``user_agents`` (the operator's, kopf's, the autoscaler's)."""
    used = set()
    for r in kmock:
        if r.headers.get("User-Agent", "").startswith(user_agents):
            perm = request_permission(r.method, r.url.path, dict(r.params))
            if perm is not None:
                used.add(perm)
    return used


def service_account_kubeconfig(core: Any, namespace: str, name: str, admin_kubeconfig: Path, dest: Path) -> Path:
    """A kubeconfig for ServiceAccount ``namespace/name`` (an hour's token from the TokenRequest API,
    ``core`` a kubernetes CoreV1Api), on the cluster of ``admin_kubeconfig``: whoever uses it holds
    that ServiceAccount's RBAC and nothing else."""
    token = core.create_namespaced_service_account_token(
        name, namespace, {"spec": {"expirationSeconds": 3600}}).status.token
    admin = yaml.safe_load(admin_kubeconfig.read_text())
    context = next(c["context"] for c in admin["contexts"] if c["name"] == admin["current-context"])
    cluster = next(c["cluster"] for c in admin["clusters"] if c["name"] == context["cluster"])
    dest.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "c", "cluster": cluster}], "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": "sa"}}]}))
    return dest
