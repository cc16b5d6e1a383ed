"""Online calibration of an engine's prefill speed against the performance profile.

Routing turns tokens into seconds with one static profile (``--profile``: a model on a GPU). An
engine that is not that pair (another GPU, another model, vLLM on a CPU) prefills many times
faster or slower, and every estimate built on the profile (DualMap's SLO switch, the scheduler's
budgets, PD and offload choices) is off by that much: with estimates far below the SLO the switch
never fires and a conversation's burst piles onto one engine.

vLLM reports what each finished request cost it, all observed at once when the request ends: its
seconds from scheduled to first token (``vllm:request_prefill_time_seconds``), its prompt tokens
and the tokens it prefilled rather than read from its prefix cache. Between two scrapes the deltas
of these sums cover the same requests. The profile predicts those requests' prefill time too; the
ratio measured / predicted is this engine's speed relative to the profile (above 1: slower). It is
folded in per window of enough prefilled tokens (a few short requests say little), smoothed,
clamped, and back to 1.0 when the engine restarts. Engines that export none of it (SGLang) keep 1.0.

A request's prefill phase spans every step it shares with others, so on a loaded engine the
measured time also holds the batching that a request meets there: the factor rises with load as
real first tokens do. Pure: the scrape path feeds snapshots, routing reads :attr:`scale`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tandem.router.enginemetrics import EngineSnapshot


class CalibrationSettings(BaseModel):
    """How the per-instance prefill factor is estimated (gateway setting ``calibration``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    window_tokens: int = Field(2048, gt=0, description="prefilled (uncached) prompt tokens a window must hold "
                               "before it updates the factor")
    smoothing: float = Field(0.3, gt=0, le=1, description="weight of a new window in the moving average "
                             "(1: the last window alone); the first window after a start sets the factor")
    min_scale: float = Field(0.01, gt=0, description="lowest factor (engine this many times faster than profiled)")
    max_scale: float = Field(1000.0, gt=0, description="highest factor (engine this many times slower)")

    @model_validator(mode="after")
    def _range(self) -> CalibrationSettings:
        if self.min_scale > 1.0 or self.max_scale < 1.0:
            raise ValueError("min_scale <= 1 <= max_scale: the uncalibrated factor 1.0 must be in range")
        return self

    def clamp(self, scale: float) -> float:
        return min(self.max_scale, max(self.min_scale, scale))


@dataclass(frozen=True, slots=True)
class PrefillWork:
    """An engine process's cumulative prefill counters, as of one scrape."""

    seconds: float
    requests: float
    prompt_tokens: float
    computed_tokens: float

    @classmethod
    def of(cls, snap: EngineSnapshot) -> PrefillWork | None:
        """From vLLM's per-request histograms; an older vLLM without the prefilled-token histogram
        from its prompt and prefix-hit counters (these move at prefill, not at the end: the windows
        then line up only on average). None: the engine exports no prefill time."""
        if snap.prefill_time_sum is None or snap.prefill_time_count is None:
            return None
        if snap.request_computed_sum is not None and snap.request_prompt_sum is not None:
            prompt, computed = snap.request_prompt_sum, snap.request_computed_sum
        elif snap.prompt_tokens is not None and snap.prefix_hits is not None:
            prompt, computed = snap.prompt_tokens, snap.prompt_tokens - snap.prefix_hits
        else:
            return None
        return cls(snap.prefill_time_sum, snap.prefill_time_count, prompt, computed)

    def minus(self, base: PrefillWork) -> PrefillWork:
        return PrefillWork(*(getattr(self, f.name) - getattr(base, f.name) for f in fields(self)))


# The profile's prefill seconds of one request: (prefilled tokens, cached tokens) -> seconds.
PrefillPredictor = Callable[[int, int], float]


@dataclass(slots=True)
class PrefillCalibrator:
    """One instance's factor (measured / profiled prefill time) and the window it is filling."""

    settings: CalibrationSettings
    predict: PrefillPredictor
    scale: float = 1.0
    windows: int = 0  # windows folded in since the last reset; 0: the factor is still the profile's 1.0
    base: PrefillWork | None = None  # the counters where the current window starts

    def reset(self) -> None:
        """The engine restarted: what was measured belongs to another process (and maybe other hardware)."""
        self.scale, self.windows, self.base = 1.0, 0, None

    def observe(self, snap: EngineSnapshot) -> float:
        """Fold in one good scrape; returns the factor to use from now on."""
        work = PrefillWork.of(snap)
        if work is None:
            return self.scale
        if self.base is None:
            self.base = work
            return self.scale
        d = work.minus(self.base)
        if min(d.seconds, d.requests, d.prompt_tokens, d.computed_tokens) < 0:  # counters went backwards
            self.reset()
            self.base = work
            return self.scale
        if d.computed_tokens < self.settings.window_tokens or d.requests < 1:
            return self.scale
        self.base = work
        computed = round(d.computed_tokens / d.requests)
        cached = max(0, round((d.prompt_tokens - d.computed_tokens) / d.requests))
        predicted = d.requests * self.predict(computed, cached)
        if predicted <= 0:
            return self.scale
        ratio = self.settings.clamp(d.seconds / predicted)
        a = self.settings.smoothing
        self.scale = ratio if self.windows == 0 else self.settings.clamp((1 - a) * self.scale + a * ratio)
        self.windows += 1
        return self.scale
