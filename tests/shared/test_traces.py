import math
from pathlib import Path

import pytest

from tandem.traces import TRACE_DIR, TraceFormatError, detect_format, load_trace, mean_qps, rescale_to_qps, select


@pytest.fixture(scope="module")
def mooncake():
    return load_trace(TRACE_DIR / "conversation_trace.jsonl")


def test_mooncake_blocks_cover_input(mooncake) -> None:
    assert len(mooncake) == 12031
    assert all(len(r.hash_ids) == math.ceil(r.input_tokens / 512) for r in mooncake)
    assert all(r.hash_ids[0] == mooncake[0].hash_ids[0] for r in mooncake)  # every request shares block 0
    assert mooncake[0].arrival == 0 and mooncake[-1].arrival == pytest.approx(59 * 60, rel=0.05)


def test_azure_trace_parses() -> None:
    azure = load_trace(TRACE_DIR / "AzureLLMInferenceTrace_conv.csv")
    assert len(azure) == 19366 and not azure[0].hash_ids
    assert 1000 < sum(r.input_tokens for r in azure) / len(azure) < 1300


def test_rescale_and_select(mooncake) -> None:
    part = select(mooncake, warmup=500, count=2000)
    assert len(part) == 2000 and part[0].arrival == 0
    fast = rescale_to_qps(part, 25.0)
    assert mean_qps(fast) == pytest.approx(25.0)
    assert [r.input_tokens for r in fast] == [r.input_tokens for r in part]


def test_bad_trace_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "x.txt"
    bad.write_text("hello\n")
    with pytest.raises(TraceFormatError, match="neither Mooncake"):
        detect_format(bad)
    broken = tmp_path / "m.jsonl"
    broken.write_text('{"timestamp": 0}\n')
    with pytest.raises(TraceFormatError, match=r"m\.jsonl:1"):
        load_trace(broken)
