"""Engine ``/metrics`` text -> the few signals routing needs, for vLLM (v1 and older names) and SGLang.

Pure: takes the exposition text, returns an :class:`EngineSnapshot`. Parsing goes through
prometheus-client's parser so every valid exposition (escaped labels, ``# HELP`` lines, histograms)
is read the same way the engines' own Prometheus would read it. Several engines (data-parallel
ranks, ``engine`` label) in one process are summed; the KV usage is their mean.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Literal

from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel

EngineFlavor = Literal["vllm", "sglang", "unknown"]

# signal -> metric names as the parser reports them (counters lose their ``_total`` suffix in the
# family name; the samples keep it). First name found wins, so newer names come first.
_GAUGES: dict[str, tuple[str, ...]] = {
    "waiting": ("vllm:num_requests_waiting", "sglang:num_queue_reqs"),
    "running": ("vllm:num_requests_running", "sglang:num_running_reqs"),
    "kv_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage"),
    "cache_hit_rate": ("sglang:cache_hit_rate",),
}
_COUNTERS: dict[str, tuple[str, ...]] = {
    "prefix_queries": ("vllm:prefix_cache_queries",),
    "prefix_hits": ("vllm:prefix_cache_hits",),
    "prompt_tokens": ("vllm:prompt_tokens", "sglang:prompt_tokens"),
    "generation_tokens": ("vllm:generation_tokens", "sglang:generation_tokens"),
}
# signal -> histogram names; only their _sum and _count are read. The request_* ones are observed
# together when a request finishes (vLLM), so their deltas between two scrapes cover the same requests.
_HISTOGRAMS: dict[str, tuple[str, ...]] = {
    "ttft": ("vllm:time_to_first_token_seconds", "sglang:time_to_first_token_seconds"),
    "prefill_time": ("vllm:request_prefill_time_seconds",),
    "request_prompt": ("vllm:request_prompt_tokens",),
    "request_computed": ("vllm:request_prefill_kv_computed_tokens",),
}
_HISTOGRAM_SIGNAL = {name: signal for signal, names in _HISTOGRAMS.items() for name in names}


class EngineSnapshot(BaseModel):
    """What one scrape tells about an engine. Fields absent from the exposition stay ``None``."""

    flavor: EngineFlavor = "unknown"
    waiting: float | None = None
    running: float | None = None
    kv_usage: float | None = None
    prefix_queries: float | None = None
    prefix_hits: float | None = None
    cache_hit_rate: float | None = None
    prompt_tokens: float | None = None
    generation_tokens: float | None = None
    ttft_sum: float | None = None
    ttft_count: float | None = None
    # Finished requests (vLLM): seconds from scheduled to first token, their prompt tokens and the
    # tokens prefilled (not served from the prefix cache). What prefill calibration compares.
    prefill_time_sum: float | None = None
    prefill_time_count: float | None = None
    request_prompt_sum: float | None = None
    request_computed_sum: float | None = None
    block_size: int | None = None  # vLLM's KV block size (cache_config_info)
    kv_blocks: int | None = None  # and its number of KV blocks (num_gpu_blocks): the prefix cache's capacity
    start_time: float | None = None  # process_start_time_seconds: the engine process's incarnation
    model_names: list[str] = []

    def prefix_hit_ratio(self) -> float | None:
        """Cumulative hit ratio: vLLM from its token counters, SGLang from its gauge."""
        if self.prefix_queries:
            return (self.prefix_hits or 0.0) / self.prefix_queries
        return self.cache_hit_rate


class EngineMetricsError(ValueError):
    """The text is not a Prometheus exposition, or carries none of the engine metrics we know."""


_START = "process_start_time_seconds"
_WANTED = tuple(sorted({n for names in (*_GAUGES.values(), *_COUNTERS.values()) for n in names}
                       | set(_HISTOGRAM_SIGNAL) | {"vllm:cache_config_info", _START}))


def relevant_lines(text: str) -> str:
    """Only the lines of the families routing reads (engines export dozens of histograms).

    prometheus-client's parser is pure Python; handing it the ~20 lines that matter instead of the
    whole exposition makes a scrape several times cheaper for the gateway's event loop.
    """
    keep = []
    for line in text.splitlines():
        name = line.split(" ", 3)[2] if line.startswith("# ") else line
        if name.startswith(_WANTED) and "_bucket" not in name:  # histograms: only _sum and _count are read
            keep.append(line)
    return "\n".join(keep) + "\n"


def parse_engine_metrics(text: str) -> EngineSnapshot:
    try:
        families = list(text_string_to_metric_families(relevant_lines(text)))
    except (ValueError, TypeError, IndexError) as exc:
        raise EngineMetricsError(f"unparseable /metrics: {exc}") from exc
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    models: set[str] = set()
    block_size = kv_blocks = None
    start_time: float | None = None
    for fam in families:
        if fam.name == _START:
            start_time = max((s.value for s in fam.samples), default=None)
            continue
        for s in fam.samples:
            if "model_name" in s.labels:
                models.add(s.labels["model_name"])
            if fam.name == "vllm:cache_config_info":
                if s.labels.get("block_size", "").isdigit():
                    block_size = int(s.labels["block_size"])
                if s.labels.get("num_gpu_blocks", "").isdigit():
                    kv_blocks = int(s.labels["num_gpu_blocks"])
            if fam.type == "histogram" and fam.name in _HISTOGRAM_SIGNAL:
                signal = _HISTOGRAM_SIGNAL[fam.name]
                if s.name.endswith("_sum"):
                    sums[f"{signal}_sum"] += s.value
                elif s.name.endswith("_count"):
                    sums[f"{signal}_count"] += s.value
                continue
            if s.name.endswith("_created"):
                continue  # counter creation timestamps are not counts
            key = s.name.removesuffix("_total")
            sums[key] += s.value
            counts[key] += 1
    values: dict[str, float] = {}
    for signal, names in _GAUGES.items():
        for name in names:
            if name in counts:
                # kv usage and hit rate are ratios: average over engines/ranks, the rest add up.
                ratio = signal in {"kv_usage", "cache_hit_rate"}
                values[signal] = sums[name] / counts[name] if ratio else sums[name]
                break
    for signal, names in _COUNTERS.items():
        for name in names:
            if name in counts:
                values[signal] = sums[name]
                break
    for key in ("ttft_sum", "ttft_count", "prefill_time_sum", "prefill_time_count", "request_prompt_sum",
                "request_computed_sum"):
        if key in sums:
            values[key] = sums[key]
    known = {n for names in (*_GAUGES.values(), *_COUNTERS.values()) for n in names}
    flavors = {n.split(":", 1)[0] for n in counts if n in known}
    if not values:
        raise EngineMetricsError("no vLLM or SGLang metrics found in /metrics")
    flavor: EngineFlavor = "vllm" if "vllm" in flavors else "sglang" if "sglang" in flavors else "unknown"
    return EngineSnapshot(flavor=flavor, block_size=block_size, kv_blocks=kv_blocks, start_time=start_time,
                          model_names=sorted(models), **values)
