"""``tandem autoscaler``: the live controller (see :mod:`tandem.autoscaler.actuator`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from tandem.config import ConfigFileError, TandemSettings, UrlList, split_urls

if TYPE_CHECKING:
    from tandem.kube import KubeClient


class AutoscalerCommand(TandemSettings):
    """Size every autoscaled LLMService's pools from live load, its SLOs and its performance profile."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_AUTOSCALER_")

    gateway_url: UrlList = Field(["http://tandem-gateway:8080"],
                                 description="static discovery: gateway base URLs, comma-separated, one per "
                                 "replica; every one is asked (/admin/observation-counts) and the answers "
                                 "added up (a Service URL reaches one random replica: 1/K of the load)")
    gateway_discovery: Literal["static", "kubernetes"] = Field(
        "static", description="where the gateway replicas are: static (--gateway-url) or kubernetes (every "
                              "running pod matching --gateway-selector, asked at its own address)")
    gateway_selector: str = Field("app.kubernetes.io/component=gateway",
                                  description="kubernetes discovery: label selector of the gateway pods (k=v,...)")
    gateway_namespace: str | None = Field(None, description="kubernetes discovery: namespace of the gateway pods "
                                          "(default: the namespace of each LLMService observed)")
    gateway_port: str = Field("http", min_length=1, description="kubernetes discovery: the gateway pods' port, "
                              "a number or a container port's name")
    gateway_timeout_s: float = Field(5.0, gt=0, description="how long each gateway replica may take to answer; "
                                     "one that does not is left out of the report (logged, "
                                     "tandem_autoscaler_gateway_replicas{state=\"failed\"})")
    gateway_admin_key: str | None = Field(None, description="the gateway's admin API key, when it has one "
                                          "(env TANDEM_AUTOSCALER_GATEWAY_ADMIN_KEY)")
    namespaces: list[str] = Field(default_factory=lambda: ["default"], description="namespaces to watch")
    kubeconfig: Path | None = Field(None, description="kubeconfig (default: in-cluster, then ~/.kube/config)")
    interval_s: float = Field(15.0, gt=0, description="seconds between ticks")
    window_s: float = Field(30.0, gt=0, description="observation window asked of the gateway")
    mix_window_s: float = Field(300.0, gt=0, description="window of the length mix and prefix hit ratio "
                                                           "(slower and noisier than the rate)")
    startup_delay_s: float = Field(120.0, ge=0, description="pod scheduled -> engine ready (forecast horizon)")
    scale_up_cooldown_s: float = Field(30.0, ge=0, description="least time between two scale-ups of a role")
    stabilization_s: float = Field(300.0, ge=0, description="scale-down stabilization window")
    drain_timeout_s: float = Field(300.0, gt=0, description="a draining pod counts as drained after this long")
    gpu_budget: int | None = Field(None, ge=1, description="GPUs all autoscaled services may hold together")
    metrics_port: int = Field(9091, ge=0, le=65535, description="port of /metrics (tandem_autoscaler_*)")
    api_timeout_s: float = Field(10.0, gt=0, description="timeout of each Kubernetes API call")

    _urls = field_validator("gateway_url", mode="before")(classmethod(lambda cls, v: split_urls(v)))

    @field_validator("gateway_selector")
    @classmethod
    def _selector(cls, value: str) -> str:
        from tandem.autoscaler.actuator import parse_label_selector

        parse_label_selector(value)
        return value

    @model_validator(mode="after")
    def _has_gateways(self) -> AutoscalerCommand:
        if self.gateway_discovery == "static" and not self.gateway_url:
            raise ValueError("gateway_url: static discovery needs at least one gateway URL")
        return self

    def cli_cmd(self) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        asyncio.run(self._run())

    async def _kube_client(self) -> KubeClient:
        """A client of a Kubernetes API that answered a first list of LLMServices, or a CLI error
        (exit 2) that says which API and why: without one the autoscaler can do nothing."""
        import aiohttp
        import kubernetes.config

        from tandem.kube import LLMSERVICES, ApiError, KubeClient, load_credentials

        where = "kubeconfig (--kubeconfig / TANDEM_AUTOSCALER_KUBECONFIG)"
        try:
            creds = await asyncio.to_thread(load_credentials, self.kubeconfig)
            tls = await asyncio.to_thread(creds.ssl_context)
        except (kubernetes.config.ConfigException, OSError, ValueError) as exc:
            searched = self.kubeconfig or "not in a cluster, and $KUBECONFIG / ~/.kube/config"
            raise ConfigFileError(f"{where}: no Kubernetes API credentials ({searched}: {exc})") from None
        client = KubeClient(creds, tls, timeout=self.api_timeout_s, user_agent="tandem-autoscaler")
        try:
            await client.list(LLMSERVICES, self.namespaces[0])
        except (ApiError, aiohttp.ClientError, TimeoutError) as exc:
            await client.close()
            raise ConfigFileError(f"{where}: the Kubernetes API at {creds.server} did not list LLMServices in "
                                  f"namespace {self.namespaces[0]!r}: {type(exc).__name__}: {exc}") from None
        return client

    async def _run(self) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        from tandem.autoscaler.actuator import Actuator, GatewayObservationSource, KubernetesGateways
        from tandem.autoscaler.models import AutoscalerSpec

        client = await self._kube_client()
        gateways = self.gateway_url if self.gateway_discovery == "static" else KubernetesGateways(
            client, self.gateway_selector, port=self.gateway_port, namespace=self.gateway_namespace)
        source = GatewayObservationSource(gateways, timeout_s=self.gateway_timeout_s, admin_key=self.gateway_admin_key)
        registry = CollectorRegistry()
        start_http_server(self.metrics_port, registry=registry)
        defaults = AutoscalerSpec(startup_delay_s=self.startup_delay_s, scale_up_cooldown_s=self.scale_up_cooldown_s,
                                  scale_down_stabilization_s=self.stabilization_s)
        actuator = Actuator(client, source, namespaces=self.namespaces, defaults=defaults, window_s=self.window_s,
                            mix_window_s=self.mix_window_s, drain_timeout_s=self.drain_timeout_s,
                            gpu_budget=self.gpu_budget, registry=registry)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        try:
            await actuator.run(self.interval_s, stop)
        finally:
            await source.close()
            await client.close()
