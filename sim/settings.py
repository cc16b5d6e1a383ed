"""Configuration of one simulated engine (``tandem sim``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from tandem.api.models import Role
from tandem.config import TandemSettings

FaultMode = Literal["none", "crash", "hang", "slow", "error"]


class SimSettings(TandemSettings):
    model_config = SettingsConfigDict(env_prefix="TANDEM_SIM_")

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one)")
    profile: str = Field("llama3-8b-h100", description="performance profile name or JSON path")
    served_model_name: str | None = Field(None, description="model name in the API (default: the profile's model)")
    role: Role = Field(Role.unified, description="engine role for PD serving")
    metrics: Literal["vllm", "sglang"] = Field("vllm", description="metric names to export")
    max_num_seqs: int | None = Field(None, gt=0, description="max running sequences (default: profile)")
    max_num_batched_tokens: int | None = Field(None, gt=0, description="token budget per iteration")
    max_model_len: int | None = Field(None, gt=0, description="context length in tokens (vLLM's --max-model-len; "
                                      "default: the profile's model)")
    kv_capacity_tokens: int | None = Field(None, gt=0, description="override the KV capacity from the profile")
    host_cache_tokens: int = Field(0, ge=0, description="host-memory KV tier in tokens (0: none); blocks "
                                   "evicted from GPU go there and hits are loaded over PCIe, not recomputed")
    host_link_gbytes_s: float = Field(25.0, gt=0, description="host-to-GPU KV load bandwidth in GB/s "
                                      "(25 ~ PCIe Gen5 x16 effective)")
    default_max_tokens: int = Field(256, gt=0, description="output length when a request gives none (vLLM: the "
                                    "rest of the context)")
    enable_prompt_tokens_details: bool = Field(False, description="report usage.prompt_tokens_details.cached_tokens "
                                               "(vLLM's --enable-prompt-tokens-details; null without it)")
    max_pending: int = Field(4096, gt=0, description="requests accepted but unfinished before answering 503")
    fault: FaultMode = Field("none", description="injected fault: crash, hang, slow, error")
    slowdown: float = Field(1.0, ge=1.0, description="with fault=slow: every iteration takes this many times longer")
    error_rate: float = Field(0.0, ge=0.0, le=1.0, description="with fault=error: share of requests answered 500")
    seed: int = Field(0, description="seed of the fault injector's random choices")
    time_scale: float = Field(1.0, gt=0, le=100, description="engine seconds per wall-clock second (benchmarks: "
                              "replay a trace N times faster; the engine's own metrics are in engine seconds)")
    engine_id: str | None = Field(None, min_length=1, max_length=128,
                                  description="KV-transfer engine id (vLLM remote_engine_id); default: random")
    kv_link_gbps: float = Field(100.0, gt=0, description="decode role: Gbit/s of the link KV is pulled over")
    kv_link_per_flow_gbps: float | None = Field(None, gt=0, description="decode role: cap of one KV transfer")
    kv_rtt_ms: float = Field(0.5, ge=0, description="decode role: round trip before the first KV byte")
    kv_transport: Literal["simulated", "wire"] = Field("simulated", description="decode role: simulated: the "
                                                       "KV moves in simulated time over a --kv-link-gbps link; "
                                                       "wire: the prefill engine sends the KV bytes themselves "
                                                       "(prompt tokens x the profile's KV bytes per token) over "
                                                       "HTTP, so a real (e.g. shaped) network path carries them")
    kv_hold_s: float = Field(120.0, gt=0, description="prefill role: how long computed KV waits to be pulled")
    kv_wait_s: float = Field(60.0, gt=0, description="decode role: how long to wait for the prefill's KV")
    kv_events: str | None = Field(None, description="publish KV-cache events as vLLM's --kv-events-config does: "
                                  "the PUB endpoint to bind (tcp://127.0.0.1:5557, ipc:///path)")
    kv_events_replay: str | None = Field(None, description="the replay ROUTER endpoint to bind (missed batches)")
    kv_events_topic: str = Field("", description="the events' topic (vLLM's default: empty)")
    kv_events_buffer: int = Field(10_000, gt=0, le=1_000_000, description="batches kept for replay (vLLM's "
                                  "buffer_steps)")
    api_key: SecretStr | None = Field(None, description="require 'Authorization: Bearer KEY' on /v1/* (vLLM's "
                                      "--api-key; env TANDEM_SIM_API_KEY), as a remote prefill pool behind "
                                      "credentials does")

    @model_validator(mode="after")
    def _kv_events(self) -> SimSettings:
        for name in ("kv_events", "kv_events_replay"):
            value = getattr(self, name)
            if value is not None and not value.startswith(("tcp://", "ipc://", "inproc://")):
                raise ValueError(f"{name}: {value!r} is not a tcp://, ipc:// or inproc:// endpoint")
        if self.kv_events_replay is not None and self.kv_events is None:
            raise ValueError("kv_events_replay: needs kv_events")
        return self
