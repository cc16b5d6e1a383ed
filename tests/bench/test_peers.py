"""``tandem bench peers`` end to end on a small slice (Tandem and the direct client; the peer routers
need their own virtualenv, which the device-machine runs install), and its input checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from tandem.bench.peers import BenchPeers

pytestmark = pytest.mark.slow


def test_small_run_reports_capacity_latency_and_engine_hits(tmp_path: Path) -> None:
    out = tmp_path / "peers"
    done = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "bench", "peers", "--requests", "30", "--engines", "2",
         "--bisect-steps", "1", "--light-requests", "4", "--light-rate", "20", "--time-scale", "4",
         "--rate-lo", "0.5", "--rate-hi", "1.5", "--configs", '["tandem:dualmap","direct"]', "--out", str(out)],
        capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "peers.json").read_text())
    by = {r["config"]: r for r in report["results"]}
    assert set(by) == {"tandem:dualmap", "direct"}
    for r in by.values():
        assert r["error"] == ""
        probes = r["probes"]  # the common rate first; the floor too when the common rate missed the target
        assert probes[0]["rate"] == 1.0 and {p["rate"] for p in probes[1:]} <= {0.5}
        for probe in probes:
            assert probe["summary"]["requests"] == 30 and probe["summary"]["errors"] == 0
            assert 0.0 < probe["engine_hit_ratio"] < 1.0  # the engines' own counters: prompts share prefixes
        assert r["light"]["router_p50_ms"] > 0 and r["light"]["direct_p50_ms"] > 0
    assert "| tandem:dualmap |" in (out / "peers.md").read_text()
    assert (out / "peers.png").stat().st_size > 0


def test_configs_are_checked_and_missing_peers_are_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="KIND:POLICY"):
        BenchPeers(configs=["nginx:round_robin"])
    with pytest.raises(ValidationError):
        BenchPeers(configs=["direct:x"])
    bench = BenchPeers(configs=["sglang:cache_aware"], peers_venv=tmp_path / "none", install_peers=False)
    with pytest.raises(SystemExit, match=r"sglang-router==0\.3\.2"):
        bench._peer_python()
