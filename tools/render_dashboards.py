"""Render the Grafana dashboards of deploy/grafana/ to PNG from a running Prometheus (matplotlib).

Grafana cannot run here, so this draws what it would: each panel's queries, the dashboard variables
substituted (All by default), run as range queries over Prometheus' HTTP API, one subplot per panel
in the dashboard's grid order, each series labelled by the panel's legend format. The PNGs in
docs/images/ come from the stack of the real-Prometheus test tier::

    TANDEM_RENDER_DASHBOARDS=docs/images pytest tests/e2e/test_prometheus_tier.py

or by hand against any Prometheus that scrapes Tandem::

    python tools/render_dashboards.py --prometheus http://127.0.0.1:9090 --minutes 15 --out docs/images
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
BOARDS = ROOT / "deploy" / "grafana"
UNITS = {"percentunit": "share", "reqps": "req/s", "ops": "per s", "s": "seconds", "Bps": "bytes/s", "short": ""}


@dataclass
class Drawn:
    """What one dashboard's rendering found: the panels that had no data (should be none)."""

    path: Path
    empty: list[str]


def substitute(expr: str, variables: dict[str, str], rate_interval: str) -> str:
    out = expr.replace("$__rate_interval", rate_interval)
    for name, value in sorted(variables.items(), key=lambda kv: -len(kv[0])):
        out = out.replace(f"${name}", value)
    return out


def legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip() or "value"


def query_range(client: httpx.Client, prometheus: str, expr: str, start: float, end: float, step: float
                ) -> list[dict[str, Any]]:
    resp = client.get(f"{prometheus}/api/v1/query_range",
                      params={"query": expr, "start": str(start), "end": str(end), "step": str(step)})
    resp.raise_for_status()
    return resp.json()["data"]["result"]


def _draw_timeseries(ax: Any, results: list[tuple[str, list[dict[str, Any]]]], start: float) -> bool:
    """Lines; series that stay at 0 are drawn but left out of the legend (counted in its title)."""
    drawn, zeros = False, 0
    for fmt, series_list in results:
        for series in series_list:
            points = [(float(t) - start, float(v)) for t, v in series["values"] if not math.isnan(float(v))]
            if points:
                xs, ys = zip(*points, strict=True)
                flat = not any(ys)
                zeros += flat
                ax.plot(xs, ys, label="_nolegend_" if flat else legend(fmt, series["metric"]), linewidth=1.2)
                drawn = True
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=6, loc="upper left", framealpha=0.6, title=f"+{zeros} series at 0" if zeros else None,
                  title_fontsize=6)
    elif zeros:
        ax.text(0.01, 0.95, f"{zeros} series, all at 0", transform=ax.transAxes, fontsize=7, va="top")
    ax.set_xlabel("seconds", fontsize=7)
    return drawn


def _draw_bars(ax: Any, results: list[tuple[str, list[dict[str, Any]]]]) -> bool:
    names, values = [], []
    for fmt, series_list in results:
        for series in series_list:
            last = [float(v) for _, v in series["values"] if not math.isnan(float(v))]
            if last:
                names.append(legend(fmt, series["metric"]))
                values.append(max(last))
    ax.barh(names, values)
    ax.tick_params(axis="y", labelsize=6)
    ax.set_xlabel("largest value in range", fontsize=7)
    return bool(names)


def _draw_table(ax: Any, results: list[tuple[str, list[dict[str, Any]]]]) -> bool:
    rows = []
    for fmt, series_list in results:
        for series in series_list:
            values = [v for _, v in series["values"] if not math.isnan(float(v))]
            if values:
                rows.append([legend(fmt, series["metric"]), values[-1]])
    ax.axis("off")
    if rows:
        table = ax.table(cellText=rows, colLabels=["series", "value"], loc="center", cellLoc="left")
        table.auto_set_font_size(False)
        table.set_fontsize(7)
    return bool(rows)


def render(path: Path, prometheus: str, start: float, end: float, out: Path, variables: dict[str, str],
           rate_interval: str = "5s") -> Drawn:
    """One dashboard to ``out/dashboard-<name>.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    board = json.loads(path.read_text())
    panels = board["panels"]
    step = max(1.0, (end - start) / 300)
    cols = 2
    places, slot = [], 0  # (row, column or None for a full-width panel)
    for panel in panels:
        if panel["gridPos"]["w"] > 12:
            slot += slot % cols
            places.append((slot // cols, None))
            slot += cols
        else:
            places.append(divmod(slot, cols))
            slot += 1
    rows = -(-slot // cols)
    height = 3.2 * rows
    fig = plt.figure(figsize=(14, height))
    grid = fig.add_gridspec(rows, cols, hspace=0.55, wspace=0.18, top=1 - 0.7 / height, bottom=0.4 / height)
    empty = []
    with httpx.Client(timeout=30) as client:
        for panel, (row, col) in zip(panels, places, strict=True):
            ax = fig.add_subplot(grid[row, :] if col is None else grid[row, col])
            results = [(t.get("legendFormat", ""),
                        query_range(client, prometheus, substitute(t["expr"], variables, rate_interval), start, end,
                                    step))
                       for t in panel["targets"]]
            draw = {"table": _draw_table, "barchart": _draw_bars}.get(panel["type"])
            has = draw(ax, results) if draw else _draw_timeseries(ax, results, start)
            unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
            title = substitute(panel["title"], variables, rate_interval)
            ax.set_title(title + (f" ({UNITS.get(unit, unit)})" if UNITS.get(unit, unit) else ""), fontsize=9)
            ax.tick_params(labelsize=7)
            if not has:
                empty.append(panel["title"])
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="red")
    scope = ", ".join(f"{k}={v}" for k, v in variables.items() if k in ("namespace", "service", "model"))
    fig.suptitle(f"{board['title']}  ({scope}; {end - start:.0f} s of a test run)", fontsize=12,
                 y=1 - 0.2 / height)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"dashboard-{path.stem}.png"
    fig.savefig(target, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return Drawn(target, empty)


def render_all(prometheus: str, start: float, end: float, out: Path,
               variables: dict[str, str] | None = None) -> list[Drawn]:
    values = {"namespace": ".*", "service": ".*", "model": ".*", "ttft_slo": "5.0", **(variables or {})}
    return [render(path, prometheus, start, end, out, values) for path in sorted(BOARDS.glob("*.json"))]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prometheus", required=True, help="base URL of the Prometheus HTTP API")
    parser.add_argument("--minutes", type=float, default=15.0, help="time range drawn, ending now")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args(argv)
    end = time.time()
    drawn = render_all(args.prometheus.rstrip("/"), end - 60 * args.minutes, end, args.out)
    for d in drawn:
        print(d.path, "panels without data: " + ", ".join(d.empty) if d.empty else "")
    return 1 if any(d.empty for d in drawn) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
