"""The operator's ``service.json`` applied to the gateway's settings.

The operator describes each LLMService to its gateway in one file (``operator/plan.py``
``service_description``): engine, mode, SLOs and the RemotePrefillPool the service offloads to.
Instances themselves come from discovery; this file carries what pods cannot (a remote
datacenter's endpoints and link). Flags given explicitly win over the file, so an operator-managed
gateway can still be tuned by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tandem.router.settings import GatewaySettings


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")
    engine: str = "vllm"


class _Slo(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    ttft_seconds: float | None = Field(None, alias="ttftSeconds", gt=0)
    tpot_seconds: float | None = Field(None, alias="tpotSeconds", gt=0)


class _Offload(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    endpoints: list[str] = Field(min_length=1)
    remote_prefill: str | None = Field(None, alias="remotePrefill")
    link_bandwidth_gbps: float = Field(alias="linkBandwidthGbps", gt=0)
    rtt_milliseconds: float = Field(0.0, alias="rttMilliseconds", ge=0)
    length_threshold: int | None = Field(None, alias="lengthThreshold", ge=0)
    auto: bool = True


class ServiceDescription(BaseModel):
    """The part of ``service.json`` the gateway uses."""

    model_config = ConfigDict(extra="ignore")
    model: _Model = Field(default_factory=_Model)
    mode: str = "aggregated"
    slo: _Slo = Field(default_factory=_Slo)
    offload: _Offload | None = None


class ServiceConfigError(ValueError):
    pass


def load_service_description(path: Path) -> ServiceDescription:
    try:
        return ServiceDescription.model_validate(json.loads(path.read_text()))
    except OSError as exc:
        raise ServiceConfigError(f"service config {path}: {exc.strerror}") from exc
    except (json.JSONDecodeError, ValidationError) as exc:
        raise ServiceConfigError(f"service config {path}: {exc}") from exc


def apply_service_description(settings: GatewaySettings, desc: ServiceDescription) -> GatewaySettings:
    """Settings with the description's values for every field not set explicitly."""
    update: dict[str, Any] = {}
    if desc.slo.ttft_seconds is not None:
        update["slo_ttft"] = desc.slo.ttft_seconds
    if desc.slo.tpot_seconds is not None:
        update["slo_tpot"] = desc.slo.tpot_seconds
    if desc.mode == "disaggregated" and desc.model.engine in ("vllm", "sglang"):
        update["pd_engine"] = desc.model.engine
    if desc.offload is not None:
        update["remote_prefill_instances"] = list(desc.offload.endpoints)
        update["remote_link_gbps"] = desc.offload.link_bandwidth_gbps
        update["remote_link_rtt_ms"] = desc.offload.rtt_milliseconds
        update["remote_prefill_pool"] = desc.offload.remote_prefill
        if not desc.offload.auto and desc.offload.length_threshold is not None:
            update["offload_threshold"] = desc.offload.length_threshold
    explicit = settings.model_fields_set
    return settings.model_copy(update={k: v for k, v in update.items() if k not in explicit})
