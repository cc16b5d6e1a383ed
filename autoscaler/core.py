"""The autoscaler's pure core: one tick turns observations into replicas per role.

Sizing (DistServe, pooled): each role gets the smallest pool that carries R-hat / correction at
the target attainment (:mod:`tandem.autoscaler.capacity`), R-hat a high quantile of the arrival
rate forecast one start-up delay ahead.

Correction (the queue-time feedback): the model can be optimistic (heavy-tailed prompts, routing
imbalance, a slow node). Each role answers for its own objective: prefill for the TTFT of the
prefill leg, decode for the TPOT and for the first tokens that came late after a prefill leg in
time (when the gateway reports the leg; otherwise prefill answers for the whole TTFT). When the
observed attainment of a role's objective is below target by
more than its sampling noise although the model said the ready instances were enough for the
observed rate, the role's learned ``goodput_scale`` shrinks with the shortfall and the role gains
at least one instance, whatever the model says. A shortfall while the pool lagged the load (or
while ordered instances are still starting) is left to ordinary sizing. The correction relaxes
slowly while the pool is loaded and comfortably within target.

Control: scale up at once to the need (fast), at most once per ``scale_up_cooldown_s``. Shrink
slowly: only to the largest need seen over ``scale_down_stabilization_s`` (at R-hat plus
``hysteresis``), only ``scale_down_cooldown_s`` after the role last changed, only when the
objective was comfortably met over that window, and never while the forecast's trend is up (the
window only looks back; a load on its way up would meet a pool just made smaller). Right after a
scale-down, going up again needs the need to clear the hysteresis band or an actual SLO miss,
which keeps direction changes to about one per cooldown window without ever blocking a real
overload. Bounds and GPU budgets clamp the result.

Offload (Prefill-as-a-Service): with a remote prefill pool in the spec, the local prefill pool is
sized only for the prompts the threshold in force keeps local, and after the pools are decided
the threshold is re-solved for them by the PD solver (:mod:`tandem.router.routing.offload`) from the
length mix, the link's spare capacity and the remote queue; the new threshold applies from the
next tick, so sizing and threshold converge together without a second solver.

Draining contract (scale-down never cuts requests): a decision carries, per role, ``drain``
(how many instances must be marked draining) and ``replicas`` (what to set the pool to now).
The actuator marks that many instances draining (pod annotation ``serving.tandem.dev/draining``
plus a low ``controller.kubernetes.io/pod-deletion-cost`` so the ReplicaSet removes exactly those);
the gateway stops routing to a draining instance; once one is idle (or its drain timed out) the
observation source reports it as ``drained`` and the next tick lowers ``replicas`` by that many.
If load returns first, ``drain`` falls and the actuator un-marks instances before any pod starts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from tandem.api.models import Role
from tandem.api.observations import LengthBucket, Observations, RoleObservation
from tandem.autoscaler import forecast, rules
from tandem.autoscaler.capacity import CapacityModel, Workload
from tandem.autoscaler.models import AutoscalerSpec, AutoscalerState, Decision, RoleDecision, RoleState
from tandem.perf.profile import Profile
from tandem.router.routing.offload import OffloadProblem, PrefillPoolSpeed, solve_threshold

MIN_GOODPUT_SCALE = 0.3
RELAX_PER_TICK = 1.002
RELAX_MIN_LOAD = 0.6  # share of the pool's corrected goodput the observed load must reach to relax
MAX_CUT = 0.25  # the most one tick's shortfall lowers the goodput correction

# Uncached-length samples handed to the offload solver: the mix's buckets expanded to about this many.
OFFLOAD_SAMPLES = 200


def size_pools(cap: CapacityModel, spec: AutoscalerSpec, rate: float, mix: list[LengthBucket],
               hit_ratio: float = 0.0) -> dict[Role, int]:
    """Replicas each role needs to carry ``rate`` (no control, no bounds): the plain sizing rule."""
    w = cap.workload(mix, hit_ratio)
    out: dict[Role, int] = {}
    for role in spec.roles:
        n = cap.pool_size(role, rate, w, spec.bounds(role).max_replicas)
        out[role] = spec.bounds(role).max_replicas if n is None else n
    return out


def _uncached(b: LengthBucket, hit_ratio: float) -> int:
    return b.input_tokens - min(int(b.input_tokens * hit_ratio), b.input_tokens - 1)


def _local_prefill(cap: CapacityModel, obs: Observations, threshold: int | None) -> tuple[float, Workload]:
    """The share of requests the local prefill pool keeps under ``threshold``, and their workload."""
    if threshold is None:
        return 1.0, cap.workload(obs.length_mix, obs.prefix_hit_ratio)
    local = [b for b in obs.length_mix if _uncached(b, obs.prefix_hit_ratio) <= threshold]
    if not local:
        return 0.0, cap.workload(obs.length_mix, obs.prefix_hit_ratio)
    share = sum(b.weight for b in local) / sum(b.weight for b in obs.length_mix)
    return share, cap.workload(local, obs.prefix_hit_ratio)


def solve_offload(cap: CapacityModel, obs: Observations, spec: AutoscalerSpec, roles: Mapping[Role, RoleDecision],
                  w: Workload) -> int:
    """Re-solve the offload threshold (PrfaaS, :func:`tandem.router.routing.offload.solve_threshold`) for
    the pools just decided: Λ(t) = min(remote / p, local prefill / (1 - p), decode, link)."""
    off = spec.offload
    assert off is not None
    p = cap.cost.params
    total = sum(b.weight for b in obs.length_mix)
    samples = [_uncached(b, obs.prefix_hit_ratio) for b in obs.length_mix
               for _ in range(max(1, round(OFFLOAD_SAMPLES * b.weight / total)))]
    decode_n = max(1, roles["decode"].target)
    problem = OffloadProblem(
        uncached_lengths=samples,
        local=PrefillPoolSpeed(instances=roles["prefill"].target, per_token_s=p.per_token_s,
                               attn_pair_s=p.attn_pair_s),
        remote=PrefillPoolSpeed(instances=off.remote_instances, per_token_s=off.remote_per_token_s or p.per_token_s,
                                attn_pair_s=off.remote_attn_pair_s if off.remote_attn_pair_s is not None
                                else p.attn_pair_s),
        decode_rps=max(cap.pool_goodput("decode", decode_n, w), 1e-9),
        link_gbps=off.link_gbps, kv_bytes_per_token=cap.cost.kv_bytes_per_token, high_water=off.high_water,
        arrival_rps=obs.arrival_rate, link_other_gbps=obs.link_other_gbps, remote_queue_s=obs.remote_queue_s,
        min_threshold=off.min_threshold)
    return max(solve_threshold(problem).threshold_tokens, off.min_threshold)


def _attainment(role: Role, obs: Observations) -> float | None:
    """The observed attainment that this role's capacity governs.

    TTFT attainment is taken relative to its ceiling (requests whose prompt alone takes longer
    than the SLO miss it at any pool size), as the capacity model does: otherwise a trace with a
    long tail would look short of target forever and every correction would buy nothing.

    Disaggregated, a TTFT miss belongs to the role that lost the time. When the gateway reports the
    prefill leg on its own, prefill answers for the prefill legs that ended too late and decode for
    the first tokens that came too late after a prefill leg in time (waiting for a decode slot or
    KV room); without it, prefill answers for every TTFT miss, as before.
    """
    ttft = None if obs.ttft_attainment is None else min(1.0, obs.ttft_attainment / obs.ttft_attainable)
    leg = obs.prefill_attainment
    if role == "prefill":
        return ttft if leg is None else min(1.0, leg / obs.ttft_attainable)
    if role == "decode":
        values = [obs.tpot_attainment]
        if leg and obs.ttft_attainment is not None:
            values.append(min(1.0, obs.ttft_attainment / leg))
        known = [a for a in values if a is not None]
        return min(known) if known else None
    values = [a for a in (ttft, obs.tpot_attainment) if a is not None]
    return min(values) if values else None


def _recent_overloads(cap: CapacityModel, role: Role, obs: Observations, threshold: int | None, scale: float,
                      ready: int) -> bool:
    """Whether the rate window's own work (its rate and its mix, not the longer mix window's) needs more
    than the ``ready`` instances: the measured load, corrected like the sizing, against the pool
    that serves it now. False with nothing ready or no recent mix (nothing to compare)."""
    if ready < 1 or not obs.recent_length_mix:
        return False
    recent = obs.model_copy(update={"length_mix": obs.recent_length_mix})
    share, w = 1.0, cap.workload(obs.recent_length_mix, obs.prefix_hit_ratio)
    if role == "prefill" and threshold is not None:
        share, w = _local_prefill(cap, recent, threshold)
    return _exceeds(cap, role, obs.arrival_rate * share / scale, w, ready)


def _exceeds(cap: CapacityModel, role: Role, rate: float, w: Workload, replicas: int) -> bool:
    """Whether ``rate`` needs more than ``replicas`` instances."""
    return cap.pool_size(role, rate, w, replicas) is None


def _pods(o: RoleObservation) -> int:
    return o.ready + o.starting + o.draining + o.drained


def role_decision(role: Role, target: int, o: RoleObservation, needed: float, goodput: float,
                  reason: str) -> RoleDecision:
    """Apply the draining contract: shrink the pool only by instances already drained."""
    pods = _pods(o)
    if target >= pods:
        return RoleDecision(replicas=target, target=target, drain=0, needed=needed, goodput_rps=goodput,
                            reason=reason)
    drain = pods - target
    return RoleDecision(replicas=pods - min(o.drained, drain), target=target, drain=drain, needed=needed,
                        goodput_rps=goodput, reason=reason)


def _settled(rs: RoleState, o: RoleObservation, now: float, spec: AutoscalerSpec, window_s: float) -> bool:
    """Whether the window's attainment says something about the pool as it is: capacity ordered by the
    last scale-up has served a whole window, and no backlog was drained in the window (requests that
    waited out a backlog miss whatever the pool now is; counting them would bias the correction)."""
    if o.starting or (rs.last_up_s is not None and now - rs.last_up_s < spec.startup_delay_s + window_s):
        return False
    # A request that waited in the backlog completes up to about a window after it drained.
    return rs.last_backlog_s is None or now - rs.last_backlog_s >= 2 * window_s


def tick(obs: Observations, profile: Profile, spec: AutoscalerSpec, previous: AutoscalerState | None = None,
         *, capacity: CapacityModel | None = None) -> Decision:
    """One control step. Pure: the same inputs always give the same decision and next state."""
    state = previous or AutoscalerState()
    now = obs.time_s
    fc = forecast.update(state.forecast, obs.arrival_rate, now, spec.forecast_alpha, spec.forecast_beta)
    cap = capacity or CapacityModel(profile, spec.slo, max_utilisation=spec.max_utilisation,
                                    decode_max_utilisation=spec.decode_max_utilisation)
    w = cap.workload(obs.length_mix, obs.prefix_hit_ratio)
    threshold = None
    if spec.offload is not None:
        threshold = obs.offload_threshold if obs.offload_threshold is not None else spec.offload.initial_threshold
    target_att = spec.slo.attainment
    history = [h for h in state.history if h[0] > now - spec.burst_lookback_s]
    misses = [t for t in state.misses if t > now - spec.burst_lookback_s]
    view = rules.bursts(history, threshold=spec.burst_threshold, max_length_s=spec.burst_max_s,
                        min_episodes=spec.burst_min_episodes, misses=misses,
                        miss_lag_s=spec.startup_delay_s + obs.window_s, window_s=obs.window_s,
                        max_dilution=spec.burst_max_dilution)
    # R-hat: a high quantile of the rate one start-up ahead. While recurring bursts are held, the pool
    # their peaks needed is the headroom; the forecast's spread (mostly those same bursts) would buy
    # it a second time, so only the level and a rising trend are kept.
    r_hat = forecast.quantile(fc, spec.startup_delay_s, spec.forecast_quantile, obs.window_s)
    expected = max(0.0, fc.level + max(fc.trend, 0.0) * spec.startup_delay_s)
    if view.holding:
        r_hat = expected
    # Nor above the highest rate of the look-back unless the trend heads there: a large one-step
    # error in either direction widens the spread, and a load that just dropped must not look like
    # one that may triple (sizing up on the way down is a change of direction for nothing).
    seen = max([r for t, r in history if t > now - spec.scale_down_stabilization_s] + [obs.arrival_rate])
    r_hat = min(r_hat, max(seen, expected))
    # A step up since the last tick: size for the new level now, not as the window fills. Not while
    # recurring bursts are held: such a rise is one of them, and the floor is sized for it.
    jump = None if view.holding else rules.jump_rps(history, now, obs.arrival_rate, obs.window_s, spec.jump_z)
    if jump is not None and jump > r_hat:
        r_hat = jump

    roles: dict[Role, RoleDecision] = {}
    new_states: dict[Role, RoleState] = {}
    missed = False  # any role's objective short in this window (beyond sampling noise)
    for role in spec.roles:
        o = obs.roles.get(role)
        if o is None:
            raise ValueError(f"observations.roles lacks {role!r}, which {spec.mode} mode needs")
        bounds = spec.bounds(role)
        rs = state.roles.get(role) or RoleState(replicas=max(o.provisioned, bounds.min_replicas))
        current = rs.replicas
        scale = rs.goodput_scale
        why: list[str] = []

        # The mix this role is sized on: the mix window's, unless (prefill) the rate window's brings
        # significantly more work per request (a shift the mix window has not caught up with).
        mix = obs.length_mix
        # The ratio margin is waived while the pool serving now cannot carry the rate window's own work.
        if role != "decode" and rules.mix_shift(
                cap, role, obs.length_mix, obs.recent_length_mix, obs.recent_mix_requests, obs.prefix_hit_ratio,
                spec.mix_shift_z, spec.mix_shift_min_ratio,
                overloaded=spec.mix_shift_follow_overload and _recent_overloads(cap, role, obs, threshold, scale,
                                                                                o.ready)):
            assert obs.recent_length_mix is not None
            mix = obs.recent_length_mix
            why.append("mix shift: sized on the recent mix")
        share, role_w = 1.0, cap.workload(mix, obs.prefix_hit_ratio)
        if role == "prefill" and threshold is not None:  # offloaded prompts never reach the local pool
            share, role_w = _local_prefill(cap, obs.model_copy(update={"length_mix": mix}), threshold)

        att = _attainment(role, obs)
        # Short only beyond the sampling noise of the window's attainment (one standard error):
        # a 0.949 over a hundred requests is not evidence against a 0.95 target.
        noise = math.sqrt(target_att * (1 - target_att) / max(obs.completed, 1))
        short = att is not None and obs.completed >= spec.min_samples and att < target_att - noise
        missed = missed or short
        comfortable = att is not None and obs.completed >= spec.min_samples and att >= (1 + target_att) / 2
        # Scale-down needs the objective comfortably met over the whole stabilization window, not
        # in one lucky window: a 30-second attainment swings by several points.
        recent_att = [(t, a) for t, a in rs.recent_attainment if t > now - spec.scale_down_stabilization_s]
        if att is not None and obs.completed >= spec.min_samples:
            recent_att.append((now, att))
        tight = any(a < (1 + target_att) / 2 for _, a in recent_att)
        backlog = max(0.0, o.queue_depth - o.ready)
        last_backlog = now if o.queue_depth > 2 * max(o.ready, 1) else rs.last_backlog_s
        settled = _settled(rs.model_copy(update={"last_backlog_s": last_backlog}), o, now, spec, obs.window_s)
        # Only a shortfall the model did not predict is evidence against the model: the ready
        # instances were enough, in the model, for the rate actually observed. A shortfall while
        # the pool lagged the load is fixed by ordinary sizing and must not leave a lasting bias.
        model_said_enough = cap.pool_size(role, obs.arrival_rate * share / scale, role_w, o.ready) is not None
        if short and settled and model_said_enough:
            assert att is not None
            scale = max(MIN_GOODPUT_SCALE, scale * (1 - min(MAX_CUT, target_att - att)))
            why.append(f"attainment {att:.3f} < {target_att:.3f} where the model saw enough: "
                       f"goodput corrected to x{scale:.2f}")
        elif comfortable and scale < 1.0 and o.ready:
            # Relax only while the pool carries enough load for its attainment to say something
            # about the model; a comfortable but idle pool would erase a correction it still needs.
            carried = cap.pool_goodput(role, o.ready, role_w) * scale
            if obs.arrival_rate * share >= RELAX_MIN_LOAD * carried:
                scale = min(1.0, scale * RELAX_PER_TICK)

        # The need at R-hat inflated by the learned correction, plus a backlog to drain (what
        # scale-up orders).
        rate = r_hat * share / scale
        drain = backlog / spec.backlog_drain_s if spec.backlog_drain_s > 0 else 0.0
        sized = cap.pool_size(role, rate + drain, role_w, bounds.max_replicas)
        want = bounds.max_replicas if sized is None else sized
        n_ref = max(want, 1)
        goodput = cap.pool_goodput(role, n_ref, role_w) / n_ref  # per instance, in a pool of that size
        needed = rate / goodput if goodput > 0 else float(bounds.max_replicas)
        why.append(f"R-hat {r_hat:.2f} rps / correction {scale:.2f} needs {want} "
                   f"(goodput {goodput:.2f} rps per instance)")
        if drain > 0:
            why.append(f"backlog {backlog:.0f} drained over {spec.backlog_drain_s:.0f} s")
        despite = 0
        if short and settled and model_said_enough and want <= current:
            want = despite = current + 1
            why.append("+1 despite the model")
        floor, held = 0, 0
        if view.hold_rps is not None:
            sized_hold = cap.pool_size(role, view.hold_rps * share / scale, role_w, bounds.max_replicas)
            # A miss in a burst at n instances proves n + 1 needed whatever the model says of the
            # bursts' peak (their rate within a window can exceed the window's): kept while held.
            held = max(rs.held, despite)
            floor = max(bounds.max_replicas if sized_hold is None else sized_hold, held)
            if floor > want:
                want = floor
                why.append(f"held for {len(view.short)} recurring bursts (peak {view.hold_rps:.1f} rps): {floor}")

        # Scale-down look-back: the largest pool that the recent ticks needed with the hysteresis
        # headroom (rate and length mix both vary, so the need is kept, not the rate). While bursts
        # are held the floor is the headroom: the band on top of the bursts' own need would hold
        # one instance more than they ever needed.
        band = 0.0 if view.holding else spec.hysteresis
        headroom = cap.pool_size(role, rate * (1 + band), role_w, bounds.max_replicas)
        recent = [(t, n) for t, n in rs.recent_needs if t > now - spec.scale_down_stabilization_s]
        # An instance added despite the model is a need too: the look-back keeps it, or the next
        # scale-down would release it into the same shortfall.
        # So is the burst floor: sized anew each tick from the mix window, it dips with the mix's noise,
        # and a pool shrunk by a dip is grown again by the next burst (two reversals for nothing).
        recent.append((now, max(despite, floor, bounds.max_replicas if headroom is None else headroom)))
        want = max(bounds.min_replicas, min(bounds.max_replicas, want))

        target, direction = current, 0
        flipped_lately = rs.last_flip_s is not None and now - rs.last_flip_s < spec.flip_window_s
        recently_down = rs.last_down_s is not None and now - rs.last_down_s < spec.scale_down_cooldown_s
        if want > current:
            forced = short or _exceeds(cap, role, rate * (1 - spec.hysteresis), role_w, current)
            if rs.last_up_s is not None and now - rs.last_up_s < spec.scale_up_cooldown_s:
                why.append("scale-up cooldown")
            elif rs.last_direction < 0 and (recently_down or flipped_lately) and not forced:
                # Going back up soon after a scale-down is a change of direction: only when the need
                # clears the band below R-hat, or the SLO is actually being missed.
                why.append("inside the hysteresis band after a scale-down")
            else:
                target, direction = want, 1
        elif want < current:
            goal = max(n for _, n in recent)
            candidate = rules.scale_down_step(current, goal, floor, bounds.min_replicas, spec.scale_down_step)
            since = now if rs.observed_since_s is None else rs.observed_since_s
            if now - since < spec.scale_down_stabilization_s:
                why.append("no scale-down before a full stabilization window was observed")
            elif candidate >= current:
                why.append("held by the look-back / hysteresis" + (" / burst floor" if floor >= current else ""))
            elif rs.last_up_s is not None and now - rs.last_up_s < spec.scale_down_cooldown_s:
                why.append("scale-down cooldown after a scale-up")
            elif rs.last_down_s is not None and now - rs.last_down_s < spec.scale_down_interval_s:
                why.append("scale-down step interval")
            elif rs.last_direction > 0 and flipped_lately:
                why.append("a change of direction within the flip window")
            elif fc.trend > 0 and not view.holding:  # (held bursts: the floor is what a rise needs)
                why.append("load rising: no scale-down")
            elif tight:
                # The model may say fewer would do, but the objective is only just met: removing
                # capacity now is how a pool walks off the cliff.
                worst = min(a for _, a in recent_att)
                why.append(f"attainment {worst:.3f} in the window is not comfortably above {target_att:.3f}: "
                           "no scale-down")
            else:
                target, direction = candidate, -1

        if direction:
            why.insert(0, f"{role} {current}->{target}")
        else:
            why.insert(0, f"{role} stays {current}")
        flip = direction != 0 and rs.last_direction != 0 and direction != rs.last_direction
        new_states[role] = RoleState(
            replicas=target,
            last_up_s=now if direction > 0 else rs.last_up_s,
            last_down_s=now if direction < 0 else rs.last_down_s,
            last_direction=direction or rs.last_direction,
            goodput_scale=scale,
            observed_since_s=now if rs.observed_since_s is None else rs.observed_since_s,
            recent_attainment=recent_att,
            recent_needs=recent,
            last_flip_s=now if flip else rs.last_flip_s,
            held=held,
            last_backlog_s=last_backlog,
        )
        roles[role] = role_decision(role, target, o, needed, goodput, "; ".join(why))

    history.append((now, obs.arrival_rate))
    if missed:
        misses.append(now)
    new_state = AutoscalerState(forecast=fc, roles=new_states, history=history, misses=misses)
    decision = Decision(
        roles=roles,
        offload_threshold=None if threshold is None else solve_offload(cap, obs, spec, roles, w),
        forecast_rps=r_hat,
        reason=" | ".join(d.reason for d in roles.values()),
        state=new_state,
    )
    if spec.gpu_budget is not None:
        decision = apply_budget({"": (decision, spec, obs)}, spec.gpu_budget)[""]
    return decision


def share_budget(demands: Mapping[str, tuple[int, int, int]], budget: int) -> dict[str, int]:
    """Cut replica demands (want, min, gpus per replica) to fit ``budget`` GPUs.

    Every pool keeps its minimum; the GPUs above the minimums go to the pools in proportion to
    what they asked for beyond their minimum, so a disaggregated service keeps its P:D balance.
    """
    base = sum(mn * g for _, mn, g in demands.values())
    want = sum(w * g for w, _, g in demands.values())
    if want <= budget:
        return {k: w for k, (w, _, _) in demands.items()}
    spare = max(0, budget - base)
    extra_total = want - base
    out = {k: mn + int((w - mn) * g * spare / extra_total) // g for k, (w, mn, g) in demands.items()}
    # Hand out what rounding left, one replica at a time, to the pools furthest below their share.
    left = budget - sum(out[k] * demands[k][2] for k in out)
    while left > 0:
        open_ = [k for k, (w, _, g) in demands.items() if out[k] < w and g <= left]
        if not open_:
            break
        k = max(open_, key=lambda k: (demands[k][0] - out[k]) / max(demands[k][0], 1))
        out[k] += 1
        left -= demands[k][2]
    return out


def apply_budget(services: Mapping[str, tuple[Decision, AutoscalerSpec, Observations]],
                 budget: int) -> dict[str, Decision]:
    """Fit several services' decisions into one GPU budget (the global budget across services)."""
    demands = {(name, role): (d.target, spec.bounds(role).min_replicas, spec.bounds(role).gpus_per_replica)
               for name, (dec, spec, _) in services.items() for role, d in dec.roles.items()}
    granted = share_budget(demands, budget)
    out: dict[str, Decision] = {}
    for name, (dec, _, obs) in services.items():
        roles = dict(dec.roles)
        states = dict(dec.state.roles)
        for role, d in dec.roles.items():
            got = granted[(name, role)]
            if got < d.target:
                reason = f"{d.reason}; capped {d.target}->{got} by GPU budget {budget}"
                roles[role] = role_decision(role, got, obs.roles[role], d.needed, d.goodput_rps, reason)
                states[role] = states[role].model_copy(update={"replicas": got})
        state = dec.state.model_copy(update={"roles": states})
        reason = " | ".join(d.reason for d in roles.values())
        out[name] = dec.model_copy(update={"roles": roles, "state": state, "reason": reason})
    return out
