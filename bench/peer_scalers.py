"""Peer-style scaling policies for the autoscaling replay: what users would otherwise run.

Both are written from the published descriptions of their algorithms (no code of theirs is used)
and run in the same replay as Tandem (same DES, routing, drain contract, start-up delay):

* :class:`DynamoPlannerScaler`, after NVIDIA Dynamo's SLA planner (throughput-based mode): every
  adjustment interval it predicts the next interval's request rate and length mix from the last
  one (its "constant" predictor: next = current) and sets each pool to what the performance profile
  says that load needs. No hysteresis, no cooldown, no stabilization window. The profile sizing is
  Tandem's own capacity model (:func:`tandem.autoscaler.core.size_pools`: M/G/c prefill, decode batch
  slots), which is a stronger profile model than a throughput interpolation, so the comparison
  isolates the control policy.
* :class:`KnativeKPAScaler`, after Knative's Pod Autoscaler (KPA): every 2 s it samples each pool's
  concurrency (requests in flight); the desired pod count is the mean concurrency over a 60 s
  stable window divided by the target concurrency per pod (container concurrency x 70 %). When the
  6 s panic window asks for at least twice the ready pods it enters panic mode, in which it only
  scales up, until a whole stable window passes without that condition; scale-down is limited to
  halving per tick. Container concurrency is set once from the profile at the first minute's mix,
  as a user would configure it: a decode pod's batch slots, a prefill pod's TTFT budget over the
  mean prefill time.
"""

from __future__ import annotations

import math
from collections import deque

from tandem.api.observations import Observations
from tandem.autoscaler.capacity import CapacityModel
from tandem.autoscaler.core import role_decision, size_pools
from tandem.autoscaler.models import AutoscalerSpec, Role
from tandem.bench.replay import ScaleCommand, Scaler


def _command(target: int, obs: Observations, role: Role) -> ScaleCommand:
    """The drain contract: shrink only by instances already drained."""
    d = role_decision(role, target, obs.roles[role], 0.0, 0.0, "")
    return ScaleCommand(replicas=d.replicas, drain=d.drain, target=target)


class DynamoPlannerScaler(Scaler):
    """Predict the next interval from the last, size each pool from the profile, set it (no hysteresis)."""

    name = "dynamo"

    def __init__(self, capacity: CapacityModel, spec: AutoscalerSpec, initial: dict[Role, int],
                 interval_s: float = 60.0) -> None:
        self.capacity, self.spec, self._initial = capacity, spec, initial
        self.interval_s = interval_s
        # Observe over the adjustment interval; tick at the replay's pace so drained instances go at once.
        self.window_s = interval_s
        self.mix_window_s = interval_s
        self.targets = dict(initial)
        self._planned_at: float | None = None

    def initial(self) -> dict[Role, int]:
        return dict(self._initial)

    def step(self, obs: Observations) -> dict[Role, ScaleCommand]:
        if self._planned_at is None or obs.time_s - self._planned_at >= self.interval_s - 1e-9:
            self._planned_at = obs.time_s
            sizes = size_pools(self.capacity, self.spec, obs.arrival_rate, obs.length_mix, obs.prefix_hit_ratio)
            for role, n in sizes.items():
                b = self.spec.bounds(role)
                self.targets[role] = max(b.min_replicas, min(b.max_replicas, n))
        return {role: _command(self.targets[role], obs, role) for role in self.spec.roles}


class KnativeKPAScaler(Scaler):
    """Concurrency per pod over a stable window, a panic window that only scales up."""

    name = "kpa"
    tick_s = 2.0
    window_s = 2.0
    mix_window_s = 2.0  # the KPA reads no length mix

    def __init__(self, spec: AutoscalerSpec, initial: dict[Role, int], container_concurrency: dict[Role, float], *,
                 target_utilisation: float = 0.7, stable_window_s: float = 60.0, panic_window_share: float = 0.1,
                 panic_threshold: float = 2.0, max_scale_down_rate: float = 2.0,
                 max_scale_up_rate: float = 1000.0) -> None:
        self.spec, self._initial = spec, initial
        self.target = {r: max(c * target_utilisation, 1e-9) for r, c in container_concurrency.items()}
        self.stable_s = stable_window_s
        self.panic_s = stable_window_s * panic_window_share
        self.panic_threshold = panic_threshold
        self.down_rate, self.up_rate = max_scale_down_rate, max_scale_up_rate
        self.samples: dict[Role, deque[tuple[float, float]]] = {r: deque() for r in spec.roles}
        self.panic_since: dict[Role, float | None] = {r: None for r in spec.roles}
        self.max_panic: dict[Role, int] = {r: 0 for r in spec.roles}
        self.targets = dict(initial)

    @classmethod
    def from_profile(cls, capacity: CapacityModel, spec: AutoscalerSpec, initial: dict[Role, int],
                     obs_mix: list, hit_ratio: float = 0.0, **kw: float) -> KnativeKPAScaler:
        """Container concurrency from the profile at one length mix (what a user would configure)."""
        w = capacity.workload(obs_mix, hit_ratio)
        cc = {"prefill": max(1.0, capacity.slo.ttft_s / max(w.es, 1e-9)), "decode": float(max(1, w.slots)),
              "unified": float(max(1, w.slots))}
        return cls(spec, initial, {r: cc[r] for r in spec.roles}, **kw)

    def initial(self) -> dict[Role, int]:
        return dict(self._initial)

    def _mean(self, role: Role, now: float, window: float) -> float:
        vals = [v for t, v in self.samples[role] if t > now - window]
        return sum(vals) / len(vals) if vals else 0.0

    def step(self, obs: Observations) -> dict[Role, ScaleCommand]:
        now = obs.time_s
        out: dict[Role, ScaleCommand] = {}
        for role in self.spec.roles:
            o = obs.roles[role]
            buf = self.samples[role]
            buf.append((now, o.in_flight))
            while buf and buf[0][0] <= now - self.stable_s:
                buf.popleft()
            ready = max(1, o.ready)
            stable = math.ceil(self._mean(role, now, self.stable_s) / self.target[role])
            panic = math.ceil(self._mean(role, now, self.panic_s) / self.target[role])
            over = panic / ready >= self.panic_threshold
            lo, hi = math.floor(ready / self.down_rate), math.ceil(ready * self.up_rate)
            stable, panic_c = min(max(stable, lo), hi), min(max(panic, lo), hi)
            since = self.panic_since[role]
            if over:
                self.panic_since[role] = now
            elif since is not None and now - since >= self.stable_s:
                self.panic_since[role] = None
                self.max_panic[role] = 0
            if self.panic_since[role] is not None:
                # Panic mode: never below the current pods, never below the panic peak so far.
                want = max(panic_c, self.max_panic[role], self.targets[role])
                self.max_panic[role] = want
            else:
                want = stable
            b = self.spec.bounds(role)
            self.targets[role] = max(b.min_replicas, min(b.max_replicas, want))
            out[role] = _command(self.targets[role], obs, role)
        return out
