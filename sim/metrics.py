"""The simulator's /metrics, named, typed, labelled and bucketed like the real engines.

vLLM v1 (``vllm:`` prefix, labels ``model_name`` and ``engine``) and SGLang (``sglang:`` prefix,
labels ``model_name``, ``engine_type``, ``tp_rank``). Gauges and counters are read from the engine
at scrape time; latency histograms are observed as requests progress. Everything lives in a
per-server registry so several simulated engines can share one process (tests, the demo).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Literal

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tandem.sim.engine import Engine

Flavor = Literal["vllm", "sglang"]

# Bucket boundaries as the engines define them.
VLLM_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                     10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
VLLM_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0)
VLLM_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                    240.0, 480.0, 960.0, 1920.0, 7680.0)
SGLANG_TTFT_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0,
                       200.0, 400.0)
SGLANG_ITL_BUCKETS = (0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040, 0.060,
                      0.080, 0.100, 0.200, 0.400, 0.600, 0.800, 1.000, 2.000, 4.000, 6.000, 8.000)


class _EngineCollector(Collector):
    def __init__(self, engine: Engine, flavor: Flavor, labels: dict[str, str], block_size: int) -> None:
        self.engine, self.flavor, self.labels, self.block_size = engine, flavor, labels, block_size
        self.started = time.time()

    def collect(self) -> Iterator[Metric]:
        e, c = self.engine, self.engine.counters
        names, values = list(self.labels), list(self.labels.values())

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=names)
            g.add_metric(values, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            m = CounterMetricFamily(name, doc, labels=names)
            m.add_metric(values, value)
            return m

        if self.flavor == "vllm":
            yield gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                        len(e.running))
            yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                        len(e.waiting))
            yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", e.kv_usage())
            yield counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
                          c.prefix_query_tokens)
            yield counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                          c.prefix_hit_tokens)
            yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", c.prompt_tokens)
            yield counter("vllm:generation_tokens", "Number of generation tokens processed.", c.generation_tokens)
            info = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                                     labels=[*names, "block_size", "num_gpu_blocks"])
            blocks = e.limits.kv_capacity_tokens // self.block_size
            info.add_metric([*values, str(self.block_size), str(blocks)], 1.0)
            yield info
            # prometheus_client's process collector writes this for vLLM's API server; SGLang's
            # multiprocess registry has none (restarts show there as counters going backwards).
            yield GaugeMetricFamily("process_start_time_seconds",
                                    "Start time of the process since unix epoch in seconds.", self.started)
        else:
            yield gauge("sglang:num_running_reqs", "The number of running requests.", len(e.running))
            yield gauge("sglang:num_queue_reqs", "The number of requests in the waiting queue.", len(e.waiting))
            yield gauge("sglang:token_usage", "The token usage.", e.kv_usage())
            rate = c.prefix_hit_tokens / c.prefix_query_tokens if c.prefix_query_tokens else 0.0
            yield gauge("sglang:cache_hit_rate", "The prefix cache hit rate.", rate)
            yield counter("sglang:prompt_tokens", "Number of prefill tokens processed.", c.prompt_tokens)
            yield counter("sglang:generation_tokens", "Number of generation tokens processed.", c.generation_tokens)


class EngineMetrics:
    """Histograms observed per request plus the scrape-time collector, in one registry."""

    def __init__(self, engine: Engine, *, flavor: Flavor, model_name: str, role: str, block_size: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.flavor = flavor
        if flavor == "vllm":
            labels = {"model_name": model_name, "engine": "0"}
            prefix, ttft_b, itl_b = "vllm", VLLM_TTFT_BUCKETS, VLLM_ITL_BUCKETS
        else:
            labels = {"model_name": model_name, "engine_type": role, "tp_rank": "0"}
            prefix, ttft_b, itl_b = "sglang", SGLANG_TTFT_BUCKETS, SGLANG_ITL_BUCKETS
        self.registry.register(_EngineCollector(engine, flavor, labels, block_size))
        names = list(labels)
        self._labels = labels

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"{prefix}:{name}", doc, names, buckets=buckets, registry=self.registry)

        self.ttft = hist("time_to_first_token_seconds", "Histogram of time to first token in seconds.", ttft_b)
        self.itl = hist("inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", itl_b)
        self.e2e = hist("e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                        VLLM_E2E_BUCKETS)
        self.queue = hist("request_queue_time_seconds" if flavor == "vllm" else "queue_time_seconds",
                          "Histogram of time spent waiting in the queue in seconds.", VLLM_E2E_BUCKETS)

    def observe_first_token(self, ttft: float, queue_time: float) -> None:
        self.ttft.labels(**self._labels).observe(ttft)
        self.queue.labels(**self._labels).observe(queue_time)

    def observe_tokens(self, gap: float, tokens: int) -> None:
        child = self.itl.labels(**self._labels)
        for _ in range(tokens):
            child.observe(gap / tokens)

    def observe_finished(self, e2e: float) -> None:
        self.e2e.labels(**self._labels).observe(e2e)
