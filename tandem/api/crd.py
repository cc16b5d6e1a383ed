"""Generate the CustomResourceDefinitions from the pydantic models.

pydantic emits JSON Schema 2020-12; the API server wants a *structural* OpenAPI v3 schema: every
node typed, no ``$ref``/``anyOf``/``title``/``additionalProperties: false``, boolean
``exclusiveMinimum``. :func:`structural` performs that translation, copies each model's CEL rules
into ``x-kubernetes-validations`` and adds ``default: {}`` to optional sub-objects so that the
server applies the nested defaults even when the user leaves the whole object out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from tandem.api.models import GROUP, MAX_NAME_LENGTH, VERSION, ApiModel, LLMService, RemotePrefillPool

_DROP = {"title", "additionalProperties", "$defs"}
# The name limit, on the root: without a fieldPath the API server reports it at the root, whose path
# prints as "<nil>"; with it, at metadata.name, in the operator's words (operator/plan.py).
NAME_LENGTH_RULE = {
    "rule": f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
    "message": f"must be at most {MAX_NAME_LENGTH} characters (children append '-gateway')",
    "fieldPath": ".metadata.name",
}


def _model_classes(root: type[BaseModel]) -> dict[str, type[ApiModel]]:
    """Every ApiModel reachable from ``root``, by the name pydantic uses in ``$defs``."""
    found: dict[str, type[ApiModel]] = {}
    stack: list[Any] = [root]
    while stack:
        tp = stack.pop()
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if tp.__name__ in found:
                continue
            if issubclass(tp, ApiModel):
                found[tp.__name__] = tp
            stack.extend(f.annotation for f in tp.model_fields.values())
        else:
            stack.extend(getattr(tp, "__args__", ()) or ())
            stack.extend(getattr(tp, "__metadata__", ()) or ())
    return found


def structural(
    schema: dict[str, Any], defs: dict[str, Any], classes: dict[str, type[ApiModel]]
) -> dict[str, Any]:
    """Translate one pydantic JSON-schema node (and its children) to a structural schema node."""
    node = dict(schema)
    if "$ref" in node:
        name = node.pop("$ref").rsplit("/", 1)[-1]
        resolved = structural(defs[name], defs, classes)
        rules = classes[name].cel_rules if name in classes else []
        if rules:
            resolved["x-kubernetes-validations"] = [dict(r) for r in rules]
        # Field-level keys (description, default) win over the referenced type's own.
        return {**resolved, **{k: v for k, v in structural(node, defs, classes).items() if k != "type"}}
    if "anyOf" in node:
        variants = [v for v in node.pop("anyOf") if v.get("type") != "null"]
        if len(variants) != 1:
            raise ValueError(f"cannot express a union in a structural schema: {variants}")
        merged = {**structural(variants[0], defs, classes), **structural(node, defs, classes)}
        if merged.get("default", 0) is None:
            del merged["default"]
        return merged
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "const":
            out["enum"] = [value]
        elif key in {"exclusiveMinimum", "exclusiveMaximum"}:
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif key == "properties":
            required = set(node.get("required", []))
            props = {}
            for name, sub in value.items():
                prop = structural(sub, defs, classes)
                optional_object = (
                    name not in required
                    and "default" not in prop
                    and prop.get("type") == "object"
                    and "anyOf" not in sub
                    and "additionalProperties" not in prop
                    and "properties" in prop
                )
                if optional_object:
                    prop["default"] = {}
                props[name] = prop
            out["properties"] = props
        elif key == "items":
            out["items"] = structural(value, defs, classes)
        elif key == "default" and value is None:
            continue
        else:
            out[key] = value
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        out["additionalProperties"] = structural(extra, defs, classes)
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    return out


def _object_schema(model: type[BaseModel], field: str) -> dict[str, Any]:
    """Structural schema of ``model``'s ``field`` (spec or status) with its own CEL rules."""
    sub = model.model_fields[field].annotation
    sub = next(
        a for a in (sub, *getattr(sub, "__args__", ())) if isinstance(a, type) and issubclass(a, BaseModel)
    )
    raw = sub.model_json_schema(by_alias=True, mode="validation")
    classes = _model_classes(sub)
    schema = structural(raw, raw.get("$defs", {}), classes)
    if issubclass(sub, ApiModel) and sub.cel_rules:
        schema["x-kubernetes-validations"] = [dict(r) for r in sub.cel_rules]
    return schema


def crd(model: type[LLMService] | type[RemotePrefillPool]) -> dict[str, Any]:
    """The full CustomResourceDefinition object of one resource."""
    kind = model.kind_name
    plural = model.plural
    spec_schema = _object_schema(model, "spec")
    status_schema = _object_schema(model, "status")
    spec_schema["description"] = f"Desired state of the {kind}."
    status_schema["description"] = f"Observed state of the {kind}, written by Tandem's controllers."
    version: dict[str, Any] = {
        "name": VERSION,
        "served": True,
        "storage": True,
        "schema": {
            "openAPIV3Schema": {
                "type": "object",
                "description": (model.__doc__ or kind).strip().splitlines()[0],
                "required": ["spec"],
                "x-kubernetes-validations": [NAME_LENGTH_RULE] if model is LLMService else [],
                "properties": {
                    "apiVersion": {"type": "string"},
                    "kind": {"type": "string"},
                    # A root schema may describe metadata.name (and generateName) only; declaring
                    # it makes `.metadata.name` a valid fieldPath for the rule above.
                    "metadata": {"type": "object", "properties": {"name": {"type": "string"}}}
                    if model is LLMService
                    else {"type": "object"},
                    "spec": spec_schema,
                    "status": status_schema,
                },
            }
        },
        "subresources": {"status": {}},
        "additionalPrinterColumns": [],
    }
    root = version["schema"]["openAPIV3Schema"]
    if not root["x-kubernetes-validations"]:
        del root["x-kubernetes-validations"]
    if model is LLMService:
        # One scale subresource per CRD is all Kubernetes allows: it addresses the primary pool
        # (unified or decode) through spec.replicas; the autoscaler patches the other role's
        # spec.pools.<role>.replicas directly (docs/operator.md).
        version["subresources"]["scale"] = {
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        }
        version["additionalPrinterColumns"] = [
            {"name": "Mode", "type": "string", "jsonPath": ".spec.mode"},
            {"name": "Model", "type": "string", "jsonPath": ".spec.model.name", "priority": 1},
            {
                "name": "Ready",
                "type": "string",
                "jsonPath": ".status.readySummary",
                "description": "Ready/desired replicas per role (U unified, P prefill, D decode).",
            },
            {
                "name": "Available",
                "type": "string",
                "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
            },
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ]
    else:
        version["additionalPrinterColumns"] = [
            {
                "name": "Bandwidth",
                "type": "number",
                "jsonPath": ".spec.linkBandwidthGbps",
                "description": "Link bandwidth, Gbit/s.",
            },
            {"name": "Reachable", "type": "boolean", "jsonPath": ".status.reachable"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": list(model.short_names),
                "categories": ["tandem"],
            },
            "versions": [version],
        },
    }


def _readable(node: Any) -> Any:
    """Put ``type`` and ``description`` first in every schema node, for people reading the YAML."""
    if isinstance(node, list):
        return [_readable(v) for v in node]
    if not isinstance(node, dict):
        return node
    first = [k for k in ("type", "description") if k in node]
    return {k: _readable(node[k]) for k in [*first, *(k for k in node if k not in first)]}


class _NoAliasDumper(yaml.SafeDumper):
    """Repeated sub-schemas (the three pools) are written out in full: kubectl users read them."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render_crds() -> dict[str, str]:
    """File name -> YAML text of every CRD, exactly as committed in ``crds/``."""
    header = "# Generated from tandem/api/models.py by `tandem operator crds` (make crds). Do not edit.\n"
    out = {}
    for model in (LLMService, RemotePrefillPool):
        doc = crd(model)
        version = doc["spec"]["versions"][0]
        version["schema"] = _readable(version["schema"])
        text = yaml.dump(doc, Dumper=_NoAliasDumper, sort_keys=False, width=100)
        out[f"{GROUP}_{model.plural}.yaml"] = header + text
    return out


def write_crds(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_crds().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written
