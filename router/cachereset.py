"""Engine cache resets and restarts: what was seen, and which cache views it makes stale.

An engine that restarts or drops its prefix cache (vLLM ``/reset_prefix_cache``, SGLang
``/flush_cache``) has forgotten everything; a router that keeps estimating hits there sends
"affinity" traffic to a cache that no longer exists. A reset is seen by whichever gateway process
sees it first: its scrape (process start time changed, counters went backwards) or its event
stream (``AllBlocksCleared``; sequence numbers starting over). That process clears its views of the
instance at once and publishes a :class:`CacheReset` through the shared state; every other replica
and worker clears its own on its next sync. Pure: the gateway does the I/O.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from tandem.router.enginemetrics import EngineSnapshot

ResetReason = Literal["restart", "counters", "cleared", "events_restart"]


class CacheReset(BaseModel):
    """One reset of one instance's cache.

    ``after``: the engine's cache is gone since at least this wall-clock time (the new process's
    start time, or the last scrape before the counters went backwards, or the ts of the event
    batch). ``token`` is the same for every process that sees the same reset on its own, so none
    clears twice for it.
    """

    instance: str
    reason: ResetReason
    source: Literal["metrics", "events"]
    after: float
    token: str


def restart_from_metrics(instance: str, prev: EngineSnapshot, new: EngineSnapshot,
                         prev_scrape_wall: float) -> CacheReset | None:
    """A restart between two good scrapes: a new process start time (vLLM exports it), or a
    counter that went backwards (SGLang runs prometheus_client's multiprocess mode without the
    process collector, so counters are its only sign)."""
    if prev.start_time is not None and new.start_time is not None and new.start_time > prev.start_time + 0.5:
        return CacheReset(instance=instance, reason="restart", source="metrics", after=new.start_time,
                          token=f"start:{new.start_time!r}")
    for field in ("prompt_tokens", "generation_tokens", "prefix_queries"):
        before, now = getattr(prev, field), getattr(new, field)
        if before is not None and now is not None and now < before:
            return CacheReset(instance=instance, reason="counters", source="metrics", after=prev_scrape_wall,
                              token=f"counters:{instance}:{prev_scrape_wall!r}")
    return None


def exact_view_stale(reset: CacheReset, live: bool, oldest_ts: float | None) -> bool:
    """Must an exact view (engine events) be cleared for ``reset``?

    A reset seen in an event stream reaches every subscriber in its own stream, in order: a live
    view applies it there, and clearing it again later would drop what the engine stored since
    (a cache hit publishes nothing, so those blocks would never come back). A reset seen in the
    metrics makes the view stale only if it holds blocks from before the reset (``oldest_ts``: the
    engine time of the oldest batch it still reflects).
    """
    if reset.source == "events":
        return not live
    return oldest_ts is not None and oldest_ts < reset.after
