"""Model shapes for ``tandem profile``: the named ones, and any Hugging Face style ``config.json``.

Only the shape matters for timing (weights are random), so a user can profile a model from its
config file alone, without downloading the checkpoint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tandem.perf.profile import ModelShape

DTYPE_BYTES = {"bf16": 2}

NAMED_SHAPES: dict[str, ModelShape] = {
    "llama3-8b": ModelShape(
        name="Llama-3-8B", num_layers=32, hidden_size=4096, num_attention_heads=32, num_kv_heads=8,
        head_dim=128, intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False,
        max_model_len=131072,
    ),
    "qwen2.5-32b": ModelShape(
        name="Qwen2.5-32B", num_layers=64, hidden_size=5120, num_attention_heads=40, num_kv_heads=8,
        head_dim=128, intermediate_size=27648, vocab_size=152064, tie_word_embeddings=False,
        max_model_len=131072,
    ),
}


class ShapeError(ValueError):
    """A model config that is missing, unreadable or not a dense GQA decoder."""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "model"


def shape_from_hf_config(config: dict[str, Any], name: str, dtype: str = "bf16") -> ModelShape:
    """Map a Hugging Face ``config.json`` (Llama, Qwen2, Mistral and alike) to a :class:`ModelShape`."""
    missing = [k for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
                           "vocab_size") if k not in config]
    if missing:
        raise ShapeError(f"model config lacks {', '.join(missing)}")
    heads = int(config["num_attention_heads"])
    try:
        return ModelShape(
            name=name,
            num_layers=int(config["num_hidden_layers"]),
            hidden_size=int(config["hidden_size"]),
            num_attention_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // heads),
            intermediate_size=int(config["intermediate_size"]),
            vocab_size=int(config["vocab_size"]),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            dtype_bytes=DTYPE_BYTES[dtype],
            max_model_len=int(config.get("max_position_embeddings") or 131072),
        )
    except ValidationError as exc:
        raise ShapeError(f"model config is not a dense GQA decoder: {exc}") from exc


def resolve_shape(spec: str, dtype: str = "bf16") -> tuple[str, ModelShape]:
    """``spec`` is a named shape or a path to a ``config.json``; returns (short key, shape)."""
    if dtype not in DTYPE_BYTES:
        raise ShapeError(f"dtype {dtype!r} is not supported; choose from {', '.join(DTYPE_BYTES)}")
    if spec in NAMED_SHAPES:
        return spec, NAMED_SHAPES[spec]
    path = Path(spec)
    if not path.is_file():
        raise ShapeError(f"{spec!r} is neither a named shape ({', '.join(NAMED_SHAPES)}) nor a config file")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ShapeError(f"cannot read model config {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise ShapeError(f"model config {path} is not a JSON object")
    name = str(config.get("_name_or_path") or path.parent.name or path.stem)
    key = _slug(name.rsplit("/", 1)[-1])
    return key, shape_from_hf_config(config, name, dtype)


def shape_key(shape: ModelShape) -> str:
    """The named key of a shape with the same dimensions, else a slug of its name."""
    dims = shape.model_dump(exclude={"name"})
    for key, named in NAMED_SHAPES.items():
        if named.model_dump(exclude={"name"}) == dims:
            return key
    return _slug(shape.name)


def gpu_key(gpu_name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``h100``: the first word with a digit, else a slug of the name."""
    words = [w for w in re.split(r"[\s_-]+", gpu_name) if w.upper() not in {"NVIDIA", "TESLA", "GEFORCE"}]
    for word in words:
        if any(c.isdigit() for c in word):
            return _slug(word)
    return _slug(gpu_name)
