"""Engine performance profiles: model shape, GPU, and the fitted cost-model coefficients.

A profile is data (one JSON file per model x GPU under ``tandem/perf/profiles/``). It is measured on a
GPU by ``tandem profile`` or, for shapes nobody has measured, derived from a roofline of the
GPU's FLOP/s and HBM bandwidth (:func:`roofline_profile`).
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

GIB = 1024**3


class ModelShape(BaseModel):
    """The dimensions of a dense decoder-only transformer with grouped-query attention."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    tie_word_embeddings: bool = False
    dtype_bytes: int = Field(2, gt=0, description="bytes per weight and per KV element (bf16: 2)")
    max_model_len: int = Field(131072, gt=0)

    @model_validator(mode="after")
    def _gqa(self) -> ModelShape:
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError("num_attention_heads must be a multiple of num_kv_heads")
        return self

    @property
    def layer_params(self) -> int:
        q_o = 2 * self.hidden_size * self.num_attention_heads * self.head_dim
        k_v = 2 * self.hidden_size * self.num_kv_heads * self.head_dim
        mlp = 3 * self.hidden_size * self.intermediate_size
        return q_o + k_v + mlp

    @property
    def params(self) -> int:
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * self.layer_params + embeddings

    @property
    def flops_per_token(self) -> int:
        """Matmul FLOPs per token: 2 per weight, excluding the embedding lookup."""
        return 2 * (self.num_layers * self.layer_params + self.vocab_size * self.hidden_size)

    @property
    def weight_bytes(self) -> int:
        return self.params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V for every layer: 2 x layers x kv_heads x head_dim x bytes."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def attention_flops_per_pair(self) -> int:
        """FLOPs of one (query token, key token) pair over all layers: QK^T and PV, 2 each."""
        return 4 * self.num_layers * self.num_attention_heads * self.head_dim


class GPUSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    memory_gib: float = Field(gt=0)
    bf16_tflops: float = Field(gt=0, description="achievable dense bf16 matmul TFLOP/s")
    hbm_gbps: float = Field(gt=0, description="achievable HBM bandwidth in GB/s (1e9 bytes)")


class CostParams(BaseModel):
    """Coefficients of the step-time model (seconds); see :mod:`tandem.perf.costmodel`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    step_overhead_s: float = Field(ge=0, description="fixed cost of one engine iteration")
    weight_read_s: float = Field(ge=0, description="streaming all weights once: the memory floor of a step")
    per_token_s: float = Field(ge=0, description="linear-layer compute per token in the batch")
    attn_pair_s: float = Field(ge=0, description="prefill attention per (query, key) token pair")
    kv_read_s_per_token: float = Field(ge=0, description="decode attention per context token read")


class ProfilePoint(BaseModel):
    """One raw measurement, kept in the profile so a fit can be checked or redone."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["prefill", "decode"]
    new_tokens: int = Field(0, ge=0, description="prefill: uncached prompt tokens")
    cached_tokens: int = Field(0, ge=0, description="prefill: tokens already in the KV cache")
    batch: int = Field(0, ge=0, description="decode: sequences in the batch")
    context_tokens: int = Field(0, ge=0, description="decode: total context tokens over the batch")
    seconds: float = Field(gt=0)
    layers_measured: int | None = Field(
        None, gt=0, description="layers actually run when fewer than the model's (per-layer time scaled up)")


class FitReport(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prefill_mape: float = Field(ge=0, description="mean absolute percentage error on prefill points")
    decode_mape: float = Field(ge=0, description="mean absolute percentage error on decode points")
    roofline_prefill_mape: float | None = None
    roofline_decode_mape: float | None = None


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    source: Literal["roofline", "measured"]
    model: ModelShape
    gpu: GPUSpec
    params: CostParams
    memory_fraction: float = Field(0.9, gt=0, le=1, description="share of GPU memory the engine may use")
    activation_reserve_gib: float = Field(2.0, ge=0, description="memory kept for activations and graphs")
    kv_block_size: int = Field(16, gt=0, description="tokens per KV cache block (vLLM default 16)")
    max_num_seqs: int = Field(256, gt=0, description="max running sequences per engine")
    max_num_batched_tokens: int = Field(8192, gt=0, description="token budget of one iteration")
    fit: FitReport | None = None
    environment: dict[str, str] = Field(default_factory=dict, description="GPU driver, library versions")
    points: list[ProfilePoint] = Field(default_factory=list)

    @property
    def kv_capacity_tokens(self) -> int:
        free = self.gpu.memory_gib * GIB * self.memory_fraction
        free -= self.model.weight_bytes + self.activation_reserve_gib * GIB
        if free <= 0:
            return 0
        return int(free // self.model.kv_bytes_per_token)


class RooflineEfficiency(BaseModel):
    """What a serving engine reaches of a GPU's achievable ceilings (GPUSpec), for the roofline fallback."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    compute: float = Field(gt=0, le=1, description="share of matmul FLOP/s the linear layers reach")
    attention: float = Field(gt=0, le=1, description="share of matmul FLOP/s prefill attention reaches")
    bandwidth: float = Field(gt=0, le=1, description="share of copy bandwidth weight and KV reads reach")
    step_overhead_s: float = Field(ge=0, description="fixed cost of one iteration")


# Calibrated on the measured Llama-3-8B profiles (H100 and H200) against their measured ceilings by
# tandem.sim.profiling.fit.calibrate_roofline; the Qwen2.5-32B profiles are its out-of-sample check.
# tandem/perf/profiles/README.md has the resulting errors.
ROOFLINE_EFFICIENCY = RooflineEfficiency(compute=0.74, attention=0.42, bandwidth=0.83, step_overhead_s=0.0018)


def roofline_params(model: ModelShape, gpu: GPUSpec,
                    efficiency: RooflineEfficiency = ROOFLINE_EFFICIENCY) -> CostParams:
    flops = gpu.bf16_tflops * 1e12
    bandwidth = gpu.hbm_gbps * 1e9
    return CostParams(
        step_overhead_s=efficiency.step_overhead_s,
        weight_read_s=model.weight_bytes / (bandwidth * efficiency.bandwidth),
        per_token_s=model.flops_per_token / (flops * efficiency.compute),
        attn_pair_s=model.attention_flops_per_pair / (flops * efficiency.attention),
        kv_read_s_per_token=model.kv_bytes_per_token / (bandwidth * efficiency.bandwidth),
    )


def roofline_profile(name: str, model: ModelShape, gpu: GPUSpec, **overrides: object) -> Profile:
    return Profile(name=name, source="roofline", model=model, gpu=gpu,
                   params=roofline_params(model, gpu), **overrides)


PROFILE_DIR = resources.files("tandem.perf.profiles")
DEFAULT_PROFILE = "llama3-8b-h100"


def available_profiles() -> list[str]:
    return sorted(p.name.removesuffix(".json") for p in PROFILE_DIR.iterdir() if p.name.endswith(".json"))


@cache
def load_profile(name_or_path: str) -> Profile:
    """Load a shipped profile by name, or any profile JSON by path."""
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        return Profile.model_validate_json(path.read_text())
    entry = PROFILE_DIR / f"{name_or_path}.json"
    if not entry.is_file():
        raise ValueError(f"unknown profile {name_or_path!r}; available: {', '.join(available_profiles())}")
    return Profile.model_validate(json.loads(entry.read_text()))
