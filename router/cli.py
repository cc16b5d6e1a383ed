"""The ``tandem gateway`` subcommand."""

from __future__ import annotations

import logging
import threading
from types import FrameType
from typing import Any

import uvicorn

from tandem.router.settings import GatewaySettings


def uvicorn_speedups(choice: str) -> dict[str, str]:
    """uvloop + httptools when chosen and installed (measured faster; see ``tandem bench gateway``)."""
    if choice == "asyncio":
        return {"loop": "asyncio", "http": "h11"}
    out = {}
    try:
        import uvloop  # noqa: F401

        out["loop"] = "uvloop"
    except ImportError:
        pass
    try:
        import httptools  # noqa: F401

        out["http"] = "httptools"
    except ImportError:
        pass
    return out


class DrainingServer(uvicorn.Server):
    """On the first SIGTERM/SIGINT, keep listening for ``grace`` seconds while the gateway answers
    every new request 503 "shutting down" with ``Connection: close`` (and /readyz 503), so clients and
    Kubernetes move to another replica over connections the gateway itself closes; only then does
    uvicorn stop. Without this, uvicorn closes idle keep-alive connections at once and a client that
    sends on one at that moment sees a bare disconnect, not knowing whether its request was taken.
    A second signal stops at once."""

    def __init__(self, config: uvicorn.Config, on_drain: Any, grace: float) -> None:
        super().__init__(config)
        self.on_drain, self.grace = on_drain, grace
        self._timer: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._timer is not None or self.grace <= 0:
            super().handle_exit(sig, frame)
            return
        self.on_drain()
        self._timer = threading.Timer(self.grace, super().handle_exit, (sig, frame))
        self._timer.daemon = True
        self._timer.start()


class GatewayCommand(GatewaySettings):
    """Run the OpenAI-compatible gateway: DualMap routing over discovered engine instances."""

    def cli_cmd(self) -> None:
        from tandem.router.app import create_app
        from tandem.router.security import ApiKeyError
        from tandem.router.service_config import apply_service_description, load_service_description

        logging.basicConfig(level=self.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            settings: GatewaySettings = self
            if self.service_config is not None:
                settings = apply_service_description(self, load_service_description(self.service_config))
            app = create_app(settings)
        except (ApiKeyError, ValueError) as exc:
            raise SystemExit(f"tandem gateway: {exc}") from exc
        config = uvicorn.Config(app, host=self.host, port=self.port, log_level=self.log_level, access_log=False,
                                timeout_graceful_shutdown=int(self.drain_timeout) or None,
                                timeout_keep_alive=self.keep_alive_timeout, **uvicorn_speedups(self.loop))

        def drain() -> None:
            app.gateway.draining = True

        DrainingServer(config, drain, self.shutdown_grace).run()
