"""The ``tandem gateway`` subcommand."""

from __future__ import annotations

import logging

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


class GatewayCommand(GatewaySettings):
    """Run the OpenAI-compatible gateway: DualMap routing over discovered engine instances."""

    def cli_cmd(self) -> None:
        from tandem.router.app import create_app
        from tandem.router.security import ApiKeyError

        logging.basicConfig(level=self.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            app = create_app(self)
        except (ApiKeyError, ValueError) as exc:
            raise SystemExit(f"tandem gateway: {exc}") from exc
        uvicorn.run(app, host=self.host, port=self.port, log_level=self.log_level, access_log=False,
                    timeout_graceful_shutdown=int(self.drain_timeout) or None,
                    timeout_keep_alive=self.keep_alive_timeout, **uvicorn_speedups(self.loop))
