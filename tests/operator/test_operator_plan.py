"""Pure planning and state logic of the operator: spec -> children, live -> drift, counts -> status."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from tandem.api.models import LLMService, RemotePrefillPoolSpec, Role
from tandem.operator.plan import (
    ANN_CONFIG_HASH,
    OperatorDefaults,
    PlanError,
    engine_command,
    label_value,
    plan_service,
)
from tandem.operator.state import (
    DeploymentCounts,
    child_drift,
    diff_paths,
    invalid_status,
    merge_patch_for,
    service_status,
    status_patch,
)

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
LATER = datetime(2026, 11, 23, 13, 0, tzinfo=UTC)


def service(name: str = "llm", namespace: str = "prod", **spec: Any) -> LLMService:
    body: dict[str, Any] = {
        "metadata": {"name": name, "namespace": namespace, "uid": "uid-1", "generation": 3},
        "spec": {
            "model": {"name": "meta-llama/Llama-3.1-8B-Instruct", "servedName": "llama-8b"},
            "replicas": 2,
            "pools": {"unified": {}},
        },
    }
    body["spec"].update(spec)
    return LLMService.model_validate(body)


def pd(**spec: Any) -> LLMService:
    pools = {"prefill": {"replicas": 2}, "decode": {"maxReplicas": 8}}
    return service(mode="disaggregated", pools=spec.pop("pools", pools), **{"replicas": 4, **spec})


def children(
    svc: LLMService, pools: dict[str, RemotePrefillPoolSpec] | None = None
) -> dict[tuple[str, str], Any]:
    plan = plan_service(svc, OperatorDefaults(), pools or {})
    return {(c["kind"], c["metadata"]["name"]): c for c in plan.children}


def container(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]["containers"][0]


def test_aggregated_plan_has_one_pool_a_gateway_and_config() -> None:
    plan = plan_service(service(), OperatorDefaults(), {})
    assert [(c["kind"], c["metadata"]["name"]) for c in plan.children] == [
        ("ConfigMap", "llm-config"),
        ("Deployment", "llm-unified"),
        ("Service", "llm-unified"),
        ("PodDisruptionBudget", "llm-unified"),
        ("Deployment", "llm-gateway"),
        ("Service", "llm"),
        ("PodDisruptionBudget", "llm-gateway"),
    ]
    for child in plan.children:
        assert child["metadata"]["namespace"] == "prod"
        assert child["metadata"]["ownerReferences"] == [
            {
                "apiVersion": "serving.tandem.dev/v1alpha1",
                "kind": "LLMService",
                "name": "llm",
                "uid": "uid-1",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert child["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "tandem-operator"
        assert child["metadata"]["labels"]["app.kubernetes.io/instance"] == "llm"
    assert plan.warnings == []


def test_disaggregated_plan_has_prefill_and_decode() -> None:
    kids = children(pd())
    assert {n for k, n in kids if k == "Deployment"} == {"llm-prefill", "llm-decode", "llm-gateway"}
    assert kids[("Deployment", "llm-prefill")]["spec"]["replicas"] == 2
    assert kids[("Deployment", "llm-decode")]["spec"]["replicas"] == 4


def test_spec_replicas_sizes_the_primary_pool_only() -> None:
    kids = children(pd(replicas=6))
    assert kids[("Deployment", "llm-decode")]["spec"]["replicas"] == 6
    assert kids[("Deployment", "llm-prefill")]["spec"]["replicas"] == 2
    assert children(service(replicas=3))[("Deployment", "llm-unified")]["spec"]["replicas"] == 3
    # A prefill pool without replicas starts at its minimum (or 1).
    assert pd(pools={"prefill": {}, "decode": {}}).spec.replicas_of(Role.prefill) == 1
    assert pd(pools={"prefill": {"minReplicas": 3}, "decode": {}}).spec.replicas_of(Role.prefill) == 3


def test_vllm_unified_command_line() -> None:
    svc = service(
        model={"name": "m/x", "servedName": "x", "args": ["--max-model-len", "4096"], "kvBlockSize": 32}
    )
    assert engine_command(svc.spec, Role.unified) == [
        "vllm",
        "serve",
        "m/x",
        "--served-model-name",
        "x",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
        "--enable-prefix-caching",
        "--block-size",
        "32",
        "--kv-events-config",
        '{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:5557",'
        '"replay_endpoint":"tcp://*:5558","topic":"kv-events"}',
        "--max-model-len",
        "4096",
    ]


def test_routed_roles_publish_kv_events_and_say_where() -> None:
    """Unified and prefill engines publish KV-cache events; the pod annotation tells gateways where
    (ports on the pod IP), as their Kubernetes discovery reads it."""
    from tandem.kvevents import KVEventsSource
    from tandem.router.discovery import endpoint_from_pod

    svc = pd(model={"name": "m", "engine": "sglang"}, pools={"prefill": {"replicas": 1}, "decode": {}})
    prefill = engine_command(svc.spec, Role.prefill)
    config = json.loads(prefill[prefill.index("--kv-events-config") + 1])
    assert config == {"publisher": "zmq", "endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558",
                      "topic": "kv-events"}
    assert "--kv-events-config" not in engine_command(svc.spec, Role.decode)
    kids = children(svc)
    pod = kids[("Deployment", "llm-prefill")]["spec"]["template"]
    ports = {p["name"]: p["containerPort"] for p in container(kids[("Deployment", "llm-prefill")])["ports"]}
    assert ports["kv-events"] == 5557 and ports["kv-replay"] == 5558
    assert "serving.tandem.dev/kv-events" not in kids[("Deployment", "llm-decode")]["spec"]["template"]["metadata"][
        "annotations"]
    running = {"metadata": {**pod["metadata"], "name": "p-0"},
               "status": {"phase": "Running", "podIP": "10.1.2.3",
                          "conditions": [{"type": "Ready", "status": "True"}]}}
    ep = endpoint_from_pod(running, 8000)
    assert ep is not None and ep.kv_events == KVEventsSource("tcp://10.1.2.3:5557", "tcp://10.1.2.3:5558",
                                                             "kv-events")


def test_vllm_pd_roles_get_kv_transfer_config_and_tensor_parallelism() -> None:
    pools = {"prefill": {"replicas": 1, "resources": {"nvidia.com/gpu": 2}}, "decode": {}}
    svc = pd(pools=pools)
    prefill = engine_command(svc.spec, Role.prefill)
    decode = engine_command(svc.spec, Role.decode)
    for argv in (prefill, decode):
        config = json.loads(argv[argv.index("--kv-transfer-config") + 1])
        assert config == {"kv_connector": "NixlConnector", "kv_role": "kv_both"}
        assert "--enable-prefix-caching" in argv
    assert prefill[prefill.index("--tensor-parallel-size") + 1] == "2"
    assert "--tensor-parallel-size" not in decode
    other = pd(model={"name": "m", "kvConnector": "P2pNcclConnector"})
    assert '"kv_role":"kv_producer"' in engine_command(other.spec, Role.prefill)[-1]
    assert '"kv_role":"kv_consumer"' in engine_command(other.spec, Role.decode)[-1]
    kids = children(svc)
    env = {e["name"]: e for e in container(kids[("Deployment", "llm-prefill")])["env"]}
    assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    ports = {p["name"]: p["containerPort"] for p in container(kids[("Deployment", "llm-decode")])["ports"]}
    assert ports == {"http": 8000, "nixl": 5600}


def test_sglang_command_lines_per_role() -> None:
    svc = pd(
        model={"name": "m", "servedName": "s", "engine": "sglang"},
        pools={"prefill": {"replicas": 1, "resources": {"nvidia.com/gpu": 4}}, "decode": {}},
    )
    prefill = engine_command(svc.spec, Role.prefill)
    decode = engine_command(svc.spec, Role.decode)
    assert prefill[:3] == ["python3", "-m", "sglang.launch_server"]
    assert prefill[prefill.index("--model-path") + 1] == "m"
    assert prefill[prefill.index("--disaggregation-mode") + 1] == "prefill"
    assert prefill[prefill.index("--disaggregation-bootstrap-port") + 1] == "8998"
    assert prefill[prefill.index("--tp-size") + 1] == "4"
    assert decode[decode.index("--disaggregation-mode") + 1] == "decode"
    assert "--disaggregation-bootstrap-port" not in decode
    assert "--enable-metrics" in decode and "--disable-radix-cache" not in decode
    unified = engine_command(service(model={"name": "m", "engine": "sglang"}).spec, Role.unified)
    assert "--disaggregation-mode" not in unified
    assert unified[unified.index("--page-size") + 1] == "16"
    kids = children(svc)
    annotations = kids[("Deployment", "llm-prefill")]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["serving.tandem.dev/bootstrap-port"] == "8998"
    assert container(kids[("Deployment", "llm-prefill")])["image"] == OperatorDefaults().sglang_image
    service_ports = {p["name"] for p in kids[("Service", "llm-prefill")]["spec"]["ports"]}
    assert service_ports == {"http", "bootstrap"}


def test_resources_scheduling_and_probes() -> None:
    svc = service(
        pools={
            "unified": {
                "resources": {"nvidia.com/gpu": 2, "cpu": "8", "memory": "64Gi"},
                "nodeSelector": {"gpu": "h100"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            }
        }
    )
    dep = children(svc)[("Deployment", "llm-unified")]
    c = container(dep)
    want = {"nvidia.com/gpu": "2", "cpu": "8", "memory": "64Gi"}
    assert c["resources"] == {"requests": want, "limits": want}
    pod = dep["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    plain = children(service(pools={"unified": {"resources": {"nvidia.com/gpu": 0}}}))
    plain_pod = plain[("Deployment", "llm-unified")]["spec"]["template"]["spec"]
    assert "resources" not in plain_pod["containers"][0]  # no GPU, no cpu/memory: nothing to request
    assert "nodeSelector" not in plain_pod and "tolerations" not in plain_pod  # empty ones are left out


def test_labels_for_gateway_discovery() -> None:
    dep = children(service())[("Deployment", "llm-unified")]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert labels["serving.tandem.dev/service"] == "llm"
    assert labels["serving.tandem.dev/role"] == "unified"
    assert labels["serving.tandem.dev/model"] == "llama-8b"
    assert labels["serving.tandem.dev/engine"] == "vllm"
    assert dep["spec"]["selector"]["matchLabels"] == {
        "serving.tandem.dev/service": "llm",
        "serving.tandem.dev/role": "unified",
    }
    # The gateway's pods carry the service label (their metrics are labelled with it, and alert
    # summaries name it), but its discovery selector matches engines only, never itself.
    kids = children(pd())
    gateway = kids[("Deployment", "llm-gateway")]
    assert gateway["spec"]["template"]["metadata"]["labels"]["serving.tandem.dev/service"] == "llm"
    argv = container(gateway)["command"]
    selector = argv[argv.index("--k8s-selector") + 1]
    matched = {name for (kind, name), obj in kids.items() if kind == "Deployment"
               and selects(selector, obj["spec"]["template"]["metadata"]["labels"])}
    assert matched == {"llm-prefill", "llm-decode"}
    assert label_value("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama-Llama-3.1-8B-Instruct"
    assert len(label_value("x" * 100)) == 63
    assert label_value("//") == "unnamed"


def selects(selector: str, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector matching for ``k=v`` and ``k`` (exists) terms, as the API server does."""
    for term in selector.split(","):
        key, eq, value = term.partition("=")
        if key not in labels or (eq and labels[key] != value):
            return False
    return True


def test_gateway_runs_the_tandem_gateway_with_kubernetes_discovery() -> None:
    kids = children(service(slo={"ttftSeconds": 2.5}, routing={"policy": "prefix_tree"}))
    c = container(kids[("Deployment", "llm-gateway")])
    assert c["command"] == [
        "tandem",
        "gateway",
        "--discovery",
        "kubernetes",
        "--port",
        "8080",
        "--policy",
        "prefix_tree",
        "--k8s-namespace",
        "prod",
        "--k8s-selector",
        "serving.tandem.dev/service=llm,serving.tandem.dev/role",
        "--slo-ttft",
        "2.5",
        "--service-config",
        "/etc/tandem/service.json",
    ]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert kids[("Service", "llm")]["spec"]["ports"] == [
        {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}
    ]
    pod = kids[("Deployment", "llm-gateway")]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "tandem-gateway"
    assert pod["volumes"] == [{"name": "config", "configMap": {"name": "llm-config"}}]


def test_config_changes_restart_the_gateway_and_plans_are_deterministic() -> None:
    first = children(service())
    assert first == children(service())
    changed = children(service(slo={"ttftSeconds": 1}))

    def digest(kids: dict[tuple[str, str], Any]) -> str:
        return kids[("Deployment", "llm-gateway")]["spec"]["template"]["metadata"]["annotations"][
            ANN_CONFIG_HASH
        ]

    assert digest(first) != digest(changed)
    config = json.loads(changed[("ConfigMap", "llm-config")]["data"]["service.json"])
    assert config["slo"]["ttftSeconds"] == 1
    assert config["roles"] == {"unified": {"service": "llm-unified.prod.svc", "port": 8000, "gpus": 1}}


def test_scaling_does_not_restart_the_gateway() -> None:
    small, large = (
        children(pd(replicas=2)),
        children(pd(replicas=9, pools={"prefill": {"replicas": 5}, "decode": {}})),
    )
    assert small[("Deployment", "llm-gateway")] == large[("Deployment", "llm-gateway")]
    assert small[("ConfigMap", "llm-config")] == large[("ConfigMap", "llm-config")]


def test_remote_prefill_pool_present_or_missing() -> None:
    svc = pd(offload={"remotePrefill": "west", "auto": True})
    plan = plan_service(svc, OperatorDefaults(), {})
    assert plan.warnings and plan.warnings[0].startswith(
        "spec.offload.remotePrefill: RemotePrefillPool 'west'"
    )
    config = json.loads(plan.children[0]["data"]["service.json"])
    assert config["offload"] is None
    pool = RemotePrefillPoolSpec.model_validate(
        {"endpoints": ["https://p.example"], "linkBandwidthGbps": 25, "credentialsSecretRef": {"name": "tok"}}
    )
    kids = children(svc, {"west": pool})
    config = json.loads(kids[("ConfigMap", "llm-config")]["data"]["service.json"])
    assert config["offload"]["endpoints"] == ["https://p.example"]
    assert config["offload"]["auto"] is True and config["offload"]["linkBandwidthGbps"] == 25
    env = {e["name"]: e for e in container(kids[("Deployment", "llm-gateway")])["env"]}
    assert env["TANDEM_GATEWAY_REMOTE_PREFILL_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "tok", "key": "token"}


def test_plan_errors_name_the_field() -> None:
    with pytest.raises(PlanError) as exc:
        plan_service(service(name="n" * 56), OperatorDefaults(), {})
    assert exc.value.field == "metadata.name"
    svc = service()
    svc.metadata.uid = None
    with pytest.raises(PlanError) as exc:
        plan_service(svc, OperatorDefaults(), {})
    assert exc.value.field == "metadata.uid"


# ---------------------------------------------------------------------------------------------
# Gateway shared state (Redis), replicas and workers

REDIS = "redis://tandem-redis.tandem-system.svc:6379/0"
WITH_REDIS = OperatorDefaults(gateway_redis_url=REDIS)


def gateway_of(svc: LLMService, defaults: OperatorDefaults) -> dict[str, Any]:
    kids = plan_service(svc, defaults, {}).children
    name = f"{svc.metadata.name}-gateway"
    return next(c for c in kids if c["kind"] == "Deployment" and c["metadata"]["name"] == name)


def test_one_gateway_process_without_redis_is_planned_as_before() -> None:
    default = gateway_of(service(), OperatorDefaults())
    assert gateway_of(service(gateway={"replicas": 1, "workers": 1}), OperatorDefaults()) == default
    c = container(default)
    assert "env" not in c  # pruned: no Redis URL, no secret
    assert "--redis-prefix" not in c["command"] and "--workers" not in c["command"]
    assert c["resources"] == {"requests": {"cpu": "500m", "memory": "512Mi"}}
    assert default["spec"]["replicas"] == 1


def test_operator_default_redis_reaches_every_gateway_under_its_own_prefix() -> None:
    dep = gateway_of(service(gateway={"replicas": 3}), WITH_REDIS)
    c = container(dep)
    assert dep["spec"]["replicas"] == 3
    assert c["env"] == [{"name": "TANDEM_GATEWAY_REDIS_URL", "value": REDIS}]
    assert c["command"][-2:] == ["--redis-prefix", "tandem/prod/llm"]
    assert "--workers" not in c["command"]
    assert c["resources"] == {"requests": {"cpu": "500m", "memory": "512Mi"}}  # one process per pod
    # A single gateway joins the shared Redis too (another replica may come with the next edit).
    assert container(gateway_of(service(), WITH_REDIS))["env"] == c["env"]
    other = container(gateway_of(service(name="llm2", namespace="dev"), WITH_REDIS))
    assert other["command"][-1] == "tandem/dev/llm2"


def test_the_services_secret_wins_over_the_operator_default() -> None:
    svc = service(gateway={"replicas": 2, "redisSecretRef": {"name": "gw-redis"}})
    for defaults in (OperatorDefaults(), WITH_REDIS):
        c = container(gateway_of(svc, defaults))
        assert c["env"] == [{"name": "TANDEM_GATEWAY_REDIS_URL",
                             "valueFrom": {"secretKeyRef": {"name": "gw-redis", "key": "url"}}}]
        assert c["command"][-2:] == ["--redis-prefix", "tandem/prod/llm"]
    keyed = service(gateway={"redisSecretRef": {"name": "gw-redis", "key": "redis-url"}})
    env = container(gateway_of(keyed, OperatorDefaults()))["env"]
    assert env[0]["valueFrom"]["secretKeyRef"] == {"name": "gw-redis", "key": "redis-url"}


def test_workers_flag_and_a_cpu_per_worker() -> None:
    c = container(gateway_of(service(gateway={"workers": 4}), WITH_REDIS))
    assert c["command"][-4:] == ["--redis-prefix", "tandem/prod/llm", "--workers", "4"]
    assert c["resources"] == {"requests": {"cpu": "4", "memory": "2048Mi"}}
    assert "limits" not in c["resources"]  # a CPU limit would throttle the event loops


@pytest.mark.parametrize(("gateway", "field"), [
    ({"replicas": 2}, "spec.gateway.replicas"),
    ({"workers": 2}, "spec.gateway.workers"),
    ({"replicas": 3, "workers": 8}, "spec.gateway.replicas"),
])
def test_several_gateways_without_redis_are_refused_naming_the_field(gateway: dict[str, int], field: str) -> None:
    with pytest.raises(PlanError) as exc:
        plan_service(service(gateway=gateway), OperatorDefaults(), {})
    assert exc.value.field == field
    assert "needs shared state in Redis" in exc.value.reason
    assert "spec.gateway.redisSecretRef" in exc.value.reason and "--gateway-redis-url" in exc.value.reason


def test_operator_redis_url_is_checked_and_never_shown() -> None:
    secret = "redis://:hunter2@redis.example:6379/0"
    defaults = OperatorDefaults(gateway_redis_url=secret)
    assert "hunter2" not in repr(defaults) and "hunter2" not in str(defaults)
    with pytest.raises(ValueError) as exc:
        OperatorDefaults(gateway_redis_url="http://:hunter2@redis.example")
    assert "must start with redis://" in str(exc.value)
    assert "hunter2" not in "".join(e["msg"] for e in exc.value.errors())


# ---------------------------------------------------------------------------------------------
# Drift


def test_diff_ignores_server_defaults_but_not_changes() -> None:
    desired = {"spec": {"replicas": 2, "ports": [{"name": "http", "port": 80}], "resources": {"cpu": "1.5"}}}
    live = {
        "spec": {
            "replicas": 2,
            "clusterIP": "10.0.0.1",
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
            "resources": {"cpu": "1500m"},
        }
    }
    assert diff_paths(desired, live) == []
    live["spec"]["replicas"] = 5
    live["spec"]["ports"].append({"name": "extra", "port": 81})
    assert diff_paths(desired, live) == [".spec.replicas", ".spec.ports"]
    assert diff_paths({"a": {}, "b": []}, {}) == []
    assert diff_paths({"a": "1"}, {"a": 1}) == []  # int-or-string fields read back as numbers


def test_exactly_owned_fields_catch_additions_and_the_patch_removes_them() -> None:
    desired = children(service(pools={"unified": {"nodeSelector": {"gpu": "h100"}}}))[
        ("Deployment", "llm-unified")
    ]
    live = json.loads(json.dumps(desired))
    assert child_drift(desired, live) == []
    live["spec"]["template"]["spec"]["nodeSelector"]["sneaky"] = "x"
    live["spec"]["template"]["spec"]["tolerations"] = [{"operator": "Exists"}]
    assert child_drift(desired, live) == [
        ".spec.template.spec.nodeSelector",
        ".spec.template.spec.tolerations",
    ]
    patch = merge_patch_for(desired, live)
    assert patch["spec"]["template"]["spec"]["nodeSelector"] == {"sneaky": None, "gpu": "h100"}
    assert patch["spec"]["template"]["spec"]["tolerations"] is None
    svc_desired = children(service())[("Service", "llm")]
    svc_live = json.loads(json.dumps(svc_desired))
    svc_live["spec"]["selector"]["extra"] = "x"
    assert child_drift(svc_desired, svc_live) == [".spec.selector"]
    svc_live["metadata"]["ownerReferences"] = []
    assert ".metadata.ownerReferences" in child_drift(svc_desired, svc_live)


# ---------------------------------------------------------------------------------------------
# Status


def dep_status(desired: int, ready: int, updated: int | None = None) -> DeploymentCounts:
    return DeploymentCounts(
        desired=desired, current=desired, ready=ready, updated=desired if updated is None else updated
    )


def test_status_of_a_ready_disaggregated_service() -> None:
    svc = pd()
    status = service_status(
        svc, {Role.prefill: dep_status(2, 2), Role.decode: dep_status(4, 4)}, dep_status(1, 1), [], None, NOW
    )
    assert status["readySummary"] == "P 2/2 D 4/4"
    assert status["replicas"] == 4
    assert status["selector"] == "serving.tandem.dev/service=llm,serving.tandem.dev/role=decode"
    assert status["observedGeneration"] == 3
    assert status["roles"]["decode"] == {"desired": 4, "ready": 4, "updated": 4}
    conds = {c["type"]: c for c in status["conditions"]}
    assert {t: c["status"] for t, c in conds.items()} == {
        "Ready": "True",
        "Progressing": "False",
        "Degraded": "False",
        "InvalidSpec": "False",
    }
    assert all(c["observedGeneration"] == 3 for c in conds.values())
    assert status["endpoints"][0] == {"name": "llm", "role": "gateway", "url": "http://llm.prod.svc:80"}


def test_status_while_rolling_out_and_degraded() -> None:
    status = service_status(
        pd(),
        {Role.prefill: dep_status(2, 1, updated=1), Role.decode: dep_status(4, 4)},
        dep_status(1, 0),
        ["spec.offload.remotePrefill: missing"],
        None,
        NOW,
    )
    conds = {c["type"]: c for c in status["conditions"]}
    assert conds["Ready"]["status"] == "False"
    assert conds["Ready"]["message"] == "waiting for prefill 1/2, gateway 0/1"
    assert conds["Progressing"]["status"] == "True"
    assert conds["Degraded"]["status"] == "True"
    assert conds["Degraded"]["message"] == "spec.offload.remotePrefill: missing"


def test_pods_the_controller_cannot_create_make_the_service_degraded() -> None:
    live = {
        "spec": {"replicas": 1},
        "status": {
            "conditions": [
                {
                    "type": "ReplicaFailure",
                    "status": "True",
                    "reason": "FailedCreate",
                    "message": 'pods "x" is forbidden: error looking up service account prod/tandem-gateway',
                }
            ]
        },
    }
    gateway = DeploymentCounts.from_deployment(live)
    status = service_status(service(), {Role.unified: dep_status(2, 2)}, gateway, [], None, NOW)
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "ReplicaFailure"
    assert (
        degraded["message"]
        == 'llm-gateway: pods "x" is forbidden: error looking up service account prod/tandem-gateway'
    )


def test_transition_times_survive_and_other_writers_are_kept() -> None:
    counts = {Role.unified: dep_status(2, 2)}
    first = service_status(service(), counts, dep_status(1, 1), [], None, NOW)
    first["conditions"].append({"type": "AutoscalerActive", "status": "True"})
    first["lastScalingDecision"] = {
        "time": "2026-11-23T11:00:00Z",
        "reason": "load",
        "replicas": {"unified": 2},
    }
    second = service_status(service(), counts, dep_status(1, 1), [], first, LATER)
    assert second["conditions"] == first["conditions"]  # same statuses: same transition times
    assert status_patch(second, first) is None  # nothing to write
    third = service_status(service(), {Role.unified: dep_status(2, 1)}, dep_status(1, 1), [], first, LATER)
    ready = next(c for c in third["conditions"] if c["type"] == "Ready")
    assert ready["lastTransitionTime"] == "2026-11-23T13:00:00Z"
    patch = status_patch(third, first)
    assert patch is not None and "lastScalingDecision" not in patch
    assert {c["type"] for c in patch["conditions"]} >= {"AutoscalerActive", "Ready"}


def test_status_patch_removes_roles_of_the_old_mode() -> None:
    old = {"roles": {"unified": {"desired": 2, "ready": 2, "updated": 2}}, "readySummary": "U 2/2"}
    new = {"roles": {"prefill": {"desired": 1, "ready": 0, "updated": 0}}, "readySummary": "P 0/1"}
    assert status_patch(new, old) == {
        "roles": {"prefill": {"desired": 1, "ready": 0, "updated": 0}, "unified": None},
        "readySummary": "P 0/1",
    }


def test_invalid_status_keeps_what_was_running() -> None:
    body = {"metadata": {"generation": 4}, "status": {"readySummary": "U 2/2", "conditions": []}}
    status = invalid_status(
        body, "spec.pools", "disaggregated mode needs pools.prefill and pools.decode", NOW
    )
    conds = {c["type"]: c for c in status["conditions"]}
    assert conds["InvalidSpec"]["status"] == "True"
    assert (
        conds["InvalidSpec"]["message"]
        == "spec.pools: disaggregated mode needs pools.prefill and pools.decode"
    )
    assert conds["Ready"]["status"] == "False"
    assert status["observedGeneration"] == 4
    assert "readySummary" not in status  # the patch leaves the last observed counts in place


def test_deployment_counts_from_a_live_object() -> None:
    live = {
        "metadata": {"generation": 2},
        "spec": {"replicas": 3},
        "status": {"observedGeneration": 2, "replicas": 3, "readyReplicas": 3, "updatedReplicas": 3},
    }
    counts = DeploymentCounts.from_deployment(live)
    assert (counts.desired, counts.ready, counts.settled) == (3, 3, True)
    live["status"]["observedGeneration"] = 1  # the controller has not seen the new spec yet
    assert not DeploymentCounts.from_deployment(live).settled
    assert not DeploymentCounts.from_deployment(None).settled
    assert DeploymentCounts.from_deployment({"spec": {"replicas": 2}}).ready == 0
