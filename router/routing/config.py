"""Routing parameters: one small validated model per policy (and one for the scheduler), and the
flat :class:`RoutingConfig` that users set.

Each policy reads only its own parameter model (:class:`DualMapParams`, :class:`ConsistentHashParams`,
:class:`PrefixTreeParams`, :class:`NoParams`), named as the policy class's ``Params``; the scheduler
reads :class:`SchedulerParams` (late binding, queue order, dispatch budget, hotspot migration, queue
bounds). A parameter is defined once, in the model of the part that reads it; models that share a
concern share its mixin (the adaptive key, the rings, the SLO budget), so DualMap and
``consistent_hash`` validate their keys the same way.

Users keep one flat shape: :class:`RoutingConfig` is the union of every model (it inherits them all),
so the gateway's ``--routing`` mapping, the DES and the benchmarks take the same keys, flags and
YAML as before, and a policy switch never needs a new config shape. :func:`make_policy
<tandem.router.routing.registry.make_policy>` hands each policy its own slice
(:meth:`RoutingConfig.scoped`).
"""

from __future__ import annotations

from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


P = TypeVar("P", bound=_Params)


class NoParams(_Params):
    """The parameters of a policy that has none (round_robin, least_request, least_loaded, min_ttft)."""


class SLOParams(_Params):
    """The TTFT objective and DualMap's alpha: together the estimate above which an instance counts as loaded."""

    slo_ttft_s: float = Field(5.0, gt=0, description="TTFT service-level objective in seconds")
    alpha: float = Field(0.5, gt=0, le=4, description="SLO switch: leave the affinity choice when its "
                         "estimated TTFT exceeds alpha x SLO; also scales the hotspot threshold")

    @property
    def slo_budget_s(self) -> float:
        """alpha x SLO: the estimate above which DualMap switches, and the hotspot threshold."""
        return self.alpha * self.slo_ttft_s


class KeyParams(_Params):
    """DualMap's adaptive-depth routing key (:class:`~tandem.router.routing.keys.AdaptiveKeyer`)."""

    key_window: int = Field(200, ge=10, le=100_000, description="requests in the adaptive-depth sliding window")
    key_expand_share: float = Field(0.06, gt=0, lt=1, description="key a prefix one block deeper above this "
                                    "share of the window")
    key_shrink_share: float = Field(0.02, ge=0, lt=1, description="undo the expansion below this share")
    key_min_depth: int = Field(2, ge=2, le=64, description="blocks in the shallowest key")

    @model_validator(mode="after")
    def _shares(self) -> KeyParams:
        if self.key_shrink_share >= self.key_expand_share:
            raise ValueError("key_shrink_share must be below key_expand_share (hysteresis)")
        return self


class RingParams(_Params):
    """Consistent-hash rings (:mod:`~tandem.router.routing.rings`)."""

    vnodes: int = Field(128, ge=100, le=160, description="virtual nodes per instance on each ring")
    ring_seed: int = Field(0, ge=0, lt=2**32, description="seed of both rings' hash functions")


class DualMapParams(RingParams, KeyParams, SLOParams):
    """DualMap: the SLO switch (alpha x SLO), the adaptive key and the two rings, with the paper's defaults.

    Its hotspot migration is run by the scheduler, so those thresholds are in :class:`SchedulerParams`.
    """


class ConsistentHashParams(RingParams, KeyParams):
    """``consistent_hash``: DualMap's adaptive key on one ring."""


class PrefixTreeParams(_Params):
    """``prefix_tree``: the SGLang router's defaults."""

    balance_abs_threshold: int = Field(32, ge=0, description="prefix_tree: imbalanced when max-min pending "
                                       "requests exceeds this ...")
    balance_rel_threshold: float = Field(1.0001, ge=1, description="... and max > min x this")
    cache_threshold: float = Field(0.5, ge=0, le=1, description="prefix_tree: below this match ratio pick "
                                   "the instance with the smallest cache")


class SchedulerParams(SLOParams):
    """The scheduler's gateway queues: late binding, release order, dispatch budget, hotspot migration, bounds."""

    # --- late binding and dispatch ------------------------------------------------------------
    late_binding: bool | None = Field(None, description="hold requests in per-instance gateway queues until "
                                      "the instance has budget (default: on for dualmap, off for baselines)")
    # Not the paper's default: measured in the DES (docs/benchmarks.md), 'prefill' keeps more requests
    # within the SLO near and past saturation and changes nothing below it.
    queue_order: Literal["hit", "prefill"] = Field("prefill", description="release order of an instance's gateway "
                                                   "queue: 'hit' longest cache hit, then arrival (the paper's); "
                                                   "'prefill' arrival + prefill_order_weight x estimated prefill "
                                                   "seconds (short prefills first, with bounded waits)")
    prefill_order_weight: float = Field(10.0, gt=0, description="'prefill' order: a request is overtaken only by "
                                        "requests arriving less than this many times its own estimated prefill "
                                        "time after it")
    dispatch_max_unprefilled: int = Field(1, ge=1, le=1024, description="always release while fewer requests "
                                          "than this are sent and not yet prefilled")
    dispatch_budget_s: float | None = Field(None, ge=0, description="also release while the instance's "
                                            "in-flight uncached prefill (seconds) stays under this "
                                            "(default alpha x SLO)")
    # --- hotspot migration (only for policies that can name alternatives: dualmap) -------------
    migration: bool = Field(True, description="move queued requests off hot instances (dualmap only)")
    hotspot_wait_s: float = Field(3.0, gt=0, description="an instance whose oldest queued request waited this "
                                  "long is hot")
    max_moves_per_request: int = Field(1, ge=0, le=16, description="a request moves at most this often "
                                       "(stops two hot instances from trading it back and forth)")
    max_migrations_per_tick: int = Field(64, ge=0, le=100_000, description="bound on moves per rebalance")
    # --- bounds -------------------------------------------------------------------------------
    max_queued_per_instance: int = Field(4096, ge=1, description="gateway queue bound per instance (then 429)")
    max_queued_total: int = Field(65536, ge=1, description="gateway queue bound over the pool (then 503)")

    @property
    def dispatch_budget(self) -> float:
        return self.slo_budget_s if self.dispatch_budget_s is None else self.dispatch_budget_s


class RoutingConfig(PrefixTreeParams, SchedulerParams, DualMapParams, ConsistentHashParams, NoParams):
    """Every routing parameter in one flat model: what the gateway's ``--routing``, the DES and the benchmarks set.

    It inherits each scoped model, so every field keeps its one definition, and a RoutingConfig is
    accepted wherever a scoped model is expected; :meth:`scoped` cuts out one model's fields. (The
    bases are listed so that the fields keep their historical order: SLO, key, rings, scheduler,
    prefix_tree.)
    """

    def scoped(self, model: type[P]) -> P:
        """The parameters ``model`` declares, with this configuration's values."""
        return model.model_validate({name: getattr(self, name) for name in model.model_fields})
