"""Pure comparison and status logic: is a live child what we planned, and what does the status say.

The operator only writes when something differs, so re-running a reconcile changes nothing (and
on an API server every write would otherwise bump resourceVersion and wake every watcher).
"""

from __future__ import annotations

import copy
from datetime import datetime
from typing import Any

from kubernetes.utils import parse_quantity
from pydantic import BaseModel, Field

from tandem.api.models import ConditionStatus, GatewayType, LLMService, Role

from .plan import role_selector, selector_string

READY = "Ready"
PROGRESSING = "Progressing"
DEGRADED = "Degraded"
INVALID_SPEC = "InvalidSpec"
CONDITION_TYPES = (READY, PROGRESSING, DEGRADED, INVALID_SPEC)

ROLE_LETTER = {Role.unified: "U", Role.prefill: "P", Role.decode: "D"}


def _same_quantity(a: str, b: str) -> bool:
    try:
        return parse_quantity(a) == parse_quantity(b)
    except ValueError:
        return a == b


def diff_paths(desired: Any, live: Any, path: str = "") -> list[str]:
    """Paths where ``live`` does not contain ``desired``; fields only the server sets are ignored.

    Maps compare as subsets (the server adds defaults such as ``clusterIP`` or probe timeouts),
    lists element-wise with the same length (a removed or added container/port is drift), and
    resource quantities by value ("1.5" and "1500m" are the same CPU).
    """
    if isinstance(desired, dict):
        if not isinstance(live, dict):
            return [path or "."]
        out: list[str] = []
        for key, value in desired.items():
            sub = f"{path}.{key}"
            if key not in live:
                if value not in ({}, []):
                    out.append(sub)
                continue
            out.extend(diff_paths(value, live[key], sub))
        return out
    if isinstance(desired, list):
        if not isinstance(live, list) or len(live) != len(desired):
            return [path]
        out = []
        for i, (d, v) in enumerate(zip(desired, live, strict=True)):
            out.extend(diff_paths(d, v, f"{path}[{i}]"))
        return out
    if isinstance(desired, str) and isinstance(live, str) and ".resources." in path:
        return [] if _same_quantity(desired, live) else [path]
    if isinstance(desired, str) and isinstance(live, int | float) and not isinstance(live, bool):
        return [] if desired == str(live) else [path]
    return [] if desired == live else [path]


# Pod-template fields the operator owns whole: what someone adds there is drift too (a stray
# nodeSelector entry would pin GPU pods to the wrong nodes), while elsewhere server defaults are fine.
EXACT_PATHS: dict[str, tuple[tuple[str, ...], ...]] = {
    "Deployment": (("spec", "template", "spec", "nodeSelector"), ("spec", "template", "spec", "tolerations")),
    "Service": (("spec", "selector"),),
}


def _at(obj: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def child_drift(desired: dict[str, Any], live: dict[str, Any]) -> list[str]:
    """Drifted paths of a child, looking at what the operator owns (labels, owner, spec/data)."""
    meta = desired["metadata"]
    owned = {k: v for k, v in desired.items() if k not in {"apiVersion", "kind", "metadata"}}
    owned_meta = {"labels": meta.get("labels", {}), "ownerReferences": meta.get("ownerReferences", [])}
    drift = diff_paths(owned_meta, live.get("metadata", {}), ".metadata") + diff_paths(owned, live)
    for path in EXACT_PATHS.get(desired["kind"], ()):
        if (_at(desired, path) or None) != (_at(live, path) or None):
            drift.append("." + ".".join(path))
    return sorted(set(drift))


def merge_patch_for(desired: dict[str, Any], live: dict[str, Any] | None = None) -> dict[str, Any]:
    """JSON merge patch that puts ``desired`` in place: lists are replaced whole, maps merged.

    For the exactly-owned maps, keys only ``live`` has are removed with ``null``.
    """
    meta = desired["metadata"]
    body = {k: v for k, v in desired.items() if k not in {"apiVersion", "kind", "metadata"}}
    patch: dict[str, Any] = {
        "metadata": {"labels": meta["labels"], "ownerReferences": meta["ownerReferences"]}
    }
    patch.update(copy.deepcopy(body))
    if live is not None:
        for path in EXACT_PATHS.get(desired["kind"], ()):
            want, have = _at(desired, path), _at(live, path)
            if have is None:
                continue
            node = patch
            for key in path[:-1]:
                node = node.setdefault(key, {})
            if isinstance(have, dict):
                node[path[-1]] = {**{k: None for k in have}, **(want or {})}
            elif want is None:
                node[path[-1]] = None
    return patch


class DeploymentCounts(BaseModel):
    """The replica counts a Deployment's status reports (absent fields are zero)."""

    desired: int = 0
    current: int = 0
    ready: int = 0
    updated: int = 0
    available: int = 0
    observed: bool = Field(default=True, description="status.observedGeneration caught up with the spec.")
    failure: str | None = Field(
        default=None, description="Why the controller cannot create pods, if it says."
    )

    @classmethod
    def from_deployment(cls, obj: dict[str, Any] | None) -> DeploymentCounts:
        if not obj:
            return cls(observed=False)
        status = obj.get("status") or {}
        generation = obj.get("metadata", {}).get("generation")
        observed_generation = status.get("observedGeneration")
        # ReplicaFailure: the ReplicaSet cannot create pods (quota, missing ServiceAccount, admission).
        failure = next(
            (
                c.get("message") or c.get("reason") or "ReplicaFailure"
                for c in status.get("conditions") or []
                if c.get("type") == "ReplicaFailure" and c.get("status") == "True"
            ),
            None,
        )
        return cls(
            desired=int(obj.get("spec", {}).get("replicas", 1)),
            current=int(status.get("replicas", 0)),
            ready=int(status.get("readyReplicas", 0)),
            updated=int(status.get("updatedReplicas", 0)),
            available=int(status.get("availableReplicas", 0)),
            observed=generation is None or observed_generation is None or observed_generation >= generation,
            failure=failure,
        )

    @property
    def settled(self) -> bool:
        return (
            self.observed
            and self.ready >= self.desired
            and self.updated >= self.desired
            and self.current <= self.desired
        )


def _condition(
    ctype: str,
    true: bool,
    reason: str,
    message: str,
    previous: dict[str, dict[str, Any]],
    generation: int | None,
    now: datetime,
) -> dict[str, Any]:
    status = ConditionStatus.true.value if true else ConditionStatus.false.value
    old = previous.get(ctype)
    transition = (
        old["lastTransitionTime"]
        if old and old.get("status") == status and old.get("lastTransitionTime")
        else None
    )
    cond = {
        "type": ctype,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": transition or now.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def _previous(status: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    return {c.get("type", ""): c for c in (status or {}).get("conditions", []) or []}


def _merge_conditions(ours: list[dict[str, Any]], status: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Our four conditions plus any other writer's (the autoscaler's), in a stable order."""
    others = [c for c in (status or {}).get("conditions", []) or [] if c.get("type") not in CONDITION_TYPES]
    return ours + others


def invalid_status(body: dict[str, Any], field: str, reason: str, now: datetime) -> dict[str, Any]:
    """Status of an LLMService whose spec was refused: nothing was applied, the children are untouched."""
    status = body.get("status") or {}
    generation = body.get("metadata", {}).get("generation")
    prev = _previous(status)
    message = f"{field}: {reason}"
    conds = [
        _condition(
            READY,
            False,
            INVALID_SPEC,
            "spec refused; existing children left unchanged",
            prev,
            generation,
            now,
        ),
        _condition(PROGRESSING, False, INVALID_SPEC, "waiting for a valid spec", prev, generation, now),
        _condition(DEGRADED, False, INVALID_SPEC, "", prev, generation, now),
        _condition(INVALID_SPEC, True, "FieldInvalid", message, prev, generation, now),
    ]
    out: dict[str, Any] = {"conditions": _merge_conditions(conds, status)}
    if generation is not None:
        out["observedGeneration"] = generation
    return out


def _front_endpoint(svc: LLMService) -> dict[str, str]:
    """Where requests enter: the gateway's Service, or the endpoint picker a Gateway API gateway calls."""
    name, ns = svc.metadata.name, svc.metadata.namespace
    if svc.spec.gateway.type == GatewayType.inference_pool:
        return {"name": f"{name}-epp", "role": "endpoint-picker", "url": f"grpc://{name}-epp.{ns}.svc:9002"}
    return {"name": name, "role": "gateway", "url": f"http://{name}.{ns}.svc:80"}


def service_status(
    svc: LLMService,
    counts: dict[Role, DeploymentCounts],
    gateway: DeploymentCounts,
    warnings: list[str],
    previous: dict[str, Any] | None,
    now: datetime,
) -> dict[str, Any]:
    """Status of a valid, applied LLMService from its Deployments' counts."""
    spec = svc.spec
    name = svc.metadata.name
    ns = svc.metadata.namespace
    generation = svc.metadata.generation
    prev = _previous(previous)
    roles = spec.roles()
    role_counts = {r: counts.get(r, DeploymentCounts(observed=False)) for r in roles}
    summary = " ".join(f"{ROLE_LETTER[r]} {role_counts[r].ready}/{spec.replicas_of(r)}" for r in roles)
    all_ready = all(role_counts[r].ready >= spec.replicas_of(r) for r in roles) and gateway.ready >= 1
    settled = all(c.settled for c in role_counts.values()) and gateway.settled
    not_ready = [
        f"{r.value} {role_counts[r].ready}/{spec.replicas_of(r)}"
        for r in roles
        if role_counts[r].ready < spec.replicas_of(r)
    ]
    if gateway.ready < 1:
        not_ready.append(f"gateway {gateway.ready}/{spec.gateway.replicas}")
    failures = [f"{name}-{r.value}: {c.failure}" for r, c in role_counts.items() if c.failure]
    if gateway.failure:
        failures.append(f"{name}-gateway: {gateway.failure}")
    problems = warnings + failures
    conds = [
        _condition(
            READY,
            all_ready,
            "AllReplicasReady" if all_ready else "ReplicasNotReady",
            "" if all_ready else "waiting for " + ", ".join(not_ready),
            prev,
            generation,
            now,
        ),
        _condition(
            PROGRESSING,
            not settled,
            "RollingOut" if not settled else "Reconciled",
            "Deployments are rolling out" if not settled else "all children match the spec",
            prev,
            generation,
            now,
        ),
        _condition(
            DEGRADED,
            bool(problems),
            "DependencyMissing" if warnings else "ReplicaFailure" if failures else "AsExpected",
            "; ".join(problems),
            prev,
            generation,
            now,
        ),
        _condition(INVALID_SPEC, False, "Valid", "", prev, generation, now),
    ]
    primary = spec.primary_role
    status: dict[str, Any] = {
        "replicas": role_counts[primary].current,
        "selector": selector_string(role_selector(name, primary)),
        "readySummary": summary,
        "roles": {
            r.value: {
                "desired": spec.replicas_of(r),
                "ready": role_counts[r].ready,
                "updated": role_counts[r].updated,
            }
            for r in roles
        },
        "endpoints": [
            _front_endpoint(svc),
            *(
                {
                    "name": f"{name}-{r.value}",
                    "role": r.value,
                    "url": f"http://{name}-{r.value}.{ns}.svc:8000",
                }
                for r in roles
            ),
        ],
        "conditions": _merge_conditions(conds, previous),
    }
    if generation is not None:
        status["observedGeneration"] = generation
    return status


def status_patch(new: dict[str, Any], old: dict[str, Any] | None) -> dict[str, Any] | None:
    """Merge patch from ``old`` to ``new`` status, or None when nothing changed.

    Roles that no longer exist (mode switched) are removed with ``null``; fields other writers own
    (``lastScalingDecision``) are never mentioned, so they survive.
    """
    old = old or {}
    patch: dict[str, Any] = {}
    for key, value in new.items():
        if key == "roles":
            gone = {r: None for r in (old.get("roles") or {}) if r not in value}
            if value != old.get("roles") or gone:
                patch["roles"] = {**value, **gone}
        elif old.get(key) != value:
            patch[key] = value
    return patch or None
