"""Generate docs/metrics.md from the metric registries themselves (``make generate``; a test checks it).

Each process' registry is built exactly as the process builds it (the gateway's GatewayMetrics, a
simulated engine per flavour, the autoscaler's AutoscalerMetrics) and read back: name, type, help
text and label names, so the reference lists what really is exported. The Prometheus rules and the
dashboards that use each series are cross-referenced.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "metrics.md"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from generated import write_or_check  # noqa: E402
from promql_names import metric_names  # noqa: E402

SERIES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",), "info": ("",),
          "unknown": ("",), "summary": ("", "_sum", "_count")}


def _families(registry: CollectorRegistry, *owners: Any) -> list[dict[str, Any]]:
    """Name, type, help and label names of every family in ``registry``."""
    declared = {m._name: list(m._labelnames) for owner in owners for m in vars(owner).values()
                if isinstance(m, MetricWrapperBase)}
    out = []
    for family in registry.collect():
        labels = declared.get(family.name)
        if labels is None:
            labels = sorted({k for s in family.samples for k in s.labels if k != "le"})
        if family.type == "histogram":
            labels = [*labels, "le (on _bucket)"]
        out.append({"name": family.name, "type": family.type, "help": family.documentation, "labels": labels,
                    "series": [family.name + suffix for suffix in SERIES.get(family.type, ("",))]})
    return sorted(out, key=lambda f: f["name"])


def sources() -> dict[str, list[dict[str, Any]]]:
    from tandem.autoscaler.actuator import AutoscalerMetrics
    from tandem.perf.profile import load_profile
    from tandem.router.metrics import GatewayMetrics
    from tandem.sim.server import SimServer
    from tandem.sim.settings import SimSettings

    gateway = GatewayMetrics()
    out = {"gateway": _families(gateway.registry, gateway)}
    for flavor in ("vllm", "sglang"):
        settings = SimSettings(metrics=flavor)
        server = SimServer(settings, load_profile(settings.profile))
        families = _families(server.metrics.registry, server.metrics, server.kv)
        out[flavor] = [f for f in families if f["name"].startswith(f"{flavor}:")]
        out["simulator"] = [f for f in families if f["name"].startswith("tandem_sim_")]
    scaler = AutoscalerMetrics(CollectorRegistry())
    out["autoscaler"] = _families(scaler.registry, scaler)
    return out


def _uses() -> dict[str, list[str]]:
    """Series name -> the dashboards and rules that query it."""
    uses: dict[str, set[str]] = {}
    for path in sorted((ROOT / "deploy" / "grafana").glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel["targets"]:
                for name in metric_names(target["expr"]):
                    uses.setdefault(name, set()).add(f"{board['title'].split('/')[-1].strip()} dashboard")
    for group in yaml.safe_load((ROOT / "deploy" / "prometheus" / "tandem-rules.yaml").read_text())["groups"]:
        for rule in group["rules"]:
            for name in metric_names(rule["expr"]):
                uses.setdefault(name, set()).add(f"`{rule.get('record') or rule['alert']}`")
    return {k: sorted(v) for k, v in uses.items()}


SECTIONS = {
    "gateway": ("Gateway (`tandem gateway`)",
                "Served on the gateway's port at `/metrics`. The label `instance` is the engine URL (scrape "
                "with `honorLabels: true`, as the chart's monitors do). Counters exist at 0 before their "
                "first increment (a series born at 1 is invisible to rate() and increase()): outcomes, "
                "retry and rejection reasons from the start, a policy's decision reasons with its "
                "scheduler, an instance's error kinds and scrapes when it joins, a model's prefill routes "
                "when its first disaggregated instance joins."),
    "vllm": ("vLLM engines", "Names, types and labels as vLLM v1 exports them; `tandem sim --metrics vllm` "
                             "exports the same. The chart's PodMonitor adds `role` and `service` from pod labels."),
    "sglang": ("SGLang engines", "Names, types and labels as SGLang exports them; `tandem sim --metrics sglang` "
                                 "exports the same."),
    "simulator": ("Simulator only", "Exported by `tandem sim` in disaggregated roles, not by real engines."),
    "autoscaler": ("Autoscaler (`tandem autoscaler`)",
                   "Served on `--metrics-port` at `/metrics`. The labels `namespace` and `service` name the "
                   "LLMService (scrape with `honorLabels: true`, as the chart's ServiceMonitor does, or they "
                   "become the autoscaler's own). A service's counters exist at 0 from the tick that first "
                   "sees it; that tick's own error or scaling action is the one increase() cannot count."),
}


DASHBOARDS_INTRO = """\
The Grafana dashboards are `deploy/grafana/*.json` (the chart ships them as ConfigMaps for Grafana's
sidecar). They are generated by `tools/gen_dashboards.py` with Grafana's Foundation SDK
(`grafana-foundation-sdk`, pinned in pyproject.toml): the panels are written as (title, PromQL,
legend) rows and the SDK's typed builders produce Grafana's schema, layout and variables, so no
JSON is written by hand.

Every dashboard has the variables **namespace**, **service** and **model** (multi-value; All is
the regex `.*`), and every panel query is filtered by them (the model where the series names one:
the gateway's request series are per service, and a service serves one model). Series that every
gateway replica exports alike (instance counts, breakers, the offload threshold, the autoscaler's
decision) are taken with `max` over replicas, never summed.

`tests/e2e/test_prometheus_tier.py` runs a real Prometheus (Debian's `prometheus`) against a real stack
(vLLM- and SGLang-dialect `tandem sim` engines, an aggregated service behind two gateway replicas, a
disaggregated service with a remote prefill pool, the autoscaler against kmock), labelled as the
chart's monitors label it, drives traffic with a failing engine, and fails when any panel query
(variables substituted) draws no data, a variable lists nothing, or a recording rule has no series.
The images below are that run, drawn by `tools/render_dashboards.py` (matplotlib; Grafana cannot
run here) from Prometheus' HTTP API: `TANDEM_RENDER_DASHBOARDS=docs/images pytest
tests/e2e/test_prometheus_tier.py`, or `python tools/render_dashboards.py --prometheus URL` against
any Prometheus that scrapes Tandem. The time axis is the seconds of that short run.

Every alert is unit-tested with `promtool test rules` (`tests/promtool/`, run by
`tests/shared/test_alert_rules.py`): it fires on its fault and is quiet at steady state; the scrape
alerts at 1, 15, 30 and 60 s Prometheus scrape intervals and 1 and 5 s gateway scrape intervals.
"""


def dashboards_section() -> list[str]:
    lines = ["## Dashboards", "", DASHBOARDS_INTRO]
    for path in sorted((ROOT / "deploy" / "grafana").glob("*.json")):
        board = json.loads(path.read_text())
        lines += [f"### {board['title']}", "", board["description"], "",
                  f"![{board['title']}](images/dashboard-{path.stem}.png)", ""]
    return lines


def render() -> str:
    uses = _uses()
    lines = ["# Metric reference", "",
             "Generated by `tools/gen_metric_reference.py` from the metric registries of the processes "
             "themselves; do not edit by hand, run `make generate`. `tests/router/test_observability.py` checks "
             "that every series the dashboards and rules query appears in the real `/metrics` output.", "",
             *dashboards_section()]
    for key, families in sources().items():
        title, intro = SECTIONS[key]
        lines += [f"## {title}", "", intro, "",
                  "| Series | Type | Labels | Meaning | Used by |", "|---|---|---|---|---|"]
        for f in families:
            used = sorted({u for s in f["series"] for u in uses.get(s, [])})
            series = "<br>".join(f"`{s}`" for s in f["series"])
            lines.append(f"| {series} | {f['type']} | {', '.join(f['labels']) or '-'} | "
                         f"{f['help'].replace('|', '/')} | {', '.join(used) or '-'} |")
        lines.append("")
    lines += ["## Recording rules and alerts", "",
              "From `deploy/prometheus/tandem-rules.yaml` (also shipped as the chart's PrometheusRule).", "",
              "| Rule | Kind | Expression |", "|---|---|---|"]
    for group in yaml.safe_load((ROOT / "deploy" / "prometheus" / "tandem-rules.yaml").read_text())["groups"]:
        for rule in group["rules"]:
            expr = " ".join(rule["expr"].split()).replace("|", "\\|")
            kind = "recording" if "record" in rule else f"alert ({rule['labels']['severity']}, for {rule['for']})"
            lines.append(f"| `{rule.get('record') or rule['alert']}` | {kind} | `{expr}` |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    return write_or_check({OUT: render()}, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
