"""The dashboards and rules against a real Prometheus scraping a real stack (tests/promstack.py).

Two services (aggregated ``chat`` on a vLLM-dialect and an SGLang-dialect ``tandem sim`` behind two
gateway replicas; disaggregated ``pd`` with a remote prefill pool behind one gateway), the autoscaler
against kmock, traffic with one failing engine (retries, upstream errors, one failed request), and
Prometheus scraping everything every second with the chart's relabeling. Then every panel query of
every dashboard, with the Grafana variables substituted, must return data; every variable must list
the stack's namespace, services and models; every recording rule must produce series. A panel that
goes empty fails the test and names itself.

One stack per test session (about 10 s to start and drive). ``prometheus`` comes from Debian's package
(``make test`` installs it); outside CI a machine without it skips this module, in CI it fails.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from promstack import NAMESPACE, PromStack

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import render_dashboards  # noqa: E402

DASHBOARDS = sorted((ROOT / "deploy" / "grafana").glob("*.json"))
RULES = ROOT / "deploy" / "prometheus" / "tandem-rules.yaml"
# Grafana's $__rate_interval at a 1 s scrape interval is 4 s; one more scrape of slack.
RATE_INTERVAL = "5s"
ALL = ".*"  # what a variable set to All becomes in a regex matcher

pytestmark = pytest.mark.xdist_group("prometheus")


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PromStack]:
    if shutil.which("prometheus") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("prometheus not installed: make test installs it (apt-get install prometheus)")
        pytest.skip("prometheus not installed (make test installs it: apt-get install prometheus)")
    st = PromStack(tmp_path_factory.mktemp("promstack"))
    try:
        st.start()
        st.codes = st.drive()
        wait_for_series(st)
        yield st
    finally:
        st.stop()


def wait_for_series(st: PromStack, limit_s: float = 40) -> None:
    """Until the last requests are scraped, recorded and seen by an autoscaler tick."""
    wanted = ['tandem:prefill_offload_fraction:ratio_rate5m{service="pd"} >= 0',
              'tandem:ttft_slo_attainment:ratio_rate5m{service="chat"} >= 0',
              'tandem_autoscaler_forecast_rps{service="chat"} > 0', 'tandem_autoscaler_forecast_rps{service="pd"} > 0']
    deadline = time.monotonic() + limit_s
    while missing := [q for q in wanted if not st.query(q)]:
        assert time.monotonic() < deadline, f"no series for {missing} after {limit_s} s"
        time.sleep(0.5)
    time.sleep(2)  # two more scrapes and rule evaluations after the last request


def substitute(expr: str, namespace: str = ALL, service: str = ALL, model: str = ALL) -> str:
    """A Grafana query as Grafana sends it: variables replaced (regex-formatted for =~ matchers)."""
    for name, value in (("$__rate_interval", RATE_INTERVAL), ("$namespace", namespace), ("$service", service),
                        ("$model", model), ("$ttft_slo", "5.0")):
        expr = expr.replace(name, value)
    assert "$" not in expr, expr
    return expr


def has_data(st: PromStack, expr: str) -> bool:
    """Whether the query draws anything over the stack's lifetime: a series with a number (not NaN)."""
    result = st.query_range(expr, st.started_at, time.time())
    return any(not math.isnan(float(v)) for series in result for _, v in series["values"])


def panels() -> list[tuple[str, str, str, str]]:
    """(dashboard file, panel title, refId, expr) of every panel target."""
    return [(path.name, p["title"], t["refId"], t["expr"])
            for path in DASHBOARDS for p in json.loads(path.read_text())["panels"] for t in p["targets"]]


def test_targets_are_up_and_labelled_as_the_chart_labels_them(stack: PromStack) -> None:
    up = {r["metric"]["pod"]: r for r in stack.query("up")}
    assert set(up) == {"chat-unified-0", "chat-unified-1", "pd-prefill-0", "pd-decode-0", "pd-remote-prefill-0",
                       "chat-gateway-0", "chat-gateway-1", "pd-gateway-0", "tandem-autoscaler-0"}
    assert all(r["value"][1] == "1" for r in up.values())
    assert up["pd-decode-0"]["metric"] | {"role": "decode", "service": "pd", "component": "decode"} \
        == up["pd-decode-0"]["metric"]
    # Per-service gateways carry their LLMService (their pods' serving.tandem.dev/service label).
    requests = stack.query("sum by (namespace, service) (tandem_requests_total)")
    assert {(r["metric"]["namespace"], r["metric"]["service"]) for r in requests} == {(NAMESPACE, "chat"),
                                                                                     (NAMESPACE, "pd")}
    # The autoscaler's series keep the LLMService's namespace and service (honorLabels), not its own.
    ticks = stack.query("tandem_autoscaler_ticks_total")
    assert {(r["metric"]["namespace"], r["metric"]["service"]) for r in ticks} == {(NAMESPACE, "chat"),
                                                                                  (NAMESPACE, "pd")}


def test_every_variable_lists_the_stacks_namespace_services_and_models(stack: PromStack) -> None:
    for path in DASHBOARDS:
        variables = {v["name"]: v for v in json.loads(path.read_text())["templating"]["list"]}
        for name, expected in (("namespace", {NAMESPACE}), ("service", {"chat", "pd"}), ("model", {"chat", "pd"})):
            query = substitute(variables[name]["query"])
            series, label = query.removeprefix("label_values(").removesuffix(")").rsplit(",", 1)
            assert set(stack.label_values(label.strip(), series)) == expected, (path.name, name, query)


def test_every_panel_query_returns_data(stack: PromStack) -> None:
    empty = [f"{board} {title!r} {ref}: {expr}" for board, title, ref, expr in panels()
             if not has_data(stack, substitute(expr))]
    assert empty == []


def test_filters_select_a_service(stack: PromStack) -> None:
    """Variables set to one service show that service only: the offload panels are pd's alone, and the
    chat service's 2 engines read 2 behind its 2 gateway replicas (the largest count, not the sum)."""
    by_title = {(board, title): expr for board, title, _, expr in panels()}
    offload = by_title[("autoscaler.json", "Remote prefill link KV traffic")]
    assert has_data(stack, substitute(offload, NAMESPACE, "pd", "pd"))
    assert not has_data(stack, substitute(offload, NAMESPACE, "chat", "chat"))
    instances = by_title[("gateway.json", "Instances by role and state")]
    healthy = [r for r in stack.query(substitute(instances, NAMESPACE, "chat", "chat"))
               if r["metric"]["state"] == "healthy"]
    assert [(r["metric"]["role"], r["value"][1]) for r in healthy] == [("unified", "2")]
    assert not has_data(stack, substitute(instances, "elsewhere"))


def test_every_recording_rule_produces_series(stack: PromStack) -> None:
    records = [r["record"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "record" in r]
    assert len(records) == 7
    empty = [record for record in records if not has_data(stack, record)]
    assert empty == []


def test_the_first_error_and_retry_are_counted(stack: PromStack) -> None:
    """One failed request and a handful of retries, each visible to increase() (their series existed at 0)."""
    assert stack.codes["failing 502"] == 1 and stack.codes["retried 200"] == 4
    window = f"[{int(time.time() - stack.started_at) + 5}s]"
    failed = stack.query(f'sum(increase(tandem_requests_total{{outcome="upstream_error"}}{window}))')
    retries = stack.query(f"sum(increase(tandem_retries_total{window}))")
    errors = stack.query(f'sum(increase(tandem_upstream_errors_total{{kind="status"}}{window}))')
    assert float(failed[0]["value"][1]) >= 0.9  # increase() extrapolates a little either way
    assert float(retries[0]["value"][1]) >= 0.9
    assert float(errors[0]["value"][1]) >= 0.9


def test_the_check_fails_on_an_empty_panel(stack: PromStack) -> None:
    expr = next(p[3] for p in panels() if p[1] == "Requests per second by outcome")
    assert has_data(stack, substitute(expr))
    assert not has_data(stack, substitute(expr.replace("tandem_requests_total", "tandem_request_total")))
    assert not has_data(stack, substitute(expr, service="no-such-service"))


def test_dashboards_render_to_png_from_the_stack(stack: PromStack, tmp_path: Path) -> None:
    """tools/render_dashboards.py draws every panel with data. With TANDEM_RENDER_DASHBOARDS=docs/images
    this is how the PNGs of docs/metrics.md are made."""
    out = Path(os.environ.get("TANDEM_RENDER_DASHBOARDS") or tmp_path)
    drawn = render_dashboards.render_all(stack.prometheus, stack.started_at, time.time(), out)
    assert [d.path.name for d in drawn] == [f"dashboard-{p.stem}.png" for p in DASHBOARDS]
    assert [(d.path.name, d.empty) for d in drawn if d.empty] == []
    assert all(d.path.stat().st_size > 20_000 for d in drawn)
