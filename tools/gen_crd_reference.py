"""Generate docs/crd-reference.md from the API models (``make generate``; a test checks it is current).

It walks the same structural schemas tandem.api.crd builds from the pydantic models for crds/, so
the reference, the CRDs and the API server's validation can never disagree: every field with its
type, default, constraints and description, every CEL rule with its message, the printer columns
and the subresources.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from generated import write_or_check

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "crd-reference.md"
CONSTRAINTS = (("minimum", ">="), ("maximum", "<="), ("minLength", "min length"), ("maxLength", "max length"),
               ("minItems", "min items"), ("maxItems", "max items"), ("pattern", "pattern"))


def _type(node: dict[str, Any]) -> str:
    kind = node.get("type", "any")
    if kind == "array":
        return f"[]{_type(node.get('items', {}))}"
    if kind == "object" and "additionalProperties" in node:
        return f"map[string]{_type(node['additionalProperties'])}"
    if node.get("x-kubernetes-int-or-string"):
        return "int or string"
    return str(kind)


def _constraints(node: dict[str, Any]) -> str:
    parts = []
    if "enum" in node:
        parts.append("one of " + ", ".join(f"`{v}`" for v in node["enum"]))
    for key, label in CONSTRAINTS:
        if key in node:
            strict = node.get("exclusiveMinimum" if key == "minimum" else "exclusiveMaximum") is True
            op = label.replace("=", "") if strict and label in {">=", "<="} else label
            parts.append(f"{op} `{node[key]}`")
    if node.get("format"):
        parts.append(f"format `{node['format']}`")
    items = node.get("items", {})
    if "enum" in items or "pattern" in items or "maxLength" in items:
        parts.append("items: " + _constraints(items))
    return "; ".join(parts)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _walk(node: dict[str, Any], path: str, required: bool, rows: list[list[str]], rules: list[list[str]]) -> None:
    if path:
        default = node.get("default")
        rows.append([f"`{path}`", _type(node), "yes" if required else "",
                     "" if default in (None, {}) else f"`{json.dumps(default)}`", _cell(_constraints(node)),
                     _cell(node.get("description", ""))])
    for rule in node.get("x-kubernetes-validations", []):
        rules.append([f"`{path or '.'}`", f"`{_cell(rule['rule'])}`", _cell(rule["message"])])
    children = node.get("properties", {})
    needed = set(node.get("required", []))
    for name, child in children.items():
        _walk(child, f"{path}.{name}" if path else name, name in needed, rows, rules)
    items = node.get("items", {})
    if items.get("properties"):
        for rule in items.get("x-kubernetes-validations", []):
            rules.append([f"`{path}[]`", f"`{_cell(rule['rule'])}`", _cell(rule["message"])])
        for name, child in items["properties"].items():
            _walk(child, f"{path}[].{name}", name in set(items.get("required", [])), rows, rules)
    extra = node.get("additionalProperties")
    if isinstance(extra, dict) and extra.get("properties"):
        for name, child in extra["properties"].items():
            _walk(child, f"{path}.<key>.{name}", name in set(extra.get("required", [])), rows, rules)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _resource(crd: dict[str, Any], doc: str) -> list[str]:
    names, version = crd["spec"]["names"], crd["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    lines = [f"## {names['kind']}", "", doc, "",
             f"`{crd['spec']['group']}/{version['name']}`, {crd['spec']['scope'].lower()}, plural "
             f"`{names['plural']}`, short names {', '.join(f'`{s}`' for s in names.get('shortNames', []))}.", ""]
    sub = version.get("subresources", {})
    if "scale" in sub:
        scale = sub["scale"]
        lines += [f"Scale subresource: `kubectl scale` sets `{scale['specReplicasPath']}`, reads "
                  f"`{scale['statusReplicasPath']}`" + (f" and selector `{scale['labelSelectorPath']}`"
                                                          if "labelSelectorPath" in scale else "") + ".", ""]
    if "status" in sub:
        lines += ["Status subresource: `status` is written by Tandem's controllers only.", ""]
    columns = version.get("additionalPrinterColumns", [])
    if columns:
        lines += ["`kubectl get` columns:", "",
                  *_table(["Column", "Type", "JSONPath"],
                          [[c["name"], c["type"], f"`{c['jsonPath']}`"] for c in columns]), ""]
    for part in ("spec", "status"):
        rows: list[list[str]] = []
        rules: list[list[str]] = []
        _walk(schema["properties"][part], "", False, rows, rules)
        lines += [f"### {names['kind']} {part}", "", _cell(schema["properties"][part].get("description", "")), "",
                  *_table(["Field", "Type", "Required", "Default", "Constraints", "Description"],
                          [[r[0].replace("`", "`" + part + ".", 1), *r[1:]] for r in rows]), ""]
        if rules:
            lines += [f"Validation rules (CEL, enforced by the API server) on {part}:", "",
                      *_table(["On", "Rule", "Message"], rules), ""]
    return lines


def render() -> str:
    from tandem.api.crd import crd
    from tandem.api.models import LLMService, RemotePrefillPool

    lines = ["# CRD reference", "",
             "Generated by `tools/gen_crd_reference.py` from the pydantic models in `tandem/api/models.py` "
             "(the same schemas as `crds/`); do not edit by hand, run `make generate`.", ""]
    for model in (LLMService, RemotePrefillPool):
        doc = " ".join((model.__doc__ or "").split())
        lines += _resource(crd(model), doc)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str]) -> int:
    return write_or_check({OUT: render()}, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
