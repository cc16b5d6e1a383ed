"""The gateway's own Prometheus metrics (``tandem_`` prefix, seconds, counters end in ``_total``).

One registry per gateway instance (no module-level singletons), so several gateways can live in one
process (tests, the demo) without their series mixing.

With ``--workers N`` (router/workers.py) each worker process writes its series to files in a shared
directory (prometheus_client's multiprocess mode, switched on by the supervisor's environment) and
any worker answers ``/metrics`` for all: counters and histograms add up; each gauge says how its
workers' values combine (``multiprocess_mode``): queue lengths, in-flight requests and link use add
up, instance counts, open circuits and the offload threshold are the same engines seen by every
worker (the largest), and the state backend is up only if it is up for every worker.

A labelled series exists only once its labels are used, and one that is born with the value 1 is
invisible to ``rate()`` and ``increase()`` (there is no earlier sample to rise from): the first retry,
upstream error or failed request would read 0 on every dashboard. So the label values known in
advance are created at 0 here: the outcomes, retry and rejection reasons at start, a policy's decision
reasons when its scheduler is made, an instance's error kinds when it joins, a model's prefill routes
when its first disaggregated instance joins.
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
                   160.0)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)

# Every value the gateway gives these labels (router/app.py, router/pdgateway.py, router/proxy.py), and
# the endpoint picker (router/epp.py: a failover the data plane made, a subset with no ready endpoint).
OUTCOMES = ("ok", "client_error", "upstream_error", "timeout", "no_instance", "queue_full", "queue_timeout", "busy",
            "refused", "client_gone")
UPSTREAM_ERROR_KINDS = ("connect", "busy", "status", "empty", "timeout", "protocol", "failover")
RETRY_REASONS = ("connect", "status", "empty", "timeout", "protocol", "pd", "failover")  # a busy gateway does not retry
REJECT_REASONS = ("draining", "overloaded", "auth", "too_large", "body_timeout", "invalid", "pd_incomplete",
                  "unknown_model", "rate_limit", "subset")
PREFILL_ROUTES = ("local", "remote")
# Decisions that are not a policy's: nothing was routed yet, or a disaggregated request.
NO_DECISION, PD_DECISION = "none", "pd"


CACHE_RESET_REASONS = ("restart", "counters", "cleared", "events_restart")  # tandem.router.cachereset.ResetReason
KV_GAP_OUTCOMES = ("replayed", "cleared")


class GatewayMetrics:
    def __init__(self, multiprocess_dir: Path | None = None) -> None:
        self.multiprocess_dir = multiprocess_dir
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("tandem_requests", "Requests finished, by policy, routing decision and outcome.",
                                ["policy", "decision", "outcome"], registry=r)
        self.ttft = Histogram("tandem_time_to_first_token_seconds", "TTFT as seen by the client (queueing included).",
                              ["policy"], buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("tandem_request_duration_seconds", "End-to-end request latency as seen by the client.",
                             ["policy"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_length = Gauge("tandem_queue_length", "Requests waiting in the gateway for an instance.",
                                  ["instance"], multiprocess_mode="livesum", registry=r)
        self.queue_wait = Histogram("tandem_queue_wait_seconds", "Time a request waited in the gateway's queue.",
                                    ["instance"], buckets=LATENCY_BUCKETS, registry=r)
        self.inflight = Gauge("tandem_inflight_requests", "Requests sent to an instance and not finished.",
                              ["instance"], multiprocess_mode="livesum", registry=r)
        self.migrations = Counter("tandem_migrations", "Queued requests moved off a hot instance.", registry=r)
        self.choices = Counter("tandem_routing_choices",
                               "Routing decisions by reason (affinity, slo_switch, least_loaded, ...).",
                               ["policy", "reason"], registry=r)
        self.retries = Counter("tandem_retries", "Upstream attempts retried before the first byte.", ["reason"],
                               registry=r)
        self.upstream_errors = Counter("tandem_upstream_errors", "Failed upstream attempts by instance and kind.",
                                       ["instance", "kind"], registry=r)
        self.breaker_open = Gauge("tandem_circuit_open", "1 while an instance's circuit breaker is open.",
                                  ["instance"], multiprocess_mode="livemax", registry=r)
        self.scrapes = Counter("tandem_scrapes", "Engine /metrics scrapes started (each ends in a sample or in "
                               "tandem_scrape_errors_total): errors over scrapes is the failing share, whatever "
                               "the scrape interval.", ["instance"], registry=r)
        self.scrape_errors = Counter("tandem_scrape_errors", "Failed engine /metrics scrapes.", ["instance"],
                                     registry=r)
        self.loop_lag = Histogram("tandem_event_loop_lag_seconds", "How late a timer of the gateway's event loop "
                                  "fires (sampled every 50 ms): what every request in the loop waits on top of "
                                  "its own work; sustained lag means the process needs more workers.",
                                  buckets=OVERHEAD_BUCKETS, registry=r)
        self.prefill_scale = Gauge("tandem_instance_prefill_cost_scale", "An instance's measured prefill time "
                                   "over what the --profile predicts for the same requests (1: as profiled; "
                                   "every TTFT estimate of the instance is multiplied by it).", ["instance"],
                                   multiprocess_mode="livemax", registry=r)
        self.scrape_duration = Histogram("tandem_scrape_duration_seconds", "Engine /metrics scrape time.",
                                         buckets=OVERHEAD_BUCKETS, registry=r)
        self.instances = Gauge("tandem_instances", "Known instances by pool and state.", ["model", "role", "state"],
                               multiprocess_mode="livemax", registry=r)
        self.state_backend_up = Gauge("tandem_state_backend_up",
                                      "1 when the shared state backend (Redis) is reachable, 0 when degraded to "
                                      "local state.", ["backend"], multiprocess_mode="livemin", registry=r)
        self.state_backend_errors = Counter("tandem_state_backend_errors", "Failed shared-state syncs.",
                                            ["backend"], registry=r)
        # The exact cache view (engine KV-cache events, router/kvsubscriber.py) and cache resets.
        self.kv_batches = Counter("tandem_kv_event_batches", "Engine KV-cache event batches applied to the exact "
                                  "cache view.", ["instance"], registry=r)
        self.kv_gaps = Counter("tandem_kv_event_gaps", "Missed event batches (sequence gaps) by outcome: replayed "
                               "from the engine's replay socket, or the view cleared.", ["instance", "outcome"],
                               registry=r)
        self.kv_index_blocks = Gauge("tandem_kv_index_blocks", "Engine KV blocks in an instance's exact cache view.",
                                     ["instance"], multiprocess_mode="livemax", registry=r)
        self.cache_resets = Counter("tandem_engine_cache_resets", "Engine cache resets and restarts seen (this "
                                    "process's own detections and its peers'): the instance's cache views were "
                                    "cleared.", ["instance", "reason"], registry=r)
        self.rejected = Counter("tandem_rejected_requests", "Requests refused before routing, by reason.",
                                ["reason"], registry=r)
        # Disaggregated serving with a remote prefill pool (router/pdgateway.py, router/routing/offload.py).
        self.prefill_routes = Counter("tandem_prefill_route", "Disaggregated requests by where their prefill was "
                                      "sent: local or remote (the offload threshold's decision).",
                                      ["model", "route"], registry=r)
        self.offload_threshold = Gauge("tandem_offload_threshold_tokens", "Current offload threshold t: prompts "
                                       "with more uncached tokens are prefilled by the remote pool.", ["model"],
                                       multiprocess_mode="livemax", registry=r)
        self.link_bytes = Counter("tandem_offload_link_bytes", "KV-cache bytes of offloaded requests sent over "
                                  "the remote prefill link (prompt tokens x KV bytes per token).", ["model"],
                                  registry=r)
        self.link_utilization = Gauge("tandem_offload_link_utilization", "Share (0-1) of the remote prefill "
                                      "link's capacity this gateway's offloads used over the controller's "
                                      "measurement window; sum over gateways for the link's total.", ["model"],
                                      multiprocess_mode="livesum", registry=r)
        for reason in RETRY_REASONS:
            self.retries.labels(reason)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)

    def policy_known(self, policy: str, reasons: tuple[str, ...]) -> None:
        """Create a routing policy's series: its decision reasons and each request outcome under them."""
        self.ttft.labels(policy)
        self.e2e.labels(policy)
        for reason in reasons:
            self.choices.labels(policy, reason)
        for decision in (*reasons, NO_DECISION, PD_DECISION):
            for outcome in OUTCOMES:
                self.requests.labels(policy, decision, outcome)

    def instance_known(self, instance: str) -> None:
        """Create an engine instance's error, queue and cache-reset series (when it joins)."""
        for reason in CACHE_RESET_REASONS:
            self.cache_resets.labels(instance, reason)
        self.scrapes.labels(instance)
        self.scrape_errors.labels(instance)
        self.prefill_scale.labels(instance).set(1.0)
        self.queue_wait.labels(instance)
        for kind in UPSTREAM_ERROR_KINDS:
            self.upstream_errors.labels(instance, kind)

    def kv_events_known(self, instance: str) -> None:
        """Create the event-stream series of an instance whose KV-cache events the gateway follows."""
        self.kv_batches.labels(instance)
        for outcome in KV_GAP_OUTCOMES:
            self.kv_gaps.labels(instance, outcome)

    def pd_model_known(self, model: str, remote: bool) -> None:
        """Create a disaggregated model's prefill-route series (when one of its instances joins), and
        its link traffic counter once it has a remote prefill pool."""
        for route in PREFILL_ROUTES:
            self.prefill_routes.labels(model, route)
        if remote:
            self.link_bytes.labels(model)

    def backend_known(self, backend: str) -> None:
        self.state_backend_errors.labels(backend)

    def exposition(self) -> bytes:
        """The text ``/metrics`` answers: this gateway's series, or every worker's combined."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        combined = CollectorRegistry()
        MultiProcessCollector(combined, path=str(self.multiprocess_dir))
        return generate_latest(combined)
