"""tandem.api models and the CRDs generated from them: drift, structure, and CEL == pydantic."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml
from pydantic import ValidationError

from tandem.api.crd import crd, render_crds
from tandem.api.models import LLMService, LLMServiceSpec, RemotePrefillPool
from tandem.operator.reconcile import validation_message

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "title", "const"}


def test_committed_crds_match_the_models() -> None:
    rendered = render_crds()
    on_disk = {p.name: p.read_text() for p in (ROOT / "crds").glob("*.yaml")}
    assert on_disk == rendered, "crds/ drifted from tandem/api/models.py: run `make crds`"


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, node)]
    for name, sub in (node.get("properties") or {}).items():
        out += _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        out += _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        out += _walk(node["additionalProperties"], f"{path}{{}}")
    return out


@pytest.mark.parametrize("model", [LLMService, RemotePrefillPool])
def test_schema_is_structural(model: type[LLMService] | type[RemotePrefillPool]) -> None:
    schema = crd(model)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "type" in node, f"{path} has no type"
        assert not FORBIDDEN & set(node), f"{path} uses {FORBIDDEN & set(node)}"
        assert node.get("additionalProperties") is not False, path
        if node["type"] == "object" and "properties" in node:
            assert not isinstance(node.get("additionalProperties"), dict), f"{path}: both kinds of properties"
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node, path


def _schema_paths(model: type[LLMService]) -> set[str]:
    schema = crd(model)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return {p for p, _ in _walk(schema)}


def test_scale_subresource_and_printer_columns_point_at_real_fields() -> None:
    version = crd(LLMService)["spec"]["versions"][0]
    paths = _schema_paths(LLMService)
    scale = version["subresources"]["scale"]
    for key in ("specReplicasPath", "statusReplicasPath", "labelSelectorPath"):
        assert scale[key] in paths, key
    assert version["subresources"]["status"] == {}
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert columns["Mode"]["jsonPath"] in paths
    assert columns["Ready"]["jsonPath"] in paths
    assert columns["Age"]["type"] == "date"
    assert columns["Available"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'


def test_enums_defaults_and_bounds_reach_the_schema() -> None:
    spec = crd(LLMService)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    model = spec["properties"]["model"]["properties"]
    assert model["engine"]["enum"] == ["vllm", "sglang"] and model["engine"]["default"] == "vllm"
    assert spec["properties"]["mode"]["enum"] == ["aggregated", "disaggregated"]
    pool = spec["properties"]["pools"]["properties"]["decode"]["properties"]
    assert pool["replicas"]["minimum"] == 0 and "default" not in pool["replicas"]
    assert spec["properties"]["replicas"]["default"] == 1  # the scale subresource's field always exists
    assert pool["resources"]["properties"]["nvidia.com/gpu"]["maximum"] == 16
    slo = spec["properties"]["slo"]
    assert slo["default"] == {}  # so the nested defaults apply when slo is left out
    assert slo["properties"]["attainment"]["exclusiveMinimum"] is True
    conditions = crd(LLMService)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"][
        "properties"
    ]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"


# ---------------------------------------------------------------------------------------------
# The CEL rules, evaluated the way the API server does (after defaulting), agree with pydantic.


def _apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    if isinstance(value, dict) and "properties" in schema:
        out = dict(value)
        for name, sub in schema["properties"].items():
            if name not in out and "default" in sub:
                out[name] = copy.deepcopy(sub["default"])
            if name in out:
                out[name] = _apply_defaults(sub, out[name])
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_apply_defaults(schema["items"], v) for v in value]
    return value


def _cel_failures(schema: dict[str, Any], value: Any, env: celpy.Environment) -> list[str]:
    failures = []
    for rule in schema.get("x-kubernetes-validations", []):
        program = env.program(env.compile(rule["rule"]))
        if not bool(program.evaluate({"self": celpy.json_to_cel(value)})):
            failures.append(rule["message"])
    if isinstance(value, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name in value:
                failures += _cel_failures(sub, value[name], env)
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            failures += _cel_failures(schema["items"], item, env)
    return failures


def spec(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"model": {"name": "m"}, "replicas": 2, "pools": {"unified": {}}}
    base.update(changes)
    return base


PD = {"prefill": {"replicas": 1}, "decode": {"minReplicas": 1, "maxReplicas": 4}}
CASES = [
    pytest.param(spec(), None, id="aggregated"),
    pytest.param(spec(mode="disaggregated", pools=PD), None, id="disaggregated"),
    pytest.param(spec(mode="disaggregated", pools=PD, replicas=4), None, id="scale-target-in-bounds"),
    pytest.param(
        spec(mode="disaggregated", pools=PD, offload={"remotePrefill": "w", "auto": True}),
        None,
        id="offload-auto",
    ),
    pytest.param(
        spec(mode="disaggregated", pools=PD, offload={"remotePrefill": "w", "lengthThreshold": 9}),
        None,
        id="offload-threshold",
    ),
    pytest.param(
        spec(mode="disaggregated", pools={"prefill": {"replicas": 1, "minReplicas": 2}, "decode": {}}),
        "replicas must be >= minReplicas",
        id="below-min",
    ),
    pytest.param(
        spec(mode="disaggregated", pools={"prefill": {"replicas": 5, "maxReplicas": 4}, "decode": {}}),
        "replicas must be <= maxReplicas",
        id="above-max",
    ),
    pytest.param(
        spec(replicas=1, pools={"unified": {"minReplicas": 1, "maxReplicas": 1}}), None, id="pinned"
    ),
    pytest.param(
        spec(pools={"unified": {"replicas": 3}}),
        "pools.unified.replicas is not used: spec.replicas sizes the primary pool",
        id="primary-pool-replicas",
    ),
    pytest.param(
        spec(mode="disaggregated", pools={"prefill": {}, "decode": {"replicas": 3}}),
        "pools.decode.replicas is not used: spec.replicas sizes the primary pool",
        id="decode-pool-replicas",
    ),
    pytest.param(
        spec(pools={"prefill": {}, "decode": {}}),
        "aggregated mode needs pools.unified",
        id="aggregated-without-unified",
    ),
    pytest.param(
        spec(pools={"unified": {}, "decode": {}}),
        "pools.prefill and pools.decode are only valid in disaggregated mode",
        id="aggregated-with-decode",
    ),
    pytest.param(
        spec(mode="disaggregated", pools={"prefill": {}}),
        "disaggregated mode needs pools.prefill and pools.decode",
        id="disaggregated-without-decode",
    ),
    pytest.param(
        spec(mode="disaggregated", pools={**PD, "unified": {}}),
        "pools.unified is only valid in aggregated mode",
        id="disaggregated-with-unified",
    ),
    pytest.param(
        spec(offload={"remotePrefill": "w", "auto": True}),
        "offload to a remote prefill pool needs disaggregated mode",
        id="offload-aggregated",
    ),
    pytest.param(
        spec(mode="disaggregated", pools=PD, offload={"remotePrefill": "w"}),
        "set exactly one of lengthThreshold and auto",
        id="offload-neither",
    ),
    pytest.param(
        spec(
            mode="disaggregated", pools=PD, offload={"remotePrefill": "w", "auto": True, "lengthThreshold": 5}
        ),
        "set exactly one of lengthThreshold and auto",
        id="offload-both",
    ),
    pytest.param(
        spec(mode="disaggregated", pools=PD, replicas=9),
        "replicas must lie within pools.decode.minReplicas..maxReplicas",
        id="scale-target-above-max",
    ),
    pytest.param(
        spec(replicas=0, pools={"unified": {"minReplicas": 1}}),
        "replicas must lie within pools.unified.minReplicas..maxReplicas",
        id="scale-target-below-min",
    ),
    pytest.param(
        spec(gateway={"type": "inference-pool", "inferencePool": {"failureMode": "FailOpen"}, "replicas": 2}),
        None,
        id="inference-pool",
    ),
    pytest.param(
        spec(mode="disaggregated", pools=PD, gateway={"type": "inference-pool"}),
        "gateway type inference-pool routes one unified pool: disaggregated mode needs the embedded gateway",
        id="inference-pool-disaggregated",
    ),
    pytest.param(
        spec(gateway={"type": "inference-pool", "workers": 2}),
        "the endpoint picker runs one process per replica: use replicas, not workers",
        id="inference-pool-workers",
    ),
]


@pytest.mark.parametrize(("raw", "error"), CASES)
def test_cel_rules_and_pydantic_agree(raw: dict[str, Any], error: str | None) -> None:
    schema = crd(LLMService)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    defaulted = _apply_defaults(schema, raw)
    cel = _cel_failures(schema, defaulted, celpy.Environment())
    try:
        LLMServiceSpec.model_validate(raw)
        refused = None
    except ValidationError as exc:
        refused = validation_message(exc)[1]
    assert refused == error
    assert (cel[:1] or [None]) == [error]
    if error is None:
        # What the API server stores after defaulting is what pydantic fills in.
        assert LLMServiceSpec.model_validate(defaulted) == LLMServiceSpec.model_validate(raw)


def test_root_rule_limits_the_name_length_and_reports_metadata_name() -> None:
    """Issue 18: without a fieldPath the API server reported the rule at the root (``<nil>: ...``).
    It now points at metadata.name with the operator's own words for the same refusal."""
    from tandem.api.models import ObjectMeta
    from tandem.operator.plan import OperatorDefaults, PlanError, plan_service

    schema = crd(LLMService)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    env = celpy.Environment()
    rules = {"x-kubernetes-validations": schema["x-kubernetes-validations"]}
    body = {"metadata": {"name": "x" * 55}, "spec": spec()}
    assert _cel_failures(rules, body, env) == []
    body["metadata"]["name"] = "x" * 56
    (message,) = _cel_failures(rules, body, env)
    (rule,) = [r for r in schema["x-kubernetes-validations"] if r["message"] == message]
    svc = LLMService(metadata=ObjectMeta(name="x" * 56, uid="u"), spec=LLMServiceSpec.model_validate(spec()))
    with pytest.raises(PlanError) as refused:
        plan_service(svc, OperatorDefaults(), {})
    assert (rule["fieldPath"].lstrip("."), message) == (refused.value.field, refused.value.reason)
    assert schema["properties"]["metadata"] == {"type": "object", "properties": {"name": {"type": "string"}}}


def _field_path_target(schema: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The schema node a CEL rule's fieldPath names (``.a.b`` or ``['a.b']`` steps), or None."""
    node: dict[str, Any] | None = schema
    rest = path
    while rest and node is not None:
        if rest.startswith("['"):
            name, rest = rest[2:].split("']", 1)
        elif rest.startswith("."):
            name = rest[1:].split(".", 1)[0].split("[", 1)[0]
            rest = rest[1 + len(name):]
        else:
            return None
        node = (node.get("properties") or {}).get(name)
    return node


@pytest.mark.parametrize("model", [LLMService, RemotePrefillPool])
def test_every_rule_field_path_names_a_field_of_the_schema(model: type[LLMService] | type[RemotePrefillPool]) -> None:
    """What the API server checks when the CRD is created ("fieldPath must be a valid path"): each
    fieldPath resolves, from the node holding the rule, to a property the schema declares."""
    schema = crd(model)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    checked = []
    for where, node in _walk(schema):
        for rule in node.get("x-kubernetes-validations", []):
            if "fieldPath" in rule:
                assert _field_path_target(node, rule["fieldPath"]) is not None, (where, rule)
                checked.append(rule["fieldPath"])
    assert _field_path_target(schema, ".metadata.nope") is None and _field_path_target(schema, "spec") is None
    if model is LLMService:
        assert ".metadata.name" in checked and ".pools.unified.replicas" in checked


def test_validation_errors_name_the_field_in_json_terms() -> None:
    with pytest.raises(ValidationError) as exc:
        LLMService.model_validate(
            {
                "metadata": {"name": "a"},
                "spec": spec(pools={"unified": {"resources": {"nvidia.com/gpu": 99}}}),
            }
        )
    assert validation_message(exc.value) == (
        "spec.pools.unified.resources.nvidia.com/gpu",
        "Input should be less than or equal to 16",
    )
    with pytest.raises(ValidationError) as exc:
        LLMService.model_validate(
            {"metadata": {"name": "a"}, "spec": spec(model={"name": "m", "kvBlockSize": 0})}
        )
    assert validation_message(exc.value)[0] == "spec.model.kvBlockSize"


def _defaults_with_rules(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """(path, sub-schema) of every sub-schema that has both a default and CEL rules."""
    out = [(path, schema)] if "default" in schema and schema.get("x-kubernetes-validations") else []
    for name, sub in (schema.get("properties") or {}).items():
        out += _defaults_with_rules(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        out += _defaults_with_rules(schema["items"], f"{path}[]")
    return out


def test_every_default_passes_its_own_rules_as_written() -> None:
    """The API server checks a schema's default against its CEL rules without the nested defaults
    applied, so a rule on an object defaulted to {} must guard each key with has(). Found on a real
    API server: spec.gateway's rule read self.type and the CRD was refused ("no such key: type")."""
    env = celpy.Environment()
    checked = [c for model in (LLMService, RemotePrefillPool)
               for c in _defaults_with_rules(crd(model)["spec"]["versions"][0]["schema"]["openAPIV3Schema"])]
    assert ".spec.gateway" in {path for path, _ in checked}
    for path, sub in checked:
        for rule in sub["x-kubernetes-validations"]:
            value = env.program(env.compile(rule["rule"])).evaluate({"self": celpy.json_to_cel(sub["default"])})
            assert bool(value), (path, rule["rule"])


def test_examples_are_valid_resources() -> None:
    kinds = []
    for path in sorted((ROOT / "deploy" / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            model = {"LLMService": LLMService, "RemotePrefillPool": RemotePrefillPool}[doc["kind"]]
            model.model_validate(doc)
            schema = crd(model)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
            assert _cel_failures(schema, _apply_defaults(schema, doc), celpy.Environment()) == [], path
            kinds.append((path.name, doc["kind"], doc["spec"].get("mode")))
    assert ("aggregated-8b.yaml", "LLMService", "aggregated") in kinds
    assert ("disaggregated-2p4d.yaml", "LLMService", "disaggregated") in kinds
    assert ("remote-prefill.yaml", "RemotePrefillPool", None) in kinds


def test_examples_and_gateway_rbac_leave_the_namespace_to_kubectl() -> None:
    """`kubectl apply -n X -f F` refuses an object of F that names another namespace (issue 18: the
    examples said `default`), so the examples and the per-namespace gateway RBAC name none."""
    paths = [*sorted((ROOT / "deploy" / "examples").glob("*.yaml")), ROOT / "deploy" / "rbac" / "gateway.yaml"]
    docs = [(p.name, d) for p in paths for d in yaml.safe_load_all(p.read_text()) if d]
    assert {d["kind"] for _, d in docs} >= {"LLMService", "RemotePrefillPool", "ServiceAccount", "RoleBinding"}
    assert [(name, d["kind"]) for name, d in docs if "namespace" in d["metadata"]] == []
    # The binding's ServiceAccount subject has no namespace either: RBAC reads it as the binding's own.
    binding = next(d for _, d in docs if d["kind"] == "RoleBinding")
    assert [s for s in binding["subjects"] if "namespace" in s] == []
