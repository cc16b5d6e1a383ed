"""``tandem demo``: the README's main command.

Until the gateway lands this shows the foundation end to end: one simulated engine on a loopback
port answering a streamed request and a repeated prompt served from its prefix cache.
"""

from __future__ import annotations

import asyncio
import json

import httpx
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from tandem.config import TandemSettings


class DemoCommand(TandemSettings):
    """Start a simulated engine locally and stream a completion from it."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_DEMO_")

    profile: str = Field("llama3-8b-h100", description="performance profile of the simulated engine")
    max_tokens: int = Field(16, gt=0, le=4096, description="tokens to generate")

    def cli_cmd(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        from tandem.serve import serve
        from tandem.sim.server import create_app
        from tandem.sim.settings import SimSettings

        app = create_app(SimSettings(profile=self.profile))
        model = app.state.sim.model_name
        prompt = "Explain prefix caching in one paragraph. " * 30
        async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
            print(f"simulated engine {model} at {url}")
            for attempt in ("cold", "warm"):
                body = {"model": model, "prompt": prompt, "max_tokens": self.max_tokens, "stream": True,
                        "stream_options": {"include_usage": True}}
                text, usage = [], {}
                async with client.stream("POST", "/v1/completions", json=body) as resp:
                    resp.raise_for_status()
                    async for line in resp.aiter_lines():
                        if line.startswith("data: {"):
                            chunk = json.loads(line[6:])
                            text.extend(c["text"] for c in chunk["choices"])
                            usage = chunk.get("usage") or usage
                print(f"[{attempt}] {''.join(text).strip()!r}")
                print(f"[{attempt}] prompt {usage['prompt_tokens']} tokens, "
                      f"cached {usage['prompt_tokens_details']['cached_tokens']}")
