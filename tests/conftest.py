"""Suite-wide hooks: the real-vLLM tier's shared engines and its scheduling under xdist."""

from __future__ import annotations

import pytest
from vllm_fixtures import GROUP, vllm_fleet  # noqa: F401 - a session fixture, found by name

# A test marked vllm may have to wait for the session's engines to start (cold: ~1-2 min).
VLLM_TIMEOUT = 600


@pytest.hookimpl(tryfirst=True)  # before xdist renames grouped items (nodeid@group) to schedule by
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test marked vllm runs in one xdist group, so one worker starts and owns the engines."""
    for item in items:
        if item.get_closest_marker("vllm") is None:
            continue
        item.add_marker(pytest.mark.xdist_group(GROUP))
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(VLLM_TIMEOUT))
