"""``tandem profile``: measure a model shape on this machine's GPU and write a cost-model profile.

Two halves: measuring needs PyTorch and a CUDA GPU and is imported only when it runs;
``--fit-only RAW.json`` refits recorded measurements on any CPU. Either way the profile carries the
raw points, the fit error and the roofline's error on the same points.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import SettingsConfigDict

from tandem.config import TandemSettings
from tandem.perf.profile import Profile
from tandem.sim.profiling.fit import FitError
from tandem.sim.profiling.measurements import MeasurementFileError, RawRun, load_raw, to_profile
from tandem.sim.profiling.report import summary
from tandem.sim.profiling.shapes import ShapeError, resolve_shape


class ProfileCommand(TandemSettings):
    """Measure prefill and decode step times on the local GPU (random weights) and fit a profile."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_PROFILE_", protected_namespaces=())

    shape: str = Field(
        "llama3-8b",
        validation_alias=AliasChoices("model-config", "tandem_profile_model_config"),
        description="named shape (llama3-8b, qwen2.5-32b) or a Hugging Face style config.json path",
    )
    dtype: Literal["bf16"] = Field("bf16", description="weight and KV cache dtype")
    out: Path | None = Field(None, description="profile JSON to write; unset: ./<model>-<gpu>.json")
    name: str | None = Field(None, description="profile name; unset: <model>-<gpu>")
    raw_out: Path | None = Field(None, description="raw measurements JSON; unset: <out> with .raw.json")
    fit_only: Path | None = Field(None, description="refit a recorded raw-measurements JSON; needs no GPU")
    prefill_tokens: list[int] = Field(
        [128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768], description="prompt lengths, no cached prefix")
    prefill_cached: list[tuple[int, int]] = Field(
        [(128, 2048), (128, 8192), (128, 32768), (512, 16384), (1024, 4096), (2048, 8192), (4096, 28672),
         (8192, 8192), (16384, 16384)],
        description="[new, cached] prompt pairs with a cached prefix")
    decode_batches: list[int] = Field([1, 8, 32, 64, 128, 256], description="decode batch sizes")
    decode_contexts: list[int] = Field([512, 2048, 8192, 32768], description="mean context per sequence")
    decode_max_tokens: int = Field(1 << 20, gt=0, description="skip decode points with batch x context above")
    max_layers: int | None = Field(
        None, gt=0, description="real-shape layers to build; unset: as many as fit in 60 percent of free memory")
    memory_fraction: float = Field(0.9, gt=0, le=1, description="GPU memory share for the capacity estimate")
    activation_tokens: int = Field(8192, gt=0, description="step size whose activation peak is reserved")
    kv_reserve_gib: float | None = Field(
        None, ge=0, description="GPU memory (GiB) kept out of the KV pool; unset: sized from the largest prompt")
    target_s: float = Field(0.3, gt=0, description="timed replays per point last about this long")
    deadline_s: float = Field(300.0, gt=0, description="points not started by then are skipped")

    @model_validator(mode="before")
    @classmethod
    def _yaml_key(cls, data: Any) -> Any:
        """YAML keys arrive with '-' turned into '_'; accept ``model_config:`` there too."""
        if isinstance(data, dict) and "model_config" in data:
            data = dict(data)
            data.setdefault("model-config", data.pop("model_config"))
        return data

    @model_validator(mode="after")
    def _valid_sweep(self) -> ProfileCommand:
        for field in ("prefill_tokens", "decode_batches", "decode_contexts"):
            if any(v <= 0 for v in getattr(self, field)):
                raise ValueError(f"{field}: every value must be positive")
        if any(n <= 0 or c < 0 for n, c in self.prefill_cached):
            raise ValueError("prefill_cached: pairs are [new > 0, cached >= 0]")
        return self

    def spec(self) -> dict[str, Any]:
        """The GPU half's input: plain JSON, so it runs without tandem installed."""
        key, shape = resolve_shape(self.shape, self.dtype)
        spec: dict[str, Any] = {
            "shape": shape.model_dump(), "shape_key": key,
            "prefill_tokens": self.prefill_tokens, "prefill_cached": [list(c) for c in self.prefill_cached],
            "decode_batches": self.decode_batches, "decode_contexts": self.decode_contexts,
            "decode_max_tokens": self.decode_max_tokens, "memory_fraction": self.memory_fraction,
            "activation_tokens": self.activation_tokens, "target_s": self.target_s,
            "deadline_s": self.deadline_s,
        }
        if self.max_layers is not None:
            spec["max_layers"] = self.max_layers
        if self.kv_reserve_gib is not None:
            spec["kv_reserve_gib"] = self.kv_reserve_gib
        return spec

    def measure(self) -> RawRun:
        from tandem.sim.profiling import gpu  # torch: imported only on the measuring path

        raw_path = self.raw_out or (self.out or Path("profile.json")).with_suffix(".raw.json")
        raw_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            result = gpu.measure(self.spec(), str(raw_path))
        except RuntimeError as exc:  # no CUDA device, out of memory, no flash attention kernel
            print(f"tandem profile: measuring failed: {exc} (points so far: {raw_path})", file=sys.stderr)
            raise SystemExit(1) from exc
        print(f"raw measurements: {raw_path}")
        return RawRun.model_validate(result)

    def cli_cmd(self) -> None:
        try:
            raw = load_raw(self.fit_only) if self.fit_only else self.measure()
            profile = to_profile(raw, self.name)
        except (ShapeError, MeasurementFileError, FitError) as exc:
            print(f"tandem profile: {exc}", file=sys.stderr)
            raise SystemExit(2) from exc
        except ImportError as exc:
            print(f"tandem profile: measuring needs PyTorch with CUDA ({exc}); install "
                  "tandem-serving[profile], or refit recorded points with --fit-only", file=sys.stderr)
            raise SystemExit(2) from exc
        out = self.out or Path(f"{profile.name}.json")
        write_profile(profile, out)
        print(summary(profile))
        print(f"profile: {out}")


def write_profile(profile: Profile, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile.model_dump(mode="json"), indent=2) + "\n")
