"""The autoscaler's inputs and outputs: observations, spec, state and decision.

Everything the pure core (:func:`tandem.autoscaler.core.tick`) reads or returns is one of these
models, so the live controller, the discrete-event benchmark and the tests drive exactly the same
decision code with plain values. Times are seconds on whatever monotonic clock the caller uses
(wall clock live, virtual time in the simulator).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tandem.api.models import Role

Mode = Literal["aggregated", "disaggregated"]

ROLES_BY_MODE: dict[str, tuple[Role, ...]] = {
    "aggregated": ("unified",),
    "disaggregated": ("prefill", "decode"),
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PoolBounds(_Model):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(64, ge=1)
    gpus_per_replica: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> PoolBounds:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self


class ScalingSLO(_Model):
    """The SLO the autoscaler plans pool sizes for.

    Built from an LLMService's ``spec.slo`` (:class:`tandem.api.models.SLO`, the CRD's wire shape)
    by the actuator, and set directly by the benchmarks. Kept apart from it because the capacity
    model solves for an attainment quantile, which must be below 1 (the CRD allows 1).
    """

    ttft_s: float = Field(5.0, gt=0, description="time-to-first-token objective")
    tpot_s: float = Field(0.1, gt=0, description="time-per-output-token objective")
    attainment: float = Field(0.95, gt=0, lt=1, description="share of requests that must meet both")


class OffloadSpec(_Model):
    """A remote prefill pool (Prefill-as-a-Service) whose length threshold the autoscaler re-solves."""

    remote_instances: int = Field(ge=0, description="prefill instances in the remote pool")
    link_gbps: float = Field(gt=0, description="link capacity to the remote pool, Gbit/s")
    remote_per_token_s: float | None = Field(None, gt=0, description="remote prefill s/token (default: local)")
    remote_attn_pair_s: float | None = Field(None, ge=0, description="remote s per attention pair (default: local)")
    high_water: float = Field(0.85, gt=0, le=1, description="share of the link offload may use")
    min_threshold: int = Field(1024, ge=0, description="never offload shorter uncached prompts")
    initial_threshold: int = Field(16384, ge=0, description="threshold before the first solve")


class AutoscalerSpec(_Model):
    """How one service is scaled: its mode, pool bounds, SLOs and the controller's time constants."""

    mode: Mode = "disaggregated"
    pools: dict[Role, PoolBounds] = Field(default_factory=dict, description="bounds per role (default 1..64)")
    slo: ScalingSLO = ScalingSLO()
    gpu_budget: int | None = Field(None, ge=1, description="most GPUs this service may hold")
    startup_delay_s: float = Field(60.0, ge=0, description="pod scheduled -> engine ready; the forecast horizon")
    scale_up_cooldown_s: float = Field(15.0, ge=0, description="least time between two scale-ups of a role")
    scale_down_cooldown_s: float = Field(120.0, ge=0,
                                         description="least time after a scale-up before the role shrinks (the "
                                                     "look-back still keeps what the recent ticks needed)")
    scale_down_interval_s: float = Field(60.0, ge=0, description="least time between two scale-down steps of a role")
    scale_down_step: float = Field(0.25, gt=0, le=1,
                                   description="the most of a pool one scale-down step removes (at least one)")
    scale_down_stabilization_s: float = Field(300.0, ge=0,
                                              description="shrink only to the largest need seen over this window")
    flip_window_s: float = Field(600.0, ge=0,
                                 description="a role reverses direction at most once in this window, unless the "
                                             "SLO is missed or the need clears the hysteresis band")
    hysteresis: float = Field(0.05, ge=0, lt=1, description="shrink only when the need is this far below the pool")
    burst_lookback_s: float = Field(1800.0, ge=0, description="history searched for recurring bursts")
    burst_threshold: float = Field(0.3, gt=0, description="a burst begins when the rate exceeds the look-back "
                                                          "median by this share (and ends below half of it)")
    burst_max_s: float = Field(300.0, ge=0, description="bursts up to this long are held rather than followed "
                                                         "(a few start-up delays: following them does not pay)")
    burst_min_episodes: int = Field(2, ge=1, description="short bursts in the look-back (one of them missing the "
                                                         "SLO) before their peak is held")
    burst_max_dilution: float = Field(
        2.0, ge=1, description="a held burst shorter than the rate window is held at its excess over the base "
                               "scaled by window / its span, at most by this factor: a 15 s burst seen through "
                               "30 s windows reads half its excess, and a pool held at that reading misses in "
                               "every burst (1: hold the window's reading)")
    mix_shift_z: float = Field(4.0, gt=0, description="the recent mix replaces the mix window's for prefill when "
                                                      "it brings more work per request by this many standard errors")
    mix_shift_min_ratio: float = Field(1.3, ge=1, description="... and by at least this factor")
    mix_shift_follow_overload: bool = Field(
        True, description="waive mix_shift_min_ratio while the ready pool cannot carry the rate window's own work "
                          "(its rate at its mix): the margin only spares a pool that absorbs a small move, and "
                          "a turning mix overloads the pool a tick or more before it clears the margin")
    backlog_drain_s: float = Field(120.0, ge=0, description="scale-up sizes for the queue beyond one request per "
                                                            "instance drained over this long (0: off)")
    jump_z: float = Field(3.0, gt=0, description="a rise of the window rate since the last tick beyond this many "
                                                 "Poisson standard deviations is a step: R-hat takes the new level")
    forecast_quantile: float = Field(0.9, gt=0.5, lt=1, description="R-hat is this quantile of the forecast")
    forecast_alpha: float = Field(0.3, gt=0, le=1, description="Holt level smoothing")
    forecast_beta: float = Field(0.1, ge=0, le=1, description="Holt trend smoothing")
    min_samples: int = Field(20, ge=1, description="completions needed before observed attainment is trusted")
    max_utilisation: float = Field(0.85, gt=0, lt=1,
                                   description="no prefill/unified pool is planned above this utilisation")
    decode_max_utilisation: float = Field(0.9, gt=0, lt=1,
                                          description="no decode pool is planned above this share of its batch slots")
    offload: OffloadSpec | None = Field(None, description="remote prefill offload (disaggregated mode only)")

    @model_validator(mode="after")
    def _roles_match_mode(self) -> AutoscalerSpec:
        if self.offload is not None and self.mode != "disaggregated":
            raise ValueError("offload needs disaggregated mode: offloaded prompts decode on the local decode pool")
        wrong = set(self.pools) - set(ROLES_BY_MODE[self.mode])
        if wrong:
            raise ValueError(f"pools {sorted(wrong)} do not exist in {self.mode} mode "
                             f"(roles: {', '.join(ROLES_BY_MODE[self.mode])})")
        return self

    @property
    def roles(self) -> tuple[Role, ...]:
        return ROLES_BY_MODE[self.mode]

    def bounds(self, role: Role) -> PoolBounds:
        return self.pools.get(role, PoolBounds())


class ForecastState(_Model):
    """Holt's linear trend on the arrival rate plus an EWMA of the squared one-step error."""

    level: float = 0.0
    trend: float = 0.0  # requests/s per second
    variance: float = 0.0
    time_s: float | None = None


class RoleState(_Model):
    replicas: int = Field(ge=0, description="the role's target after the last tick")
    last_up_s: float | None = None
    last_down_s: float | None = None
    last_direction: int = Field(0, ge=-1, le=1)
    goodput_scale: float = Field(1.0, gt=0, le=1,
                                 description="learned correction of the model's goodput (<1: model too optimistic)")
    observed_since_s: float | None = Field(None, description="first tick that saw this role")
    recent_attainment: list[tuple[float, float]] = Field(
        default_factory=list, description="(time, observed attainment) over the stabilization window")
    recent_needs: list[tuple[float, int]] = Field(
        default_factory=list, description="(time, replicas needed with hysteresis) over the stabilization window")
    last_flip_s: float | None = Field(None, description="when the role last reversed direction")
    held: int = Field(0, ge=0, description="while bursts are held: the pool that proved needed in them (a miss "
                                           "at one instance fewer); 0 when nothing is held")
    last_backlog_s: float | None = Field(None, description="when the role last had a queue beyond one request "
                                                           "per instance")


class AutoscalerState(_Model):
    forecast: ForecastState = ForecastState()
    roles: dict[Role, RoleState] = Field(default_factory=dict)
    history: list[tuple[float, float]] = Field(default_factory=list,
                                               description="(time, observed rate) over the burst look-back")
    misses: list[float] = Field(default_factory=list,
                                description="ticks over the burst look-back whose window missed the SLO target")


class RoleDecision(_Model):
    replicas: int = Field(ge=0, description="replicas to set now (target + draining instances not yet drained)")
    target: int = Field(ge=0, description="replicas the role should settle at")
    drain: int = Field(0, ge=0, description="instances that should be marked draining (removed once drained)")
    needed: float = Field(ge=0, description="fractional replicas at R-hat: rate / per-instance goodput")
    goodput_rps: float = Field(ge=0, description="per-instance goodput under the SLOs in a pool of that size")
    reason: str


class Decision(_Model):
    roles: dict[Role, RoleDecision]
    offload_threshold: int | None = None
    forecast_rps: float = Field(ge=0, description="R-hat: the rate the pools were sized for")
    reason: str
    state: AutoscalerState

    @property
    def replicas(self) -> dict[Role, int]:
        return {role: d.replicas for role, d in self.roles.items()}

    def gpus(self, spec: AutoscalerSpec) -> int:
        return sum(d.target * spec.bounds(role).gpus_per_replica for role, d in self.roles.items())
