"""The raw-measurement file that ``tandem profile`` writes on the GPU, and its conversion to a Profile.

The GPU half (:mod:`.gpu`) emits plain JSON so it can run where tandem is not installed; this
module is its schema. Keeping the raw file beside the profile lets anyone refit on a CPU
(``tandem profile --fit-only RAW.json``) after the cost model or the fit changes, without a GPU.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tandem.perf.profile import GIB, GPUSpec, ModelShape, Profile, ProfilePoint, roofline_params
from tandem.sim.profiling.fit import fit_params, fit_report
from tandem.sim.profiling.shapes import gpu_key, shape_key


class RawPoint(BaseModel):
    """One timed step; ``seconds`` is the full-depth time (scaled when fewer layers were run)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    kind: Literal["prefill", "decode"]
    new_tokens: int = Field(0, ge=0)
    cached_tokens: int = Field(0, ge=0)
    batch: int = Field(0, ge=0)
    context_tokens: int = Field(0, ge=0)
    layers_measured: int = Field(gt=0)
    measured_s: float = Field(gt=0, description="median time of the layers actually run")
    head_s: float | None = Field(None, gt=0, description="embedding + norm + LM head, when scaling")
    min_s: float = Field(gt=0)
    max_s: float = Field(gt=0)
    reps: int = Field(gt=0)
    cuda_graph: bool
    seconds: float = Field(gt=0)


class RawMicro(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    matmul_tflops: float = Field(gt=0, description="achieved bf16 8192^3 matmul on random data")
    copy_gbps: float = Field(gt=0, description="device-to-device copy, bytes read + written")


class RawMemory(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    total_bytes: int = Field(gt=0)
    layers_built: int = Field(gt=0)
    model_weight_bytes: int = Field(gt=0)
    kv_bytes_per_token: int = Field(gt=0)
    activation_tokens: int = Field(gt=0)
    activation_peak_bytes: int = Field(ge=0)
    memory_fraction: float = Field(gt=0, le=1)
    kv_capacity_tokens: int = Field(ge=0)


class RawRun(BaseModel):
    """Everything one GPU run measured (see :func:`tandem.sim.profiling.gpu.measure`)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    format: Literal[1]
    shape: ModelShape
    spec: dict[str, Any]
    environment: dict[str, str]
    micro: RawMicro
    memory: RawMemory
    attention: dict[str, Any] = Field(default_factory=dict)
    points: list[RawPoint]
    skipped: list[dict[str, Any]] = Field(default_factory=list)
    errors: list[dict[str, Any]] = Field(default_factory=list)
    elapsed_s: float = Field(0.0, ge=0)


class MeasurementFileError(ValueError):
    """A raw-measurement file that cannot be read or does not match :class:`RawRun`."""


def load_raw(path: Path) -> RawRun:
    try:
        return RawRun.model_validate_json(path.read_text())
    except OSError as exc:
        raise MeasurementFileError(f"cannot read {path}: {exc.strerror}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise MeasurementFileError(
            f"{path} is not a tandem raw-measurement file: {where}: {first['msg']}") from exc


def default_name(raw: RawRun) -> str:
    key = str(raw.spec.get("shape_key") or shape_key(raw.shape))
    return f"{key}-{gpu_key(raw.environment.get('gpu_name', 'gpu'))}"


def _environment(raw: RawRun) -> dict[str, str]:
    env = {k: raw.environment[k] for k in ("gpu_name", "driver", "torch", "cuda", "cudnn", "python", "kernel")
           if k in raw.environment}
    mem, built, total = raw.memory, raw.memory.layers_built, raw.shape.num_layers
    scaled = sorted({p.layers_measured for p in raw.points if p.layers_measured < total})
    env["measured_bf16_tflops"] = f"{raw.micro.matmul_tflops:.1f}"
    env["measured_copy_gbps"] = f"{raw.micro.copy_gbps:.1f}"
    env["kv_bytes_per_token_measured"] = str(mem.kv_bytes_per_token)
    env["kv_capacity_tokens_measured"] = str(mem.kv_capacity_tokens)
    env["activation_peak_gib"] = f"{mem.activation_peak_bytes / GIB:.2f} at {mem.activation_tokens} tokens"
    env["decode_attention"] = str(raw.attention.get("decode_backend", "unknown")).lower()
    env["method"] = (
        "random bf16 weights, real-shape layers (no QKV bias); prefill: one prompt per step, flash "
        "attention (bottom-right causal over cached prefix), last-token logits, CUDA graphs up to 2048 "
        "tokens; decode: static contiguous KV cache, equal context per sequence, CUDA graphs, logits "
        "for every sequence; median of repeated timings (CUDA events)"
    )
    if built < total or scaled:
        env["layer_scaling"] = (
            f"{built} of {total} layers built; points with layers_measured < {total} ran that many "
            f"real-shape layers and scaled per-layer time: t = t_head + ({total}/k)(t_k - t_head), "
            "t_head = embedding + final norm + LM head timed alone"
        )
    if raw.errors or raw.skipped:
        env["incomplete"] = f"{len(raw.errors)} points failed, {len(raw.skipped)} skipped"
    return env


def to_profile(raw: RawRun, name: str | None = None) -> Profile:
    """Fit the cost model to ``raw`` and build the measured profile (raw points and fit error included)."""
    points = [
        ProfilePoint(kind=p.kind, new_tokens=p.new_tokens, cached_tokens=p.cached_tokens, batch=p.batch,
                     context_tokens=p.context_tokens, seconds=p.seconds,
                     layers_measured=p.layers_measured if p.layers_measured < raw.shape.num_layers else None)
        for p in raw.points
    ]
    gpu = GPUSpec(
        name=raw.environment.get("gpu_name", "unknown GPU"),
        memory_gib=round(raw.memory.total_bytes / GIB, 2),
        bf16_tflops=round(raw.micro.matmul_tflops, 1),
        hbm_gbps=round(raw.micro.copy_gbps, 1),
    )
    params = fit_params(points)
    return Profile(
        name=name or default_name(raw),
        source="measured",
        model=raw.shape,
        gpu=gpu,
        params=params,
        memory_fraction=raw.memory.memory_fraction,
        # Rounded up to 0.1 GiB: the capacity estimate must not promise memory that activations need.
        activation_reserve_gib=math.ceil(raw.memory.activation_peak_bytes / GIB * 10) / 10,
        fit=fit_report(params, roofline_params(raw.shape, gpu), points),
        environment=_environment(raw),
        points=points,
    )
