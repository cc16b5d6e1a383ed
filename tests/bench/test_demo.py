"""``tandem demo`` end to end on a tiny slice: engines, gateway subprocess, replay, table, plot."""

from __future__ import annotations

import json

import pytest

from tandem.cli import main


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys) -> None:
    code = main(["demo", "--instances", "4", "--requests", "10", "--qps", "10", "--max-output-tokens", "4",
                 "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "round_robin" in out and "dualmap" in out and "SLO attainment" in out
    data = json.loads((tmp_path / "demo.json").read_text())
    assert [s["policy"] for s in data["summaries"]] == ["round_robin", "dualmap"]
    assert all(s["errors"] == 0 and s["requests"] == 10 for s in data["summaries"])
    assert (tmp_path / "demo.png").stat().st_size > 10_000


def test_demo_rejects_unknown_policy(tmp_path) -> None:
    with pytest.raises(SystemExit, match="bogus"):
        main(["demo", "--policies", "bogus", "--out", str(tmp_path)])
