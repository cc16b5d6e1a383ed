"""``tandem bench gateway`` runs end to end (tiny load) and reports numbers from both paths."""

from __future__ import annotations

import json

import pytest

from tandem.cli import main


@pytest.mark.slow
def test_bench_gateway_smoke(tmp_path, capsys) -> None:
    assert main(["bench", "gateway", "--rates", "20", "--duration", "1", "--concurrency", "4",
                 "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench-gateway.json").read_text())
    assert report["max_rps"]["direct"] > 0 and report["max_rps"]["gateway"] > 0
    assert report["cpu_ms_per_request"]["gateway"] > 0
    rows = report["latency"]
    assert [r["target"] for r in rows] == ["direct", "gateway"]
    assert all(r["errors"] == 0 and r["ok"] == 20 for r in rows)
    assert "CPU per request" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_gateway_envoy_epp_smoke(tmp_path, capsys) -> None:
    """The picker front: a real Envoy routing straight to the engines, and one asking tandem epp."""
    assert main(["bench", "gateway", "--front", "envoy-epp", "--rates", "20", "--duration", "1", "--concurrency",
                 "4", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench-gateway.json").read_text())
    assert set(report["max_rps"]) == {"direct", "gateway", "envoy-direct", "envoy-epp"}
    assert all(v > 0 for v in report["max_rps"].values())
    assert report["cpu_ms_per_request"]["epp"] > 0
    light = [r for r in report["latency"] if r["offered_rps"] == 20]
    assert sorted(r["target"] for r in light) == ["direct", "envoy-direct", "envoy-epp", "gateway"]
    assert all(r["errors"] == 0 and r["ok"] == 20 for r in light)
    out = "".join(capsys.readouterr().out.split())  # rich wraps lines at the terminal's width
    assert "envoy-epp:max" in out and "CPUperrequest:picker" in out
