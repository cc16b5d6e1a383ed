"""Shared ground of the test suite.

The folders mirror the packages (``tests/routing`` the pure routing core, ``tests/router`` the
gateway, ``tests/sim``, ``tests/autoscaler``, ``tests/operator``, ``tests/bench``, ``tests/shared``
for ``tandem``'s own modules and the deployment files) and ``tests/e2e`` holds the tests that run
several real processes together. Each test under ``tests/e2e`` is marked ``e2e``, so
``pytest -m "not e2e"`` is the lane without them and ``pytest tests/routing`` the sub-second one.
The real-vLLM tier (marker ``vllm``) shares one fleet of engines per session (``vllm_fixtures``).

This folder is on ``sys.path`` (pytest puts a rootless conftest's folder there), which is how the
helper modules beside this file (``gatewayutil``, ``kubeutil``, ``helmrun``, ``vllm_fixtures``)
are imported. The real-vLLM tier's engines are one session fixture (``vllm_fleet``), and every
test marked ``vllm`` runs in one xdist group so one worker starts and owns them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from vllm_fixtures import GROUP, vllm_fleet  # noqa: F401 - a session fixture, found by name

E2E = Path(__file__).resolve().parent / "e2e"
# A test marked vllm may have to wait for the session's engines to start (cold: ~1-2 min).
VLLM_TIMEOUT = 600


@pytest.hookimpl(tryfirst=True)  # before xdist renames grouped items (nodeid@group) to schedule by
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks tests/e2e as e2e; every test marked vllm runs in one xdist group, so one worker starts
    and owns the engines."""
    for item in items:
        if E2E in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.e2e)
        if item.get_closest_marker("vllm") is None:
            continue
        item.add_marker(pytest.mark.xdist_group(GROUP))
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(VLLM_TIMEOUT))
