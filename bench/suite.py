"""``tandem bench autoscale --suite``: every scenario of :mod:`tandem.bench.scenarios` through the same
replay, one scenario per process, with a progress bar, a wall-clock budget and one table.

Per scenario the replay searches static_peak (the fewest instances meeting the target in every
minute), runs Tandem and the two peer-style scalers, and sizes the calibrated oracle; the table
reports Tandem's attainment, goodput per GPU-hour against static_peak, the share of the oracle's
headroom it captured, its worst minute, its scaling actions and direction changes, and the peers'
goodput per GPU-hour and attainment beside it. Below the table, each of the issue's targets with
the scenarios that miss it.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tandem.bench.autoscale import AutoscaleBench, OverBudget, run_bench
from tandem.bench.scenarios import SYNTHETIC, Scenario, describe, generate, suite
from tandem.perf.profile import load_profile

TARGET_RATIO = 1.0  # goodput per GPU-hour vs static_peak, every scenario
TARGET_DIURNAL = 1.2  # on the day-shaped scenarios
TARGET_SHARE = 0.5  # mean share of the oracle's headroom
TARGET_DIRECTION = 1  # direction changes per pool per 10 minutes
PEERS = ("dynamo", "kpa")


def evaluate(s: Scenario, cfg: AutoscaleBench, deadline: float | None) -> dict[str, Any]:
    """One scenario, every scaler (run in a worker process; never raises)."""
    wall, cpu = time.monotonic(), time.process_time()
    out: dict[str, Any] = {"scenario": s.model_dump(), "description": describe(s), "error": None}
    try:
        w = generate(s)
        out["requests"] = len(w.requests)
        run_cfg = cfg.model_copy(update={"ttft_s": w.ttft_s, "profile": w.profile})
        res = run_bench(w.requests, load_profile(w.profile), run_cfg, s.family, deadline=deadline,
                        references=False, threshold=False)
        out["scalers"] = res["json"]["scalers"]
        conf = res["json"]["config"]
        out.update({k: conf[k] for k in ("static_peak_replicas", "oracle_gpu_hours_60s",
                                          "oracle_calibrated_gpu_hours_60s", "peak_qps_60s", "mean_qps", "profile")})
        out["static_candidates"] = len(conf["static_candidates"])
    except OverBudget as exc:
        out["error"] = f"not run: {exc}"
    except (Exception, SystemExit) as exc:  # one broken scenario must not lose the others' results
        out["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"
    out["seconds"] = time.monotonic() - wall
    out["cpu_seconds"] = time.process_time() - cpu
    return out


def wins(t: dict[str, Any], peer: dict[str, Any], target: float) -> bool:
    """Tandem beats a peer on a scenario: it meets the attainment target and either the peer does not
    or Tandem's goodput per GPU-hour is higher."""
    if t["slo_attainment"] < target:
        return False
    return peer["slo_attainment"] < target or t["goodput_per_gpu_hour"] > peer["goodput_per_gpu_hour"]


def verdicts(results: Sequence[dict[str, Any]], target: float) -> dict[str, Any]:
    """Each of the issue's targets over the scenarios that ran, with the scenarios that miss it."""
    done = [r for r in results if r.get("scalers")]
    t = {r["scenario"]["name"]: r["scalers"]["tandem"] for r in done}
    shares = [s["oracle_headroom_share"] for s in t.values() if s["oracle_headroom_share"] is not None]
    diurnal = [r["scenario"]["name"] for r in done if r["scenario"]["family"] == "diurnal"]
    beats = {r["scenario"]["name"]: all(wins(r["scalers"]["tandem"], r["scalers"][p], target)
                                        for p in PEERS if p in r["scalers"]) for r in done}
    return {
        "ran": len(done), "not_run": [r["scenario"]["name"] for r in results if not r.get("scalers")],
        "attainment_below_target": [n for n, s in t.items() if s["slo_attainment"] < target],
        "goodput_below_static": [n for n, s in t.items() if s["goodput_per_gpu_hour_vs_static"] < TARGET_RATIO],
        "mean_oracle_headroom_share": sum(shares) / len(shares) if shares else None,
        "oracle_share_scenarios": len(shares),
        "diurnal_below_target": [n for n in diurnal if t[n]["goodput_per_gpu_hour_vs_static"] < TARGET_DIURNAL],
        "direction_changes_over_target": [n for n, s in t.items()
                                          if s["direction_changes_10min_max"] > TARGET_DIRECTION],
        "beats_both_peers": sum(beats.values()),
        "not_better_than_both_peers": [n for n, b in beats.items() if not b],
    }


def _fmt_share(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0%}"


def rows(results: Sequence[dict[str, Any]], target: float) -> list[list[str]]:
    """The table's rows (plain strings), one per scenario in suite order."""
    out = []
    for r in results:
        name = r["scenario"]["name"]
        if not r.get("scalers"):
            out.append([name, r["description"], (r["error"] or "").splitlines()[0][:60]] + [""] * 9)
            continue
        sc = r["scalers"]
        t = sc["tandem"]
        peer_cells = [f"{sc[p]['goodput_per_gpu_hour_vs_static']:.2f}x ({sc[p]['slo_attainment']:.3f})"
                      if p in sc else "" for p in PEERS]
        beats = all(wins(t, sc[p], target) for p in PEERS if p in sc)
        bound = f"{sc['reactive_oracle']['slo_attainment']:.3f}" if "reactive_oracle" in sc else ""
        out.append([name, r["description"], f"{t['slo_attainment']:.3f}", f"{t['goodput_per_gpu_hour_vs_static']:.2f}x",
                    _fmt_share(t["oracle_headroom_share"]), f"{t['worst_minute_attainment']:.2f}",
                    str(t["scaling_actions"]), str(t["direction_changes_10min_max"]), *peer_cells,
                    "yes" if beats else "no", bound])
    return out


HEADERS = ["scenario", "load", "attainment", "goodput/GPU-h vs static_peak", "oracle headroom", "worst minute",
           "actions", "dir. changes /pool /10 min", "dynamo (att.)", "kpa (att.)", "beats both",
           "reactive bound (att.)"]


def markdown(results: Sequence[dict[str, Any]], v: dict[str, Any], target: float) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows(results, target)]
    lines += ["", *summary_lines(v)]
    return "\n".join(lines) + "\n"


def summary_lines(v: dict[str, Any]) -> list[str]:
    share = v["mean_oracle_headroom_share"]
    ran = v["ran"]

    def missed(key: str) -> str:
        return ", ".join(v[key]) or "none"

    return [
        f"- attainment >= target: {ran - len(v['attainment_below_target'])}/{ran} (below: "
        f"{missed('attainment_below_target')})",
        f"- goodput/GPU-h >= {TARGET_RATIO:.1f}x static_peak: {ran - len(v['goodput_below_static'])}/{ran} "
        f"(below: {missed('goodput_below_static')})",
        f"- mean share of the oracle's headroom: {_fmt_share(share)} over {v['oracle_share_scenarios']} scenarios "
        f"with headroom (target {TARGET_SHARE:.0%})",
        f"- diurnal >= {TARGET_DIURNAL:.1f}x: below: {missed('diurnal_below_target')}",
        f"- <= {TARGET_DIRECTION} direction change per pool per 10 min: {ran - len(v['direction_changes_over_target'])}"
        f"/{ran} (over: {missed('direction_changes_over_target')})",
        f"- better than both peers (goodput/GPU-h at >= target attainment): {v['beats_both_peers']}/{ran} "
        f"(not: {missed('not_better_than_both_peers')})",
        *([f"- not run (budget or error): {', '.join(v['not_run'])}"] if v["not_run"] else []),
    ]


def select(scenarios: list[Scenario], only: str | None) -> list[Scenario]:
    if not only:
        return scenarios
    wanted = {w.strip() for w in only.split(",") if w.strip()}
    picked = [s for s in scenarios if s.name in wanted or s.family in wanted]
    unknown = wanted - {s.name for s in picked} - {s.family for s in picked}
    if unknown:
        raise SystemExit(f"tandem bench autoscale: scenarios: unknown {', '.join(sorted(unknown))} "
                         f"(names: {', '.join(s.name for s in scenarios)})")
    return picked


def run_suite(scenarios: list[Scenario], cfg: AutoscaleBench, workers: int, budget_s: float,
              console: Console | None = None) -> list[dict[str, Any]]:
    """Run ``scenarios`` in ``workers`` processes within ``budget_s``; results in the input order."""
    deadline = time.time() + budget_s
    results: dict[str, dict[str, Any]] = {}
    console = console or Console(stderr=True)
    ctx = multiprocessing.get_context("fork")
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[last]}"), console=console, transient=False) as progress, \
            ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        task = progress.add_task("scenarios", total=len(scenarios), last="")
        pending: dict[Future, Scenario] = {pool.submit(evaluate, s, cfg, deadline): s for s in scenarios}
        while pending:
            left = deadline - time.time()
            done, _ = wait(pending, timeout=max(1.0, min(30.0, left)) if left > 0 else 1.0,
                           return_when=FIRST_COMPLETED)
            if time.time() > deadline:
                for fut in [f for f in pending if f.cancel()]:
                    s = pending.pop(fut)
                    results[s.name] = {"scenario": s.model_dump(), "description": describe(s),
                                       "error": "not run: budget spent before it started"}
                    progress.advance(task)
            for fut in done:
                s = pending.pop(fut)
                results[s.name] = fut.result()
                r = results[s.name]
                t = (r.get("scalers") or {}).get("tandem")
                tail = f"{t['goodput_per_gpu_hour_vs_static']:.2f}x, att {t['slo_attainment']:.3f}" if t else "error"
                progress.update(task, advance=1, last=f"{s.name}: {tail} ({r['seconds']:.0f} s)")
                if not console.is_terminal:  # a log file gets one line per scenario instead of a bar
                    console.print(f"{s.name}: {tail} ({r['seconds']:.0f} s, {r['cpu_seconds']:.0f} s CPU)")
    return [results[s.name] for s in scenarios if s.name in results]


def run_suite_command(cfg: AutoscaleBench) -> None:
    scenarios = select(suite(quick=cfg.quick, seeds=cfg.seeds), cfg.scenarios)
    workers = min(cfg.workers or os.cpu_count() or 1, len(scenarios))
    console = Console(stderr=True)
    console.print(f"{len(scenarios)} scenarios on {workers} processes, budget {cfg.budget_s:.0f} s "
                  f"(synthetic families: {', '.join(SYNTHETIC)})")
    start = time.monotonic()
    results = run_suite(scenarios, cfg, workers, cfg.budget_s, console)
    target = cfg.attainment
    v = verdicts(results, target)
    table = Table(title=f"tandem bench autoscale --suite ({'quick' if cfg.quick else 'full'}), "
                        f"{time.monotonic() - start:.0f} s on {workers} processes")
    for h in HEADERS:
        table.add_column(h, overflow="fold")
    for row in rows(results, target):
        table.add_row(*row)
    out = Console(file=sys.stdout, width=220)
    out.print(table)
    for line in summary_lines(v):
        out.print(line)
    cfg.json_out.parent.mkdir(parents=True, exist_ok=True)
    cfg.json_out.write_text(json.dumps({
        "suite": {"quick": cfg.quick, "seeds": cfg.seeds, "workers": workers, "budget_s": cfg.budget_s,
                  "wall_s": time.monotonic() - start, "attainment_target": target},
        "verdicts": v, "scenarios": results}, indent=2))
    if cfg.markdown:
        cfg.markdown.parent.mkdir(parents=True, exist_ok=True)
        cfg.markdown.write_text(markdown(results, v, target))
