"""The ``tandem gateway`` subcommand."""

from __future__ import annotations

import logging

from tandem.router.settings import GatewaySettings


class GatewayCommand(GatewaySettings):
    """Run the OpenAI-compatible gateway: DualMap routing over discovered engine instances."""

    def cli_cmd(self) -> None:
        from tandem.router.server import run_gateway_process
        from tandem.router.service_config import apply_service_description, load_service_description
        from tandem.router.workers import Supervisor

        logging.basicConfig(level=self.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        settings: GatewaySettings = self
        try:
            if self.service_config is not None:
                settings = apply_service_description(self, load_service_description(self.service_config))
            supervisor = Supervisor(settings) if settings.workers > 1 else None
        except ValueError as exc:
            raise SystemExit(f"tandem gateway: {exc}") from exc
        if supervisor is None:
            run_gateway_process(settings)
        else:
            raise SystemExit(supervisor.run())
