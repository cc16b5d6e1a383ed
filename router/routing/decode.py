"""The decode choice of prefill/decode disaggregation, shared by the gateway and the DES.

A disaggregated request's prompt is prefilled on an instance of the prefill pool (chosen by the
pool's routing policy, DualMap by default, because prefix-cache affinity decides prefill cost), its
KV moves to a decode instance, and the decode instance streams the output. Decode instances have
no useful cache affinity (the KV arrives with the request), so the decode choice is by load: least
KV usage, then fewest running requests.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tandem.router.routing.types import NoInstanceError


@dataclass(frozen=True, slots=True)
class DecodeLoad:
    """A decode instance as the decode choice sees it."""

    id: str
    kv_usage: float  # 0..1, engine metrics (vllm:kv_cache_usage_perc / sglang:token_usage)
    running: int  # engine running + waiting requests
    inflight: int = 0  # the gateway's own requests sent there and not finished (fresher than a scrape)
    routable: bool = True


def pick_decode(loads: Iterable[DecodeLoad], exclude: Iterable[str] = ()) -> str:
    """Least KV usage (in 2% steps, so near-equal usage falls through), then fewest requests."""
    skip = set(exclude)
    best: tuple[float, int, str] | None = None
    for d in loads:
        if not d.routable or d.id in skip:
            continue
        key = (round(d.kv_usage * 50) / 50, d.running + d.inflight, d.id)
        if best is None or key < best:
            best = key
    if best is None:
        raise NoInstanceError("no routable decode instance")
    return best[2]
