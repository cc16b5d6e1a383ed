"""The repository's manifests as kubectl sends them, read without a cluster.

docs/operator.md's quick start is a list of kubectl commands. :func:`quick_start` reads them from
the document and turns each into the objects it sends, with the namespace kubectl gives each one;
:func:`order_problems` says what a fresh cluster would refuse or leave broken, running them in that
order; :func:`renamed` gives the namespaces and cluster-scoped names a suffix, so that the same
sequence can run on a shared test cluster without touching what others installed there.
"""

from __future__ import annotations

import copy
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
OPERATOR_DOC = ROOT / "docs" / "operator.md"
QUICK_START_HEADING = "## Quick start"
# Kinds the quick start sends that have no namespace (kubectl -n leaves them alone).
CLUSTER_SCOPED = frozenset({"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"})
# Kinds whose name other objects refer to cluster-wide (roleRef), renamed by :func:`renamed`.
RENAMED_KINDS = frozenset({"Namespace", "ClusterRole", "ClusterRoleBinding"})
# What every fresh cluster has before the first command.
FRESH_CLUSTER_NAMESPACES = frozenset({"default", "kube-system", "kube-public", "kube-node-lease"})
BUILT_IN_GROUPS = frozenset({"", "apps", "policy", "rbac.authorization.k8s.io", "apiextensions.k8s.io"})
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass
class Step:
    """One command and the objects it sends, in the order kubectl sends them."""

    command: str
    objects: list[dict[str, Any]] = field(default_factory=list)


def read_manifests(path: Path) -> list[dict[str, Any]]:
    """The objects of a file, or of a folder's manifest files in name order (as ``kubectl -f DIR``)."""
    files = sorted(p for p in path.iterdir() if p.suffix in MANIFEST_SUFFIXES) if path.is_dir() else [path]
    return [d for f in files for d in yaml.safe_load_all(f.read_text()) if d]


def kubectl(argv: list[str], root: Path = ROOT, current_namespace: str = "default") -> list[dict[str, Any]]:
    """The objects ``kubectl apply [-n NS] -f PATH`` or ``kubectl create namespace NAME`` sends.

    Like kubectl, an object without a namespace gets ``-n``'s (else the context's), and one whose
    own namespace differs from ``-n`` is refused. Any other command raises ValueError, so a quick
    start line this module does not understand fails the test instead of being skipped.
    """
    if argv[:3] == ["kubectl", "create", "namespace"] and len(argv) == 4:
        return [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": argv[3]}}]
    if argv[:2] != ["kubectl", "apply"]:
        raise ValueError(f"not a kubectl apply or create namespace command: {shlex.join(argv)}")
    namespace, paths, rest = None, [], argv[2:]
    while rest:
        flag, *rest = rest
        if flag in {"-n", "--namespace", "-f", "--filename"} and rest:
            value, *rest = rest
            if flag in {"-n", "--namespace"}:
                namespace = value
            else:
                paths.append(root / value)
        else:
            raise ValueError(f"{shlex.join(argv)}: option {flag!r} is not understood here")
    if not paths:
        raise ValueError(f"{shlex.join(argv)}: no -f")
    objects = []
    for path in paths:
        for obj in read_manifests(path):
            obj = copy.deepcopy(obj)
            meta = obj["metadata"]
            if obj["kind"] in CLUSTER_SCOPED:
                if "namespace" in meta:
                    raise ValueError(f"{path.name}: {obj['kind']} {meta['name']} is cluster-scoped, "
                                     "yet names a namespace")
            elif namespace and meta.get("namespace", namespace) != namespace:
                # kubectl's own refusal (issue 18: the examples said `namespace: default`).
                raise ValueError(f"{path.name}: the namespace from the provided object {meta['namespace']!r} "
                                 f"does not match the namespace {namespace!r}")
            else:
                meta["namespace"] = meta.get("namespace") or namespace or current_namespace
            objects.append(obj)
    return objects


def quick_start(doc: Path = OPERATOR_DOC) -> list[Step]:
    """The commands of the first code block under the quick start heading, with their objects."""
    text = doc.read_text()
    at = text.find(f"\n{QUICK_START_HEADING}")
    if at < 0:
        raise ValueError(f"{doc.name} has no {QUICK_START_HEADING!r} section")
    block = re.search(r"```[^\n]*\n(.*?)```", text[at:], re.S)
    if block is None:
        raise ValueError(f"{doc.name}: no code block under {QUICK_START_HEADING!r}")
    steps = []
    for line in block.group(1).splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            steps.append(Step(shlex.join(argv), kubectl(argv)))
    return steps


def _key(obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    where = f"{meta['namespace']}/" if "namespace" in meta else ""
    return f"{obj['kind']} {where}{meta['name']}"


def order_problems(steps: list[Step], gateway_service_account: str = "tandem-gateway") -> list[str]:
    """What goes wrong running ``steps`` in order on a fresh cluster, one line each (empty: nothing).

    Refused by the API server: a namespaced object before its namespace exists, a custom resource
    before its CRD. Accepted but broken: a binding to a ClusterRole or a ServiceAccount not created
    before it, a pod template whose ServiceAccount does not exist, an LLMService in a namespace
    without the ServiceAccount the operator's gateway pods run as (``gateway_service_account``).
    """
    namespaces = set(FRESH_CLUSTER_NAMESPACES)
    kinds: set[tuple[str, str]] = set()  # (group, kind) served through CRDs
    roles: set[str] = set()
    accounts: set[tuple[str, str]] = set()
    problems = []
    for step in steps:
        for obj in step.objects:
            meta, kind = obj["metadata"], obj["kind"]
            where = f"{step.command}: {_key(obj)}"
            ns = meta.get("namespace")
            group = obj["apiVersion"].rpartition("/")[0]
            refusals = [f"{where}: namespace {ns!r} does not exist yet"] if ns is not None and ns not in namespaces \
                else []
            if group not in BUILT_IN_GROUPS and (group, kind) not in kinds:
                refusals.append(f"{where}: no CRD serves {kind} ({group}) yet")
            problems += refusals
            if refusals:
                continue  # the API server refused it: it does not exist for what follows
            if kind in {"RoleBinding", "ClusterRoleBinding"}:
                ref = obj["roleRef"]
                if ref["kind"] == "ClusterRole" and ref["name"] not in roles:
                    problems.append(f"{where}: ClusterRole {ref['name']!r} does not exist yet")
                for subject in obj.get("subjects", []):
                    account = (subject.get("namespace") or ns, subject["name"])
                    if subject["kind"] == "ServiceAccount" and account not in accounts:
                        problems.append(f"{where}: ServiceAccount {'/'.join(map(str, account))} does not exist yet")
            pod = ((obj.get("spec") or {}).get("template") or {}).get("spec") or {}
            if "serviceAccountName" in pod and (ns, pod["serviceAccountName"]) not in accounts:
                problems.append(f"{where}: its pods' ServiceAccount {pod['serviceAccountName']!r} does not exist yet")
            if kind == "LLMService" and (ns, gateway_service_account) not in accounts:
                problems.append(f"{where}: the gateway pods' ServiceAccount {gateway_service_account!r} "
                                f"does not exist in {ns!r}")
            if kind == "Namespace":
                namespaces.add(meta["name"])
            elif kind == "CustomResourceDefinition":
                kinds.add((obj["spec"]["group"], obj["spec"]["names"]["kind"]))
            elif kind == "ClusterRole":
                roles.add(meta["name"])
            elif kind == "ServiceAccount":
                accounts.add((ns, meta["name"]))
    return problems


def renamed(steps: list[Step], suffix: str) -> list[Step]:
    """``steps`` with every namespace, ClusterRole and ClusterRoleBinding they create named
    ``<name>-<suffix>``, and every reference to them (metadata.namespace, roleRef, subjects) to
    match. CRDs keep their names: they are the API itself, the same for every run."""
    created = {(o["kind"], o["metadata"]["name"]) for s in steps for o in s.objects if o["kind"] in RENAMED_KINDS}
    namespaces = {name for kind, name in created if kind == "Namespace"}

    def ns(name: str | None) -> str | None:
        return f"{name}-{suffix}" if name in namespaces else name

    out = []
    for step in steps:
        objects = []
        for obj in copy.deepcopy(step.objects):
            meta = obj["metadata"]
            if (obj["kind"], meta["name"]) in created:
                meta["name"] = f"{meta['name']}-{suffix}"
            if "namespace" in meta:
                meta["namespace"] = ns(meta["namespace"])
            ref = obj.get("roleRef")
            if ref and ("ClusterRole", ref["name"]) in created:
                ref["name"] = f"{ref['name']}-{suffix}"
            for subject in obj.get("subjects", []):
                if "namespace" in subject:
                    subject["namespace"] = ns(subject["namespace"])
            objects.append(obj)
        out.append(Step(step.command, objects))
    return out
