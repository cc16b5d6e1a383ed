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
