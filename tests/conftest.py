"""Shared ground of the test suite.

The folders mirror the packages (``tests/routing`` the pure routing core, ``tests/router`` the
gateway, ``tests/sim``, ``tests/autoscaler``, ``tests/operator``, ``tests/bench``, ``tests/shared``
for ``tandem``'s own modules and the deployment files) and ``tests/e2e`` holds the tests that run
several real processes together. Each test under ``tests/e2e`` is marked ``e2e``, so
``pytest -m "not e2e"`` is the lane without them and ``pytest tests/routing`` the sub-second one.

This folder is on ``sys.path`` (pytest puts a rootless conftest's folder there), which is how the
helper modules beside this file (``gatewayutil``, ``kubeutil``, ``helmrun``) are imported.
"""

from __future__ import annotations

from pathlib import Path

import pytest

E2E = Path(__file__).resolve().parent / "e2e"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if E2E in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.e2e)
