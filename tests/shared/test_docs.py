"""The generated references are current and every relative link in docs/ resolves."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import gen_crd_reference  # noqa: E402
import gen_metric_reference  # noqa: E402


@pytest.mark.parametrize("module", [gen_crd_reference, gen_metric_reference], ids=lambda m: m.__name__)
def test_generated_reference_is_current(module) -> None:
    assert module.OUT.read_text() == module.render(), f"{module.OUT.name} is stale: run make generate"


def test_crd_reference_covers_every_model_field() -> None:
    """Each field of the spec models appears (by its camelCase name) in the reference."""
    from tandem.api.models import LLMServiceSpec, ModelSpec, PoolSpec, RemotePrefillPoolSpec

    text = gen_crd_reference.OUT.read_text()
    for model in (LLMServiceSpec, ModelSpec, PoolSpec, RemotePrefillPoolSpec):
        for name, field in model.model_fields.items():
            alias = field.alias or name
            assert re.search(rf"`spec\.[\w.\[\]/<>-]*\b{re.escape(alias)}`", text), f"{model.__name__}.{alias}"


def test_metric_reference_lists_what_the_dashboards_use() -> None:
    text = gen_metric_reference.OUT.read_text()
    for name in ("tandem_requests_total", "vllm:num_requests_waiting", "sglang:num_queue_reqs",
                 "tandem_autoscaler_desired_replicas", "tandem:ttft_slo_attainment:ratio_rate5m", "TandemRedisDown"):
        assert f"`{name}`" in text


def test_relative_links_resolve() -> None:
    broken = []
    for doc in sorted((ROOT / "docs").glob("*.md")):
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" in target:
                continue
            if not (doc.parent / target).resolve().exists():
                broken.append(f"{doc.name}: {target}")
    assert broken == []
