"""Set-up shared by the tests that run against a real Kubernetes API server (TANDEM_TEST_KUBECONFIG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tandem.kube import Kind, KubeClient

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
