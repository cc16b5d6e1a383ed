"""Where the engine instances are: a static list, or Kubernetes pods watched by label selector.

Both produce the same thing, the full current set of :class:`Endpoint` s, and hand it to a callback;
the gateway diffs it against what it serves (join, leave = drain). The Kubernetes side is split into
a pure part (:func:`endpoints_from_pods`: pod objects -> endpoints, unit-tested without a cluster)
and the watch loop, which runs the synchronous ``kubernetes`` client in a worker thread so the
event loop never blocks, and restarts the watch (with backoff) when it ends or fails.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict

from tandem.api.labels import ANN_DRAINING, ANN_KV_EVENTS, ANN_PORT, LABEL_MODEL, LABEL_ROLE, LABEL_SERVICE
from tandem.kvevents import KVEventsSource, parse_kv_events

log = logging.getLogger("tandem.gateway.discovery")

# The roles of tandem.api.models.Role plus "remote-prefill": the engines of a remote prefill pool
# (PrfaaS-style offload), which the gateway routes to but which are not one of the service's pools.
EndpointRole = Literal["unified", "prefill", "decode", "remote-prefill"]


class Endpoint(BaseModel):
    """One engine instance as discovery sees it. ``model`` None: ask the engine's /v1/models."""

    model_config = ConfigDict(frozen=True)

    url: str
    role: EndpointRole = "unified"
    model: str | None = None
    service: str | None = None
    name: str | None = None  # pod name, for humans
    kv_events: KVEventsSource | None = None  # where the engine publishes its KV-cache events, if it does


def static_endpoints(instances: Iterable[str], prefill: Iterable[str] = (),
                     decode: Iterable[str] = (), remote_prefill: Iterable[str] = (),
                     kv_events: Mapping[str, KVEventsSource] | None = None) -> set[Endpoint]:
    events = kv_events or {}
    roles: list[tuple[EndpointRole, Iterable[str]]] = [("unified", instances), ("prefill", prefill),
                                                       ("decode", decode), ("remote-prefill", remote_prefill)]
    return {Endpoint(url=u, role=role, kv_events=events.get(u)) for role, urls in roles for u in urls}


def _get(obj: Any, *path: str) -> Any:
    """Read ``a.b.c`` from a kubernetes client model or from the same object as a plain dict."""
    for key in path:
        if obj is None:
            return None
        if isinstance(obj, Mapping):
            camel = key.split("_")[0] + "".join(p.title() for p in key.split("_")[1:])
            obj = obj.get(key, obj.get(camel, obj.get(camel.replace("Ip", "IP"))))
        else:
            obj = getattr(obj, key, None)
    return obj


def _pod_ready(pod: Any) -> bool:
    for cond in _get(pod, "status", "conditions") or ():
        if _get(cond, "type") == "Ready":
            return _get(cond, "status") == "True"
    return False


def _pod_port(pod: Any, default_port: int) -> int:
    annotations = _get(pod, "metadata", "annotations") or {}
    if str(annotations.get(ANN_PORT, "")).isdigit():
        return int(annotations[ANN_PORT])
    for container in _get(pod, "spec", "containers") or ():
        for port in _get(container, "ports") or ():
            if _get(port, "name") == "http" and _get(port, "container_port"):
                return int(_get(port, "container_port"))
    return default_port


def pod_draining(pod: Any) -> bool:
    """The autoscaler marked the pod draining (any non-empty value of the annotation)."""
    return bool((_get(pod, "metadata", "annotations") or {}).get(ANN_DRAINING))


def endpoint_from_pod(pod: Any, default_port: int) -> Endpoint | None:
    """A routable endpoint for a running, ready, not-terminating, not-draining pod with an IP; else None.

    A draining pod is left out like a deleted one: the gateway then drains its instance (no new
    requests, its queued ones re-routed, in-flight ones finish) and keeps counting what it still holds.
    """
    if _get(pod, "metadata", "deletion_timestamp") or _get(pod, "status", "phase") != "Running":
        return None
    if pod_draining(pod):
        return None
    ip = _get(pod, "status", "pod_ip")
    if not ip or not _pod_ready(pod):
        return None
    labels = _get(pod, "metadata", "labels") or {}
    role = labels.get(LABEL_ROLE, "unified")
    if role not in get_args(EndpointRole):
        log.warning("pod %s: unknown %s=%r, ignored", _get(pod, "metadata", "name"), LABEL_ROLE, role)
        return None
    host = f"[{ip}]" if ":" in ip else ip
    return Endpoint(url=f"http://{host}:{_pod_port(pod, default_port)}", role=role,
                    model=labels.get(LABEL_MODEL) or None, service=labels.get(LABEL_SERVICE) or None,
                    name=_get(pod, "metadata", "name"), kv_events=_pod_kv_events(pod, host))


def _pod_kv_events(pod: Any, host: str) -> KVEventsSource | None:
    """The pod's KV-event sockets (annotation ``serving.tandem.dev/kv-events``); a bad value is
    logged and ignored: the instance is still served, on the shadow cache view."""
    spec = (_get(pod, "metadata", "annotations") or {}).get(ANN_KV_EVENTS)
    if not spec:
        return None
    try:
        return parse_kv_events(str(spec), host)
    except ValueError as exc:
        log.warning("pod %s: %s=%r ignored: %s", _get(pod, "metadata", "name"), ANN_KV_EVENTS, spec, exc)
        return None


def endpoints_from_pods(pods: Iterable[Any], default_port: int) -> set[Endpoint]:
    return {ep for pod in pods if (ep := endpoint_from_pod(pod, default_port)) is not None}


class PodSet:
    """The watched pods by name; applying watch events keeps it equal to the API server's list."""

    def __init__(self) -> None:
        self.pods: dict[str, Any] = {}

    def reset(self, pods: Iterable[Any]) -> None:
        self.pods = {_get(p, "metadata", "name"): p for p in pods}

    def apply(self, event_type: str, pod: Any) -> None:
        name = _get(pod, "metadata", "name")
        if event_type == "DELETED":
            self.pods.pop(name, None)
        elif event_type in ("ADDED", "MODIFIED"):
            self.pods[name] = pod

    def endpoints(self, default_port: int) -> set[Endpoint]:
        return endpoints_from_pods(self.pods.values(), default_port)

    def services(self) -> set[str]:
        """The services the watched pods belong to (ready or not, draining or not)."""
        return {svc for p in self.pods.values() if (svc := (_get(p, "metadata", "labels") or {}).get(LABEL_SERVICE))}


OnEndpoints = Callable[[set[Endpoint]], Awaitable[None]]


class KubernetesDiscovery:
    """List + watch pods by label selector; every change publishes the full endpoint set."""

    def __init__(self, namespace: str, selector: str, default_port: int, on_change: OnEndpoints,
                 kubeconfig: Path | None = None, watch_timeout_s: int = 60) -> None:
        self.namespace, self.selector, self.default_port = namespace, selector, default_port
        self.on_change, self.kubeconfig, self.watch_timeout_s = on_change, kubeconfig, watch_timeout_s
        self.pods = PodSet()
        self._stop = threading.Event()
        self._task: asyncio.Task[None] | None = None
        self._watch: Any = None

    def _api(self) -> Any:
        from kubernetes import client, config

        if self.kubeconfig:
            config.load_kube_config(config_file=str(self.kubeconfig))
        else:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
        return client.CoreV1Api()

    async def start(self) -> None:
        api = await asyncio.to_thread(self._api)
        await self._list(api)  # the first list happens before serving starts: fail fast if unreachable
        self._task = asyncio.create_task(self._run(api), name="k8s-discovery")

    async def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _list(self, api: Any) -> str:
        resp = await asyncio.to_thread(api.list_namespaced_pod, self.namespace, label_selector=self.selector,
                                       _request_timeout=10)
        self.pods.reset(resp.items)
        await self.on_change(self.pods.endpoints(self.default_port))
        return resp.metadata.resource_version

    async def _run(self, api: Any) -> None:
        from kubernetes import watch

        loop = asyncio.get_running_loop()
        backoff = 1.0
        version: str | None = None
        while not self._stop.is_set():
            try:
                if version is None:
                    version = await self._list(api)
                events: asyncio.Queue[tuple[str, Any] | None] = asyncio.Queue(maxsize=1024)
                self._watch = watch.Watch()
                worker = asyncio.to_thread(self._stream, api, version, events, loop)
                stream = asyncio.ensure_future(worker)
                while (item := await events.get()) is not None:
                    etype, pod = item
                    if etype == "ERROR":  # e.g. 410 Gone: resource version too old, re-list
                        version = None
                        continue
                    version = _get(pod, "metadata", "resource_version") or version
                    self.pods.apply(etype, pod)
                    await self.on_change(self.pods.endpoints(self.default_port))
                await stream
                backoff = 1.0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the API server went away: keep serving the last known set
                log.warning("kubernetes discovery: %s; retrying in %.0fs", exc, backoff)
                version = None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    def _stream(self, api: Any, version: str, events: asyncio.Queue, loop: asyncio.AbstractEventLoop) -> None:
        """Worker thread: one watch call (bounded by ``watch_timeout_s``), events handed to the loop."""
        try:
            for ev in self._watch.stream(api.list_namespaced_pod, self.namespace, label_selector=self.selector,
                                         resource_version=version, timeout_seconds=self.watch_timeout_s):
                if self._stop.is_set():
                    break
                item = (ev["type"], ev["raw_object"] if ev["type"] == "ERROR" else ev["object"])
                asyncio.run_coroutine_threadsafe(events.put(item), loop).result(timeout=30)
        finally:
            loop.call_soon_threadsafe(events.put_nowait, None)
