"""Schemathesis against the gateway's own OpenAPI schema: every endpoint (admin included) with generated
requests, valid and invalid, on a gateway without keys and on one with client and admin keys (each
request carrying the key its endpoint needs). The gateways run as real processes in front of a real
simulator; no request may get a 5xx (nothing here is unavailable, so a 5xx would be the gateway's own
failure) and the processes must stay up. Bounded: 25 examples per operation and generation mode."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import schemathesis
from gatewayutil import ROOT, free_port, sim_process
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

from tandem.bench.harness import Process, tandem_argv

CLIENT_KEY, ADMIN_KEY = "client-key-fuzz-1", "admin-key-fuzz-1"
AUTH = {"off": [], "on": ["--api-keys", CLIENT_KEY, "--admin-api-keys", ADMIN_KEY]}


@pytest.fixture(scope="module")
def engine() -> Iterator[str]:
    with sim_process() as (sim, _):
        yield sim


@pytest.fixture(scope="module", params=sorted(AUTH))
def gateway_url(request: pytest.FixtureRequest, engine: str) -> Iterator[tuple[str, str]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # --expose-topology: the admin routes are in the schema (and fuzzed; drain of an unknown instance is a 404).
    with Process("tandem gateway", tandem_argv("gateway", "--port", str(port), "--instances", engine,
                                               "--max-body-bytes", "65536", "--max-output-tokens", "64",
                                               "--expose-topology", "--shutdown-grace", "0", *AUTH[request.param]),
                 cwd=ROOT) as proc:
        proc.wait_http(url + "/readyz", limit_s=30)
        yield url, request.param
        assert proc.running, "the gateway died during the fuzz run"


EXAMPLES = 25  # per operation and generation mode


def _fuzz(strategy, label: str, base_url: str, auth: str, calls: dict[str, int]) -> None:
    @given(case=strategy)
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case) -> None:
        if case.path == "/admin/drain":  # never drain the only engine: an unknown one is a 404
            case.query = {**(case.query or {}), "instance": "http://127.0.0.1:1"}
        headers = None
        if auth == "on":  # the key each endpoint needs, so that the fuzzing reaches past authentication
            headers = {"Authorization": f"Bearer {ADMIN_KEY if case.path.startswith('/admin') else CLIENT_KEY}"}
        response = case.call(base_url=base_url, timeout=30, headers=headers)
        calls[label] = calls.get(label, 0) + 1
        case.validate_response(response, checks=(not_a_server_error,))

    check()


def test_no_5xx_from_the_gateway(gateway_url: tuple[str, str]) -> None:
    url, auth = gateway_url
    # Operations are walked by hand (not schemathesis' pytest plugin, which trails pytest's internals).
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    calls: dict[str, int] = {}
    for result, mode in itertools.product(list(schema.get_all_operations()), GenerationMode):
        op = result.ok()
        try:
            _fuzz(op.as_strategy(mode), f"{op.label} {mode.value}", url, auth, calls)
        except Unsatisfiable:  # no way to make an invalid request (an endpoint without parameters)
            assert mode is GenerationMode.NEGATIVE
    print(f"auth {auth}: schemathesis calls per operation:", calls)
    paths = {label.split(" ")[1] for label in calls}
    assert any(label.endswith("negative") for label in calls)
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/admin/instances", "/admin/drain",
            "/admin/decisions", "/admin/observations", "/healthz", "/readyz", "/metrics"} <= paths
