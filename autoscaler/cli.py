"""``tandem autoscaler``: the live controller (see :mod:`tandem.autoscaler.actuator`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from tandem.config import TandemSettings


class AutoscalerCommand(TandemSettings):
    """Size every autoscaled LLMService's pools from live load, its SLOs and its performance profile."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_AUTOSCALER_")

    gateway_url: str = Field("http://tandem-gateway:8080",
                             description="gateway whose admin API reports load (/admin/observations)")
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

    def cli_cmd(self) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        asyncio.run(self._run())

    async def _run(self) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        from tandem.autoscaler.actuator import Actuator, GatewayObservationSource
        from tandem.autoscaler.models import AutoscalerSpec
        from tandem.operator.kube import KubeClient, load_credentials

        creds = await asyncio.to_thread(load_credentials, self.kubeconfig)
        client = KubeClient(creds, await asyncio.to_thread(creds.ssl_context), timeout=self.api_timeout_s,
                            user_agent="tandem-autoscaler")
        source = GatewayObservationSource(self.gateway_url, admin_key=self.gateway_admin_key)
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
