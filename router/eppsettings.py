"""Configuration and command of the endpoint picker (``tandem epp``): the gateway's settings, plus its gRPC port.

The picker is the gateway's core behind another front end, so it takes every gateway setting
(discovery, policy, SLOs, queues, keys, shared state, ...) under its own prefix (``TANDEM_EPP_*``,
or an ``epp:`` section of the YAML file). ``port`` is its HTTP side (``/metrics``, ``/healthz``,
``/readyz``, the admin API the autoscaler reads); ``grpc_port`` serves the ext_proc service and gRPC
health checking. Settings about proxying to the engines do not apply: the data plane proxies.
"""

from __future__ import annotations

import logging

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from tandem.router.settings import GatewaySettings


class EppSettings(GatewaySettings):
    model_config = SettingsConfigDict(env_prefix="TANDEM_EPP_")

    port: int = Field(9090, ge=0, le=65535, description="HTTP port: /metrics, /healthz, /readyz and the admin API")
    grpc_port: int = Field(9002, ge=0, le=65535, description="gRPC port: the ext_proc service "
                           "(envoy.service.ext_proc.v3.ExternalProcessor) and gRPC health checking "
                           "(InferencePool endpointPickerRef.port)")
    grpc_grace: float = Field(5.0, ge=0, le=300, description="on shutdown, seconds open ext_proc streams get to "
                              "end after the drain before they are cancelled")

    @model_validator(mode="after")
    def _one_process(self) -> EppSettings:
        if self.workers != 1:
            raise ValueError("workers: the endpoint picker runs one process (run more replicas with --redis-url)")
        if self.grpc_port and self.grpc_port == self.port:
            raise ValueError("grpc_port: must differ from port (the HTTP side)")
        return self


class EppCommand(EppSettings):
    """Run the endpoint picker: Tandem routing for Envoy / Gateway API Inference Extension gateways."""

    def cli_cmd(self) -> None:
        from tandem.router.eppserver import run_epp_process
        from tandem.router.service_config import apply_service_description, load_service_description

        logging.basicConfig(level=self.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        settings: EppSettings = self
        try:
            if self.service_config is not None:
                settings = apply_service_description(self, load_service_description(self.service_config))
        except ValueError as exc:
            raise SystemExit(f"tandem epp: {exc}") from exc
        run_epp_process(settings)
