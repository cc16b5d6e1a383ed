"""The chart's InferencePool + endpoint picker (values: inferencePool), through Helm's install path on kmock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import test_chart
from test_chart import api_server, args_of, by_kind, install, one, render

GIE_KINDS = [
    ("inference.networking.k8s.io/v1/inferencepools", "InferencePool", True),
    ("gateway.networking.k8s.io/v1/httproutes", "HTTPRoute", True),
]
VALUES: dict[str, Any] = {"engines": {"namespaces": ["llm-a"]}, "redis": {"enabled": True},
                          "inferencePool": {"enabled": True, "replicas": 2, "failureMode": "FailOpen",
                                            "httpRoute": {"enabled": True, "gatewayNamespace": "gateways"}}}


@pytest.fixture(autouse=True)
def _gie_kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The emulated API server serves the GIE and Gateway API kinds (their CRDs come from those projects)."""
    monkeypatch.setattr(test_chart, "KINDS", [*test_chart.KINDS, *GIE_KINDS])


async def test_off_by_default(tmp_path: Path) -> None:
    docs, _ = await render(tmp_path)
    assert not by_kind(docs, "InferencePool") and not [d for d in docs if d["metadata"]["name"].endswith("-epp")]


async def test_pool_picker_and_route(tmp_path: Path) -> None:
    from tandem.router.eppsettings import EppSettings

    docs, _ = await render(tmp_path, VALUES)
    pool = one(docs, "InferencePool", "llm-a/tandem")
    assert pool["spec"]["selector"]["matchLabels"] == {"serving.tandem.dev/role": "unified"}
    assert pool["spec"]["targetPorts"] == [{"number": 8000}]
    ref = pool["spec"]["endpointPickerRef"]
    assert ref == {"name": "tandem-epp", "port": {"number": 9002}, "failureMode": "FailOpen"}
    service = one(docs, "Service", "llm-a/tandem-epp")
    assert {"name": "grpc", "port": 9002, "targetPort": "grpc", "protocol": "TCP",
            "appProtocol": "kubernetes.io/h2c"} in service["spec"]["ports"]
    picker = one(docs, "Deployment", "llm-a/tandem-epp")
    assert picker["spec"]["replicas"] == 2
    assert service["spec"]["selector"].items() <= picker["spec"]["template"]["metadata"]["labels"].items()
    argv = args_of(docs, "llm-a/tandem-epp")
    settings = EppSettings(_cli_parse_args=argv[1:])
    assert argv[0] == "epp" and settings.grpc_port == 9002 and settings.host == "0.0.0.0"
    assert settings.k8s_namespace == "llm-a" and settings.k8s_selector == "serving.tandem.dev/role=unified"
    env = {e["name"]: e.get("value") for e in picker["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["TANDEM_EPP_REDIS_URL"].startswith("redis://tandem-redis.")
    route = one(docs, "HTTPRoute", "llm-a/tandem")
    assert route["spec"]["parentRefs"][0]["namespace"] == "gateways"
    assert route["spec"]["rules"][0]["backendRefs"] == [
        {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "tandem"}]


async def test_several_pickers_need_shared_state(tmp_path: Path) -> None:
    async with api_server(tmp_path) as (kubeconfig, _):
        outcome = await install(kubeconfig, {"inferencePool": {"enabled": True, "replicas": 2}})
    assert "inferencePool.replicas" in outcome.get("error", ""), outcome
