"""``tandem demo --engines vllm`` on the session's real vLLM engines (``--engine-urls``: no extra engines)."""

from __future__ import annotations

import json

import pytest
from vllm_fixtures import VllmFleet

from tandem.cli import main

pytestmark = pytest.mark.vllm


def test_demo_against_real_vllm(vllm_fleet: VllmFleet, tmp_path, capsys) -> None:
    code = main(["demo", "--engines", "vllm", "--engine-urls", ",".join(vllm_fleet.unified_urls),
                 "--requests", "10", "--qps", "1", "--max-output-tokens", "2", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "real vLLM-CPU" in out and "SLO attainment" in out and "no discrete-event check" in out
    data = json.loads((tmp_path / "demo.json").read_text())
    summaries = {s["policy"]: s for s in data["summaries"]}
    assert set(summaries) == {"round_robin", "dualmap"} and data["des"] == []
    assert all(s["errors"] == 0 and s["requests"] == 10 for s in summaries.values())
    # vLLM's own cached_tokens (the engines run with --enable-prompt-tokens-details): the trace's shared
    # prefixes hit, and no policy inherits another's cache (each starts from emptied caches).
    assert summaries["dualmap"]["hit_ratio"] > 0
    assert (tmp_path / "demo.png").stat().st_size > 10_000
