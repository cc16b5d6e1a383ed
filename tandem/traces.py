"""Trace loaders: Mooncake JSONL (with prefix block hashes) and Azure LLM inference CSV.

Both become the same :class:`TraceRequest` list so that the demo, the benchmarks and the
discrete-event simulator can replay either. Arrival times can be rescaled to a target rate,
which is how capacity (highest QPS meeting the SLO) is measured.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Literal

MOONCAKE_BLOCK_TOKENS = 512
TRACE_DIR = Path(__file__).resolve().parent.parent / "data" / "traces"


@dataclass(frozen=True, slots=True)
class TraceRequest:
    arrival: float  # seconds since the trace's first request
    input_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...] = ()  # per-block ids (Mooncake); empty when the trace has no prefixes
    block_size: int = MOONCAKE_BLOCK_TOKENS


class TraceFormatError(ValueError):
    pass


def detect_format(path: Path) -> Literal["mooncake", "azure"]:
    with path.open() as fh:
        first = fh.readline().strip()
    if first.startswith("{"):
        return "mooncake"
    if first.upper().startswith("TIMESTAMP"):
        return "azure"
    raise TraceFormatError(f"{path}: neither Mooncake JSONL nor Azure CSV (first line: {first[:60]!r})")


def load_mooncake(path: Path) -> list[TraceRequest]:
    out: list[TraceRequest] = []
    with path.open() as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                req = TraceRequest(
                    arrival=float(row["timestamp"]) / 1000.0,
                    input_tokens=int(row["input_length"]),
                    output_tokens=max(1, int(row["output_length"])),
                    hash_ids=tuple(int(h) for h in row.get("hash_ids", ())),
                )
            except (ValueError, KeyError, TypeError) as exc:
                raise TraceFormatError(f"{path}:{lineno}: {exc}") from exc
            out.append(req)
    return _normalise(out)


def load_azure(path: Path) -> list[TraceRequest]:
    out: list[TraceRequest] = []
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        t0: datetime | None = None
        for lineno, row in enumerate(reader, 2):
            try:
                ts = datetime.fromisoformat(row["TIMESTAMP"].strip()[:26])
                t0 = t0 or ts
                out.append(TraceRequest(
                    arrival=(ts - t0).total_seconds(),
                    input_tokens=int(row["ContextTokens"]),
                    output_tokens=max(1, int(row["GeneratedTokens"])),
                ))
            except (ValueError, KeyError, TypeError) as exc:
                raise TraceFormatError(f"{path}:{lineno}: {exc}") from exc
    return _normalise(out)


def _normalise(reqs: list[TraceRequest]) -> list[TraceRequest]:
    reqs.sort(key=lambda r: r.arrival)
    if not reqs:
        return reqs
    t0 = reqs[0].arrival
    return [replace(r, arrival=r.arrival - t0) for r in reqs]


def load_trace(path: str | Path) -> list[TraceRequest]:
    p = Path(path)
    if not p.is_file():
        raise TraceFormatError(f"trace file not found: {p}")
    return load_mooncake(p) if detect_format(p) == "mooncake" else load_azure(p)


def select(reqs: list[TraceRequest], *, warmup: int = 0, count: int | None = None) -> list[TraceRequest]:
    """Skip ``warmup`` requests and keep ``count``; arrivals restart at zero."""
    chosen = reqs[warmup: None if count is None else warmup + count]
    return _normalise(list(chosen))


def rescale_to_qps(reqs: list[TraceRequest], qps: float) -> list[TraceRequest]:
    """Compress or stretch arrival times so the mean rate is ``qps``, keeping the burst shape."""
    if qps <= 0:
        raise ValueError("qps must be positive")
    if len(reqs) < 2:
        return list(reqs)
    span = reqs[-1].arrival - reqs[0].arrival
    if span <= 0:
        return [replace(r, arrival=i / qps) for i, r in enumerate(reqs)]
    factor = (len(reqs) - 1) / qps / span
    return [replace(r, arrival=r.arrival * factor) for r in reqs]


def mean_qps(reqs: list[TraceRequest]) -> float:
    if len(reqs) < 2 or reqs[-1].arrival <= reqs[0].arrival:
        return 0.0
    return (len(reqs) - 1) / (reqs[-1].arrival - reqs[0].arrival)
