"""The I/O shell around :mod:`tandem.operator.plan`: read the LLMService, apply its plan, write status.

Every write is conditional on a difference (see :func:`state.child_drift`), so a reconcile of an
unchanged service issues only reads; that is what makes it safe to run on every event of the
service and of its children (drift correction) and periodically (missed events, retries).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from tandem.api.models import GatewayType, LLMService, RemotePrefillPool, RemotePrefillPoolSpec, Role
from tandem.kube import (
    CHILD_KINDS,
    KIND_OF,
    LLMSERVICES,
    OPTIONAL_CHILD_KINDS,
    REMOTEPREFILLPOOLS,
    ApiError,
    Kind,
    KubeClient,
)

from .plan import OperatorDefaults, PlanError, child_selector, plan_service
from .state import (
    DeploymentCounts,
    child_drift,
    invalid_status,
    merge_patch_for,
    service_status,
    status_patch,
)

log = logging.getLogger("tandem.operator")

Key = tuple[str, str]


class ReconcileResult(BaseModel):
    """What one pass did, for logs and tests; empty lists mean the cluster already matched."""

    created: list[str] = Field(default_factory=list)
    patched: list[str] = Field(default_factory=list)
    deleted: list[str] = Field(default_factory=list)
    status_changed: bool = False
    invalid: str | None = None
    skipped: bool = False
    gone: bool = False


def missing_api(kind: Kind) -> str:
    """Why an optional child could not be created: its API is not served (CRD not installed)."""
    return (f"the API {kind.api_version} ({kind.plural}) is not served by this cluster; install the Gateway "
            "API Inference Extension CRDs (docs/epp.md)")


def validation_message(exc: ValidationError) -> tuple[str, str]:
    """(field, reason) of the first error, the field as a dotted path in the object's JSON."""
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "spec"
    reason = err["msg"].removeprefix("Value error, ")
    return field, reason


def _resource_view(body: dict[str, Any]) -> dict[str, Any]:
    """The parts of a custom object the models describe (status is ours to write, not to parse)."""
    return {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec") if k in body}


class Reconciler:
    """Reconciles LLMServices and RemotePrefillPools; one instance per operator process."""

    def __init__(
        self,
        defaults: OperatorDefaults,
        *,
        timeout: float = 60.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.defaults = defaults
        self.timeout = timeout
        self._clock = clock
        self._client: KubeClient | None = None
        self._locks: dict[Key, asyncio.Lock] = {}
        self._waiting: set[Key] = set()

    @property
    def client(self) -> KubeClient:
        if self._client is None:
            raise RuntimeError("not logged in yet: the kopf login handler sets the client")
        return self._client

    async def use_client(self, client: KubeClient) -> None:
        old, self._client = self._client, client
        if old is not None:
            await old.close()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    def forget(self, namespace: str, name: str) -> None:
        """The service is gone: drop its lock (the dict only holds live services)."""
        key = (namespace, name)
        if key not in self._waiting and not (key in self._locks and self._locks[key].locked()):
            self._locks.pop(key, None)

    async def reconcile(self, namespace: str, name: str) -> ReconcileResult:
        """Bring one LLMService's children and status in line; coalesces concurrent requests.

        While a pass runs, one more caller waits (it will read the newest state); any others
        return at once, since that waiter covers them.
        """
        key = (namespace, name)
        if key in self._waiting:
            return ReconcileResult(skipped=True)
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._waiting.add(key)
        acquired = False
        try:
            async with lock:
                acquired = True
                self._waiting.discard(key)  # from here on, a new request must wait for a new pass
                async with asyncio.timeout(self.timeout):
                    return await self._reconcile(namespace, name)
        finally:
            if not acquired:  # cancelled while waiting
                self._waiting.discard(key)

    async def _reconcile(self, namespace: str, name: str) -> ReconcileResult:
        client = self.client
        body = await client.get(LLMSERVICES, namespace, name)
        if body is None:
            self.forget(namespace, name)
            return ReconcileResult(gone=True)
        if body.get("metadata", {}).get("deletionTimestamp"):
            return ReconcileResult(gone=True)  # garbage collection removes the children
        result = ReconcileResult()
        try:
            svc = LLMService.model_validate(_resource_view(body))
            pools, pool_problem = await self._remote_pools(svc)
            plan = plan_service(svc, self.defaults, pools)
        except ValidationError as exc:
            field, reason = validation_message(exc)
            result.invalid = f"{field}: {reason}"
            await self._write_status(body, invalid_status(body, field, reason, self._clock()), result)
            log.warning("LLMService %s/%s refused: %s", namespace, name, result.invalid)
            return result
        except PlanError as exc:
            result.invalid = str(exc)
            await self._write_status(body, invalid_status(body, exc.field, exc.reason, self._clock()), result)
            log.warning("LLMService %s/%s refused: %s", namespace, name, result.invalid)
            return result

        warnings = [pool_problem] if pool_problem else list(plan.warnings)
        live = await self._live_children(namespace, name)
        wanted: set[tuple[str, str]] = set()
        deployments: dict[str, dict[str, Any]] = {}
        for child in plan.children:
            ident = (child["kind"], child["metadata"]["name"])
            wanted.add(ident)
            try:
                obj = await self._apply(child, live.get(ident), result)
            except ApiError as exc:
                if exc.status == 404 and KIND_OF[ident[0]] in OPTIONAL_CHILD_KINDS:
                    warnings.append(f"{ident[0]} {ident[1]}: {missing_api(KIND_OF[ident[0]])}")
                    continue
                if exc.status not in (400, 422):
                    raise  # the pass fails and is retried (next event or resync)
                # The server refused a child (e.g. a node selector it finds invalid): report, carry on.
                warnings.append(f"{ident[0]} {ident[1]}: {exc.message or exc.reason}")
                continue
            if ident[0] == "Deployment" and obj is not None:
                deployments[ident[1]] = obj
        for ident in live:
            if ident not in wanted:
                kind = KIND_OF[ident[0]]
                await client.delete(kind, namespace, ident[1])
                result.deleted.append(f"{ident[0]}/{ident[1]}")
                log.info("deleted %s %s/%s (no longer in the plan)", ident[0], namespace, ident[1])
        counts = {
            role: DeploymentCounts.from_deployment(deployments.get(f"{name}-{role.value}")) for role in Role
        }
        front = f"{name}-epp" if svc.spec.gateway.type == GatewayType.inference_pool else f"{name}-gateway"
        gateway = DeploymentCounts.from_deployment(deployments.get(front))
        status = service_status(svc, counts, gateway, warnings, body.get("status"), self._clock())
        await self._write_status(body, status, result)
        return result

    async def _remote_pools(self, svc: LLMService) -> tuple[dict[str, RemotePrefillPoolSpec], str | None]:
        """The referenced RemotePrefillPool, or why it cannot be used (it then counts as absent)."""
        if svc.spec.offload is None:
            return {}, None
        ref = svc.spec.offload.remote_prefill
        body = await self.client.get(REMOTEPREFILLPOOLS, svc.metadata.namespace, ref)
        if body is None:
            return {}, None  # the plan itself reports a missing pool
        try:
            return {ref: RemotePrefillPool.model_validate(_resource_view(body)).spec}, None
        except ValidationError as exc:
            field, reason = validation_message(exc)
            return {}, (
                f"spec.offload.remotePrefill: RemotePrefillPool {ref!r} is invalid ({field}: {reason}); "
                "serving without remote prefill offload"
            )

    async def _live_children(self, namespace: str, name: str) -> dict[tuple[str, str], dict[str, Any]]:
        found: dict[tuple[str, str], dict[str, Any]] = {}
        for kind in (*CHILD_KINDS, *OPTIONAL_CHILD_KINDS):
            try:
                objs = await self.client.list(kind, namespace, child_selector(name))
            except ApiError as exc:
                if exc.status == 404 and kind in OPTIONAL_CHILD_KINDS:
                    continue  # its CRD is not installed: there are none
                raise
            for obj in objs:
                found[(kind.kind, obj["metadata"]["name"])] = obj
        return found

    async def _apply(
        self, desired: dict[str, Any], live: dict[str, Any] | None, result: ReconcileResult
    ) -> dict[str, Any] | None:
        kind = KIND_OF[desired["kind"]]
        meta = desired["metadata"]
        label = f"{desired['kind']}/{meta['name']}"
        if live is None:
            try:
                created = await self.client.create(kind, meta["namespace"], desired)
            except ApiError as exc:
                if exc.status != 409:
                    raise
                # Created concurrently (or by an earlier pass our list missed): its ADDED event
                # triggers the next pass, which compares it like any other child.
                return None
            result.created.append(label)
            log.info("created %s %s/%s", desired["kind"], meta["namespace"], meta["name"])
            return created
        drift = child_drift(desired, live)
        if not drift:
            return live
        patched = await self.client.merge_patch(
            kind, meta["namespace"], meta["name"], merge_patch_for(desired, live)
        )
        result.patched.append(label)
        log.info(
            "patched %s %s/%s: %s", desired["kind"], meta["namespace"], meta["name"], ", ".join(drift[:5])
        )
        return patched

    async def _write_status(
        self, body: dict[str, Any], status: dict[str, Any], result: ReconcileResult
    ) -> None:
        patch = status_patch(status, body.get("status"))
        if patch is None:
            return
        meta = body["metadata"]
        await self.client.merge_patch(
            LLMSERVICES, meta["namespace"], meta["name"], {"status": patch}, "status"
        )
        result.status_changed = True

    # -----------------------------------------------------------------------------------------
    # RemotePrefillPool

    async def reconcile_pool(self, namespace: str, name: str) -> ReconcileResult:
        """Validate a RemotePrefillPool, report it, and re-plan the services that reference it."""
        result = ReconcileResult()
        async with asyncio.timeout(self.timeout):
            body = await self.client.get(REMOTEPREFILLPOOLS, namespace, name)
            if body is not None:
                await self._pool_status(body, result)
            services = await self.client.list(LLMSERVICES, namespace)
        for svc in services:
            offload = (svc.get("spec") or {}).get("offload") or {}
            if offload.get("remotePrefill") == name:
                await self.reconcile(namespace, svc["metadata"]["name"])
        return result

    async def _pool_status(self, body: dict[str, Any], result: ReconcileResult) -> None:
        meta = body["metadata"]
        old = body.get("status") or {}
        generation = meta.get("generation")
        try:
            RemotePrefillPool.model_validate(_resource_view(body))
            ok, reason, message = True, "Valid", ""
        except ValidationError as exc:
            field, why = validation_message(exc)
            ok, reason, message = False, "FieldInvalid", f"{field}: {why}"
            result.invalid = message
        previous = {c.get("type"): c for c in old.get("conditions", []) or []}
        prior = previous.get("InvalidSpec")
        status_value = "False" if ok else "True"
        keep_time = (
            prior is not None and prior.get("status") == status_value and prior.get("lastTransitionTime")
        )
        cond: dict[str, Any] = {
            "type": "InvalidSpec",
            "status": status_value,
            "reason": reason,
            "message": message,
            "lastTransitionTime": prior["lastTransitionTime"]
            if keep_time
            else self._clock().strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        if generation is not None:
            cond["observedGeneration"] = generation
        others = [c for c in old.get("conditions", []) or [] if c.get("type") != "InvalidSpec"]
        new: dict[str, Any] = {"conditions": [cond, *others]}
        if generation is not None:
            new["observedGeneration"] = generation
        patch = status_patch(new, old)
        if patch is not None:
            await self.client.merge_patch(
                REMOTEPREFILLPOOLS, meta["namespace"], meta["name"], {"status": patch}, "status"
            )
            result.status_changed = True

    # -----------------------------------------------------------------------------------------
    # Periodic resync

    async def resync_once(self, namespaces: Iterable[str | None]) -> int:
        """Reconcile every LLMService in ``namespaces`` (None: all); returns how many were visited."""
        visited = 0
        for ns in namespaces:
            for body in await self.client.list(LLMSERVICES, ns):
                meta = body["metadata"]
                try:
                    await self.reconcile(meta["namespace"], meta["name"])
                except (ApiError, TimeoutError, OSError) as exc:
                    log.warning("resync of %s/%s failed: %s", meta["namespace"], meta["name"], exc)
                visited += 1
        return visited

    async def resync_forever(self, namespaces: list[str | None], interval: float) -> None:
        """Catch what events missed (a failed pass, a child kind we do not watch) every ``interval`` s."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.resync_once(namespaces)
            except (ApiError, TimeoutError, OSError, RuntimeError) as exc:
                log.warning("periodic resync failed, next try in %.0f s: %s", interval, exc)
