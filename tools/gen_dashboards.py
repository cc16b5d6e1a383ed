"""Generate the Grafana dashboards in deploy/grafana/ (run ``make generate``; a test checks they are current).

The panels are written here as (title, PromQL, legend) rows rather than as hand-edited JSON so every
dashboard shares one layout, one datasource variable and one set of units, and a reviewer reads the
queries instead of Grafana's boilerplate. The JSON is built by Grafana's Foundation SDK (typed
builders of Grafana's own schema, pinned in pyproject.toml so the output is stable). Every metric a
query names must exist in the real /metrics output of the gateway, the engines (vLLM and SGLang
names) or the autoscaler, or be a recording rule in deploy/prometheus/: tests/router/test_observability.py
checks that; tests/e2e/test_prometheus_tier.py checks that every panel draws data from a real Prometheus.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from generated import write_or_check
from grafana_foundation_sdk.builders import barchart, prometheus, table, timeseries
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders.common import VizLegendOptions
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models.common import LegendDisplayMode, LegendPlacement
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "deploy" / "grafana"
RATE = "$__rate_interval"
DS = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
# The gateway's TTFT histogram boundaries (router/metrics.py LATENCY_BUCKETS) that make sensible SLOs:
# attainment is read off the bucket whose upper bound equals the SLO.
SLO_BUCKETS = ("1.0", "2.0", "3.0", "5.0", "7.5", "10.0", "20.0")
# What every gateway replica exports alike (the instances it sees): one value per service, the largest
# over its replicas, never their sum (2 engines behind 2 gateways are 2 engines, not 4).
PER_SERVICE = "max by (namespace, service, {})"


@dataclass
class Panel:
    title: str
    targets: list[tuple[str, str]]  # (PromQL, legend)
    unit: str = "short"
    kind: str = "timeseries"
    description: str = ""
    width: int = 12


# --- selectors filtered by the dashboard variables ---------------------------------------------------
# Every series a panel reads is narrowed by the dashboard's namespace and service variables, and by
# its model variable where the series names a model (the gateway's and autoscaler's request series do
# not: a service serves one model). "All" is the regex .*, which also matches a missing label.
SCOPE = {"namespace": "$namespace", "service": "$service"}
# The label that carries the model, per family of series.
MODEL_LABEL = {"vllm:": "model_name", "sglang:": "model_name", "tandem_instances": "model",
               "tandem_prefill_route_total": "model", "tandem_offload_": "model",
               "tandem:prefill_offload_fraction": "model"}


def model_label(metric: str) -> str | None:
    return next((label for prefix, label in MODEL_LABEL.items() if metric.startswith(prefix)), None)


def m(metric: str, **matchers: str) -> str:
    """``metric{...}``: the variables' matchers (regex, for multi-value and All), then ``matchers``
    (exact, e.g. ``le="5.0"``; a value starting with ``~`` is a regex)."""
    parts = [f'{k}=~"{v}"' for k, v in SCOPE.items()]
    if (label := model_label(metric)) is not None:
        parts.append(f'{label}=~"$model"')
    for key, value in matchers.items():
        parts.append(f'{key}=~"{value[1:]}"' if value.startswith("~") else f'{key}="{value}"')
    return f"{metric}{{{', '.join(parts)}}}"


def recorded(ratio: str) -> str:
    """A recorded ratio without its NaN series (0/0: a service without such requests in the window),
    which would make the average over services NaN."""
    return f"({m(ratio)} >= 0)"


def rate(metric: str, **matchers: str) -> str:
    return f"rate({m(metric, **matchers)}[{RATE}])"


def quantiles(metric: str, by: str = "", qs: tuple[float, ...] = (0.5, 0.9, 0.99)) -> list[tuple[str, str]]:
    group = f"le, {by}" if by else "le"
    prefix = f"{{{{{by}}}}} " if by else ""
    return [(f"histogram_quantile({q}, sum by ({group}) ({rate(metric + '_bucket')}))", f"{prefix}p{q * 100:g}")
            for q in qs]


def attainment(window: str) -> str:
    return (f'sum(rate({m("tandem_time_to_first_token_seconds_bucket", le="$ttft_slo")}[{window}]))'
            f' / sum(rate({m("tandem_time_to_first_token_seconds_count")}[{window}]))')


def both(vllm: str, sglang: str, by: str, qs: tuple[float, ...]) -> list[tuple[str, str]]:
    """Quantiles of one histogram in both engine dialects."""
    return [*[(q, "vLLM " + legend) for q, legend in quantiles(vllm, by, qs)],
            *[(q, "SGLang " + legend) for q, legend in quantiles(sglang, by, qs)]]


GATEWAY = [
    Panel("Requests per second by outcome", [(f"sum by (outcome) ({rate('tandem_requests_total')})",
                                              "{{outcome}}")], "reqps"),
    Panel("TTFT SLO attainment (TTFT <= $ttft_slo s)",
          [(attainment(RATE), "attainment"),
           (f"avg({recorded('tandem:ttft_slo_attainment:ratio_rate5m')})", "5m (recorded, 5 s SLO)")],
          "percentunit", description="Share of requests whose first token came within the SLO, from the gateway's "
                                     "TTFT histogram (queueing in the gateway included)."),
    Panel("Time to first token (client view)", quantiles("tandem_time_to_first_token_seconds"), "s"),
    Panel("End-to-end latency", quantiles("tandem_request_duration_seconds"), "s"),
    Panel("Routing decisions by reason",
          [(f"sum by (reason) ({rate('tandem_routing_choices_total')})", "{{reason}}"),
           (f"sum({rate('tandem_migrations_total')})", "migration")], "ops",
          description="affinity: DualMap kept the cache-affine candidate; slo_switch: it switched to the "
                      "less-loaded one to hold the SLO; migration: queued requests moved off a hot instance."),
    Panel("Prefix-cache hit ratio (engines)",
          [(f"sum({rate('vllm:prefix_cache_hits_total')}) / sum({rate('vllm:prefix_cache_queries_total')})",
            "vLLM (tokens)"), (f"avg({m('sglang:cache_hit_rate')})", "SGLang"),
           (f"avg({recorded('tandem:prefix_cache_hit_ratio:rate5m')})", "5m (recorded)")], "percentunit"),
    Panel("Queued in the gateway per instance", [(f"sum by (instance) ({m('tandem_queue_length')})", "{{instance}}")],
          description="Each gateway replica holds its own queue: the sum over replicas."),
    Panel("In flight per instance", [(f"sum by (instance) ({m('tandem_inflight_requests')})", "{{instance}}")],
          description="Requests each gateway replica sent to the instance, added up over replicas."),
    Panel("Gateway queue wait p90 per instance",
          quantiles("tandem_queue_wait_seconds", "instance", (0.9,)), "s"),
    Panel("Instances by role and state",
          [(f"sum by (role, state) ({PER_SERVICE.format('model, role, state')} ({m('tandem_instances')}))",
            "{{role}} {{state}}")],
          description="Every gateway replica sees the same instances: the largest count over a service's "
                      "gateways, added up over services."),
    Panel("Retries and upstream errors",
          [(f"sum by (reason) ({rate('tandem_retries_total')})", "retry {{reason}}"),
           (f"sum by (kind) ({rate('tandem_upstream_errors_total')})", "error {{kind}}"),
           (f"sum by (reason) ({rate('tandem_rejected_requests_total')})", "rejected {{reason}}")], "ops"),
    Panel("Open circuit breakers", [(f"max by (instance) ({m('tandem_circuit_open')})", "{{instance}}")],
          description="1 while any gateway replica's breaker for the instance is open."),
    Panel("Shared state backend", [(f"min by (backend) ({m('tandem_state_backend_up')})", "{{backend}} up"),
                                   (f"sum by (backend) ({rate('tandem_state_backend_errors_total')})",
                                    "{{backend}} sync errors/s")]),
    Panel("Gateway event loop lag (add workers when it stays up)",
          quantiles("tandem_event_loop_lag_seconds", qs=(0.5, 0.99)), "s"),
    Panel("Engine /metrics scrapes by the gateway",
          [(f"sum by (instance) ({rate('tandem_scrape_errors_total')}) / "
            f"sum by (instance) ({rate('tandem_scrapes_total')})", "failed share {{instance}}"),
           *quantiles("tandem_scrape_duration_seconds", qs=(0.99,))], "short",
          description="The share of the gateways' scrapes of each engine that failed (the "
                      "TandemGatewayEngineScrapeFailing alert fires above one half), and the scrape time."),
]

ENGINES = [
    Panel("Running requests per role", [(f"sum by (role) ({m('vllm:num_requests_running')})", "vLLM {{role}}"),
                                        (f"sum by (role) ({m('sglang:num_running_reqs')})", "SGLang {{role}}")]),
    Panel("Waiting requests per role", [(f"sum by (role) ({m('vllm:num_requests_waiting')})", "vLLM {{role}}"),
                                        (f"sum by (role) ({m('sglang:num_queue_reqs')})", "SGLang {{role}}")]),
    Panel("KV-cache usage per role", [(f"avg by (role) ({m('vllm:kv_cache_usage_perc')})", "vLLM {{role}}"),
                                      (f"max by (role) ({m('vllm:kv_cache_usage_perc')})", "vLLM {{role}} max"),
                                      (f"avg by (role) ({m('sglang:token_usage')})", "SGLang {{role}}")],
          "percentunit"),
    Panel("Prefix-cache hit rate per role",
          [(f"sum by (role) ({rate('vllm:prefix_cache_hits_total')}) / "
            f"sum by (role) ({rate('vllm:prefix_cache_queries_total')})", "vLLM {{role}}"),
           (f"avg by (role) ({m('sglang:cache_hit_rate')})", "SGLang {{role}}")], "percentunit"),
    Panel("TTFT per role (engine view)",
          both("vllm:time_to_first_token_seconds", "sglang:time_to_first_token_seconds", "role", (0.5, 0.99)), "s"),
    Panel("Inter-token latency per role",
          both("vllm:inter_token_latency_seconds", "sglang:inter_token_latency_seconds", "role", (0.5, 0.99)), "s"),
    Panel("Tokens per second per role",
          [(f"sum by (role) ({rate('vllm:prompt_tokens_total')})", "vLLM prompt {{role}}"),
           (f"sum by (role) ({rate('vllm:generation_tokens_total')})", "vLLM generated {{role}}"),
           (f"sum by (role) ({rate('sglang:prompt_tokens_total')})", "SGLang prompt {{role}}"),
           (f"sum by (role) ({rate('sglang:generation_tokens_total')})", "SGLang generated {{role}}")]),
    Panel("Engine queue time p90 per role",
          both("vllm:request_queue_time_seconds", "sglang:queue_time_seconds", "role", (0.9,)), "s"),
    Panel("End-to-end latency p90 per role (engine view)",
          both("vllm:e2e_request_latency_seconds", "sglang:e2e_request_latency_seconds", "role", (0.9,)), "s"),
    Panel("vLLM engines and KV blocks",
          [(f"count by (role) ({m('vllm:cache_config_info')})", "engines {{role}}"),
           (f"sum by (model_name, block_size, num_gpu_blocks) ({m('vllm:cache_config_info')})",
            "{{model_name}} block {{block_size}} x {{num_gpu_blocks}}")], kind="table"),
]

AUTOSCALER = [
    Panel("Desired vs ready replicas per role",
          [(f"max by (service, role) ({m('tandem_autoscaler_desired_replicas')})", "desired {{service}} {{role}}"),
           (f"max by (service, role) ({m('tandem_autoscaler_target_replicas')})", "target {{service}} {{role}}"),
           (f"sum by (role) ({PER_SERVICE.format('model, role')} ({m('tandem_instances', state='healthy')}))",
            "ready (gateway view) {{role}}"),
           (f"max by (service, role) ({m('tandem_autoscaler_draining_instances')})",
            "draining {{service}} {{role}}")],
          width=24, description="desired: replicas set by the last decision (target plus instances still "
                                "draining); target: where the role settles; ready: healthy instances the "
                                "gateways route to."),
    Panel("Scaling actions per role",
          [(f"sum by (service, role, direction) (increase({m('tandem_autoscaler_scaling_actions_total')}[{RATE}]))",
            "{{service}} {{role}} {{direction}}")], kind="barchart",
          description="The reason of each decision is in the LLMService's status (kubectl get llms -o yaml: "
                      "status.lastScalingDecision) and in its Events."),
    Panel("Capacity model: needed replicas and per-instance goodput",
          [(f"max by (service, role) ({m('tandem_autoscaler_needed_replicas')})", "needed {{service}} {{role}}"),
           (f"max by (service, role) ({m('tandem_autoscaler_goodput_rps')})",
            "goodput rps/instance {{service}} {{role}}")],
          description="needed = R-hat / goodput; above target for long means the pool is capped "
                      "(maxReplicas or the GPU budget): see the TandemAutoscalerAtMax alert."),
    Panel("Arrival rate: forecast vs observed",
          [(f"max by (service) ({m('tandem_autoscaler_forecast_rps')})", "forecast R-hat {{service}}"),
           (f"sum by (service) ({rate('tandem_requests_total')})", "observed (gateways) {{service}}")], "reqps"),
    Panel("Autoscaler ticks and errors",
          [(f"sum by (service) ({rate('tandem_autoscaler_ticks_total')})", "ticks {{service}}"),
           (f"sum by (service, stage) ({rate('tandem_autoscaler_errors_total')})", "errors {{service}} {{stage}}")],
          "ops"),
    Panel("TTFT SLO attainment (recorded, 5 s SLO)",
          [(f"avg({recorded('tandem:ttft_slo_attainment:ratio_rate5m')})", "5m"),
           (f"avg({recorded('tandem:ttft_slo_attainment:ratio_rate1h')})", "1h")], "percentunit"),
    Panel("Prefill offload threshold t",
          [(f"max by (model) ({m('tandem_offload_threshold_tokens')})", "{{model}} max over gateways"),
           (f"min by (model) ({m('tandem_offload_threshold_tokens')})", "{{model}} min over gateways")],
          description="Prompts with more uncached tokens than t are prefilled by the remote pool. Each gateway "
                      "re-solves t from its own traffic, so max and min differ a little; a pinned "
                      "lengthThreshold shows as a flat line."),
    Panel("Fraction of prefills offloaded",
          [(f"sum by (model) ({rate('tandem_prefill_route_total', route='remote')}) / "
            f"sum by (model) ({rate('tandem_prefill_route_total')})", "{{model}}"),
           (f"sum by (model) ({recorded('tandem:prefill_offload_fraction:ratio_rate5m')})",
            "{{model}} 5m (recorded)")],
          "percentunit", description="Disaggregated requests whose prefill went to the remote pool."),
    Panel("Remote prefill link utilisation",
          [(f"sum({m('tandem_offload_link_utilization')})", "all gateways"),
           (f"sum by (model) ({m('tandem_offload_link_utilization')})", "{{model}}")], "percentunit",
          description="Offloaded KV traffic over the link's capacity, summed over the gateways that share it. "
                      "The solver keeps it below its high-water mark (0.85); the TandemOffloadLinkSaturated "
                      "alert fires above 0.9 for 10 minutes."),
    Panel("Remote prefill link KV traffic",
          [(f"sum by (model) ({rate('tandem_offload_link_bytes_total')})", "{{model}}")], "Bps"),
]

# Each dashboard's variables: where its namespace, service and model values come from (the series
# of the component it is about).
GATEWAY_VARS = ("tandem_requests_total", "tandem_instances", "model")
ENGINE_VARS = ('{__name__=~"vllm:num_requests_running|sglang:num_running_reqs"}',
               '{__name__=~"vllm:num_requests_running|sglang:num_running_reqs"}', "model_name")
AUTOSCALER_VARS = ("tandem_autoscaler_ticks_total", "tandem_instances", "model")

# The question each dashboard answers (its description in Grafana, and docs/metrics.md).
QUESTIONS = {
    "gateway": "Are requests served within the SLO, and if not, is it the gateway or the engines? Request "
               "rate by outcome, TTFT attainment and latency as clients see them, how requests were routed "
               "(affinity or an SLO switch) and whether the prefix caches hit, what waits in the gateway per "
               "instance, instances by state, retries, errors and open breakers, the shared state and the "
               "gateway's own event-loop lag and engine scrapes.",
    "engines": "How loaded is each engine pool, in either engine's own metrics (vLLM and SGLang side by "
               "side)? Running and waiting requests, KV-cache use, prefix-cache hits, TTFT, inter-token "
               "latency, token throughput and queue time per role (unified, prefill, decode, remote prefill).",
    "autoscaler": "Why does each service have the replicas it has? Desired, target, draining and ready "
                  "replicas per role, the scaling actions, the capacity model's needed replicas and per-instance "
                  "goodput, the forecast against the observed arrival rate, the ticks and errors; and for "
                  "disaggregated services the prefill offload: threshold, share offloaded, link use and traffic.",
}

DASHBOARDS = {
    "gateway": ("Tandem / Gateway", "tandem-gateway", GATEWAY, GATEWAY_VARS, True),
    "engines": ("Tandem / Engines", "tandem-engines", ENGINES, ENGINE_VARS, False),
    "autoscaler": ("Tandem / Autoscaler", "tandem-autoscaler", AUTOSCALER, AUTOSCALER_VARS, False),
}


def narrowed(series: str, matchers: str) -> str:
    """``series`` (a name or a ``{...}`` selector) with more label matchers."""
    return f"{series[:-1]}, {matchers}}}" if series.endswith("}") else f"{series}{{{matchers}}}"


def variable_queries(sources: tuple[str, str, str]) -> dict[str, str]:
    """label_values() of each variable, each narrowed by the ones before it."""
    scope, models, model_label = sources
    in_namespace = 'namespace=~"$namespace"'
    in_service = f'{in_namespace}, service=~"$service"'
    return {"namespace": f"label_values({scope}, namespace)",
            "service": f"label_values({narrowed(scope, in_namespace)}, service)",
            "model": f"label_values({narrowed(models, in_service)}, {model_label})"}


# --- the dashboards, built with Grafana's Foundation SDK ---------------------------------------------

VARIABLE_LABELS = {"namespace": "Namespace", "service": "Service", "model": "Model"}


def _panel(p: Panel, pid: int) -> Builder[dm.Panel]:
    kind = {"timeseries": timeseries.Panel, "table": table.Panel, "barchart": barchart.Panel}[p.kind]
    out = kind().id(pid).title(p.title).unit(p.unit).datasource(DS).height(8).span(p.width)
    if p.description:
        out = out.description(p.description)
    if p.kind != "table":
        out = out.legend(VizLegendOptions().show_legend(True).display_mode(LegendDisplayMode.LIST)
                         .placement(LegendPlacement.BOTTOM))
    for i, (expr, legend) in enumerate(p.targets):
        query = prometheus.Dataquery().ref_id(chr(ord("A") + i)).datasource(DS).expr(expr).legend_format(legend)
        out = out.with_target(query.instant().format(PromQueryFormat.TABLE) if p.kind == "table" else query)
    return out


def dashboard(title: str, uid: str, panels: list[Panel], sources: tuple[str, str, str], slo: bool,
              question: str) -> dm.Dashboard:
    board = (db.Dashboard(title).uid(uid).description(question).tags(["tandem"]).editable().refresh("30s")
             .time("now-1h", "now").timezone("browser")
             .with_variable(db.DatasourceVariable("datasource").label("Prometheus").type("prometheus")))
    for name, query in variable_queries(sources).items():
        board = board.with_variable(
            db.QueryVariable(name).label(VARIABLE_LABELS[name]).datasource(DS).query(query)
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(dm.VariableSort.ALPHABETICAL_ASC)
            .multi(True).include_all(True).all_value(".*")
            .current(dm.VariableOption(text="All", value="$__all", selected=True)))
    if slo:
        board = board.with_variable(db.CustomVariable("ttft_slo").label("TTFT SLO (s)").values(",".join(SLO_BUCKETS))
                                    .current(dm.VariableOption(text="5.0", value="5.0", selected=True)))
    for pid, p in enumerate(panels, start=1):
        board = board.with_panel(_panel(p, pid))
    return board.build()


def render() -> dict[Path, str]:
    """Every dashboard file and its exact content."""
    return {OUT / f"{name}.json": json.dumps(dashboard(*spec, QUESTIONS[name]), cls=JSONEncoder, indent=2,
                                             sort_keys=True) + "\n"
            for name, spec in DASHBOARDS.items()}


def main(argv: list[str]) -> int:
    return write_or_check(render(), argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
