"""Pure reconcile planning: an LLMService (plus what it references) -> the Kubernetes objects it needs.

Nothing here talks to the API server, reads a clock or the environment: the handlers fetch, call
:func:`plan_service`, and apply the result. That keeps every decision (names, labels, engine
command lines, GPU requests, probes) unit-testable and identical between a dry run and the cluster.

Children of an LLMService named ``S``:

* per role (``unified`` | ``prefill`` + ``decode``): Deployment ``S-<role>``, Service ``S-<role>``,
  PodDisruptionBudget ``S-<role>``;
* the gateway: Deployment ``S-gateway``, Service ``S`` (what clients call), PDB ``S-gateway``;
* ConfigMap ``S-config`` with ``service.json``, the resolved service description the gateway mounts.

With ``spec.gateway.type: inference-pool`` the gateway's three are replaced by an InferencePool and
Tandem's endpoint picker (``operator/inferencepool.py``).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from pydantic import BaseModel, Field, SecretStr, field_validator

from tandem.api.labels import (
    ANN_BOOTSTRAP_PORT,
    ANN_CONFIG_HASH,
    ANN_KV_EVENTS,
    ANN_PORT,
    ANN_SERVED_MODEL,
    LABEL_COMPONENT,
    LABEL_ENGINE,
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    LABEL_MODEL,
    LABEL_NAME,
    LABEL_ROLE,
    LABEL_SERVICE,
    MANAGER,
)
from tandem.api.models import (
    API_VERSION,
    MAX_NAME_LENGTH,
    Engine,
    GatewayType,
    LLMService,
    LLMServiceSpec,
    RemotePrefillPoolSpec,
    Role,
)

ENGINE_PORT = 8000
GATEWAY_PORT = 8080
NIXL_SIDE_CHANNEL_PORT = 5600
SGLANG_BOOTSTRAP_PORT = 8998
# KV-cache events (unified and prefill engines): ZMQ PUB and replay ROUTER, announced to gateways by
# the pod annotation serving.tandem.dev/kv-events (tandem.kvevents.parse_kv_events).
KV_EVENTS_PORT = 5557
KV_REPLAY_PORT = 5558
KV_EVENTS_TOPIC = "kv-events"
CONFIG_MOUNT = "/etc/tandem"
CONFIG_FILE = "service.json"
REDIS_URL_ENV = "TANDEM_GATEWAY_REDIS_URL"
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
# What one gateway process asks for; --workers N asks for N whole CPUs instead (see gateway_resources).
GATEWAY_CPU = "500m"
GATEWAY_MEMORY_MI = 512


def check_redis_url(url: SecretStr | None) -> SecretStr | None:
    """Refuse what redis-py cannot open, without echoing the URL (it may carry a password)."""
    if url is not None and not url.get_secret_value().startswith(REDIS_SCHEMES):
        raise ValueError(f"must start with {', '.join(REDIS_SCHEMES)}")
    return url


class OperatorDefaults(BaseModel):
    """Cluster-wide choices the operator makes for every LLMService (operator flags)."""

    gateway_image: str = Field(default="ghcr.io/tandem-serving/tandem:0.1.0", min_length=1)
    vllm_image: str = Field(default="vllm/vllm-openai:v0.11.0", min_length=1)
    sglang_image: str = Field(default="lmsysorg/sglang:v0.5.4", min_length=1)
    gateway_service_account: str = Field(default="tandem-gateway", min_length=1)
    # Written as a plain env value into every gateway Deployment without spec.gateway.redisSecretRef.
    gateway_redis_url: SecretStr | None = None

    _redis_url = field_validator("gateway_redis_url")(classmethod(lambda cls, v: check_redis_url(v)))


class Plan(BaseModel):
    """What the cluster should hold for one LLMService, in apply order (config before its readers)."""

    children: list[dict[str, Any]]
    warnings: list[str] = Field(default_factory=list)


class PlanError(ValueError):
    """The spec passed schema validation but cannot be planned; ``field`` is its JSON path."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def label_value(text: str) -> str:
    """A Kubernetes label value for ``text`` (model ids contain '/', labels may not)."""
    value = re.sub(r"[^A-Za-z0-9._-]+", "-", text)[:63]
    return value.strip("-_.") or "unnamed"


def child_selector(name: str) -> dict[str, str]:
    """Labels every child carries; the operator lists its children by them."""
    return {LABEL_INSTANCE: name, LABEL_MANAGED_BY: MANAGER}


def role_selector(name: str, role: Role | str) -> dict[str, str]:
    """The immutable Deployment selector of a role's pods, also the scale subresource's selector."""
    return {LABEL_SERVICE: name, LABEL_ROLE: str(role)}


def selector_string(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in labels.items())


def _meta(svc: LLMService, name: str, component: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": svc.metadata.namespace,
        "labels": {
            LABEL_NAME: "tandem",
            **child_selector(svc.metadata.name),
            LABEL_COMPONENT: component,
            **(labels or {}),
        },
        "ownerReferences": [
            {
                "apiVersion": API_VERSION,
                "kind": "LLMService",
                "name": svc.metadata.name,
                "uid": svc.metadata.uid or "",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }


# ---------------------------------------------------------------------------------------------
# Engine command lines


def publishes_kv_events(role: Role) -> bool:
    """The roles routed on their prefix caches publish KV-cache events (gateways' exact view)."""
    return role in (Role.unified, Role.prefill)


def kv_events_args(engine: Engine) -> list[str]:
    """``--kv-events-config``: both engines take the same ZMQ publisher settings (vLLM also needs the switch)."""
    config: dict[str, Any] = {"publisher": "zmq", "endpoint": f"tcp://*:{KV_EVENTS_PORT}",
                              "replay_endpoint": f"tcp://*:{KV_REPLAY_PORT}", "topic": KV_EVENTS_TOPIC}
    if engine == Engine.vllm:
        config = {"enable_kv_cache_events": True, **config}
    return ["--kv-events-config", json.dumps(config, separators=(",", ":"))]


def engine_command(spec: LLMServiceSpec, role: Role) -> list[str]:
    """argv of one engine container: model, served name, port, prefix caching, PD transfer, TP."""
    model = spec.model
    gpus = spec.pool(role).resources.gpu
    if model.engine == Engine.vllm:
        argv = [
            "vllm",
            "serve",
            model.name,
            "--served-model-name",
            model.served,
            "--host",
            "0.0.0.0",
            "--port",
            str(ENGINE_PORT),
            "--enable-prefix-caching",
            "--block-size",
            str(model.kv_block_size),
        ]
        if publishes_kv_events(role):
            argv += kv_events_args(model.engine)
        if gpus > 1:
            argv += ["--tensor-parallel-size", str(gpus)]
        if role != Role.unified:
            # NIXL is symmetric (both sides pull/push), so vLLM's docs run both roles as kv_both;
            # connectors with a direction (P2P NCCL, LMCache) get producer/consumer.
            if model.kv_connector == "NixlConnector":
                kv_role = "kv_both"
            else:
                kv_role = "kv_producer" if role == Role.prefill else "kv_consumer"
            config = {"kv_connector": model.kv_connector, "kv_role": kv_role}
            argv += ["--kv-transfer-config", json.dumps(config, separators=(",", ":"))]
    else:
        argv = [
            "python3",
            "-m",
            "sglang.launch_server",
            "--model-path",
            model.name,
            "--served-model-name",
            model.served,
            "--host",
            "0.0.0.0",
            "--port",
            str(ENGINE_PORT),
            "--enable-metrics",
            "--page-size",
            str(model.kv_block_size),
        ]
        if publishes_kv_events(role):
            argv += kv_events_args(model.engine)
        if gpus > 1:
            argv += ["--tp-size", str(gpus)]
        if role != Role.unified:
            argv += ["--disaggregation-mode", role.value, "--disaggregation-transfer-backend", "nixl"]
            if role == Role.prefill:
                argv += ["--disaggregation-bootstrap-port", str(SGLANG_BOOTSTRAP_PORT)]
        # RadixAttention (SGLang's prefix cache) is on unless --disable-radix-cache is given.
    return argv + list(model.args)


def _engine_ports(spec: LLMServiceSpec, role: Role) -> list[dict[str, Any]]:
    ports = [{"name": "http", "containerPort": ENGINE_PORT, "protocol": "TCP"}]
    if role != Role.unified and spec.model.engine == Engine.vllm:
        ports.append({"name": "nixl", "containerPort": NIXL_SIDE_CHANNEL_PORT, "protocol": "TCP"})
    if role == Role.prefill and spec.model.engine == Engine.sglang:
        ports.append({"name": "bootstrap", "containerPort": SGLANG_BOOTSTRAP_PORT, "protocol": "TCP"})
    if publishes_kv_events(role):
        ports += [{"name": "kv-events", "containerPort": KV_EVENTS_PORT, "protocol": "TCP"},
                  {"name": "kv-replay", "containerPort": KV_REPLAY_PORT, "protocol": "TCP"}]
    return ports


def _resources(gpu: int, cpu: str | None, memory: str | None) -> dict[str, Any]:
    amounts: dict[str, str] = {}
    if gpu:
        amounts["nvidia.com/gpu"] = str(gpu)
    if cpu:
        amounts["cpu"] = cpu
    if memory:
        amounts["memory"] = memory
    # Extended resources (GPUs) must have requests == limits; cpu/memory follow so pods are Guaranteed.
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def _probe(path: str, port: str, period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period, "failureThreshold": failures}


def _engine_env(spec: LLMServiceSpec, role: Role) -> list[dict[str, Any]]:
    if role == Role.unified or spec.model.engine != Engine.vllm:
        return []
    return [
        {"name": "VLLM_NIXL_SIDE_CHANNEL_HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "VLLM_NIXL_SIDE_CHANNEL_PORT", "value": str(NIXL_SIDE_CHANNEL_PORT)},
    ]


def engine_deployment(svc: LLMService, role: Role, defaults: OperatorDefaults) -> dict[str, Any]:
    spec = svc.spec
    pool = spec.pool(role)
    name = svc.metadata.name
    selector = role_selector(name, role)
    pod_labels = {
        LABEL_NAME: "tandem",
        LABEL_INSTANCE: name,
        LABEL_COMPONENT: role.value,
        **selector,
        LABEL_MODEL: label_value(spec.model.served),
        LABEL_ENGINE: spec.model.engine,
    }
    annotations = {ANN_SERVED_MODEL: spec.model.served, ANN_PORT: str(ENGINE_PORT)}
    if role == Role.prefill and spec.model.engine == Engine.sglang:
        annotations[ANN_BOOTSTRAP_PORT] = str(SGLANG_BOOTSTRAP_PORT)
    if publishes_kv_events(role):
        annotations[ANN_KV_EVENTS] = f"{KV_EVENTS_PORT},replay={KV_REPLAY_PORT},topic={KV_EVENTS_TOPIC}"
    image = spec.model.image or (
        defaults.vllm_image if spec.model.engine == Engine.vllm else defaults.sglang_image
    )
    container = {
        "name": "engine",
        "image": image,
        "command": engine_command(spec, role),
        "env": _engine_env(spec, role),
        "ports": _engine_ports(spec, role),
        "resources": _resources(pool.resources.gpu, pool.resources.cpu, pool.resources.memory),
        # Loading weights takes minutes: the startup probe allows 20 min before liveness applies.
        "startupProbe": _probe("/health", "http", 10, 120),
        "readinessProbe": _probe("/health", "http", 5, 3),
        "livenessProbe": _probe("/health", "http", 10, 6),
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(
            svc, f"{name}-{role.value}", role.value, {**selector, LABEL_MODEL: pod_labels[LABEL_MODEL]}
        ),
        "spec": {
            "replicas": spec.replicas_of(role),
            "selector": {"matchLabels": selector},
            # Surge first: a replica is only removed once its replacement is ready (no capacity dip).
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "revisionHistoryLimit": 3,
            "template": {
                "metadata": {"labels": pod_labels, "annotations": annotations},
                "spec": {
                    "containers": [container],
                    "nodeSelector": dict(pool.node_selector),
                    "tolerations": [t.to_k8s() for t in pool.tolerations],
                    # In-flight requests finish; the gateway stops sending first (DESIGN: drain).
                    "terminationGracePeriodSeconds": 120,
                    "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],
                },
            },
        },
    }


def engine_service(svc: LLMService, role: Role) -> dict[str, Any]:
    spec = svc.spec
    ports = [{"name": "http", "port": ENGINE_PORT, "targetPort": "http", "protocol": "TCP"}]
    if role == Role.prefill and spec.model.engine == Engine.sglang:
        ports.append(
            {"name": "bootstrap", "port": SGLANG_BOOTSTRAP_PORT, "targetPort": "bootstrap", "protocol": "TCP"}
        )
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(svc, f"{svc.metadata.name}-{role.value}", role.value),
        "spec": {"type": "ClusterIP", "selector": role_selector(svc.metadata.name, role), "ports": ports},
    }


def _pdb(svc: LLMService, name: str, component: str, selector: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(svc, name, component),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector}},
    }


# ---------------------------------------------------------------------------------------------
# Gateway and its configuration


def service_description(svc: LLMService, remote: RemotePrefillPoolSpec | None) -> dict[str, Any]:
    """The content of ``service.json``: everything the gateway needs that its flags do not carry.

    No replica counts: the gateway discovers instances from pods, and a change here rolls the
    gateway (config hash), which scaling must not do.
    """
    spec = svc.spec
    ns = svc.metadata.namespace
    roles = {
        role.value: {
            "service": f"{svc.metadata.name}-{role.value}.{ns}.svc",
            "port": ENGINE_PORT,
            "gpus": spec.pool(role).resources.gpu,
        }
        for role in spec.roles()
    }
    offload = None
    if spec.offload is not None and remote is not None:
        offload = {
            "remotePrefill": spec.offload.remote_prefill,
            "lengthThreshold": spec.offload.length_threshold,
            "auto": spec.offload.auto,
            **remote.to_k8s(),
        }
    return {
        "apiVersion": API_VERSION,
        "service": svc.metadata.name,
        "namespace": ns,
        "model": spec.model.to_k8s(),
        "mode": spec.mode,
        "roles": roles,
        "slo": spec.slo.to_k8s(),
        "routing": spec.routing.to_k8s(),
        "offload": offload,
        "autoscaling": spec.autoscaling.to_k8s(),
    }


def config_map(svc: LLMService, remote: RemotePrefillPoolSpec | None) -> dict[str, Any]:
    text = json.dumps(service_description(svc, remote), indent=2, sort_keys=True) + "\n"
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(svc, f"{svc.metadata.name}-config", "config"),
        "data": {CONFIG_FILE: text},
    }


def redis_prefix(svc: LLMService) -> str:
    """Where one service's gateways keep their keys in a Redis other gateways may share.

    Namespaces and names contain neither '/' nor ':', so no two services share a prefix. Every key
    is ``<prefix>:<suffix>`` (router/state.py); the part before its first ':' here contains '/',
    which neither the gateway's default prefix "tandem" nor the chart gateway's (its release's full
    name, a DNS label) can: no key of another gateway can equal one of these.
    """
    return f"tandem/{svc.metadata.namespace}/{svc.metadata.name}"


def gateway_redis_env(svc: LLMService, defaults: OperatorDefaults) -> dict[str, Any] | None:
    """The gateway's Redis URL: the service's Secret, else the operator's default, else none.

    Several gateway replicas or workers with no Redis would each route on a partial view of the
    load (the gateway refuses --workers N > 1 outright), so that is a spec error naming the field.
    """
    gw = svc.spec.gateway
    if gw.redis_secret_ref is not None:
        ref = gw.redis_secret_ref
        return {"name": REDIS_URL_ENV, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
    if defaults.gateway_redis_url is not None:
        return {"name": REDIS_URL_ENV, "value": defaults.gateway_redis_url.get_secret_value()}
    fix = "set spec.gateway.redisSecretRef or run the operator with --gateway-redis-url"
    if gw.replicas > 1:
        raise PlanError("spec.gateway.replicas", f"more than one gateway replica needs shared state in Redis: {fix}")
    if gw.workers > 1:
        raise PlanError("spec.gateway.workers", f"more than one gateway worker needs shared state in Redis: {fix}")
    return None


def gateway_resources(workers: int) -> dict[str, Any]:
    """One process keeps the historical 500m; N workers exist because one loop is not enough, so
    each gets a whole CPU (a busy event loop is one core) and the memory of one gateway process.
    No CPU limit: throttling adds latency to every streamed token."""
    cpu = GATEWAY_CPU if workers == 1 else str(workers)
    return {"requests": {"cpu": cpu, "memory": f"{GATEWAY_MEMORY_MI * workers}Mi"}}


def routing_service_args(svc: LLMService, *, shared_state: bool) -> list[str]:
    """What the gateway and the endpoint picker both take from the service: its TTFT SLO, its
    config file, and (with a Redis URL in the env) a key prefix of its own."""
    argv = ["--slo-ttft", f"{svc.spec.slo.ttft_seconds:g}", "--service-config", f"{CONFIG_MOUNT}/{CONFIG_FILE}"]
    return [*argv, "--redis-prefix", redis_prefix(svc)] if shared_state else argv


def gateway_command(svc: LLMService, *, shared_state: bool = False) -> list[str]:
    """argv of the gateway; ``shared_state``: it has a Redis URL (env), so it gets its own key prefix."""
    spec = svc.spec
    argv = [
        "tandem",
        "gateway",
        "--discovery",
        "kubernetes",
        "--port",
        str(GATEWAY_PORT),
        "--policy",
        spec.routing.policy,
        "--k8s-namespace",
        svc.metadata.namespace,
        "--k8s-selector",
        # Engines only: the gateway's own pods carry the service label too (for its metrics), not a role.
        f"{LABEL_SERVICE}={svc.metadata.name},{LABEL_ROLE}",
        *routing_service_args(svc, shared_state=shared_state),
    ]
    if spec.gateway.workers > 1:
        argv += ["--workers", str(spec.gateway.workers)]
    return argv


def gateway_deployment(
    svc: LLMService, defaults: OperatorDefaults, config: dict[str, Any], remote: RemotePrefillPoolSpec | None
) -> dict[str, Any]:
    name = svc.metadata.name
    selector = {LABEL_INSTANCE: name, LABEL_COMPONENT: "gateway"}
    redis_env = gateway_redis_env(svc, defaults)
    env: list[dict[str, Any]] = [redis_env] if redis_env is not None else []
    if remote is not None and remote.credentials_secret_ref is not None:
        ref = remote.credentials_secret_ref
        env.append(
            {
                "name": "TANDEM_GATEWAY_REMOTE_PREFILL_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}},
            }
        )
    container = {
        "name": "gateway",
        "image": svc.spec.gateway.image or defaults.gateway_image,
        "command": gateway_command(svc, shared_state=redis_env is not None),
        "env": env,
        "ports": [{"name": "http", "containerPort": GATEWAY_PORT, "protocol": "TCP"}],
        "resources": gateway_resources(svc.spec.gateway.workers),
        "readinessProbe": _probe("/readyz", "http", 5, 3),
        "livenessProbe": _probe("/healthz", "http", 10, 3),
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True}],
    }
    return routing_deployment(svc, defaults, config, name=f"{name}-gateway", component="gateway", selector=selector,
                              container=container)


def routing_deployment(svc: LLMService, defaults: OperatorDefaults, config: dict[str, Any], *, name: str,
                       component: str, selector: dict[str, str], container: dict[str, Any]) -> dict[str, Any]:
    """The Deployment of a service's routing front end (its gateway, or its endpoint picker), with the
    service's config mounted. A config change must restart it (it reads service.json at start): the
    config's hash is in the pod template. The service label names the LLMService on its metrics (the
    chart's PodMonitor copies it to `service`); the selector stays as it was (immutable)."""
    digest = hashlib.sha256(json.dumps(config["data"], sort_keys=True).encode()).hexdigest()[:16]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(svc, name, component),
        "spec": {
            "replicas": svc.spec.gateway.replicas,
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "revisionHistoryLimit": 3,
            "template": {
                "metadata": {
                    "labels": {LABEL_NAME: "tandem", **selector, LABEL_SERVICE: svc.metadata.name},
                    "annotations": {ANN_CONFIG_HASH: digest},
                },
                "spec": {
                    "serviceAccountName": defaults.gateway_service_account,
                    "containers": [container],
                    "volumes": [{"name": "config", "configMap": {"name": config["metadata"]["name"]}}],
                },
            },
        },
    }


def gateway_service(svc: LLMService) -> dict[str, Any]:
    name = svc.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(svc, name, "gateway"),
        "spec": {
            "type": "ClusterIP",
            "selector": {LABEL_INSTANCE: name, LABEL_COMPONENT: "gateway"},
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    }


# ---------------------------------------------------------------------------------------------
# The plan


def prune_empty(value: Any) -> Any:
    """Drop empty lists/maps: the API server omits them, so keeping them would look like drift forever."""
    if isinstance(value, dict):
        pruned = {k: prune_empty(v) for k, v in value.items()}
        return {k: v for k, v in pruned.items() if v not in ({}, [], None) or k == "emptyDir"}
    if isinstance(value, list):
        return [prune_empty(v) for v in value]
    return value


def plan_service(
    svc: LLMService,
    defaults: OperatorDefaults,
    remote_pools: dict[str, RemotePrefillPoolSpec],
) -> Plan:
    """Every child object of ``svc``; ``remote_pools`` are the RemotePrefillPools of its namespace.

    A missing RemotePrefillPool is not fatal (it may be created a moment later): the stack is
    planned without offload and the plan carries a warning, reported as the Degraded condition.
    """
    name = svc.metadata.name
    if len(name) > MAX_NAME_LENGTH:
        raise PlanError(
            "metadata.name", f"must be at most {MAX_NAME_LENGTH} characters (children append '-gateway')"
        )
    if not svc.metadata.uid:
        raise PlanError("metadata.uid", "missing; children need it for their owner reference")
    warnings: list[str] = []
    remote: RemotePrefillPoolSpec | None = None
    if svc.spec.offload is not None:
        remote = remote_pools.get(svc.spec.offload.remote_prefill)
        if remote is None:
            warnings.append(
                f"spec.offload.remotePrefill: RemotePrefillPool {svc.spec.offload.remote_prefill!r} "
                f"not found "
                f"in namespace {svc.metadata.namespace}; serving without remote prefill offload"
            )
    config = config_map(svc, remote)
    children: list[dict[str, Any]] = [config]
    for role in svc.spec.roles():
        children.append(engine_deployment(svc, role, defaults))
        children.append(engine_service(svc, role))
        children.append(_pdb(svc, f"{name}-{role.value}", role.value, role_selector(name, role)))
    if svc.spec.gateway.type == GatewayType.inference_pool:
        from .inferencepool import picker_children  # it builds on this module's helpers

        children += picker_children(svc, defaults, config)
    else:
        children.append(gateway_deployment(svc, defaults, config, remote))
        children.append(gateway_service(svc))
        children.append(
            _pdb(svc, f"{name}-gateway", "gateway", {LABEL_INSTANCE: name, LABEL_COMPONENT: "gateway"})
        )
    return Plan(children=[prune_empty(c) for c in children], warnings=warnings)
