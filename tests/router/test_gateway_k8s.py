"""Kubernetes discovery end to end: the real ``kubernetes`` client against a fake API server.

No real API server can run here, so a minimal one (pod list + watch stream, the two calls discovery
makes) is served over real HTTP; the gateway under test uses the official client unchanged,
configured by a kubeconfig that points at it.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from gatewayutil import completion_body, gateway_app, sim_app, until

from tandem.serve import serving


def pod(name: str, port: int, ready: bool = True) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "llm", "resourceVersion": "1",
                         "labels": {"serving.tandem.dev/role": "unified", "serving.tandem.dev/service": "svc"},
                         "annotations": {"serving.tandem.dev/port": str(port)}},
            "spec": {"containers": [{"name": "engine", "image": "sim"}]},
            "status": {"phase": "Running", "podIP": "127.0.0.1",
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


class FakeApiServer:
    def __init__(self, pods: list[dict]) -> None:
        self.pods = {p["metadata"]["name"]: p for p in pods}
        self.events: asyncio.Queue[dict] = asyncio.Queue()
        self.selectors: list[str] = []
        self.app = FastAPI()

        @self.app.get("/api/v1/namespaces/{ns}/pods")
        async def pods_endpoint(ns: str, request: Request):
            self.selectors.append(request.query_params.get("labelSelector", ""))
            if request.query_params.get("watch") in ("true", "True", "1"):
                limit = float(request.query_params.get("timeoutSeconds", "5"))
                return StreamingResponse(self._watch(limit), media_type="application/json")
            return {"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"},
                    "items": list(self.pods.values())}

    async def _watch(self, limit: float):
        loop = asyncio.get_running_loop()
        end = loop.time() + limit
        while (left := end - loop.time()) > 0:
            try:
                ev = await asyncio.wait_for(self.events.get(), left)
            except TimeoutError:
                return
            yield json.dumps(ev) + "\n"

    def emit(self, kind: str, obj: dict) -> None:
        if kind == "DELETED":
            self.pods.pop(obj["metadata"]["name"], None)
        else:
            self.pods[obj["metadata"]["name"]] = obj
        self.events.put_nowait({"type": kind, "object": obj})


def kubeconfig(tmp_path: Path, server: str) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: "{server}"}}}}]
users: [{{name: u, user: {{token: test-token}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: u, namespace: llm}}}}]
current-context: fake
""")
    return path


async def _instances(c: httpx.AsyncClient, gw: str) -> set[str]:
    data = (await c.get(gw + "/admin/instances")).json()
    return {i["url"] for i in data["instances"] if not i["draining"]}




async def test_pods_join_and_leave_through_the_watch(tmp_path: Path) -> None:
    async with serving(sim_app(port=0)) as a, serving(sim_app(port=0)) as b:
        port_a, port_b = int(a.rsplit(":", 1)[1]), int(b.rsplit(":", 1)[1])
        api = FakeApiServer([pod("engine-a", port_a), pod("engine-b", port_b, ready=False)])
        async with serving(api.app) as api_url:
            app = gateway_app([], discovery="kubernetes", kubeconfig=kubeconfig(tmp_path, api_url),
                              k8s_namespace="llm", k8s_selector="serving.tandem.dev/service=svc",
                              k8s_watch_timeout=2)
            async with serving(app) as gw, httpx.AsyncClient(timeout=10) as c:
                assert api.selectors[0] == "serving.tandem.dev/service=svc"
                assert await _instances(c, gw) == {a}  # the not-ready pod is not routed to
                assert (await c.post(gw + "/v1/completions", json=completion_body())).status_code == 200

                api.emit("MODIFIED", pod("engine-b", port_b, ready=True))

                async def both() -> bool:
                    return await _instances(c, gw) == {a, b}
                await until(both)

                api.emit("DELETED", pod("engine-a", port_a))

                async def only_b() -> bool:
                    return await _instances(c, gw) == {b}
                await until(only_b)
                for i in range(4):
                    r = await c.post(gw + "/v1/completions", json=completion_body(f"after {i}"))
                    assert r.status_code == 200 and r.headers["x-tandem-instance"] == "engine-b"  # the pod name
