"""Every alert of deploy/prometheus/tandem-rules.yaml fires on its fault and is quiet at steady state.

The proof is Prometheus' own rule engine: ``promtool test rules`` on tests/promtool/*.yaml (input
series as the chart's monitors label them; the scrape alerts at several scrape intervals). promtool
comes with Debian's ``prometheus`` package (``make test`` installs it); outside CI a machine without
it skips these tests, in CI (``CI=true``) its absence fails them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "tandem-rules.yaml"
TESTS = sorted((ROOT / "tests" / "promtool").glob("*.yaml"))


@pytest.fixture(scope="module")
def promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool not installed: make test installs it (apt-get install prometheus)")
        pytest.skip("promtool not installed (make test installs it: apt-get install prometheus)")
    return exe


def run(promtool: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def alerts() -> set[str]:
    return {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}


def test_rules_pass_promtool_check(promtool: str) -> None:
    result = run(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_fires_on_its_fault_and_is_quiet_at_steady_state(promtool: str) -> None:
    assert TESTS
    result = run(promtool, "test", "rules", *map(str, TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in TESTS:
        doc = yaml.safe_load(path.read_text())
        assert [(path.parent / f).resolve() for f in doc["rule_files"]] == [RULES]
        for test in doc["tests"]:
            for case in test.get("alert_rule_test", []):
                (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert firing == alerts()
    assert quiet == alerts()


def test_a_broken_alert_fails_its_promtool_test(promtool: str, tmp_path: Path) -> None:
    """The tests can fail: an alert that no longer fires on its fault (Redis down read as `== 2`)."""
    (tmp_path / "rules.yaml").write_text(RULES.read_text().replace(
        'max by (namespace, service) (tandem_state_backend_up{backend="redis"}) == 0',
        'max by (namespace, service) (tandem_state_backend_up{backend="redis"}) == 2'))
    for path in TESTS:
        doc = yaml.safe_load(path.read_text())
        doc["rule_files"] = ["rules.yaml"]
        (tmp_path / path.name).write_text(yaml.safe_dump(doc, sort_keys=False))
    result = run(promtool, "test", "rules", *(p.name for p in TESTS), cwd=tmp_path)
    assert result.returncode != 0
    assert "TandemRedisDown" in result.stdout + result.stderr
