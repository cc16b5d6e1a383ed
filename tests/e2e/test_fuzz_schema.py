"""Schemathesis against the gateway's own OpenAPI schema: every endpoint (admin included) with generated
requests, valid and invalid. The gateway runs as a real process in front of a real simulator; no
request may get a 5xx (nothing here is unavailable, so a 5xx would be the gateway's own failure)
and the process must stay up. The number of examples per endpoint is bounded to keep this fast."""

from __future__ import annotations

import itertools

import pytest
import schemathesis
from gatewayutil import ROOT, free_port, sim_process
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

from tandem.bench.harness import Process, tandem_argv


@pytest.fixture(scope="module")
def gateway_url():
    with sim_process() as (sim, _):
        port = free_port()
        # The admin API is open on a gateway without keys: fuzzed too (drain of an unknown instance is a 404).
        url = f"http://127.0.0.1:{port}"
        with Process("tandem gateway", tandem_argv("gateway", "--port", str(port), "--instances", sim,
                                                   "--max-body-bytes", "65536", "--max-output-tokens", "64"),
                     cwd=ROOT) as proc:
            proc.wait_http(url + "/readyz", limit_s=30)
            yield url
            assert proc.running, "the gateway died during the fuzz run"


EXAMPLES = 40  # per endpoint and generation mode


def _fuzz(strategy, label: str, base_url: str, calls: dict[str, int]) -> None:
    @given(case=strategy)
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case) -> None:
        if case.path == "/admin/drain":  # never drain the only engine: an unknown one is a 404
            case.query = {**(case.query or {}), "instance": "http://127.0.0.1:1"}
        response = case.call(base_url=base_url, timeout=30)
        calls[label] = calls.get(label, 0) + 1
        case.validate_response(response, checks=(not_a_server_error,))

    check()


def test_no_5xx_from_the_gateway(gateway_url) -> None:
    # Operations are walked by hand (not schemathesis' pytest plugin, which trails pytest's internals).
    schema = schemathesis.openapi.from_url(gateway_url + "/openapi.json")
    calls: dict[str, int] = {}
    for result, mode in itertools.product(list(schema.get_all_operations()), GenerationMode):
        op = result.ok()
        try:
            _fuzz(op.as_strategy(mode), f"{op.label} {mode.value}", gateway_url, calls)
        except Unsatisfiable:  # no way to make an invalid request (an endpoint without parameters)
            assert mode is GenerationMode.NEGATIVE
    print("schemathesis calls per operation:", calls)
    paths = {label.split(" ")[1] for label in calls}
    assert any(label.endswith("negative") for label in calls)
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/admin/instances", "/admin/drain",
            "/admin/decisions", "/healthz", "/readyz", "/metrics"} <= paths
