"""Contracts between components that are built separately: what one writes, the other must accept."""

from pathlib import Path

import pytest
import yaml
from pydantic_settings import CliApp

from tandem.api.models import LLMService
from tandem.operator.plan import gateway_command
from tandem.router.settings import GatewaySettings

EXAMPLES = sorted(Path(__file__).resolve().parent.parent.glob("deploy/examples/*.yaml"))


def llm_services() -> list[dict]:
    docs = [d for p in EXAMPLES for d in yaml.safe_load_all(p.read_text()) if d]
    return [d for d in docs if d.get("kind") == "LLMService"]


@pytest.mark.parametrize("manifest", llm_services(), ids=lambda d: d["metadata"]["name"])
def test_operator_gateway_command_is_accepted_by_the_gateway(manifest) -> None:
    """The operator writes the gateway's command line; the gateway's own settings must parse it."""
    svc = LLMService.model_validate(manifest)
    argv = gateway_command(svc)
    assert argv[:2] == ["tandem", "gateway"]
    settings = CliApp.run(GatewaySettings, cli_args=argv[2:], cli_cmd_method_name="model_dump")
    assert settings.port == 8080
    assert settings.discovery == "kubernetes"
    assert settings.slo_ttft == pytest.approx(svc.spec.slo.ttft_seconds)
    assert settings.policy == svc.spec.routing.policy


def test_every_crd_routing_policy_exists_in_the_gateway() -> None:
    from tandem.api.models import RoutingPolicy
    from tandem.router.routing.registry import POLICIES

    assert {p.value for p in RoutingPolicy} <= set(POLICIES)
