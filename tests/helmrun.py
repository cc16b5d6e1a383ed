"""Run one helm-sdkpy action in a child process and print its outcome as JSON.

Helm's Go runtime reads the environment of the process it starts in (putenv afterwards is not seen),
so the release storage driver (HELM_DRIVER=memory for the in-memory test API server, which cannot
decode the protobuf Secrets of Helm's default driver) has to be set before a process starts.

    python helmrun.py install KUBECONFIG NAMESPACE RELEASE CHART VALUES_JSON
    python helmrun.py lint CHART
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any


async def run(argv: list[str]) -> dict[str, Any]:
    import helm_sdkpy as helm

    action = argv[0]
    try:
        if action == "install":
            kubeconfig, namespace, release, chart, values = argv[1:6]
            config = helm.Configuration(namespace=namespace, kubeconfig=kubeconfig)
            result = await helm.Install(config).run(release, chart, values=json.loads(values) or None, wait=False,
                                                    timeout=60)
            return {"release": result}
        if action == "lint":
            config = helm.Configuration(namespace="default")
            return {"lint": await helm.Lint(config).run(argv[1])}
    except helm.HelmError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    raise SystemExit(f"unknown action {action!r}")


if __name__ == "__main__":
    print(json.dumps(asyncio.run(run(sys.argv[1:]))))
