"""Asyncio rules of the package code, checked on its source.

``asyncio.wait_for`` is not used: on Python 3.11 (the runtime the image and CI pin) it can swallow a
``cancel()`` that races its timeout (CPython bpo-42130, fixed in 3.12 by rebuilding it on
``asyncio.timeout``). A background loop built on it then outlives the ``cancel()`` of its owner's
shutdown: the gateway's state-sync loop (a 0.05 s interval in a test) kept running after
``Gateway.stop`` cancelled it, and ``stop`` waited on it for ever (seen live in a CI rehearsal,
the in-process gateway's tasks dumped from the hung worker). ``async with asyncio.timeout(...)``
counts cancellations and never loses one.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = ("tandem", "router", "sim", "autoscaler", "operator", "bench")


def test_package_code_does_not_use_wait_for() -> None:
    offenders = [f"{path.relative_to(ROOT)}:{n}" for d in PACKAGE_DIRS for path in sorted((ROOT / d).rglob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if re.search(r"\bwait_for\(", line) and not line.lstrip().startswith("#")]
    assert offenders == [], "use `async with asyncio.timeout(...)` instead of asyncio.wait_for: " + ", ".join(offenders)
