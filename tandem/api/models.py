"""pydantic models of the ``LLMService`` and ``RemotePrefillPool`` custom resources.

Field names are snake_case in Python and camelCase on the wire (``by_alias``), as Kubernetes
expects. Cross-field rules are written once, as CEL expressions attached to the model that owns
the fields (``x-kubernetes-validations`` in the generated CRD), and enforced again here by
``model_validator`` s with the same meaning: the API server refuses a bad object before it is
stored, and the operator refuses it too when the CRD was installed without those rules (or when
it runs against a test server that has no schema at all) — in which case it reports an
``InvalidSpec`` condition that names the field.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

GROUP = "serving.tandem.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Kubernetes quantities ("8", "500m", "64Gi"); the API server re-checks them, this keeps typos
# out of the operator's own output.
# Children append "-gateway"/"-prefill" to the LLMService name and Service names are 63-char DNS labels.
MAX_NAME_LENGTH = 55

QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    """One ``x-kubernetes-validations`` entry; ``field_path`` makes kubectl point at the field."""
    entry = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    return entry


class ApiModel(BaseModel):
    """Base of every API object: camelCase aliases, unknown fields refused (the CRD prunes them)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", use_enum_values=True
    )

    # CEL rules of this object, copied into its schema by tandem.api.crd.
    cel_rules: ClassVar[list[dict[str, str]]] = []

    def to_k8s(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class Engine(StrEnum):
    vllm = "vllm"
    sglang = "sglang"


class Mode(StrEnum):
    aggregated = "aggregated"
    disaggregated = "disaggregated"


class Role(StrEnum):
    unified = "unified"
    prefill = "prefill"
    decode = "decode"


class RoutingPolicy(StrEnum):
    """The gateway's policies (DESIGN.md "Routing"); DualMap plus the baselines it is compared with."""

    dualmap = "dualmap"
    round_robin = "round_robin"
    least_loaded = "least_loaded"
    least_request = "least_request"
    consistent_hash = "consistent_hash"
    prefix_tree = "prefix_tree"
    min_ttft = "min_ttft"


class ConditionStatus(StrEnum):
    true = "True"
    false = "False"
    unknown = "Unknown"


# ---------------------------------------------------------------------------------------------
# LLMService spec


class ModelSpec(ApiModel):
    name: str = Field(
        min_length=1,
        max_length=256,
        description="Model to load: a Hugging Face id or a path inside the image.",
    )
    served_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="Name clients use in the OpenAI API 'model' field; defaults to name.",
    )
    engine: Engine = Field(default=Engine.vllm, description="Inference engine: vllm or sglang.")
    image: str | None = Field(
        default=None,
        min_length=1,
        max_length=512,
        description="Engine container image; defaults to the operator's image for the engine.",
    )
    args: list[Annotated[str, Field(max_length=4096)]] = Field(
        default_factory=list,
        max_length=128,
        description="Extra engine arguments, appended after the ones Tandem sets.",
    )
    kv_block_size: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="KV cache block (vLLM) / page (SGLang) size in tokens.",
    )
    kv_connector: str = Field(
        default="NixlConnector",
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9_]+$",
        description="vLLM KV connector for disaggregated roles (SGLang uses its nixl transfer backend).",
    )

    @property
    def served(self) -> str:
        return self.served_name or self.name


class Toleration(ApiModel):
    key: str | None = Field(default=None, max_length=316)
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = Field(default=None, max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(default=None, ge=0)


class PoolResources(ApiModel):
    """Per-replica resources; the GPU count is also the engine's tensor-parallel size."""

    gpu: int = Field(default=1, ge=0, le=16, alias="nvidia.com/gpu", description="GPUs per replica.")
    cpu: str | None = Field(default=None, pattern=QUANTITY_PATTERN, description="CPU request and limit.")
    memory: str | None = Field(
        default=None, pattern=QUANTITY_PATTERN, description="Memory request and limit."
    )


class PoolSpec(ApiModel):
    cel_rules: ClassVar[list[dict[str, str]]] = [
        cel(
            "!has(self.minReplicas) || !has(self.replicas) || self.minReplicas <= self.replicas",
            "replicas must be >= minReplicas",
            ".replicas",
        ),
        cel(
            "!has(self.maxReplicas) || !has(self.replicas) || self.replicas <= self.maxReplicas",
            "replicas must be <= maxReplicas",
            ".replicas",
        ),
        cel(
            "!has(self.minReplicas) || !has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
            "minReplicas must be <= maxReplicas",
            ".minReplicas",
        ),
    ]

    replicas: int | None = Field(
        default=None,
        ge=0,
        le=1024,
        description=(
            "Replicas of the prefill pool (default: minReplicas or 1). The primary pool (unified or decode) "
            "is sized by spec.replicas instead, the scale subresource's field."
        ),
    )
    min_replicas: int | None = Field(default=None, ge=0, le=1024, description="Autoscaler's lower bound.")
    max_replicas: int | None = Field(default=None, ge=1, le=1024, description="Autoscaler's upper bound.")
    resources: PoolResources = Field(default_factory=PoolResources)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)

    @model_validator(mode="after")
    def _bounds(self) -> Self:
        if self.replicas is not None and self.min_replicas is not None and self.min_replicas > self.replicas:
            raise ValueError("replicas must be >= minReplicas")
        if self.replicas is not None and self.max_replicas is not None and self.replicas > self.max_replicas:
            raise ValueError("replicas must be <= maxReplicas")
        if (
            self.min_replicas is not None
            and self.max_replicas is not None
            and self.min_replicas > self.max_replicas
        ):
            raise ValueError("minReplicas must be <= maxReplicas")
        return self


class Pools(ApiModel):
    unified: PoolSpec | None = Field(default=None, description="The single pool of aggregated mode.")
    prefill: PoolSpec | None = Field(default=None, description="Prefill pool of disaggregated mode.")
    decode: PoolSpec | None = Field(default=None, description="Decode pool of disaggregated mode.")


class SLO(ApiModel):
    ttft_seconds: float = Field(default=5.0, gt=0, le=600, description="Time-to-first-token target.")
    tpot_seconds: float = Field(default=0.1, gt=0, le=60, description="Time-per-output-token target.")
    attainment: float = Field(
        default=0.9, gt=0, le=1, description="Fraction of requests that must meet both."
    )


class Routing(ApiModel):
    policy: RoutingPolicy = Field(default=RoutingPolicy.dualmap, description="Gateway routing policy.")
    block_size: int = Field(default=512, ge=16, le=8192, description="Tokens per routing-key block.")
    alpha: float = Field(default=0.5, gt=0, le=1, description="Fraction of the TTFT SLO a queue may use.")
    virtual_nodes: int = Field(
        default=128, ge=16, le=1024, description="Virtual nodes per instance per ring."
    )


class Offload(ApiModel):
    cel_rules: ClassVar[list[dict[str, str]]] = [
        cel(
            "has(self.lengthThreshold) != self.auto",
            "set exactly one of lengthThreshold and auto",
            ".lengthThreshold",
        ),
    ]

    remote_prefill: str = Field(
        min_length=1, max_length=253, description="Name of a RemotePrefillPool in this namespace."
    )
    length_threshold: int | None = Field(
        default=None, ge=1, description="Offload requests whose uncached prompt exceeds this many tokens."
    )
    auto: bool = Field(default=False, description="Re-solve the threshold from live load (PrfaaS).")

    @model_validator(mode="after")
    def _one_threshold(self) -> Self:
        if (self.length_threshold is not None) == self.auto:
            raise ValueError("set exactly one of lengthThreshold and auto")
        return self


class Autoscaling(ApiModel):
    enabled: bool = Field(default=False, description="Let tandem autoscaler size the pools.")
    profile: str | None = Field(
        default=None, min_length=1, max_length=128, description="Performance profile name (tandem/perf/profiles)."
    )
    cooldown_seconds: int = Field(default=120, ge=0, le=86400, description="Minimum time between scalings.")


class SecretRef(ApiModel):
    """A key of a Secret in the referring object's namespace (what a pod's secretKeyRef names)."""

    name: str = Field(min_length=1, max_length=253, description="Name of the Secret.")
    key: str = Field(default="token", min_length=1, max_length=253, description="Key inside the Secret.")


class RedisSecretRef(SecretRef):
    """A Redis URL can carry a password, so a service names a Secret rather than the URL itself."""

    key: str = Field(
        default="url", min_length=1, max_length=253, description="Key inside the Secret holding the URL."
    )


class GatewayType(StrEnum):
    """What stands in front of the engines: Tandem's own gateway, or a Gateway API gateway that asks
    Tandem's endpoint picker (Gateway API Inference Extension)."""

    embedded = "embedded"
    inference_pool = "inference-pool"


class FailureMode(StrEnum):
    """InferencePool endpointPickerRef.failureMode (inference.networking.k8s.io/v1)."""

    fail_close = "FailClose"
    fail_open = "FailOpen"


class InferencePoolOptions(ApiModel):
    failure_mode: FailureMode = Field(
        default=FailureMode.fail_close,
        description=(
            "What the Gateway API gateway does while the endpoint picker does not answer: FailClose "
            "refuses the request, FailOpen sends it to an engine of the pool by its own load balancing "
            "(the InferencePool's endpointPickerRef.failureMode)."
        ),
    )


class GatewaySpec(ApiModel):
    cel_rules: ClassVar[list[dict[str, str]]] = [
        cel(
            # has(): the API server checks the rule against the schema's default ({}) too, where
            # neither key is set (both then default to embedded and 1).
            "!has(self.type) || self.type != 'inference-pool' || !has(self.workers) || self.workers == 1",
            "the endpoint picker runs one process per replica: use replicas, not workers",
            ".workers",
        ),
    ]

    type: GatewayType = Field(
        default=GatewayType.embedded,
        description=(
            "embedded: the operator runs Tandem's gateway (Service NAME). inference-pool: it creates an "
            "InferencePool (inference.networking.k8s.io/v1) NAME and Tandem's endpoint picker (Deployment "
            "and Service NAME-epp) for a Gateway API gateway (Envoy Gateway, Istio, kgateway, ...) that "
            "routes to the pool; aggregated mode only. See docs/epp.md."
        ),
    )
    inference_pool: InferencePoolOptions = Field(
        default_factory=InferencePoolOptions, description="Options of type inference-pool."
    )
    replicas: int = Field(
        default=1,
        ge=1,
        le=64,
        description=(
            "Gateway pods. More than one shares load and prefix state through Redis (redisSecretRef or "
            "the operator's --gateway-redis-url); without either the operator refuses the service."
        ),
    )
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description=(
            "Gateway processes per pod, all serving its one port, one event loop each; with more than "
            "one the pod requests one CPU and 512Mi per worker. More than one needs Redis, as replicas do."
        ),
    )
    redis_secret_ref: RedisSecretRef | None = Field(
        default=None,
        description=(
            "Secret (in this namespace) holding the Redis URL of the gateways' shared state, e.g. "
            "redis://:PASSWORD@host:6379/0; overrides the operator's --gateway-redis-url. The "
            "gateways keep their keys under tandem/NAMESPACE/NAME."
        ),
    )
    image: str | None = Field(
        default=None, min_length=1, max_length=512, description="Defaults to the operator's."
    )

    @model_validator(mode="after")
    def _picker_workers(self) -> Self:
        if self.type == GatewayType.inference_pool and self.workers != 1:
            raise ValueError("the endpoint picker runs one process per replica: use replicas, not workers")
        return self


class LLMServiceSpec(ApiModel):
    cel_rules: ClassVar[list[dict[str, str]]] = [
        cel(
            "self.mode != 'aggregated' || has(self.pools.unified)",
            "aggregated mode needs pools.unified",
            ".pools.unified",
        ),
        cel(
            "self.mode != 'aggregated' || (!has(self.pools.prefill) && !has(self.pools.decode))",
            "pools.prefill and pools.decode are only valid in disaggregated mode",
            ".pools",
        ),
        cel(
            "self.mode != 'disaggregated' || (has(self.pools.prefill) && has(self.pools.decode))",
            "disaggregated mode needs pools.prefill and pools.decode",
            ".pools",
        ),
        cel(
            "self.mode != 'disaggregated' || !has(self.pools.unified)",
            "pools.unified is only valid in aggregated mode",
            ".pools.unified",
        ),
        cel(
            "!has(self.offload) || self.mode == 'disaggregated'",
            "offload to a remote prefill pool needs disaggregated mode",
            ".offload",
        ),
        cel(
            "self.gateway.type != 'inference-pool' || self.mode == 'aggregated'",
            "gateway type inference-pool routes one unified pool: disaggregated mode needs the embedded gateway",
            ".gateway.type",
        ),
        *[
            cel(
                f"self.mode != '{mode}' || !has(self.pools.{role}) || !has(self.pools.{role}.replicas)",
                f"pools.{role}.replicas is not used: spec.replicas sizes the primary pool",
                f".pools.{role}.replicas",
            )
            for mode, role in (("aggregated", "unified"), ("disaggregated", "decode"))
        ],
        *[
            cel(
                f"self.mode != '{mode}' || !has(self.replicas) || !has(self.pools.{role}) || "
                f"((!has(self.pools.{role}.minReplicas) || "
                f"self.replicas >= self.pools.{role}.minReplicas) && "
                f"(!has(self.pools.{role}.maxReplicas) || self.replicas <= self.pools.{role}.maxReplicas))",
                f"replicas must lie within pools.{role}.minReplicas..maxReplicas",
                ".replicas",
            )
            for mode, role in (("aggregated", "unified"), ("disaggregated", "decode"))
        ],
    ]

    model: ModelSpec
    mode: Mode = Field(
        default=Mode.aggregated, description="aggregated (one pool) or disaggregated (prefill+decode)."
    )
    replicas: int = Field(
        default=1,
        ge=0,
        le=1024,
        description=(
            "Replicas of the primary pool: unified in aggregated mode, decode in disaggregated mode. "
            "The scale subresource's field (kubectl scale, HPA); see docs/operator.md."
        ),
    )
    pools: Pools
    slo: SLO = Field(default_factory=SLO)
    routing: Routing = Field(default_factory=Routing)
    offload: Offload | None = None
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    gateway: GatewaySpec = Field(default_factory=GatewaySpec)

    @property
    def primary_role(self) -> Role:
        """The role the scale subresource addresses: the one whose size follows request volume."""
        return Role.unified if self.mode == Mode.aggregated else Role.decode

    def roles(self) -> list[Role]:
        return [Role.unified] if self.mode == Mode.aggregated else [Role.prefill, Role.decode]

    def pool(self, role: Role) -> PoolSpec:
        pool = getattr(self.pools, role.value)
        assert pool is not None, "validated: every role of the mode has a pool"
        return pool

    def replicas_of(self, role: Role) -> int:
        if role == self.primary_role:
            return self.replicas
        pool = self.pool(role)
        if pool.replicas is not None:
            return pool.replicas
        return pool.min_replicas or 1

    @model_validator(mode="after")
    def _mode_pools(self) -> Self:
        have = {r for r in Role if getattr(self.pools, r.value) is not None}
        if self.mode == Mode.aggregated:
            if Role.unified not in have:
                raise ValueError("aggregated mode needs pools.unified")
            if have & {Role.prefill, Role.decode}:
                raise ValueError("pools.prefill and pools.decode are only valid in disaggregated mode")
        else:
            if not {Role.prefill, Role.decode} <= have:
                raise ValueError("disaggregated mode needs pools.prefill and pools.decode")
            if Role.unified in have:
                raise ValueError("pools.unified is only valid in aggregated mode")
        if self.offload is not None and self.mode != Mode.disaggregated:
            raise ValueError("offload to a remote prefill pool needs disaggregated mode")
        if self.gateway.type == GatewayType.inference_pool and self.mode != Mode.aggregated:
            raise ValueError(
                "gateway type inference-pool routes one unified pool: disaggregated mode needs the embedded gateway"
            )
        primary = self.primary_role.value
        pool = self.pool(self.primary_role)
        if pool.replicas is not None:
            raise ValueError(
                f"pools.{primary}.replicas is not used: spec.replicas sizes the primary pool"
            )
        too_few = pool.min_replicas is not None and self.replicas < pool.min_replicas
        too_many = pool.max_replicas is not None and self.replicas > pool.max_replicas
        if too_few or too_many:
            raise ValueError(f"replicas must lie within pools.{primary}.minReplicas..maxReplicas")
        return self


# ---------------------------------------------------------------------------------------------
# Status


# Conditions are a map keyed by type, so two writers (operator, autoscaler) can each own theirs.
_CONDITIONS_LIST: dict[str, Any] = {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}


class Condition(ApiModel):
    type: str = Field(max_length=316)
    status: ConditionStatus
    reason: str = Field(default="", max_length=1024)
    message: str = Field(default="", max_length=32768)
    last_transition_time: datetime | None = None
    observed_generation: int | None = Field(default=None, ge=0)


class RoleStatus(ApiModel):
    desired: int = Field(default=0, ge=0)
    ready: int = Field(default=0, ge=0)
    updated: int = Field(default=0, ge=0, description="Replicas already running the current pod template.")


class Endpoint(ApiModel):
    name: str
    role: str = Field(description="gateway (or endpoint-picker), unified, prefill or decode.")
    url: str


class ScalingDecision(ApiModel):
    """Written by the autoscaler; the operator never touches it."""

    time: datetime
    reason: str = Field(max_length=4096)
    replicas: dict[str, int] = Field(default_factory=dict, description="Role -> replicas decided.")


class LLMServiceStatus(ApiModel):
    observed_generation: int | None = Field(default=None, ge=0)
    replicas: int = Field(
        default=0, ge=0, description="Ready replicas of the primary pool (scale subresource)."
    )
    selector: str | None = Field(default=None, description="Label selector of the primary pool's pods (HPA).")
    ready_summary: str | None = Field(default=None, description="Ready/desired per role, e.g. 'P 2/2 D 4/4'.")
    roles: dict[str, RoleStatus] = Field(default_factory=dict)
    endpoints: list[Endpoint] = Field(default_factory=list)
    conditions: list[Condition] = Field(default_factory=list, json_schema_extra=_CONDITIONS_LIST)
    last_scaling_decision: ScalingDecision | None = None


# ---------------------------------------------------------------------------------------------
# RemotePrefillPool


class PoolCapacity(ApiModel):
    instances: int = Field(default=1, ge=1, le=4096, description="Prefill instances behind the endpoints.")
    tokens_per_second: float | None = Field(default=None, gt=0, description="Aggregate prefill throughput.")


class RemotePrefillPoolSpec(ApiModel):
    endpoints: list[Annotated[str, Field(pattern=r"^https?://[^\s]+$", max_length=2048)]] = Field(
        min_length=1, max_length=64, description="Base URLs of the remote prefill cluster."
    )
    link_bandwidth_gbps: float = Field(gt=0, le=100000, description="Link bandwidth to this cluster, Gbit/s.")
    rtt_milliseconds: float = Field(default=0.0, ge=0, le=10000, description="Round-trip time of the link.")
    capacity: PoolCapacity = Field(default_factory=PoolCapacity)
    credentials_secret_ref: SecretRef | None = Field(
        default=None,
        description="Secret (in this namespace) holding the bearer token the gateway sends to these endpoints.",
    )


class RemotePrefillPoolStatus(ApiModel):
    """``reachable`` and the measurements are written by the gateway, which uses the link."""

    observed_generation: int | None = Field(default=None, ge=0)
    reachable: bool | None = None
    measured_bandwidth_gbps: float | None = Field(default=None, ge=0)
    queue_tokens: int | None = Field(default=None, ge=0)
    conditions: list[Condition] = Field(default_factory=list, json_schema_extra=_CONDITIONS_LIST)


# ---------------------------------------------------------------------------------------------
# Whole objects


class ObjectMeta(BaseModel):
    """The metadata fields Tandem reads; everything else is kept as is by the server."""

    model_config = ConfigDict(extra="allow")
    name: str
    namespace: str = "default"
    uid: str | None = None
    generation: int | None = None


class LLMService(ApiModel):
    """An LLM served by vLLM or SGLang pools behind a Tandem gateway.

    The operator turns it into one Deployment per role, their Services, a gateway, a ConfigMap and
    PodDisruptionBudgets; the autoscaler sizes its pools.
    """

    kind_name: ClassVar[str] = "LLMService"
    plural: ClassVar[str] = "llmservices"
    short_names: ClassVar[list[str]] = ["llms"]

    api_version: Literal["serving.tandem.dev/v1alpha1"] = API_VERSION
    kind: Literal["LLMService"] = "LLMService"
    metadata: ObjectMeta
    spec: LLMServiceSpec
    status: LLMServiceStatus | None = None


class RemotePrefillPool(ApiModel):
    """A prefill cluster in another datacenter that LLMServices may offload long prompts to.

    Tandem does not run it: it is an external endpoint with a known link, referenced by name from
    an LLMService's spec.offload.remotePrefill.
    """

    kind_name: ClassVar[str] = "RemotePrefillPool"
    plural: ClassVar[str] = "remoteprefillpools"
    short_names: ClassVar[list[str]] = ["rpp"]

    api_version: Literal["serving.tandem.dev/v1alpha1"] = API_VERSION
    kind: Literal["RemotePrefillPool"] = "RemotePrefillPool"
    metadata: ObjectMeta
    spec: RemotePrefillPoolSpec
    status: RemotePrefillPoolStatus | None = None
