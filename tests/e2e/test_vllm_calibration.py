"""Prefill calibration against a real vLLM-CPU engine (the session's shared fleet, ``vllm_fixtures``).

The gateway assumes the default profile (an 8B model on an H100); a tiny model on two shared CPU
cores prefills a prompt many times slower than that profile says (8-13x under the demo's load).
After a few requests the engine's own ``request_prefill_time_seconds`` must have moved the
instance's factor far above 1. Only the order of magnitude is checked: the cores are shared.
"""

from __future__ import annotations

import httpx
import pytest
from gatewayutil import until
from vllm_fixtures import MODEL, VllmFleet, vllm_gateway_app

from tandem.serve import serving

pytestmark = pytest.mark.vllm


async def test_a_cpu_engine_calibrates_far_slower_than_the_h100_profile(vllm_fleet: VllmFleet) -> None:
    url = vllm_fleet.unified_urls[0]
    async with serving(vllm_gateway_app([url], tokenizer=vllm_fleet.tokenizer,
                                        calibration={"window_tokens": 1000})) as gw, \
            httpx.AsyncClient(timeout=120) as c:
        for i in range(4):  # distinct prompts of some hundreds of tokens: mostly prefilled, not cached
            prompt = f"request {i}: " + " ".join(f"word{i}x{j}" for j in range(300))
            r = await c.post(gw + "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2})
            assert r.status_code == 200, r.text

        async def calibrated() -> bool:
            inst = (await c.get(gw + "/admin/instances")).json()["instances"][0]
            return inst["prefill_calibration_windows"] >= 1

        await until(calibrated, limit=30)
        inst = (await c.get(gw + "/admin/instances")).json()["instances"][0]
        assert inst["prefill_cost_scale"] > 3.0, inst
