"""Kubernetes API of Tandem: the ``serving.tandem.dev/v1alpha1`` custom resources.

The pydantic models here are the single source of truth: the CRD YAML in ``crds/`` is generated
from them (:mod:`tandem.api.crd`), the operator validates specs with them, and the autoscaler and
gateway read the same objects through them.
"""

from tandem.api.models import (
    API_VERSION,
    GROUP,
    VERSION,
    Condition,
    ConditionStatus,
    Engine,
    LLMService,
    LLMServiceSpec,
    LLMServiceStatus,
    Mode,
    RemotePrefillPool,
    RemotePrefillPoolSpec,
    RemotePrefillPoolStatus,
    Role,
    RoutingPolicy,
)

__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "Condition",
    "ConditionStatus",
    "Engine",
    "LLMService",
    "LLMServiceSpec",
    "LLMServiceStatus",
    "Mode",
    "RemotePrefillPool",
    "RemotePrefillPoolSpec",
    "RemotePrefillPoolStatus",
    "Role",
    "RoutingPolicy",
]
