"""The one image (Dockerfile) carries every `tandem` subcommand the chart runs.

No image can be built here, so this checks what the build depends on: the wheel's package list
(pyproject.toml) names the package of every subcommand, every package folder exists, and the
Dockerfile copies every source folder the wheel maps and runs `tandem` as a non-root user.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from tandem.cli import COMMANDS, Registry

ROOT = Path(__file__).resolve().parents[2]


def targets(group: Registry) -> list[str]:
    out = []
    for entry in group.values():
        out += targets(entry) if isinstance(entry, dict) else [entry[0]]
    return out


def test_wheel_packages_cover_every_subcommand() -> None:
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages, mapping = set(tool["packages"]), tool["package-dir"]

    def folder(package: str) -> Path:
        for prefix in sorted(mapping, key=len, reverse=True):
            if package == prefix or package.startswith(prefix + "."):
                return ROOT / mapping[prefix] / package[len(prefix):].lstrip(".").replace(".", "/")
        raise AssertionError(f"{package}: no package-dir mapping")

    for package in packages:
        assert folder(package).is_dir() and list(folder(package).glob("*.py")) + list(
            folder(package).glob("*.json")), package
    for target in targets(COMMANDS):
        module = target.partition(":")[0]
        assert module.rpartition(".")[0] in packages, f"{target}: its package is not in the wheel"
    # Every folder of Python code under a mapped top-level folder is shipped.
    for prefix, src in mapping.items():
        for sub in (ROOT / src).rglob("*.py"):
            rel = sub.parent.relative_to(ROOT / src)
            if "__pycache__" in rel.parts:
                continue
            package = ".".join([prefix, *rel.parts]) if rel.parts else prefix
            assert package in packages, f"{sub.relative_to(ROOT)}: package {package} is not in the wheel"


def test_dockerfile_builds_every_mapped_folder_and_runs_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    copied = set(re.findall(r"^COPY (\S+) \1$", text, re.M))
    assert set(mapping.values()) <= copied
    assert re.search(r'^ENTRYPOINT \["tandem"\]$', text, re.M)
    user = re.findall(r"^USER (\d+)", text, re.M)
    assert user and int(user[-1]) != 0
    # The chart's podSecurityContext runs as this user.
    assert f"runAsUser: {user[-1]}" in (ROOT / "charts" / "tandem" / "values.yaml").read_text()
