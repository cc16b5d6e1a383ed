"""The simulator's /metrics, named, typed, labelled and bucketed like the real engines.

vLLM v1 (``vllm:`` prefix, labels ``model_name`` and ``engine``; the families, labels and buckets
of vLLM 0.32, checked against a recording of the real engine by ``tests/sim/test_sim_fidelity.py``)
and SGLang (``sglang:`` prefix, labels ``model_name``, ``engine_type``, ``tp_rank``). Gauges and
counters are read from the engine at scrape time, counters with their ``_created`` sample as
prometheus-client writes them; latency and iteration histograms are observed as requests progress.
Everything lives in a per-server registry so several simulated engines can share one process
(tests, the demo).
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

VLLM_ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
VLLM_FINISHED_REASONS = ("stop", "length", "abort", "error", "repetition")
# vLLM 0.32's cache_config_info labels (what the gateway reads: block_size, num_gpu_blocks); the
# simulator fills the ones it models and vLLM's defaults for the rest.
VLLM_CACHE_CONFIG_DEFAULTS = {
    "_block_size_resolved": "True", "cache_dtype": "auto", "cache_hit_alignment_tokens": "None",
    "enable_mamba_shared_prefix_checkpoint": "False", "enable_prefix_caching": "True",
    "gpu_memory_utilization": "0.9", "hash_block_size": "None", "is_attention_free": "False",
    "kv_cache_dtype_skip_layers": "[]", "kv_cache_layout": "None", "kv_cache_memory_bytes": "None",
    "kv_offloading_backend": "native", "kv_offloading_size": "None", "kv_sharing_fast_prefill": "False",
    "mamba_block_size": "None", "mamba_cache_dtype": "auto", "mamba_cache_mode": "none",
    "mamba_page_size_padded": "None", "mamba_ssm_cache_dtype": "float32", "num_cpu_blocks": "None",
    "num_gpu_blocks_override": "None", "prefix_cache_retention_interval": "0",
    "prefix_caching_hash_algo": "sha256", "prefix_match_unit": "None", "replayssm_buffer_len": "16",
    "skip_page_size_padded": "None", "sliding_window": "None", "swa_bounded_replay": "True",
    "use_kda_recoverssm": "False", "use_replayssm": "False", "user_specified_block_size": "False",
}
SGLANG_TTFT_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0,
                       200.0, 400.0)
SGLANG_ITL_BUCKETS = (0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040, 0.060,
                      0.080, 0.100, 0.200, 0.400, 0.600, 0.800, 1.000, 2.000, 4.000, 6.000, 8.000)


def vllm_request_token_buckets(max_model_len: int) -> tuple[float, ...]:
    """vLLM's per-request token histograms: 1, 2, 5, 10, 20, ... up to the model's context."""
    steps = (float(m * 10**e) for e in range(len(str(max_model_len))) for m in (1, 2, 5))
    return tuple(b for b in steps if b <= max_model_len)


class _EngineCollector(Collector):
    def __init__(self, engine: Engine, flavor: Flavor, labels: dict[str, str], block_size: int) -> None:
        self.engine, self.flavor, self.labels, self.block_size = engine, flavor, labels, block_size
        # When this engine started: its counters' _created sample and its process_start_time_seconds.
        self.created = time.time()

    def collect(self) -> Iterator[Metric]:
        e, c = self.engine, self.engine.counters
        names, values = list(self.labels), list(self.labels.values())

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=names)
            g.add_metric(values, value)
            return g

        def counter(name: str, doc: str, value: float | dict[str, float], extra: str = "") -> CounterMetricFamily:
            """One series, or one per value of the ``extra`` label (``value`` a mapping)."""
            m = CounterMetricFamily(name, doc, labels=[*names, extra] if extra else names)
            for key, v in (value.items() if isinstance(value, dict) else [("", value)]):
                m.add_metric([*values, key] if extra else values, v, created=self.created)
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
            yield counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.", 0)
            yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", c.prompt_tokens)
            yield counter("vllm:prompt_tokens_cached", "Number of cached prompt tokens (local + external).",
                          c.prefix_hit_tokens)
            yield counter("vllm:generation_tokens", "Number of generation tokens processed.", c.generation_tokens)
            finished = dict.fromkeys(VLLM_FINISHED_REASONS, 0.0)
            finished["length"], finished["abort"] = c.finished_requests, c.aborted_requests
            yield counter("vllm:request_success", "Count of successfully processed requests.", finished,
                          "finished_reason")
            blocks = e.limits.kv_capacity_tokens // self.block_size
            config = {**VLLM_CACHE_CONFIG_DEFAULTS, "block_size": str(self.block_size),
                      "effective_attention_block_size": str(self.block_size), "num_gpu_blocks": str(blocks),
                      "kv_cache_size_tokens": str(blocks * self.block_size),
                      "kv_cache_max_concurrency": str(round(blocks * self.block_size / e.limits.max_model_len, 2))}
            # Labelled with the engine index and the configuration, not the model (as vLLM labels it).
            info = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                                     labels=["engine", *config])
            info.add_metric([self.labels["engine"], *config.values()], 1.0)
            yield info
            # prometheus_client's process collector writes this for vLLM's API server; SGLang's
            # multiprocess registry has none (restarts show there as counters going backwards).
            yield GaugeMetricFamily("process_start_time_seconds",
                                    "Start time of the process since unix epoch in seconds.", self.created)
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
                          "Histogram of time spent in WAITING phase for request." if flavor == "vllm" else
                          "Histogram of time spent waiting in the queue in seconds.", VLLM_E2E_BUCKETS)
        # vLLM only: a request's running time split at its first token, and the tokens of each engine step.
        self.prefill_time = self.decode_time = self.inference_time = self.iteration = None
        self.prompt_tokens = self.computed_tokens = None
        if flavor == "vllm":
            self.prefill_time = hist("request_prefill_time_seconds",
                                     "Histogram of time spent in PREFILL phase for request.", VLLM_E2E_BUCKETS)
            self.decode_time = hist("request_decode_time_seconds",
                                    "Histogram of time spent in DECODE phase for request.", VLLM_E2E_BUCKETS)
            self.inference_time = hist("request_inference_time_seconds",
                                       "Histogram of time spent in RUNNING phase for request.", VLLM_E2E_BUCKETS)
            token_buckets = vllm_request_token_buckets(engine.limits.max_model_len)
            self.prompt_tokens = hist("request_prompt_tokens", "Number of prefill tokens processed.", token_buckets)
            self.computed_tokens = hist("request_prefill_kv_computed_tokens", "Histogram of new KV tokens "
                                        "computed during prefill (excluding cached tokens).", token_buckets)
            self.iteration = hist("iteration_tokens_total", "Histogram of number of tokens per engine_step.",
                                  VLLM_ITERATION_TOKEN_BUCKETS)
            engine.on_iteration = self.observe_iteration

    def observe_first_token(self, ttft: float, queue_time: float) -> None:
        self.ttft.labels(**self._labels).observe(ttft)
        self.queue.labels(**self._labels).observe(queue_time)

    def observe_tokens(self, gap: float, tokens: int) -> None:
        child = self.itl.labels(**self._labels)
        for _ in range(tokens):
            child.observe(gap / tokens)

    def observe_finished(self, e2e: float, prefill_s: float | None = None, decode_s: float | None = None,
                         prompt_tokens: int = 0, computed_tokens: int = 0) -> None:
        """A finished request: its end-to-end time and, when known, its prefill (scheduled -> first
        token) and decode (first token -> end) phases, as vLLM splits its running time, with its
        prompt and prefilled (uncached) token counts, observed with them as vLLM does."""
        self.e2e.labels(**self._labels).observe(e2e)
        if prefill_s is None or decode_s is None:
            return
        for hist, tokens in ((self.prompt_tokens, prompt_tokens), (self.computed_tokens, computed_tokens)):
            if hist is not None:
                hist.labels(**self._labels).observe(tokens)
        for hist, seconds in ((self.prefill_time, prefill_s), (self.decode_time, decode_s),
                              (self.inference_time, prefill_s + decode_s)):
            if hist is not None:
                hist.labels(**self._labels).observe(seconds)

    def observe_iteration(self, tokens: int, steps: int) -> None:
        """``steps`` engine iterations of ``tokens`` tokens each (a decode plan covers several)."""
        if self.iteration is not None:
            child = self.iteration.labels(**self._labels)
            for _ in range(steps):
                child.observe(tokens)
