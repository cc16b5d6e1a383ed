"""The autoscaling scenario suite: the shipped traces, a day envelope, and synthetic families.

A scenario is a name, a family, a seed and the parameters its generator drew from that seed; the
requests it stands for are made by :func:`generate`, deterministically (the same scenario always
gives the same requests, in any process). Every scenario is judged by the same replay
(:mod:`tandem.bench.replay`), so the suite says how a scaling policy does on shapes of traffic it was
not tuned on, not only on the two shipped one-hour traces.

Synthetic families (what a production service sees that one hour of the shipped traces does not):

* ``flash``: a flash crowd, the load rising to 3-10x within 20-90 s, staying there for 1-5 minutes and
  falling back within 0.5-2 minutes (one or two per scenario).
* ``step``: the load moving to another level within 15 s and staying there (up by 1.5-2.5x or down to
  0.4-0.7x, once or twice).
* ``ramp``: a slow ramp over most of the scenario, up or down by 2-4x.
* ``onoff``: on/off bursts whose length is a set multiple of the 60 s start-up delay (a quarter of
  it up to four times it): shorter than the start-up, a burst is over before an ordered instance
  serves; longer, following it pays.
* ``gamma``: a steady mean rate with Gamma-distributed inter-arrival times of coefficient of
  variation 1-8 (1 is Poisson; 8 is traffic that comes in clumps).
* ``mixshift``: a steady rate whose length mix turns from chat-like to code-like (long prompts,
  short outputs) mid-scenario, over a minute: the prefill work per request rises and the decode
  work falls, so the right P:D ratio moves while the request rate does not.

Arrivals of a synthetic scenario are a renewal process in operational time: unit-mean intervals
(exponential for Poisson, Gamma for ``gamma``) mapped through the inverse of the integrated rate
curve, so the curve sets the load and the interval law sets the burstiness independently. Lengths
come from a mix: ``chat`` draws (prompt, output) pairs from the shipped Azure conversation trace,
``code`` from log-normals with long prompts and short outputs whose medians are drawn per seed.
Each synthetic scenario draws its base mix (chat or code) and base rate from its seed. Synthetic
requests carry no prefix blocks (every prompt its own routing key, as distinct texts have).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from tandem.traces import TRACE_DIR, TraceRequest, load_trace

Family = Literal["trace", "diurnal", "flash", "step", "ramp", "onoff", "gamma", "mixshift"]
FAMILIES: tuple[Family, ...] = ("trace", "diurnal", "flash", "step", "ramp", "onoff", "gamma", "mixshift")
SYNTHETIC: tuple[Family, ...] = ("flash", "step", "ramp", "onoff", "gamma", "mixshift")
TRACE_FILES = {"azure": "AzureLLMInferenceTrace_conv.csv", "mooncake": "conversation_trace.jsonl"}

# Synthetic scenarios run on the Azure trace's setting (Qwen2.5-32B on H100, TTFT 2 s): a model
# large enough that pools of a few to a few dozen instances carry tens of requests per second.
SYNTHETIC_PROFILE = "qwen2.5-32b-h100"
SYNTHETIC_TTFT_S = 2.0
# Prompts longer than this would miss a 2 s TTFT on that profile even alone: the code mix is
# clipped below it, so every synthetic request can meet its SLO in a pool that is large enough.
CODE_MAX_PROMPT = 10_000
STARTUP_S = 60.0  # the start-up delay the on/off burst lengths are relative to
ONOFF_BURSTS = (0.25, 1.0, 4.0)  # burst length / start-up delay, one scenario each per seed


class Scenario(BaseModel):
    """One scenario of the suite: what :func:`generate` makes, and the parameters it drew."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="unique in the suite, e.g. 'flash-s2'")
    family: Family
    seed: int = Field(ge=0)
    duration_s: float = Field(gt=0, description="simulated seconds, warm-up included")
    trace: Literal["azure", "mooncake"] | None = Field(None, description="trace/diurnal: the shipped trace")
    params: dict[str, float | str] = Field(default_factory=dict, description="what the generator drew")


@dataclass(frozen=True, slots=True)
class Workload:
    """A scenario's requests and the setting they are judged in."""

    requests: list[TraceRequest]
    profile: str
    ttft_s: float


def _rng(family: str, seed: int, salt: str = "") -> np.random.Generator:
    """A generator that depends only on (family, seed, salt): the same in every process and run."""
    return np.random.default_rng([zlib.crc32(f"{family}:{salt}".encode()), seed])


@lru_cache(maxsize=2)
def _trace(name: str) -> tuple[TraceRequest, ...]:
    return tuple(load_trace(TRACE_DIR / TRACE_FILES[name]))


# ----- rate curves ------------------------------------------------------------------------------
RateCurve = Callable[[np.ndarray], np.ndarray]


def _smooth_step(t: np.ndarray, at: float, width: float) -> np.ndarray:
    """0 before ``at``, 1 after ``at + width``, linear between (a load that changes within seconds)."""
    return np.clip((t - at) / max(width, 1e-9), 0.0, 1.0)


def _curve(s: Scenario) -> RateCurve:
    p = s.params
    base = float(p["base_rps"])
    if s.family == "flash":
        spikes = [tuple(float(p[f"spike{i}_{k}"]) for k in ("at_s", "rise_s", "s", "fall_s", "x"))
                  for i in range(int(p["spikes"]))]

        def flash(t: np.ndarray) -> np.ndarray:
            level = np.ones_like(t)
            for at, rise, length, fall, x in spikes:
                level += (x - 1) * (_smooth_step(t, at, rise) - _smooth_step(t, at + rise + length, fall))
            return base * level
        return flash
    if s.family == "step":
        steps = [(float(p[f"step{i}_at_s"]), float(p[f"step{i}_x"])) for i in range(int(p["steps"]))]

        def step(t: np.ndarray) -> np.ndarray:
            level = np.full_like(t, base)
            prev = base
            for at, x in steps:  # each step relative to the level before it
                level += (prev * x - prev) * _smooth_step(t, at, 15.0)
                prev *= x
            return level
        return step
    if s.family == "ramp":
        t0, t1, x = float(p["ramp_from_s"]), float(p["ramp_to_s"]), float(p["ramp_x"])
        return lambda t: base * (1 + (x - 1) * _smooth_step(t, t0, t1 - t0))
    if s.family == "onoff":
        on, off, hi, lo, phase = (float(p[k]) for k in ("on_s", "off_s", "on_x", "off_x", "phase_s"))

        def onoff(t: np.ndarray) -> np.ndarray:
            return base * np.where(((t + phase) % (on + off)) < on, hi, lo)
        return onoff
    return lambda t: np.full_like(t, base)  # gamma, mixshift: a steady mean rate


def _code_share(s: Scenario) -> Callable[[np.ndarray], np.ndarray]:
    """Probability that a request arriving at t is code-like."""
    if s.family == "mixshift":
        at = float(s.params["shift_at_s"])
        return lambda t: _smooth_step(t, at, float(s.params["shift_s"]))
    code = 1.0 if s.params.get("mix") == "code" else 0.0
    return lambda t: np.full_like(t, code)


def arrivals(curve: RateCurve, duration_s: float, cv: float, rng: np.random.Generator,
             dt: float = 0.25) -> np.ndarray:
    """Arrival times of a renewal process of interval CV ``cv`` run in operational time.

    Unit-mean intervals (exponential when ``cv`` is 1, Gamma of shape 1/cv^2 otherwise) are summed and
    mapped through the inverse of the integrated rate, so the expected count in any interval is the
    integral of ``curve`` over it whatever the CV.
    """
    grid = np.arange(0.0, duration_s + dt, dt)
    rates = np.maximum(curve(grid), 0.0)
    cum = np.concatenate([[0.0], np.cumsum((rates[1:] + rates[:-1]) / 2 * dt)])
    total = cum[-1]
    n = int(total * 1.2 + 10 * cv * cv + 100)
    while True:
        if cv == 1.0:
            gaps = rng.exponential(1.0, n)
        else:
            shape = 1.0 / (cv * cv)
            gaps = rng.gamma(shape, 1.0 / shape, n)
        ops = np.cumsum(gaps)
        if ops[-1] >= total:
            break
        n *= 2
    ops = ops[ops < total]
    return np.interp(ops, cum, grid)


def _chat_pairs() -> np.ndarray:
    azure = _trace("azure")
    return np.array([(r.input_tokens, r.output_tokens) for r in azure], dtype=np.int64)


def _lengths(s: Scenario, times: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(prompt, output) tokens per arrival: chat pairs from the Azure trace or code log-normals."""
    chat = _chat_pairs()
    pick = chat[rng.integers(0, len(chat), len(times))]
    p = s.params
    code_in = np.clip(rng.lognormal(np.log(float(p["code_prompt_median"])), 0.7, len(times)),
                      32, CODE_MAX_PROMPT).astype(np.int64)
    code_out = np.clip(rng.lognormal(np.log(float(p["code_output_median"])), 0.8, len(times)),
                       1, 1024).astype(np.int64)
    is_code = rng.random(len(times)) < _code_share(s)(times)
    return np.where(is_code, code_in, pick[:, 0]), np.where(is_code, code_out, pick[:, 1])


# ----- the suite ----------------------------------------------------------------------------------
def _draw(family: Family, seed: int, duration_s: float, warmup_s: float) -> dict[str, float | str]:
    """The randomized parameters of one synthetic scenario, from its seed alone."""
    r = _rng(family, seed, "params")
    measured = duration_s - warmup_s
    p: dict[str, float | str] = {
        "mix": "code" if family != "mixshift" and seed % 2 == 1 else "chat",
        "code_prompt_median": float(np.round(r.uniform(1500, 3500))),
        "code_output_median": float(np.round(r.uniform(10, 40))),
    }
    # The steady load of a few to a dozen instances per role; code prompts cost ~3x chat's prefill.
    p["base_rps"] = float(np.round(r.uniform(6, 12) / (2.0 if p["mix"] == "code" else 1.0), 2))
    if family == "flash":
        n = int(r.integers(1, 3))
        p["spikes"] = n
        slot = measured / n
        for i in range(n):
            length = float(np.round(r.uniform(60, 300)))
            rise, fall = float(np.round(r.uniform(20, 90))), float(np.round(r.uniform(30, 120)))
            start = warmup_s + i * slot + r.uniform(0.1, 0.9) * max(slot - rise - length - fall - 60, 1.0)
            p[f"spike{i}_at_s"] = float(np.round(start))
            p[f"spike{i}_rise_s"] = rise
            p[f"spike{i}_s"] = length
            p[f"spike{i}_fall_s"] = fall
            p[f"spike{i}_x"] = float(np.round(r.uniform(3, 10), 2))
    elif family == "step":
        n = int(r.integers(1, 3))
        p["steps"] = n
        for i in range(n):
            p[f"step{i}_at_s"] = float(np.round(warmup_s + (i + r.uniform(0.2, 0.8)) * measured / n))
            up = r.random() < 0.5
            p[f"step{i}_x"] = float(np.round(r.uniform(1.5, 2.5) if up else r.uniform(0.4, 0.7), 2))
    elif family == "ramp":
        up = seed % 2 == 0
        p["ramp_from_s"] = float(np.round(warmup_s * r.uniform(0.5, 1.0)))
        p["ramp_to_s"] = float(np.round(duration_s - measured * r.uniform(0.05, 0.25)))
        x = r.uniform(2, 4)
        p["ramp_x"] = float(np.round(x if up else 1 / x, 3))
        if not up:  # a ramp down starts high
            p["base_rps"] = float(np.round(float(p["base_rps"]) * x, 2))
    elif family == "onoff":
        p["on_s"] = float(ONOFF_BURSTS[seed % len(ONOFF_BURSTS)] * STARTUP_S)
        p["off_s"] = float(np.round(float(p["on_s"]) * r.uniform(1.0, 3.0)))
        p["on_x"] = float(np.round(r.uniform(2.0, 4.0), 2))
        p["off_x"] = float(np.round(r.uniform(0.1, 0.5), 2))
        p["phase_s"] = float(np.round(r.uniform(0, float(p["on_s"]) + float(p["off_s"]))))
    elif family == "gamma":
        # Spread over the range by seed (1 .. 8), jittered: every CV region gets covered by a few seeds.
        p["cv"] = float(np.round(min(8.0, max(1.0, 1 + 7 * ((seed * 0.381966) % 1.0) + r.uniform(-0.3, 0.3))), 2))
    elif family == "mixshift":
        p["shift_at_s"] = float(np.round(warmup_s + measured * r.uniform(0.3, 0.6)))
        p["shift_s"] = 60.0
    return p


def scenario(family: Family, seed: int, *, duration_s: float = 1800.0, warmup_s: float = 300.0,
             trace: Literal["azure", "mooncake"] | None = None) -> Scenario:
    """A scenario with its parameters drawn from ``seed`` (synthetic) or the trace named (trace/diurnal)."""
    if family in ("trace", "diurnal"):
        if trace is None:
            raise ValueError(f"a {family} scenario needs trace='azure' or 'mooncake'")
        params: dict[str, float | str] = {"load_factor": 4.0 if trace == "azure" else 3.0}
        if family == "diurnal":
            params.update(period_s=duration_s, trough=0.3)
        length = "" if duration_s == 3600.0 else f"-{duration_s / 60:g}m"
        return Scenario(name=f"{family}-{trace}" + (f"-s{seed}" if seed else "") + length, family=family, seed=seed,
                        duration_s=duration_s, trace=trace, params=params)
    params = _draw(family, seed, duration_s, warmup_s)
    suffix = f"-L{int(float(params['on_s']))}" if family == "onoff" else ""
    length = "" if duration_s == 1800.0 else f"-{duration_s / 60:g}m"
    return Scenario(name=f"{family}{suffix}-s{seed}{length}", family=family, seed=seed, duration_s=duration_s,
                    params=params)


def suite(*, quick: bool = False, seeds: int | None = None) -> list[Scenario]:
    """The scenario list: ``quick`` is one seed per synthetic family (two burst lengths of on/off), 20
    minutes each, and the one-hour day envelope over the Azure trace (a 2-core run; a day compressed
    into 20 minutes is a 3x ramp in 10, steeper than the day it stands for); the full suite has the
    shipped traces, the day envelope over both, and several seeds per family."""
    if quick:
        dur = 1200.0
        picks: list[tuple[Family, int]] = [("flash", 1), ("step", 0), ("ramp", 1), ("onoff", 1), ("onoff", 0),
                                           ("gamma", 2), ("mixshift", 0)]
        return [scenario("diurnal", 0, duration_s=3600.0, trace="azure"), *(scenario(f, s, duration_s=dur)
                                                                            for f, s in picks)]
    n = seeds or 3
    out = [scenario(f, 0, duration_s=3600.0, trace=t) for f in ("trace", "diurnal") for t in ("azure", "mooncake")]
    for family in SYNTHETIC:
        count = len(ONOFF_BURSTS) * max(1, (n + 1) // 2) if family == "onoff" else n + (family == "gamma")
        out.extend(scenario(family, s) for s in range(count))
    return out


def generate(s: Scenario) -> Workload:
    """The scenario's requests (deterministic in the scenario) and the profile and TTFT to judge them."""
    if s.family in ("trace", "diurnal"):
        from tandem.bench.autoscale import DEFAULTS, LoadShape, scale_load

        assert s.trace is not None
        reqs = [r for r in _trace(s.trace) if r.arrival <= s.duration_s]
        shape = None if s.family == "trace" else LoadShape(period_s=float(s.params["period_s"]),
                                                          trough=float(s.params["trough"]))
        scaled = scale_load(reqs, float(s.params["load_factor"]), seed=s.seed, shape=shape)
        d = DEFAULTS[s.trace]
        return Workload(scaled, str(d["profile"]), float(d["ttft_s"]))  # type: ignore[arg-type]
    rng = _rng(s.family, s.seed, "requests")
    cv = float(s.params.get("cv", 1.0))
    times = arrivals(_curve(s), s.duration_s, cv, rng)
    ins, outs = _lengths(s, times, rng)
    reqs = [TraceRequest(float(t), int(i), int(o)) for t, i, o in zip(times, ins, outs, strict=True)]
    return Workload(reqs, SYNTHETIC_PROFILE, SYNTHETIC_TTFT_S)


def describe(s: Scenario) -> str:
    """The drawn parameters that matter, in a few words, for the suite's table."""
    p = s.params
    if s.family == "trace":
        return f"x{p['load_factor']:g} load"
    if s.family == "diurnal":
        return f"trough {p['trough']:g}, period {float(p['period_s']) / 60:.0f} min"
    head = f"{p['mix']} {float(p['base_rps']):g} rps"
    if s.family == "flash":
        spikes = ", ".join(f"{float(p[f'spike{i}_x']):.1f}x {float(p[f'spike{i}_s']) / 60:.1f} min"
                           for i in range(int(p["spikes"])))
        return f"{head}; {spikes}"
    if s.family == "step":
        return f"{head}; " + ", ".join(f"x{float(p[f'step{i}_x']):g}@{float(p[f'step{i}_at_s']) / 60:.0f}m"
                                       for i in range(int(p["steps"])))
    if s.family == "ramp":
        minutes = (float(p["ramp_to_s"]) - float(p["ramp_from_s"])) / 60
        return f"{head}; x{float(p['ramp_x']):.2f} over {minutes:.0f} min"
    if s.family == "onoff":
        return f"{head}; on {p['on_s']:g}s x{p['on_x']:g} / off {p['off_s']:g}s x{p['off_x']:g}"
    if s.family == "gamma":
        return f"{head}; CV {p['cv']:g}"
    return f"chat->code at {float(p['shift_at_s']) / 60:.0f} min; {head}"


def by_name(scenarios: Sequence[Scenario]) -> dict[str, Scenario]:
    out = {s.name: s for s in scenarios}
    if len(out) != len(scenarios):
        raise ValueError("scenario names must be unique")
    return out
