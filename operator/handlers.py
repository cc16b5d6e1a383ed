"""kopf wiring: which events call which :class:`Reconciler` method. No decisions are made here.

All handlers are *event* handlers: kopf then keeps no per-object progress or diff-base in the
objects (no annotations, no finalizers), and each one simply asks for a full, idempotent
reconcile. A registry is built per operator instance (no module-level kopf registry), so tests can
run several operators side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

import kopf

from tandem.api.models import GROUP, VERSION
from tandem.kube import CHILD_KINDS, KubeClient, load_credentials

from .plan import LABEL_INSTANCE, LABEL_MANAGED_BY, MANAGER
from .reconcile import Reconciler

log = logging.getLogger("tandem.operator")


def build_settings(*, request_timeout: float = 30.0, namespaced: bool = False) -> kopf.OperatorSettings:
    """kopf's settings. ``namespaced`` (--namespace): serve exactly the named namespaces without
    scanning the cluster for namespaces and CRDs, so that Roles in those namespaces are all the
    operator needs (deploy/rbac/operator-namespaced.yaml); cluster-wide it scans (a ClusterRole)."""
    settings = kopf.OperatorSettings()
    settings.scanning.disabled = namespaced
    settings.peering.standalone = True  # one operator replica (Deployment with replicas: 1)
    settings.peering.mandatory = False
    settings.networking.request_timeout = request_timeout
    settings.networking.connect_timeout = 10.0
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    # Only event handlers are registered, so kopf stores nothing; if that ever changes, keep its
    # bookkeeping in our own annotation prefix rather than in status (the schema would prune it).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    return settings


def build_registry(
    reconciler: Reconciler,
    *,
    kubeconfig: Path | None,
    namespaces: list[str | None],
    resync_seconds: float,
) -> kopf.OperatorRegistry:
    """Register the operator's handlers; ``namespaces`` [None] means cluster-wide."""
    registry = kopf.OperatorRegistry()
    tasks: set[asyncio.Task[None]] = set()

    @kopf.on.login(registry=registry)
    async def login(**_: Any) -> kopf.ConnectionInfo:
        # Resolving a kubeconfig reads files and may run exec plugins: off the event loop.
        creds = await asyncio.to_thread(load_credentials, kubeconfig)
        ssl_context = await asyncio.to_thread(creds.ssl_context)
        await reconciler.use_client(KubeClient(creds, ssl_context))
        return kopf.ConnectionInfo(
            server=creds.server,
            ca_path=creds.ca_path,
            insecure=creds.insecure,
            scheme="Bearer" if creds.token else None,
            token=creds.token,
            certificate_path=creds.cert_path,
            private_key_path=creds.key_path,
        )

    @kopf.on.startup(registry=registry)
    async def start_resync(**_: Any) -> None:
        if resync_seconds > 0:
            tasks.add(asyncio.create_task(reconciler.resync_forever(namespaces, resync_seconds)))

    @kopf.on.cleanup(registry=registry)
    async def stop(**_: Any) -> None:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        tasks.clear()
        await reconciler.close()

    @kopf.on.event(GROUP, VERSION, "llmservices", registry=registry)
    async def service_event(event: dict[str, Any], namespace: str, name: str, **_: Any) -> None:
        if event.get("type") == "DELETED":
            reconciler.forget(namespace, name)
            return
        result = await reconciler.reconcile(namespace, name)
        if result.created or result.patched or result.deleted:
            log.info("LLMService %s/%s: %s", namespace, name, result.model_dump(exclude_defaults=True))

    @kopf.on.event(GROUP, VERSION, "remoteprefillpools", registry=registry)
    async def pool_event(namespace: str, name: str, **_: Any) -> None:
        await reconciler.reconcile_pool(namespace, name)

    # Drift correction: a child edited or deleted by someone else re-runs its owner's reconcile.
    for kind in CHILD_KINDS:

        @kopf.on.event(
            kind.group,
            kind.version,
            kind.plural,
            id=f"child-{kind.plural}",
            labels={LABEL_MANAGED_BY: MANAGER},
            registry=registry,
        )
        async def child_event(namespace: str, labels: dict[str, str], **_: Any) -> None:
            owner = labels.get(LABEL_INSTANCE)
            if owner:
                await reconciler.reconcile(namespace, owner)

    return registry
