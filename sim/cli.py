"""The ``tandem sim`` subcommand."""

from __future__ import annotations

import uvicorn

from tandem.sim.settings import SimSettings


class SimCommand(SimSettings):
    """Run one simulated engine that speaks the OpenAI API and exports vLLM or SGLang metrics."""

    def cli_cmd(self) -> None:
        from tandem.perf.profile import load_profile
        from tandem.sim.server import create_app

        try:
            profile = load_profile(self.profile)
        except ValueError as exc:
            raise SystemExit(f"tandem sim: profile: {exc}") from exc
        uvicorn.run(create_app(self, profile), host=self.host, port=self.port, log_level="warning",
                    access_log=False, timeout_graceful_shutdown=5)
