"""Counters exist at 0 before their first increment, so ``rate()`` and ``increase()`` count it.

A Prometheus series that appears with the value 1 has no earlier sample to rise from: the first
retry, upstream error or failed request reads 0 on every dashboard (issue: "the first error is
invisible"). Real gateways in front of real simulated engines (and a disaggregated gateway with a
remote prefill pool), scraped before and after traffic with one failing attempt: every counter series
that is non-zero afterwards was already exported, at 0, before. The autoscaler's counters likewise,
from the real actuator against kmock's in-memory API server.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
from gatewayutil import ROOT, completion_body, free_port, gateway_app, sim_app, until
from kubeutil import kmock_kubeconfig
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tandem.autoscaler.actuator import Actuator, GatewayObservationSource
from tandem.autoscaler.models import AutoscalerSpec
from tandem.kube import LLMSERVICES, KubeClient, KubeCredentials, load_credentials
from tandem.router.metrics import OUTCOMES, RETRY_REASONS, UPSTREAM_ERROR_KINDS
from tandem.serve import serving

Series = tuple[str, tuple[tuple[str, str], ...]]


def counters(exposition: str) -> dict[Series, float]:
    """Every counter and histogram-count sample of an exposition, by name and labels."""
    out = {}
    for family in text_string_to_metric_families(exposition):
        if family.type not in ("counter", "histogram"):
            continue
        for s in family.samples:
            if s.name.endswith(("_total", "_count")):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict[Series, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def _joined(client: httpx.AsyncClient, gw: str, n: int) -> bool:
    return len((await client.get(gw + "/admin/instances")).json()["instances"]) >= n


async def test_gateway_counters_exist_at_zero_before_their_first_increment() -> None:
    async with serving(sim_app(port=0)) as a, serving(sim_app(port=0, metrics="sglang")) as b, \
            serving(gateway_app([a, b], retry_backoff=0.0, expose_topology=True)) as gw, \
            httpx.AsyncClient(timeout=20) as c:  # instance labels are the engines' URLs (--expose-topology)
        await until(lambda: _joined(c, gw, 2))
        before = counters((await c.get(gw + "/metrics")).text)
        for outcome in OUTCOMES:
            for decision in ("affinity", "slo_switch", "none"):
                assert value(before, "tandem_requests_total", policy="dualmap", decision=decision,
                             outcome=outcome) == 0
        for inst in (a, b):
            assert value(before, "tandem_scrape_errors_total", instance=inst) == 0
            for kind in UPSTREAM_ERROR_KINDS:
                assert value(before, "tandem_upstream_errors_total", instance=inst, kind=kind) == 0
        for reason in RETRY_REASONS:
            assert value(before, "tandem_retries_total", reason=reason) == 0
        # One engine answers 500 to everything: requests sent to it fail once and are retried.
        await c.post(a + "/admin/fault", json={"mode": "error", "error_rate": 1.0})
        for i in range(6):
            resp = await c.post(gw + "/v1/completions", json=completion_body(f"prompt {i} " * 30, stream=i % 2 == 1))
            assert resp.status_code == 200, resp.text
        await c.post(b + "/admin/fault", json={"mode": "error", "error_rate": 1.0})
        failed = await c.post(gw + "/v1/completions", json=completion_body("both engines fail"))
        assert failed.status_code == 502
        after = counters((await c.get(gw + "/metrics")).text)
    assert value(after, "tandem_upstream_errors_total", instance=a, kind="status") >= 1
    assert value(after, "tandem_retries_total", reason="status") >= 1
    assert sum(v for (name, labels), v in after.items() if name == "tandem_requests_total"
               and ("outcome", "upstream_error") in labels) == 1
    born_non_zero = {k: v for k, v in after.items() if v and k not in before}
    assert born_non_zero == {}


async def test_disaggregated_counters_exist_at_zero_before_the_first_request() -> None:
    async with serving(sim_app(role="prefill")) as p0, serving(sim_app(role="prefill")) as r0, \
            serving(sim_app(role="decode")) as d0, \
            serving(gateway_app([], prefill_instances=[p0], remote_prefill_instances=[r0], decode_instances=[d0],
                              offload_threshold=2048, trust_prompt_hints=True)) as gw, \
            httpx.AsyncClient(timeout=20) as c:
        await until(lambda: _joined(c, gw, 3))
        before = counters((await c.get(gw + "/metrics")).text)
        for tokens in (1000, 6000):  # one prefill kept local, one offloaded to the remote pool
            body = {**completion_body(max_tokens=2), "x_tandem": {"hash_ids": [tokens], "prompt_tokens": tokens,
                                                                   "block_size": 512}}
            assert (await c.post(gw + "/v1/completions", json=body)).status_code == 200
        after = counters((await c.get(gw + "/metrics")).text)
    model = next(dict(labels)["model"] for name, labels in before if name == "tandem_prefill_route_total")
    for route in ("local", "remote"):
        assert value(before, "tandem_prefill_route_total", model=model, route=route) == 0
        assert value(after, "tandem_prefill_route_total", model=model, route=route) == 1
    assert value(after, "tandem_requests_total", policy="dualmap", decision="pd", outcome="ok") == 2
    assert {k: v for k, v in after.items() if v and k not in before} == {}


def _llmservice(name: str) -> dict[str, Any]:
    return {"apiVersion": "serving.tandem.dev/v1alpha1", "kind": "LLMService",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"model": {"name": "meta-llama/Llama-3.1-8B-Instruct", "servedName": "llama-8b"},
                     "mode": "disaggregated", "replicas": 1,
                     "pools": {"prefill": {"replicas": 1, "maxReplicas": 4}, "decode": {"maxReplicas": 4}},
                     "autoscaling": {"enabled": True, "profile": "llama3-8b-h100"}}}


async def test_autoscaler_counters_exist_once_a_service_is_seen(kmock: Any, tmp_path: Path) -> None:
    """A tick whose observation fails counts the error; the service's other counters (apply errors,
    ticks, scaling actions of each role) are exported at 0 from then on."""
    info = kmock.ResourceInfo
    kmock.resources["serving.tandem.dev/v1alpha1/llmservices"] = info(
        kind="LLMService", namespaced=True, subresources={"status", "scale"}, verbs={"get", "list", "patch", "create"})
    kmock.resources["v1/pods"] = info(kind="Pod", namespaced=True, verbs={"get", "list", "patch", "create"})
    creds = load_credentials(kmock_kubeconfig(kmock, tmp_path))
    client = KubeClient(creds, creds.ssl_context(), user_agent="tandem-tests")
    registry = CollectorRegistry()
    dead = GatewayObservationSource([f"http://127.0.0.1:{free_port()}"], timeout_s=1.0)
    try:
        await client.create(LLMSERVICES, "default", _llmservice("pd"))
        actuator = Actuator(client, dead, namespaces=["default"], defaults=AutoscalerSpec(), registry=registry)
        assert await actuator.tick_once() == {}
        first = counters(generate_latest(registry).decode())
        actuator.metrics.service_known("default", "pd", ["prefill", "decode"])
        later = counters(generate_latest(registry).decode())
    finally:
        await dead.close()
        await client.close()
    svc = {"namespace": "default", "service": "pd"}
    assert value(first, "tandem_autoscaler_errors_total", **svc, stage="observe") == 1
    assert value(first, "tandem_autoscaler_errors_total", **svc, stage="apply") == 0
    assert value(first, "tandem_autoscaler_ticks_total", **svc) == 0
    for role in ("prefill", "decode"):
        for direction in ("up", "down"):
            assert value(later, "tandem_autoscaler_scaling_actions_total", **svc, role=role, direction=direction) == 0


def _autoscaler(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tandem.cli", "autoscaler", "--metrics-port", "0", *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)


def test_autoscaler_without_a_kubernetes_api_is_a_clear_cli_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
    env["HOME"] = str(tmp_path)  # no ~/.kube/config
    none = _autoscaler(env=env)
    assert none.returncode == 2, none.stderr
    assert "Traceback" not in none.stderr
    assert "tandem autoscaler: kubeconfig (--kubeconfig / TANDEM_AUTOSCALER_KUBECONFIG): no Kubernetes API " \
           "credentials" in none.stderr
    # Credentials of an API server that is not there (nothing listens on the port).
    server = f"http://127.0.0.1:{free_port()}"
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        f"clusters: [{{name: c, cluster: {{server: '{server}'}}}}]\n"
        "users: [{name: u, user: {}}]\ncontexts: [{name: c, context: {cluster: c, user: u}}]\n")
    down = _autoscaler("--kubeconfig", str(kubeconfig), "--api-timeout-s", "1", env=env)
    assert down.returncode == 2, down.stderr
    assert "Traceback" not in down.stderr
    assert f"the Kubernetes API at {server} did not list LLMServices in namespace 'default'" in down.stderr


async def test_autoscaler_keeps_running_when_the_api_goes_away() -> None:
    """After a good start, an API outage fails ticks (logged) instead of ending the process."""
    creds = KubeCredentials(server=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    client = KubeClient(creds, False, timeout=0.5, retries=0)
    source = GatewayObservationSource([f"http://127.0.0.1:{free_port()}"], timeout_s=0.5)
    actuator = Actuator(client, source, namespaces=["default"], defaults=AutoscalerSpec())
    stop = asyncio.Event()
    try:
        task = asyncio.create_task(actuator.run(0.05, stop))
        await asyncio.sleep(0.3)
        assert not task.done()  # every tick failed to connect, none ended the loop
        stop.set()
        await asyncio.wait_for(task, 5)
    finally:
        await source.close()
        await client.close()
