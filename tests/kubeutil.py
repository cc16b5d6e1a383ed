"""Set-up shared by the tests that run against a real Kubernetes API server (TANDEM_TEST_KUBECONFIG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tandem.operator.kube import Kind, KubeClient

CRD_KIND = Kind(group="apiextensions.k8s.io", version="v1", plural="customresourcedefinitions",
                kind="CustomResourceDefinition")
NAMESPACES = Kind(group="", version="v1", plural="namespaces", kind="Namespace")
CRD_DIR = Path(__file__).resolve().parent.parent / "crds"


def kmock_kubeconfig(kmock: Any, tmp_path: Path) -> Path:
    """A kubeconfig for kmock's in-memory API server (no credentials), as a cluster's would be."""
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": str(kmock.url).rstrip("/")}}],
        "users": [{"name": "kmock", "user": {}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}]}))
    return path


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


def cluster_role_rules(path: Path) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) of every rule of the ClusterRole in the manifest file ``path``."""
    role = next(d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == "ClusterRole")
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
