"""``tandem sim`` against a recording of real vLLM 0.32 (tests/fixtures/vllm-0.32, tools/capture_vllm.py).

The simulator stands in for vLLM in most of the suite, the demo and the benches, so where Tandem
reads vLLM the simulator must look the same: the metric families that routing, the observations,
the dashboards and the alert rules read (names, types, label names, histogram buckets, counters'
``_created`` samples, ``cache_config_info``'s labels), the fields of answers and stream chunks (the
role-only first chat chunk, ``prompt_tokens_details`` null unless enabled), the error shape of each
kind of refusal, the context-length limit, and the probe and tokenizer routes. Renaming a metric in
the simulator fails here. What the simulator does not imitate is listed in docs/simulator.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tandem.serve import serving
from tandem.sim.server import create_app
from tandem.sim.settings import SimSettings

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "vllm-0.32"
EXCHANGES: dict[str, Any] = json.loads((FIXTURES / "exchanges.json").read_text())
MODEL = "tiny-llama"  # the recording's served name; the simulator serves the same

# What Tandem reads of vLLM besides the dashboards and rules (found below): routing's scrape
# (router/enginemetrics.py), the decode pick, and the families issue 21 names for dashboards to come.
READ_BY_TANDEM = {
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:prompt_tokens", "vllm:generation_tokens",
    "vllm:time_to_first_token_seconds", "vllm:cache_config_info", "vllm:inter_token_latency_seconds",
    "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds",
    "vllm:request_success", "vllm:num_preemptions", "vllm:prompt_tokens_cached",
    "vllm:request_prefill_time_seconds", "vllm:request_decode_time_seconds", "vllm:iteration_tokens_total",
    "vllm:request_prompt_tokens", "vllm:request_prefill_kv_computed_tokens",  # prefill calibration
    "process_start_time_seconds",  # an engine restart (router/cachereset.py)
}
_SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def queried_by_dashboards_and_rules() -> set[str]:
    """The vLLM families the shipped Grafana dashboards and Prometheus rules query."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from promql_names import metric_names
    finally:
        sys.path.pop(0)
    exprs = [target["expr"] for path in sorted((ROOT / "deploy" / "grafana").glob("*.json"))
             for panel in json.loads(path.read_text())["panels"] for target in panel["targets"]]
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "tandem-rules.yaml").read_text())
    exprs += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    names = set()
    for expr in exprs:
        for name in metric_names(expr):
            if name.startswith("vllm:") and name != "vllm:gpu_cache_usage_perc":  # pre-v1, read as a fallback
                for suffix in _SUFFIXES:
                    name = name.removesuffix(suffix)
                names.add(name)
    return names


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)
            if f.name.startswith("vllm:") or f.name == "process_start_time_seconds"}


def label_names(family: Any) -> set[str]:
    return {k for s in family.samples for k in s.labels if k != "le"}


def buckets(family: Any) -> list[str]:
    return list(dict.fromkeys(s.labels["le"] for s in family.samples if s.name.endswith("_bucket")))


@pytest.fixture
async def sim() -> Any:
    settings = SimSettings(served_model_name=MODEL, max_model_len=4096)
    async with serving(create_app(settings)) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        yield client


async def _traffic(sim: httpx.AsyncClient) -> None:
    """A little of everything, so that every labelled series exists (as after the recording's traffic)."""
    for name in ("completion", "completion_repeat", "chat"):
        assert (await sim.post(EXCHANGES[name]["path"], json=EXCHANGES[name]["request"])).status_code == 200
    async with sim.stream("POST", "/v1/completions", json=EXCHANGES["completion_stream"]["request"]) as resp:
        await resp.aread()


async def test_metric_families_that_tandem_reads_are_vllms(sim: httpx.AsyncClient) -> None:
    await _traffic(sim)
    real = families((FIXTURES / "metrics.txt").read_text())
    ours = families((await sim.get("/metrics")).text)
    used = READ_BY_TANDEM | queried_by_dashboards_and_rules()
    assert used <= set(real), f"read by Tandem but not in vLLM 0.32: {sorted(used - set(real))}"
    for name in sorted(used):
        assert name in ours, f"{name}: vLLM exports it, Tandem reads it, the simulator lacks it"
        assert ours[name].type == real[name].type, name
        assert label_names(ours[name]) == label_names(real[name]), name
        if real[name].type == "histogram":
            assert buckets(ours[name]) == buckets(real[name]), name
        if real[name].type in ("counter", "histogram"):
            assert f"{name}_created" in ours, f"{name}: no _created samples"
    # Every vLLM family the simulator exports is one vLLM exports, with vLLM's type: no invented names.
    for name, family in ours.items():
        assert name in real and family.type == real[name].type, name


async def test_cache_config_info_has_vllms_labels(sim: httpx.AsyncClient) -> None:
    real = families((FIXTURES / "metrics.txt").read_text())["vllm:cache_config_info"]
    ours = families((await sim.get("/metrics")).text)["vllm:cache_config_info"]
    assert label_names(ours) == label_names(real) and len(label_names(real)) == 37
    sample = ours.samples[0].labels
    assert int(sample["block_size"]) > 0 and int(sample["num_gpu_blocks"]) > 0  # what the gateway reads


def _shape(value: Any) -> Any:
    """The keys of a JSON value, recursively (lists by their first element): its shape, not its content."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(value[0])] if value else []
    return type(value).__name__ if value is None else "value"


async def test_answers_have_vllms_fields(sim: httpx.AsyncClient) -> None:
    for name in ("completion", "chat"):
        ex = EXCHANGES[name]
        ours = (await sim.post(ex["path"], json=ex["request"])).json()
        assert _shape(ours) == _shape(ex["body"]), name
        assert ours["usage"]["prompt_tokens_details"] is None  # not enabled, as in the recording


def _events(raw: str) -> list[Any]:
    return [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"
            for line in raw.splitlines() if line.startswith("data: ")]


@pytest.mark.parametrize(("name", "path"), [("completion_stream", "completion-stream.sse"),
                                            ("chat_stream", "chat-stream.sse"),
                                            ("chat_stream_no_usage", "chat-stream-no-usage.sse")])
async def test_streams_have_vllms_chunks(sim: httpx.AsyncClient, name: str, path: str) -> None:
    real = _events((FIXTURES / path).read_text())
    async with sim.stream("POST", EXCHANGES[name]["path"], json=EXCHANGES[name]["request"]) as resp:
        ours = _events((await resp.aread()).decode())
    assert len(ours) == len(real)  # role chunk (chat), 8 tokens, usage chunk when asked, [DONE]
    for mine, theirs in zip(ours, real, strict=True):
        assert _shape(mine) == _shape(theirs)
    if name.startswith("chat"):
        assert ours[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}  # the role-only chunk


@pytest.mark.parametrize("name", sorted(n for n in EXCHANGES if n.startswith("error_")))
async def test_refusals_have_vllms_status_type_param_and_code(sim: httpx.AsyncClient, name: str) -> None:
    ex = EXCHANGES[name]
    if "request_raw" in ex:
        resp = await sim.post(ex["path"], content=ex["request_raw"].encode(), headers={"content-type":
                                                                                         "application/json"})
    elif name == "error_context_too_long":  # longer: the simulator counts word pieces, fewer than vLLM's BPE tokens
        resp = await sim.post(ex["path"], json={**ex["request"], "prompt": " ".join([ex["request"]["prompt"]] * 8)})
    else:
        resp = await sim.post(ex["path"], json=ex["request"])
    ours, theirs = resp.json()["error"], ex["body"]["error"]
    assert resp.status_code == ex["status"], resp.text
    assert set(ours) == set(theirs) and ours["code"] == theirs["code"] == ex["status"]
    assert (ours["type"], ours["param"]) == (theirs["type"], theirs["param"]), ours
    if name != "error_context_too_long":  # vLLM counts BPE tokens, the simulator its word pieces
        assert ours["message"].split("\n")[0] == theirs["message"].split("\n")[0]
    else:
        assert ours["message"].startswith("This model's maximum context length is 4096 tokens.")


@pytest.mark.parametrize("name", ["health", "ping", "version", "load", "tokenize", "tokenize_chat", "detokenize",
                                  "reset_prefix_cache"])
async def test_probe_and_tokenizer_routes(sim: httpx.AsyncClient, name: str) -> None:
    ex = EXCHANGES[name]
    resp = await sim.request(ex["method"], ex["path"], json=ex.get("request"))
    assert resp.status_code == ex["status"]
    if "body" in ex:
        assert _shape(resp.json()) == _shape(ex["body"]), name
    else:
        assert resp.content == ex["body_text"].encode()


async def test_cached_tokens_are_reported_when_enabled() -> None:
    settings = SimSettings(served_model_name=MODEL, enable_prompt_tokens_details=True)
    async with serving(create_app(settings)) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
        body = EXCHANGES["completion"]["request"]
        await c.post("/v1/completions", json=body)
        usage = (await c.post("/v1/completions", json=body)).json()["usage"]
    # Whole cached blocks (16 tokens in the profile), at most those before the prompt's last token.
    assert usage["prompt_tokens_details"] == {"cached_tokens": (usage["prompt_tokens"] - 1) // 16 * 16}
