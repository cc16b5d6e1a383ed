"""The layout's import rule, checked on the source: which component imports which.

    tandem (shared ground) <- router.routing (pure core) <- {router, sim, autoscaler, operator}
        <- bench <- tools

A component may import the layers below it and itself, never a sibling component or a layer
above. ``python tools/import_rule.py`` prints every cross-folder import edge with its count and
the violations; ``--check`` exits 1 when there is one (the test suite runs it). Every import
statement counts, also one inside a function or under ``TYPE_CHECKING``: a cycle hidden in a
function is still a cycle. ``tandem/cli.py`` names its subcommands by dotted string and imports
them lazily, so it imports nothing here.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYER = {"tandem": 0, "router.routing": 1, "router": 2, "sim": 2, "autoscaler": 2, "operator": 2, "bench": 3,
         "tools": 4}
FOLDERS = ("tandem", "router", "sim", "autoscaler", "operator", "bench", "tools")


def component_of_file(path: Path) -> str:
    parts = path.relative_to(ROOT).parts
    if parts[:2] == ("router", "routing"):
        return "router.routing"
    return parts[0]


def component_of_module(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "tandem":
        return None
    if len(parts) < 2:
        return "tandem"
    if parts[1] == "router" and len(parts) > 2 and parts[2] == "routing":
        return "router.routing"
    return parts[1] if parts[1] in LAYER else "tandem"


def imported_modules(path: Path) -> list[str]:
    package = ".".join(("tandem", *path.relative_to(ROOT).parent.parts)) if path.parts else "tandem"
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                out.append(".".join([*base, node.module] if node.module else base))
            elif node.module:
                out.append(node.module)
    return out


def edges() -> Counter[tuple[str, str]]:
    found: Counter[tuple[str, str]] = Counter()
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            src = component_of_file(path)
            for module in imported_modules(path):
                dst = component_of_module(module)
                if dst is not None and dst != src:
                    found[(src, dst)] += 1
    return found


def allowed(src: str, dst: str) -> bool:
    return LAYER[dst] < LAYER[src]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 on a violation")
    args = parser.parse_args(argv)
    found = edges()
    bad = {e: n for e, n in found.items() if not allowed(*e)}
    for (src, dst), n in sorted(found.items()):
        print(f"{'VIOLATION ' if (src, dst) in bad else ''}{src} -> {dst}: {n}")
    print(f"{len(found)} cross-component edges, {len(bad)} violating the rule")
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
