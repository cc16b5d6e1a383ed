"""The RemotePrefillPool's status, written by the gateway that uses the link.

The operator cannot tell whether another cluster's prefill engines answer or how busy the link is;
the gateway can, since it probes, scrapes and sends to them. So the gateway fills in the status the
operator leaves to it: ``reachable``, ``measuredBandwidthGbps`` (the KV traffic it put on the link
over the offload controller's window: a lower bound of what the link carries, zero when idle),
``queueTokens`` (uncached prompt tokens it has queued or in flight there) and a ``Reachable``
condition whose transition time moves only when the answer changes. The operator writes its own
condition (``InvalidSpec``) into the same list, so each writer reads the list, replaces only its own
type and patches with the resourceVersion it read (a concurrent write makes it retry next time
rather than drop the other's condition).

:func:`pool_status` is pure (tested with hand-made numbers); :class:`RemotePoolReporter` is the
loop that patches it through the Kubernetes API. Several gateway replicas report the same pool;
each writes its own view and the last write wins, which is what ``kubectl describe`` should show.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
from pydantic import BaseModel, Field

from tandem.kube import REMOTEPREFILLPOOLS, ApiError, KubeClient

log = logging.getLogger("tandem.gateway.remote_status")


class RemoteView(BaseModel):
    """What the gateway sees of the remote pool at one moment."""

    instances: int = Field(ge=0, description="remote prefill engines discovered")
    healthy: int = Field(ge=0, description="of which answer (scrapes fresh, circuit closed)")
    egress_gbps: float = Field(ge=0, description="KV traffic sent over the link, Gbit/s, last window")
    queue_tokens: int = Field(ge=0, description="uncached prompt tokens queued or in flight there")


def pool_status(view: RemoteView, current: dict[str, Any] | None, now: datetime) -> dict[str, Any]:
    """The ``status`` to merge into the RemotePrefillPool whose status is ``current``: the other
    writers' conditions kept, ours replaced, its transition time kept while its value is the same."""
    reachable = view.healthy > 0
    value = "True" if reachable else "False"
    if reachable:
        reason, message = "Answering", f"{view.healthy} of {view.instances} remote prefill engines answer"
    elif view.instances:
        reason, message = "NotAnswering", f"none of the {view.instances} remote prefill engines answers"
    else:
        reason, message = "NoEndpoints", "no remote prefill engine is known to this gateway"
    conditions = (current or {}).get("conditions") or []
    old = next((c for c in conditions if c.get("type") == "Reachable"), None)
    since = old["lastTransitionTime"] if old and old.get("status") == value and old.get("lastTransitionTime") \
        else now.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "reachable": reachable,
        "measuredBandwidthGbps": round(view.egress_gbps, 6),
        "queueTokens": view.queue_tokens,
        "conditions": [*(c for c in conditions if c.get("type") != "Reachable"),
                       {"type": "Reachable", "status": value, "reason": reason, "message": message,
                        "lastTransitionTime": since}],
    }


class RemotePoolReporter:
    """Patches ``status`` of one RemotePrefillPool every ``interval`` seconds."""

    def __init__(self, client: KubeClient, namespace: str, name: str, view: Callable[[], RemoteView],
                 interval: float) -> None:
        self.client, self.namespace, self.name = client, namespace, name
        self.view, self.interval = view, interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="remote-pool-status")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.client.close()

    async def report(self) -> bool:
        """One status write; the pool missing or the API refusing is logged, never raised."""
        where = f"RemotePrefillPool {self.namespace}/{self.name}"
        try:
            body = await self.client.get(REMOTEPREFILLPOOLS, self.namespace, self.name)
            if body is None:
                log.warning("%s not found: its status is not written", where)
                return False
            status = pool_status(self.view(), body.get("status"), datetime.now(UTC))
            patch: dict[str, Any] = {"status": status}
            if version := body.get("metadata", {}).get("resourceVersion"):
                patch["metadata"] = {"resourceVersion": version}
            await self.client.merge_patch(REMOTEPREFILLPOOLS, self.namespace, self.name, patch,
                                          subresource="status")
        except (ApiError, aiohttp.ClientError, TimeoutError) as exc:
            log.warning("cannot write the status of %s: %s", where, exc)
            return False
        return True

    async def _run(self) -> None:
        while True:
            try:
                await self.report()
            except Exception:  # a bug here must not end the reports for the gateway's lifetime
                log.exception("RemotePrefillPool %s/%s: status report failed", self.namespace, self.name)
            await asyncio.sleep(self.interval)
