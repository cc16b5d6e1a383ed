"""Dashboards and Prometheus rules name only metrics that really exist.

The reference is real /metrics output, not a list: a simulated vLLM engine, a simulated SGLang engine
and a gateway in front of them run in-process on ephemeral 127.0.0.1 ports, serve a few requests
(streaming and not), and their exposition text is parsed; so is that of a second gateway serving
disaggregated (local prefill, remote prefill pool, decode) with requests kept local and offloaded,
and the exposition of the autoscaler's metrics registry. Recording rules defined in deploy/prometheus/
and Prometheus' own ``up`` series are the only other names allowed.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from gatewayutil import completion_body, gateway_app, sim_app
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tandem.serve import serving

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import gen_dashboards  # noqa: E402
from promql_names import metric_names, selectors  # noqa: E402

RULES = ROOT / "deploy" / "prometheus" / "tandem-rules.yaml"
DASHBOARDS = sorted((ROOT / "deploy" / "grafana").glob("*.json"))
# Series Prometheus itself attaches to every target (not exported by any process).
PROMETHEUS_BUILTINS = {"up"}
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "summary": ("", "_count", "_sum"),
            "gaugehistogram": ("_bucket", "_gcount", "_gsum")}


def exported_names(exposition: str) -> set[str]:
    """Every series name an exposition can produce (families without samples yet included by type)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(s.name for s in family.samples)
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
    return names


async def _collect() -> dict[str, str]:
    async with serving(sim_app(port=0)) as vllm, serving(sim_app(port=0, metrics="sglang")) as sglang, \
            serving(gateway_app([vllm, sglang])) as gw, \
            serving(sim_app(role="prefill")) as p0, serving(sim_app(role="prefill")) as r0, \
            serving(sim_app(role="decode")) as d0, \
            serving(gateway_app([], prefill_instances=[p0], remote_prefill_instances=[r0], decode_instances=[d0],
                              offload_threshold=2048, trust_prompt_hints=True)) as pd_gw, \
            httpx.AsyncClient(timeout=20) as client:
        for i in range(6):
            body = completion_body(f"request {i} " + "shared prefix " * 40, stream=bool(i % 2))
            resp = await client.post(gw + "/v1/completions", json=body)
            assert resp.status_code == 200, resp.text
        for tokens in (1000, 6000):  # one prefill kept local, one offloaded to the remote pool
            body = {**completion_body(max_tokens=2), "x_tandem": {"hash_ids": [tokens], "prompt_tokens": tokens,
                                                                   "block_size": 512}}
            resp = await client.post(pd_gw + "/v1/completions", json=body)
            assert resp.status_code == 200, resp.text
        await asyncio.sleep(0.5)  # a scrape and a rebalance pass of the gateway
        return {name: (await client.get(url + "/metrics")).text
                for name, url in (("vllm", vllm), ("sglang", sglang), ("gateway", gw), ("gateway_pd", pd_gw))}


def autoscaler_exposition() -> str:
    from tandem.autoscaler.actuator import AutoscalerMetrics

    return generate_latest(AutoscalerMetrics(CollectorRegistry()).registry).decode()


@pytest.fixture(scope="module")
def expositions() -> dict[str, str]:
    return {**asyncio.run(_collect()), "autoscaler": autoscaler_exposition()}


@pytest.fixture(scope="module")
def exported(expositions: dict[str, str]) -> dict[str, set[str]]:
    return {name: exported_names(text) for name, text in expositions.items()}


def recorded_names() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["record"] for g in groups for r in g["rules"] if "record" in r}


def rule_expressions() -> dict[str, str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r.get("record") or r["alert"]: r["expr"] for g in groups for r in g["rules"]}


def dashboard_expressions(path: Path) -> dict[str, str]:
    """Every PromQL text of a dashboard: panel targets and variable queries, keyed for error messages."""
    board = json.loads(path.read_text())
    out = {f"{path.name} panel {p['title']!r} {t['refId']}": t["expr"]
           for p in board["panels"] for t in p.get("targets", [])}
    for var in board.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"] if isinstance(var["query"], str) else var["query"].get("query", "")
            out[f"{path.name} variable {var['name']}"] = query
    return out


def unknown(expressions: dict[str, str], known: set[str]) -> dict[str, set[str]]:
    """Per expression, the names that no source exports."""
    out = {}
    for where, expr in expressions.items():
        missing = {n for n in metric_names(expr) if n not in known}
        if missing:
            out[where] = missing
    return out


def all_expressions() -> dict[str, str]:
    exprs = {f"rules {k}": v for k, v in rule_expressions().items()}
    for path in DASHBOARDS:
        exprs.update(dashboard_expressions(path))
    return exprs


# --- the PromQL name extractor itself -------------------------------------------------------------


@pytest.mark.parametrize(("expr", "names"), [
    ("histogram_quantile(0.99, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket[5m])))",
     {"vllm:time_to_first_token_seconds_bucket"}),
    ('sum(rate(a_bucket{le="5.0", job=~"x|y"}[$__rate_interval])) / sum(rate(a_count[1h] offset 5m))',
     {"a_bucket", "a_count"}),
    ("(1 - tandem:ttft:ratio) > 5 * 0.1 and on (service) group_left (role) b unless c",
     {"tandem:ttft:ratio", "b", "c"}),
    ('{__name__="weird:name", x="y"} + max_over_time(d[10m:1m]) + 1e3 + 0x1f + inf', {"weird:name", "d"}),
    ("sum without (instance) (e) or vector(0)", {"e"}),
    ("label_values(tandem_requests_total{policy!=\"\"}, policy)", {"tandem_requests_total"}),
    ("label_values(policy)", set()),
    ("count by (role) (f) # a comment naming not_a_metric", {"f"}),
    ('sum(g{le="$ttft_slo"}) by (le) / ${datasource_total}', {"g"}),
])
def test_metric_names_of_expressions(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


# --- the cross-check ------------------------------------------------------------------------------


def test_sources_export_what_the_engines_and_gateway_are_known_for(exported: dict[str, set[str]]) -> None:
    """The reference sets are real and distinct (guards against checking against an empty scrape)."""
    assert {"vllm:num_requests_running", "vllm:prefix_cache_hits_total",
            "vllm:time_to_first_token_seconds_bucket"} <= exported["vllm"]
    assert {"sglang:num_queue_reqs", "sglang:cache_hit_rate", "sglang:token_usage"} <= exported["sglang"]
    assert {"tandem_requests_total", "tandem_time_to_first_token_seconds_bucket",
            "tandem_routing_choices_total"} <= exported["gateway"]
    offload = {"tandem_offload_threshold_tokens", "tandem_prefill_route_total", "tandem_offload_link_utilization",
               "tandem_offload_link_bytes_total"}
    assert offload <= exported["gateway_pd"]
    assert {"tandem_autoscaler_desired_replicas", "tandem_autoscaler_scaling_actions_total"} <= exported["autoscaler"]
    assert not exported["vllm"] & {n for n in exported["sglang"] if n.startswith("sglang:")}


def test_the_offload_metrics_have_samples_when_offload_is_configured(expositions: dict[str, str]) -> None:
    """Not just declared: the PD gateway's offload series carry values for the requests it routed."""
    samples = {(s.name, s.labels.get("route")): s.value
               for f in text_string_to_metric_families(expositions["gateway_pd"]) for s in f.samples}
    assert samples[("tandem_prefill_route_total", "local")] == samples[("tandem_prefill_route_total", "remote")] == 1
    assert samples[("tandem_offload_threshold_tokens", None)] == 2048
    assert samples[("tandem_offload_link_bytes_total", None)] > 0
    assert 0 < samples[("tandem_offload_link_utilization", None)] < 1
    used = set().union(*(metric_names(e) for e in all_expressions().values()))
    assert {"tandem_offload_threshold_tokens", "tandem_prefill_route_total", "tandem_offload_link_utilization",
            "tandem_offload_link_bytes_total"} <= used


def test_dashboards_and_rules_name_only_exported_metrics(exported: dict[str, set[str]]) -> None:
    known = set().union(*exported.values()) | recorded_names() | PROMETHEUS_BUILTINS
    exprs = all_expressions()
    assert len(exprs) > 50
    assert unknown(exprs, known) == {}


def test_every_metric_source_is_used(exported: dict[str, set[str]]) -> None:
    """The dashboards cover the gateway, both engine flavours and the recording rules."""
    used = set().union(*(metric_names(e) for e in all_expressions().values()))
    for source in ("vllm", "sglang", "gateway", "autoscaler"):
        assert used & exported[source], source
    assert recorded_names() <= used | {"tandem:requests:rate5m"}


def test_the_check_catches_a_made_up_metric(exported: dict[str, set[str]]) -> None:
    known = set().union(*exported.values()) | recorded_names() | PROMETHEUS_BUILTINS
    exprs = dashboard_expressions(ROOT / "deploy" / "grafana" / "gateway.json")
    where = next(iter(exprs))
    exprs[where] = exprs[where].replace("tandem_", "tandem_bogus_", 1)
    assert set(unknown(exprs, known)) == {where}
    # vLLM's older name is not what the simulator (vLLM v1) exports: it must not pass silently.
    assert unknown({"old": "vllm:gpu_cache_usage_perc"}, known) == {"old": {"vllm:gpu_cache_usage_perc"}}


# --- structure ------------------------------------------------------------------------------------


def test_generated_dashboards_are_current() -> None:
    for path, text in gen_dashboards.render().items():
        assert path.exists() and path.read_text() == text, f"{path} is stale: run make generate"
    assert sorted(gen_dashboards.render()) == DASHBOARDS


def test_dashboards_are_grafana_shaped() -> None:
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        assert board["uid"].startswith("tandem-") and board["title"].startswith("Tandem / ")
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids))
        for panel in board["panels"]:
            assert panel["datasource"]["uid"] == "${datasource}"
            assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"])
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24


def test_rules_file_structure() -> None:
    doc = yaml.safe_load(RULES.read_text())
    assert set(doc) == {"groups"}
    seen: set[str] = set()
    alerts = set()
    for group in doc["groups"]:
        assert set(group) <= {"name", "interval", "rules"} and group["rules"], group.get("name")
        for rule in group["rules"]:
            name = rule.get("record") or rule.get("alert")
            assert name and name not in seen, name
            seen.add(name)
            assert rule["expr"].count("(") == rule["expr"].count(")"), name
            if "record" in rule:
                assert set(rule) <= {"record", "expr", "labels"}, name
                assert re.fullmatch(r"[a-z_]+:[a-z_]+:[a-z0-9_]+", name), f"{name}: not level:metric:operations"
            else:
                alerts.add(name)
                assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, name
                assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
                assert rule["annotations"]["summary"], name
                assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s")), name
    assert {"TandemTTFTSLOFastBurn", "TandemTTFTSLOSlowBurn", "TandemScrapeTargetDown", "TandemRedisDown",
            "TandemAutoscalerAtMax"} <= alerts
    assert {"tandem:ttft_slo_attainment:ratio_rate5m", "tandem:prefix_cache_hit_ratio:rate5m"} <= recorded_names()


# --- aggregation of what every gateway replica exports alike ----------------------------------------

# Gauges each gateway (or autoscaler) replica exports with the same value: the instances it sees, its
# breakers' view of them, the offload threshold, the autoscaler's decision. A `sum` (or `count`) over
# replicas multiplies them by the replica count.
PER_REPLICA_GAUGES = ("tandem_instances", "tandem_circuit_open", "tandem_offload_threshold_tokens",
                      "tandem_state_backend_up", "tandem_autoscaler_desired_replicas",
                      "tandem_autoscaler_target_replicas", "tandem_autoscaler_draining_instances",
                      "tandem_autoscaler_goodput_rps", "tandem_autoscaler_needed_replicas",
                      "tandem_autoscaler_forecast_rps")


def summed_over_replicas(expr: str) -> set[str]:
    """The per-replica gauges an expression adds up directly (``sum``/``count`` applied to the series)."""
    return {name for name in PER_REPLICA_GAUGES
            if re.search(rf"\b(?:sum|count)\s*(?:(?:by|without)\s*\([^)]*\)\s*)?\(\s*{re.escape(name)}\b", expr)}


def test_per_replica_gauges_are_never_summed_over_replicas() -> None:
    assert summed_over_replicas("sum by (role) (tandem_instances)") == {"tandem_instances"}
    assert summed_over_replicas("sum by (role) (max by (namespace, service, role) (tandem_instances))") == set()
    offenders = {where: names for where, expr in all_expressions().items() if (names := summed_over_replicas(expr))}
    assert offenders == {}


def test_alerts_do_not_depend_on_kubernetes_only_labels() -> None:
    """(That they fire at any scrape interval is shown by promtool, tests/shared/test_alert_rules.py.)"""
    rules = {r.get("alert"): r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    for name, rule in rules.items():
        if name is None:
            continue
        assert "container" not in rule["expr"], name  # only Kubernetes service discovery adds it
    # A one-minute outage must be able to trip the scrape-down alert.
    assert rules["TandemScrapeTargetDown"]["for"] in {"0s", "30s", "1m"}


# --- dashboard variables ---------------------------------------------------------------------------

MODEL_LABELS = ("model", "model_name")


def series_labels(expositions: dict[str, str]) -> dict[str, set[str]]:
    """Label names of every series, from the real expositions and the recording rules' ``by`` clauses."""
    out: dict[str, set[str]] = {}
    for text in expositions.values():
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out.setdefault(sample.name, set()).update(sample.labels)
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                by = re.search(r"by \(([^)]*)\)", rule["expr"])
                out[rule["record"]] = {label.strip() for label in by.group(1).split(",")} if by else set()
    return out


def test_every_dashboard_has_namespace_service_and_model_variables() -> None:
    for path in DASHBOARDS:
        variables = {v["name"]: v for v in json.loads(path.read_text())["templating"]["list"]}
        for name in ("namespace", "service", "model"):
            var = variables[name]
            assert var["type"] == "query" and var["multi"] and var["includeAll"] and var["allValue"] == ".*", \
                (path.name, name)
        assert '$namespace' in variables["service"]["query"]  # services of the chosen namespaces
        assert '$service' in variables["model"]["query"]


def test_every_panel_query_is_filtered_by_the_variables(expositions: dict[str, str]) -> None:
    labels = series_labels(expositions)
    checked = 0
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                for name, matchers in selectors(target["expr"]):
                    where = f"{path.name} {panel['title']!r}: {name}"
                    assert matchers.get("namespace") == ("=~", "$namespace"), where
                    assert matchers.get("service") == ("=~", "$service"), where
                    for label in set(MODEL_LABELS) & labels.get(name, set()):
                        assert matchers.get(label) == ("=~", "$model"), where
                    checked += 1
    assert checked >= 80


def test_the_filter_check_catches_an_unfiltered_selector() -> None:
    assert selectors('sum(rate(a{namespace=~"$namespace"}[5m])) / sum(b)') == [
        ("a", {"namespace": ("=~", "$namespace")}), ("b", {})]
