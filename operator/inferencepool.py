"""Pure planning of ``spec.gateway.type: inference-pool``: an InferencePool and Tandem's endpoint picker.

Instead of its own gateway, the LLMService ``S`` then gets what a Gateway API gateway with the
Inference Extension (GIE, ``inference.networking.k8s.io/v1``, checked against GIE v1.6.0) needs:

* InferencePool ``S``: ``selector`` = the unified pool's pod labels, ``targetPorts`` = the engine
  port, ``endpointPickerRef`` = Service ``S-epp`` on the gRPC port, with the spec's ``failureMode``;
* Deployment ``S-epp`` running ``tandem epp`` (the gateway's routing core behind the ext_proc
  protocol), its Service ``S-epp`` (gRPC ext_proc + health, HTTP metrics/admin) and a PDB.

An HTTPRoute whose backendRef is the InferencePool belongs to the user (it attaches to their
Gateway): deploy/examples/inference-pool.yaml shows one. The picker runs as the gateway
ServiceAccount, whose RBAC (read pods, deploy/rbac/gateway.yaml) is exactly what its discovery
needs, so the operator creates no RBAC of its own.
"""

from __future__ import annotations

from typing import Any

from tandem.api.labels import LABEL_COMPONENT, LABEL_INSTANCE
from tandem.api.models import LLMService, Role
from tandem.kube import INFERENCEPOOLS

from .plan import (
    CONFIG_MOUNT,
    ENGINE_PORT,
    REDIS_URL_ENV,
    OperatorDefaults,
    _meta,
    _pdb,
    gateway_redis_env,
    gateway_resources,
    role_selector,
    routing_deployment,
    routing_service_args,
    selector_string,
)

EPP_GRPC_PORT = 9002  # the GIE convention for the picker's ext_proc port
EPP_HTTP_PORT = 9090  # metrics, /healthz, /readyz and the admin API (the autoscaler's observations)
EPP_COMPONENT = "endpoint-picker"
EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"


def epp_name(svc: LLMService) -> str:
    return f"{svc.metadata.name}-epp"


def epp_selector(svc: LLMService) -> dict[str, str]:
    return {LABEL_INSTANCE: svc.metadata.name, LABEL_COMPONENT: EPP_COMPONENT}


def epp_command(svc: LLMService, *, shared_state: bool = False) -> list[str]:
    """argv of the picker: the gateway's routing settings, discovery of the unified pool's pods."""
    return [
        "tandem",
        "epp",
        "--host",
        "0.0.0.0",
        "--port",
        str(EPP_HTTP_PORT),
        "--grpc-port",
        str(EPP_GRPC_PORT),
        "--discovery",
        "kubernetes",
        "--k8s-namespace",
        svc.metadata.namespace,
        "--k8s-selector",
        selector_string(role_selector(svc.metadata.name, Role.unified)),
        "--k8s-port",
        str(ENGINE_PORT),
        "--policy",
        svc.spec.routing.policy,
        *routing_service_args(svc, shared_state=shared_state),
    ]


def _grpc_probe(service: str, period: int, failures: int) -> dict[str, Any]:
    return {"grpc": {"port": EPP_GRPC_PORT, "service": service}, "periodSeconds": period,
            "failureThreshold": failures}


def epp_deployment(svc: LLMService, defaults: OperatorDefaults, config: dict[str, Any]) -> dict[str, Any]:
    selector = epp_selector(svc)
    redis_env = gateway_redis_env(svc, defaults)
    env = [{**redis_env, "name": REDIS_URL_ENV.replace("GATEWAY", "EPP")}] if redis_env is not None else []
    container = {
        "name": "epp",
        "image": svc.spec.gateway.image or defaults.gateway_image,
        "command": epp_command(svc, shared_state=redis_env is not None),
        "env": env,
        "ports": [
            {"name": "grpc", "containerPort": EPP_GRPC_PORT, "protocol": "TCP"},
            {"name": "http", "containerPort": EPP_HTTP_PORT, "protocol": "TCP"},
        ],
        "resources": gateway_resources(1),
        # GIE's health services: liveness (the process answers), readiness (serving, not draining).
        "readinessProbe": _grpc_probe("readiness", 5, 3),
        "livenessProbe": _grpc_probe("liveness", 10, 3),
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True}],
    }
    return routing_deployment(svc, defaults, config, name=epp_name(svc), component=EPP_COMPONENT,
                              selector=selector, container=container)


def epp_service(svc: LLMService) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(svc, epp_name(svc), EPP_COMPONENT),
        "spec": {
            "type": "ClusterIP",
            "selector": epp_selector(svc),
            "ports": [
                # gRPC over cleartext HTTP/2: gateways open the ext_proc stream with h2c.
                {"name": "grpc", "port": EPP_GRPC_PORT, "targetPort": "grpc", "protocol": "TCP",
                 "appProtocol": "kubernetes.io/h2c"},
                {"name": "http", "port": EPP_HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
            ],
        },
    }


def inference_pool(svc: LLMService) -> dict[str, Any]:
    """The InferencePool the user's HTTPRoute names as its backendRef."""
    return {
        "apiVersion": INFERENCEPOOLS.api_version,
        "kind": INFERENCEPOOLS.kind,
        "metadata": _meta(svc, svc.metadata.name, "inference-pool"),
        "spec": {
            "selector": {"matchLabels": role_selector(svc.metadata.name, Role.unified)},
            "targetPorts": [{"number": ENGINE_PORT}],
            "endpointPickerRef": {
                "name": epp_name(svc),
                "port": {"number": EPP_GRPC_PORT},
                "failureMode": svc.spec.gateway.inference_pool.failure_mode,
            },
        },
    }


def picker_children(svc: LLMService, defaults: OperatorDefaults, config: dict[str, Any]) -> list[dict[str, Any]]:
    """What replaces the embedded gateway's Deployment, Service and PDB."""
    return [
        epp_deployment(svc, defaults, config),
        epp_service(svc),
        _pdb(svc, epp_name(svc), EPP_COMPONENT, epp_selector(svc)),
        inference_pool(svc),
    ]
