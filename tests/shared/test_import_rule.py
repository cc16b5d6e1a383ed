"""The layout's import rule holds (README "Layout"; ``python tools/import_rule.py`` prints the edges)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_no_component_imports_a_sibling_or_a_layer_above() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "import_rule.py"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout
    assert "0 violating the rule" in done.stdout


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The rule is not vacuous: the checker's own classification flags an upward and a sibling edge."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import import_rule
    finally:
        sys.path.pop(0)
    assert not import_rule.allowed("router.routing", "router")
    assert not import_rule.allowed("autoscaler", "router")
    assert not import_rule.allowed("tandem", "sim")
    assert import_rule.allowed("bench", "sim") and import_rule.allowed("sim", "router.routing")
    assert import_rule.component_of_module("tandem.router.routing.scheduler") == "router.routing"
    assert import_rule.component_of_module("tandem.perf.costmodel") == "tandem"
