"""``tandem operator run`` (the kopf operator) and ``tandem operator crds`` (write crds/*.yaml)."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from tandem.config import TandemSettings

if TYPE_CHECKING:
    import kopf  # imported lazily at run time: `tandem --help` must not load it


class OperatorRunCommand(TandemSettings):
    """Run the Tandem operator: reconcile LLMServices into engine pools, a gateway and their config."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_OPERATOR_")

    namespace: list[str] = Field(
        default_factory=list, description="Namespace to watch (repeat the flag for several)."
    )
    all_namespaces: bool = Field(default=False, description="Watch every namespace (cluster-wide).")
    kubeconfig: Path | None = Field(
        default=None, description="kubeconfig file; default: in-cluster, then $KUBECONFIG / ~/.kube/config."
    )
    liveness_port: int = Field(
        default=8081, ge=0, le=65535, description="Serve kopf's /healthz here (0: off)."
    )
    liveness_host: str = Field(default="0.0.0.0", min_length=1, description="Address of the /healthz server.")
    resync_seconds: float = Field(
        default=60.0, ge=0, description="Re-reconcile every LLMService this often (0: events only)."
    )
    reconcile_timeout: float = Field(default=60.0, gt=0, description="Upper bound of one reconcile pass, s.")
    gateway_image: str = Field(
        default="ghcr.io/tandem-serving/tandem:0.1.0", min_length=1, description="Image of gateway pods."
    )
    vllm_image: str = Field(
        default="vllm/vllm-openai:v0.11.0",
        min_length=1,
        description="Engine image when spec.model.image is unset.",
    )
    sglang_image: str = Field(
        default="lmsysorg/sglang:v0.5.4",
        min_length=1,
        description="SGLang image when spec.model.image is unset.",
    )
    gateway_service_account: str = Field(
        default="tandem-gateway", min_length=1, description="ServiceAccount of the gateway pods."
    )
    gateway_redis_url: SecretStr | None = Field(
        default=None,
        description=(
            "Redis of the per-service gateways' shared state (e.g. the chart's Redis), for services "
            "without spec.gateway.redisSecretRef; each keeps its keys under tandem/NAMESPACE/NAME. "
            "It is written as a plain value into their Deployments: a URL with a password belongs in "
            "a Secret named by each service instead. Unset: such services may have only one gateway "
            "replica and worker."
        ),
    )
    verbose: bool = Field(default=False, description="Debug logging.")

    @field_validator("gateway_redis_url")
    @classmethod
    def _redis_url(cls, url: SecretStr | None) -> SecretStr | None:
        from .plan import check_redis_url

        return check_redis_url(url)

    @model_validator(mode="after")
    def _scope(self) -> Self:
        if bool(self.namespace) == self.all_namespaces:
            raise ValueError("give either --namespace NS (one or more) or --all-namespaces")
        return self

    def cli_cmd(self) -> None:
        from .handlers import build_registry
        from .plan import OperatorDefaults
        from .reconcile import Reconciler

        logging.basicConfig(
            level=logging.DEBUG if self.verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        defaults = OperatorDefaults(
            gateway_image=self.gateway_image,
            vllm_image=self.vllm_image,
            sglang_image=self.sglang_image,
            gateway_service_account=self.gateway_service_account,
            gateway_redis_url=self.gateway_redis_url,
        )
        reconciler = Reconciler(defaults, timeout=self.reconcile_timeout)
        namespaces: list[str | None] = [None] if self.all_namespaces else list(self.namespace)
        registry = build_registry(
            reconciler, kubeconfig=self.kubeconfig, namespaces=namespaces, resync_seconds=self.resync_seconds
        )
        liveness = f"http://{self.liveness_host}:{self.liveness_port}/healthz" if self.liveness_port else None
        try:
            asyncio.run(self._operate(registry, liveness))
        except Exception as exc:  # the top of the process: say why, exit non-zero, let Kubernetes restart it
            raise SystemExit(f"tandem operator: stopped: {type(exc).__name__}: {exc}") from exc

    async def _operate(self, registry: kopf.OperatorRegistry, liveness: str | None) -> None:
        import kopf

        from .handlers import build_settings

        await kopf.operator(
            registry=registry,
            settings=build_settings(namespaced=not self.all_namespaces),
            standalone=True,
            clusterwide=self.all_namespaces,
            namespaces=self.namespace,
            liveness_endpoint=liveness,
        )


class OperatorCrdsCommand(TandemSettings):
    """Write the CustomResourceDefinitions generated from tandem.api's models."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_OPERATOR_CRDS_")

    out: Path = Field(default=Path("crds"), description="Directory to write the CRD files into.")
    stdout: bool = Field(default=False, description="Print all CRDs as one multi-document YAML instead.")

    def cli_cmd(self) -> None:
        from tandem.api.crd import render_crds, write_crds

        if self.stdout:
            sys.stdout.write("---\n".join(render_crds().values()))
            return
        for path in write_crds(self.out):
            print(path)
