"""Contracts between components that are built separately: what one writes, the other must accept."""

from pathlib import Path

import pytest
import yaml
from pydantic_settings import CliApp

from tandem.api.models import LLMService
from tandem.operator.plan import gateway_command
from tandem.router.settings import GatewaySettings

EXAMPLES = sorted(Path(__file__).resolve().parents[2].glob("deploy/examples/*.yaml"))


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


def test_operator_service_description_configures_the_gateway(tmp_path) -> None:
    """The operator's service.json (with a RemotePrefillPool) reaches the gateway's offload settings."""
    from tandem.api.models import RemotePrefillPool
    from tandem.operator.plan import CONFIG_FILE, config_map
    from tandem.router.service_config import apply_service_description, load_service_description

    docs = [d for p in EXAMPLES for d in yaml.safe_load_all(p.read_text()) if d]
    pool = RemotePrefillPool.model_validate(next(d for d in docs if d["kind"] == "RemotePrefillPool"))
    svc = LLMService.model_validate(next(d for d in docs if d["kind"] == "LLMService"
                                         and (d["spec"].get("offload") or {}).get("remotePrefill")))
    path = tmp_path / CONFIG_FILE
    path.write_text(config_map(svc, pool.spec)["data"][CONFIG_FILE])
    argv = gateway_command(svc)
    assert argv[argv.index("--service-config") + 1].endswith(CONFIG_FILE)

    desc = load_service_description(path)
    flags = CliApp.run(GatewaySettings, cli_args=argv[2:], cli_cmd_method_name="model_dump")
    settings = apply_service_description(flags, desc)
    assert settings.remote_prefill_instances == pool.spec.endpoints
    assert settings.remote_link_gbps == pool.spec.link_bandwidth_gbps
    assert settings.remote_prefill_pool == pool.metadata.name == svc.spec.offload.remote_prefill
    assert settings.pd_engine == svc.spec.model.engine
    assert settings.slo_tpot == pytest.approx(svc.spec.slo.tpot_seconds)
    assert settings.offload_threshold is None  # offload.auto: the gateway solves the threshold live
    tuned = CliApp.run(GatewaySettings, cli_args=[*argv[2:], "--remote-link-gbps", "7"],
                       cli_cmd_method_name="model_dump")
    assert apply_service_description(tuned, desc).remote_link_gbps == 7  # an explicit flag wins over the file


def test_bad_service_description_is_a_clear_error(tmp_path) -> None:
    from tandem.router.service_config import ServiceConfigError, load_service_description

    bad = tmp_path / "service.json"
    bad.write_text('{"offload": {"endpoints": []}}')
    with pytest.raises(ServiceConfigError, match="endpoints"):
        load_service_description(bad)
    with pytest.raises(ServiceConfigError, match=r"missing\.json"):
        load_service_description(tmp_path / "missing.json")


def test_operator_gateway_env_reaches_the_gateway_settings(monkeypatch) -> None:
    """The remote pool's credentials Secret reaches the gateway through the env var the operator sets."""
    from tandem.api.models import RemotePrefillPool
    from tandem.operator.plan import OperatorDefaults, config_map, gateway_deployment

    docs = [d for p in EXAMPLES for d in yaml.safe_load_all(p.read_text()) if d]
    pool = RemotePrefillPool.model_validate(next(d for d in docs if d["kind"] == "RemotePrefillPool"))
    assert pool.spec.credentials_secret_ref is not None
    svc = LLMService.model_validate(next(d for d in docs if d["kind"] == "LLMService"
                                         and (d["spec"].get("offload") or {}).get("remotePrefill")))
    deployment = gateway_deployment(svc, OperatorDefaults(), config_map(svc, pool.spec), pool.spec)
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    assert env, "the operator sets no env var for the remote pool's credentials"
    for var in env:  # the kubelet resolves each secretKeyRef into a plain value
        monkeypatch.setenv(var["name"], "from-the-secret")
    settings = CliApp.run(GatewaySettings, cli_args=gateway_command(svc)[2:], cli_cmd_method_name="model_dump")
    assert settings.remote_prefill_token is not None
    assert settings.remote_prefill_token.get_secret_value() == "from-the-secret"
    assert "from-the-secret" not in repr(settings)


@pytest.mark.parametrize("manifest", llm_services(), ids=lambda d: d["metadata"]["name"])
def test_operator_shared_state_reaches_the_gateway_settings(manifest, monkeypatch) -> None:
    """Replicas and workers of a per-service gateway: the Redis URL (env) and the service's own key
    prefix and worker count (flags) are what the gateway parses, so --workers finds its --redis-url."""
    from tandem.operator.plan import OperatorDefaults, config_map, gateway_deployment

    body = {**manifest, "spec": {**manifest["spec"], "gateway": {"replicas": 2, "workers": 3}}}
    svc = LLMService.model_validate(body)
    url = "redis://tandem-redis.tandem-system.svc:6379/0"
    deployment = gateway_deployment(svc, OperatorDefaults(gateway_redis_url=url), config_map(svc, None), None)
    c = deployment["spec"]["template"]["spec"]["containers"][0]
    for var in c["env"]:
        monkeypatch.setenv(var["name"], var["value"])
    settings = CliApp.run(GatewaySettings, cli_args=c["command"][2:], cli_cmd_method_name="model_dump")
    assert settings.redis_url == url and settings.workers == 3
    assert settings.redis_prefix == f"tandem/{svc.metadata.namespace}/{svc.metadata.name}"
