"""The gateway writes the RemotePrefillPool's status (reachable, link traffic, queued tokens).

The Kubernetes side is kmock's in-memory API server; the gateway and the engines are real and talk
HTTP, and the gateway reaches kmock through a kubeconfig as it would reach a cluster.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gatewayutil import gateway_app, sim_app, until
from kubeutil import kmock_kubeconfig

from tandem.kube import REMOTEPREFILLPOOLS, KubeClient, load_credentials
from tandem.router.remote_status import RemoteView, pool_status
from tandem.serve import serving

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
OPERATORS = {"type": "InvalidSpec", "status": "False", "reason": "Valid", "message": "",
             "lastTransitionTime": "2026-11-01T00:00:00Z"}


def reachable(status: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == "Reachable")


def test_status_reports_what_the_gateway_sees_and_keeps_the_operators_condition() -> None:
    up = pool_status(RemoteView(instances=2, healthy=1, egress_gbps=3.5, queue_tokens=9000),
                     {"conditions": [OPERATORS]}, T0)
    assert (up["reachable"], up["measuredBandwidthGbps"], up["queueTokens"]) == (True, 3.5, 9000)
    assert up["conditions"][0] == OPERATORS
    assert reachable(up)["status"] == "True" and "1 of 2" in reachable(up)["message"]

    later = pool_status(RemoteView(instances=2, healthy=2, egress_gbps=0, queue_tokens=0), up,
                        T0 + timedelta(minutes=5))
    assert reachable(later)["lastTransitionTime"] == reachable(up)["lastTransitionTime"]  # same answer: kept

    down = pool_status(RemoteView(instances=2, healthy=0, egress_gbps=0, queue_tokens=0), later,
                       T0 + timedelta(minutes=9))
    assert down["reachable"] is False and reachable(down)["reason"] == "NotAnswering"
    assert reachable(down)["lastTransitionTime"] == "2026-11-23T12:09:00Z"
    assert [c["type"] for c in down["conditions"]] == ["InvalidSpec", "Reachable"]  # no duplicate of ours

    none = pool_status(RemoteView(instances=0, healthy=0, egress_gbps=0, queue_tokens=0), None, T0)
    assert none["reachable"] is False and reachable(none)["reason"] == "NoEndpoints"


async def test_gateway_writes_the_pool_status_through_the_api(kmock: Any, tmp_path: Path) -> None:
    kmock.resources["serving.tandem.dev/v1alpha1/remoteprefillpools"] = kmock.ResourceInfo(
        kind="RemotePrefillPool", namespaced=True, subresources={"status"}, verbs={"get", "list", "patch", "create"})
    kubeconfig = kmock_kubeconfig(kmock, tmp_path)
    creds = load_credentials(kubeconfig)
    client = KubeClient(creds, creds.ssl_context(), user_agent="tandem-tests")
    try:
        for name in ("west", "east"):
            await client.create(REMOTEPREFILLPOOLS, "serving", {
                "apiVersion": "serving.tandem.dev/v1alpha1", "kind": "RemotePrefillPool",
                "metadata": {"name": name, "namespace": "serving"},
                "spec": {"endpoints": ["http://example.invalid:8000"], "linkBandwidthGbps": 100},
                "status": {"conditions": [OPERATORS]}})

        async def status(name: str) -> dict[str, Any]:
            return (await client.get(REMOTEPREFILLPOOLS, "serving", name) or {}).get("status") or {}

        common = {"kubeconfig": kubeconfig, "k8s_namespace": "serving", "remote_status_interval": 0.1}
        async with serving(sim_app(role="prefill")) as p0, serving(sim_app(role="prefill")) as r0, \
                serving(sim_app(role="decode")) as d0, \
                serving(gateway_app([], prefill_instances=[p0], remote_prefill_instances=[r0], decode_instances=[d0],
                                  remote_prefill_pool="west", **common)), \
                serving(gateway_app([], prefill_instances=[p0], remote_prefill_instances=["http://127.0.0.1:9"],
                                  decode_instances=[d0], remote_prefill_pool="east", **common)):
            async def written() -> bool:
                return "reachable" in await status("west") and "reachable" in await status("east")

            await until(written)
            west, east = await status("west"), await status("east")
    finally:
        await client.close()
    assert west["reachable"] is True and west["queueTokens"] == 0 and west["measuredBandwidthGbps"] == 0
    assert reachable(west)["status"] == "True" and west["conditions"][0] == OPERATORS
    assert east["reachable"] is False and reachable(east)["reason"] == "NoEndpoints"
    assert east["conditions"][0] == OPERATORS
