"""A bandwidth-shared network link: the path KV caches take between prefill and decode.

KV transfers that overlap share the link, so one long prompt's KV slows every other transfer in
flight; modelling each transfer as ``bytes / bandwidth`` on its own would let the link deliver a
multiple of its capacity. :class:`SharedLink` is processor sharing with an optional per-flow rate
cap (max-min fair share with one common cap): with n active flows each moves at
``min(cap, capacity / n)``, so the total never exceeds the capacity. It is pure state in virtual
time, driven like the engine (``advance(now)`` returns what finished), and so serves both the
discrete-event simulator and, through :class:`AsyncLink`, the simulator process on the wall clock.

Latency (the RTT before the first byte) is not part of the model: callers start a flow one RTT
after the handshake, which keeps the link a function of bandwidth alone.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

from tandem.sim.wallclock import WallClockDriver

# A flow whose remaining bytes fall under this is done; absorbs floating-point residue of the
# piecewise integration without ever finishing a flow measurably early.
_EPS_BYTES = 1e-6


@dataclass(slots=True)
class _Flow:
    id: str
    size: float
    remaining: float
    started: float


@dataclass(frozen=True, slots=True)
class Completion:
    flow_id: str
    time: float
    size: float
    started: float


@dataclass
class SharedLink:
    """One direction of a link of ``capacity_gbps`` Gbit/s (decimal, as links are rated)."""

    capacity_gbps: float
    per_flow_gbps: float | None = None
    _flows: dict[str, _Flow] = field(default_factory=dict)
    _t: float = 0.0
    delivered_bytes: float = 0.0
    # (time, cumulative bytes delivered): the cumulative curve is linear between breakpoints.
    _history: list[tuple[float, float]] = field(default_factory=lambda: [(0.0, 0.0)])

    def __post_init__(self) -> None:
        if not self.capacity_gbps > 0:
            raise ValueError("capacity_gbps must be positive")
        if self.per_flow_gbps is not None and not self.per_flow_gbps > 0:
            raise ValueError("per_flow_gbps must be positive when given")

    @property
    def capacity_bytes_per_s(self) -> float:
        return self.capacity_gbps * 1e9 / 8

    @property
    def clock(self) -> float:
        """The time the link was last advanced to."""
        return self._t

    @property
    def active(self) -> int:
        return len(self._flows)

    def flow_rate(self) -> float:
        """Bytes/s each active flow moves now (0 when idle)."""
        n = len(self._flows)
        if n == 0:
            return 0.0
        share = self.capacity_bytes_per_s / n
        if self.per_flow_gbps is not None:
            share = min(share, self.per_flow_gbps * 1e9 / 8)
        return share

    def total_rate(self) -> float:
        return self.flow_rate() * len(self._flows)

    def start(self, flow_id: str, nbytes: float, now: float) -> None:
        """A transfer of ``nbytes`` begins at ``now`` (call :meth:`advance` up to ``now`` first)."""
        if flow_id in self._flows:
            raise ValueError(f"flow {flow_id!r} is already on the link")
        if nbytes < 0:
            raise ValueError("nbytes must be non-negative")
        self._progress(now)
        self._flows[flow_id] = _Flow(flow_id, float(nbytes), float(nbytes), now)

    def cancel(self, flow_id: str, now: float) -> bool:
        """Drop a flow (its receiver went away); the others speed up from ``now``."""
        self._progress(now)
        return self._flows.pop(flow_id, None) is not None

    def next_completion(self) -> float | None:
        rate = self.flow_rate()
        if not self._flows:
            return None
        if rate <= 0:
            return math.inf
        return self._t + max(0.0, min(f.remaining for f in self._flows.values())) / rate

    def advance(self, now: float) -> list[Completion]:
        """Move every flow forward to ``now``; return the flows that finished, in time order."""
        done: list[Completion] = []
        while (t := self.next_completion()) is not None and t <= now:
            # The flows with the least left finish at t. Pick them before integrating: at large t,
            # t - clock can round to zero and the integration alone would never finish them.
            least = min(f.remaining for f in self._flows.values())
            ending = [f for f in self._flows.values() if f.remaining <= least * (1 + 1e-9) + _EPS_BYTES]
            self._progress(t)
            for f in ending:
                self.delivered_bytes += f.remaining  # floating-point residue of the integration
                f.remaining = 0.0
                del self._flows[f.id]
                done.append(Completion(f.id, t, f.size, f.started))
            if self._history[-1][0] == t:
                self._history[-1] = (t, self.delivered_bytes)
        self._progress(now)
        return done

    def delivered_between(self, t0: float, t1: float) -> float:
        """Bytes the link delivered in [t0, t1] (both up to the last time it was advanced to)."""
        return self._cumulative(t1) - self._cumulative(t0)

    def utilisation(self, t0: float, t1: float) -> float:
        """Mean share of the capacity used in [t0, t1]; never above 1."""
        if t1 <= t0:
            raise ValueError("need t1 > t0")
        return self.delivered_between(t0, t1) / (self.capacity_bytes_per_s * (t1 - t0))

    def window_utilisation(self, t0: float, t1: float, window_s: float) -> list[float]:
        """Utilisation of consecutive windows of ``window_s`` covering [t0, t1]."""
        out = []
        start = t0
        while start < t1 - 1e-12:
            end = min(start + window_s, t1)
            out.append(self.utilisation(start, end))
            start = end
        return out

    # ----- internals ---------------------------------------------------------------------------
    def _progress(self, now: float) -> None:
        if now < self._t:
            raise ValueError(f"time went backwards: {now} < {self._t}")
        dt = now - self._t
        if dt > 0 and self._flows:
            rate = self.flow_rate()
            for f in self._flows.values():
                moved = min(f.remaining, rate * dt)
                f.remaining -= moved
                self.delivered_bytes += moved
            self._history.append((now, self.delivered_bytes))
        elif dt > 0:
            self._history.append((now, self.delivered_bytes))
        self._t = now

    def _cumulative(self, t: float) -> float:
        hist = self._history
        if t <= hist[0][0]:
            return hist[0][1]
        if t >= hist[-1][0]:
            return hist[-1][1]
        lo, hi = 0, len(hist) - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if hist[mid][0] <= t:
                lo = mid
            else:
                hi = mid
        (ta, ba), (tb, bb) = hist[lo], hist[hi]
        return ba + (bb - ba) * (t - ta) / (tb - ta) if tb > ta else bb


class AsyncLink(WallClockDriver):
    """A :class:`SharedLink` on the event loop's clock: ``await transfer(n)`` returns when done.

    The simulator process uses it for KV pulls, so concurrent transfers into one decode engine
    share its link exactly as they would in the discrete-event simulator.
    """

    task_name = "kv-link"

    def __init__(self, capacity_gbps: float, per_flow_gbps: float | None = None) -> None:
        super().__init__()
        self.link = SharedLink(capacity_gbps, per_flow_gbps)
        self._waiters: dict[str, asyncio.Future[float]] = {}
        self._ids = 0

    async def stop(self) -> None:
        await super().stop()
        for fut in self._waiters.values():
            fut.cancel()

    async def transfer(self, nbytes: float) -> float:
        """Move ``nbytes`` over the link; returns the seconds it took. Cancellation frees the share."""
        self._ids += 1
        flow_id = f"f{self._ids}"
        now = self.now()
        self._deliver(self.link.advance(now))
        fut: asyncio.Future[float] = self._loop.create_future()
        self._waiters[flow_id] = fut
        self.link.start(flow_id, nbytes, now)
        self.wake()
        try:
            return await fut
        finally:
            if self._waiters.pop(flow_id, None) is not None:
                self.link.cancel(flow_id, max(self.now(), self.link.clock))

    def next_event_time(self) -> float | None:
        return self.link.next_completion()

    def advance(self, now: float) -> None:
        self._deliver(self.link.advance(max(now, self.link.clock)))

    def _deliver(self, done: list[Completion]) -> None:
        for c in done:
            fut = self._waiters.pop(c.flow_id, None)
            if fut is not None and not fut.done():
                fut.set_result(c.time - c.started)
