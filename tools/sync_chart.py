"""Copy the files the Helm chart carries from where they are maintained (``make generate``).

Helm can only read files inside the chart directory, so charts/tandem holds byte-identical copies of
the CRDs (crds/, generated from tandem.api), the Grafana dashboards (deploy/grafana/) and the
Prometheus rules (deploy/prometheus/). ``--check`` reports copies that drifted (tests/shared/test_chart.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "tandem"
# (source folder, file pattern, folder inside the chart)
COPIES = (
    (ROOT / "crds", "*.yaml", CHART / "crds"),
    (ROOT / "deploy" / "grafana", "*.json", CHART / "dashboards"),
    (ROOT / "deploy" / "prometheus", "*.yaml", CHART / "rules"),
)


def expected() -> dict[Path, bytes]:
    """Every file the chart must carry, with its exact bytes."""
    return {dest / src.name: src.read_bytes()
            for folder, pattern, dest in COPIES for src in sorted(folder.glob(pattern))}


def drift() -> list[str]:
    """Chart copies that are missing, different, or no longer have a source."""
    want = expected()
    problems = [f"{p.relative_to(ROOT)}: {'differs' if p.exists() else 'missing'}"
                for p, data in want.items() if not p.exists() or p.read_bytes() != data]
    for _, pattern, dest in COPIES:
        problems += [f"{p.relative_to(ROOT)}: no source" for p in sorted(dest.glob(pattern)) if p not in want]
    return problems


def main(argv: list[str]) -> int:
    if "--check" in argv:
        problems = drift()
        for line in problems:
            print(line)
        return 1 if problems else 0
    for _, pattern, dest in COPIES:
        dest.mkdir(parents=True, exist_ok=True)
        for stale in dest.glob(pattern):
            stale.unlink()
    for path, data in expected().items():
        path.write_bytes(data)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
