"""The ``tandem`` command: one entry point, one subcommand per component.

Subcommands are registered by dotted path and imported only when chosen, so ``tandem --help``
stays fast and nothing heavy (torch, kubernetes) is imported for a command that does not need it.
Each subcommand is a :class:`tandem.config.TandemSettings` model with a ``cli_cmd`` method.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError
from pydantic_settings import CliApp, SettingsError

from tandem.config import ConfigFileError, TandemSettings, config_file, config_section

# name -> ("module:Class", one-line summary) or a nested group of the same shape.
Registry = dict[str, "tuple[str, str] | Registry"]

COMMANDS: Registry = {
    "sim": ("tandem.sim.cli:SimCommand", "run one simulated engine (vLLM/SGLang-compatible API and metrics)"),
    "gateway": ("tandem.router.cli:GatewayCommand", "OpenAI-compatible gateway with DualMap routing"),
    "epp": ("tandem.router.eppsettings:EppCommand",
            "endpoint picker for Envoy / Gateway API Inference Extension gateways (ext_proc gRPC)"),
    "demo": ("tandem.bench.demo:DemoCommand", "local demo: simulated engines + gateway + a real trace"),
    "profile": ("tandem.sim.profiling.cli:ProfileCommand", "measure a model shape on this GPU; write a profile"),
    "autoscaler": ("tandem.autoscaler.cli:AutoscalerCommand",
                   "size each LLMService's pools from load, SLOs and the profile"),
    "bench": {
        "gateway": ("tandem.bench.gateway:BenchGatewayCommand", "gateway proxy overhead vs direct-to-simulator"),
        "state-sync": ("tandem.bench.state_sync:BenchStateSyncCommand",
                       "event-loop CPU of one shared-state sync (Redis) per gateway replica"),
        "chaos": ("tandem.bench.chaos:BenchChaosCommand",
                  "soak under faults (engines, Redis, a gateway restarted): 0 lost, 0 duplicated"),
        "autoscale": ("tandem.bench.autoscale:AutoscaleBench",
                      "replay a trace on an elastic simulated cluster: Tandem vs static vs threshold scaling"),
        "capacity": ("tandem.bench.capacity:CapacityBench",
                     "check the autoscaler's capacity model against real engines at 0.8/1/1.2x its goodput"),
        "routing": ("tandem.bench.routing:RoutingBench",
                    "routing capacity (highest QPS meeting the TTFT SLO) per policy, in the DES"),
        "decision": ("tandem.bench.routing:DecisionBench", "time of one routing decision at several pool sizes"),
        "offload": ("tandem.bench.pd:OffloadBench",
                    "homogeneous PD vs naive vs selective cross-datacenter prefill offload, in the DES"),
        "offload-live": ("tandem.bench.offload_live:OffloadLiveBench",
                         "offload through the gateway over a real tbf-shaped link (network namespace, veth)"),
        "pd": ("tandem.bench.pd:PDBench", "aggregated vs disaggregated goodput at TTFT and TPOT SLOs"),
        "peers": ("tandem.bench.peers:BenchPeers",
                  "tandem vs sglang-router and vllm-router, live: capacity at the TTFT SLO, latency, cache hits"),
        "des": ("tandem.bench.routing:DESBench", "wall-clock speed of the discrete-event simulator"),
        "kv-view": ("tandem.bench.kvview:KVViewBench",
                    "gateway hit estimates vs real vLLM's prefix-cache counters, shadow vs events; engine restart"),
    },
    "operator": {
        "run": ("tandem.operator.cli:OperatorRunCommand", "run the Kubernetes operator (kopf)"),
        "crds": ("tandem.operator.cli:OperatorCrdsCommand", "write the CRD YAML generated from tandem.api"),
    },
}


def _split_config_flag(argv: list[str]) -> tuple[list[str], Path | None]:
    """Take ``--config FILE`` out of argv wherever it appears (it applies to every subcommand)."""
    rest: list[str] = []
    path: Path | None = Path(os.environ["TANDEM_CONFIG"]) if os.environ.get("TANDEM_CONFIG") else None
    it = iter(argv)
    for arg in it:
        if arg == "--config":
            value = next(it, None)
            if value is None:
                raise ConfigFileError("--config needs a file path")
            path = Path(value)
        elif arg.startswith("--config="):
            path = Path(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    return rest, path


def _usage(prog: str, group: Registry) -> str:
    lines = [f"usage: {prog} [--config FILE] <command> [options]", "", "commands:"]
    for name, entry in group.items():
        summary = entry[1] if isinstance(entry, tuple) else "subcommands: " + ", ".join(entry) or "-"
        lines.append(f"  {name:<12} {summary}")
    lines.append("")
    lines.append(f"Run '{prog} <command> --help' for a command's options.")
    return "\n".join(lines)


def _load(target: str) -> type[TandemSettings]:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def format_validation_error(prog: str, cls: type[TandemSettings], exc: ValidationError) -> str:
    prefix = cls.model_config.get("env_prefix", "")
    lines = [f"{prog}: invalid configuration"]
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "<root>"
        flag = "--" + field.replace("_", "-")
        env = (prefix + field.replace(".", "__")).upper()
        lines.append(f"  {field} ({flag} / {env}): {err['msg']}")
    return "\n".join(lines)


def run_command(prog: str, cls: type[TandemSettings], argv: Sequence[str]) -> int:
    """Parse ``argv`` into ``cls`` (with env and YAML) and run it; 2 on invalid configuration."""
    try:
        result = CliApp.run(cls, cli_args=list(argv), cli_settings_source=None)
    except ValidationError as exc:
        print(format_validation_error(prog, cls, exc), file=sys.stderr)
        return 2
    except (SettingsError, ConfigFileError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    return int(getattr(result, "exit_code", 0) or 0)


def dispatch(argv: Sequence[str], group: Registry = COMMANDS, prog: str = "tandem") -> int:
    args = list(argv)
    if not args or args[0] in {"-h", "--help"}:
        print(_usage(prog, group))
        return 0 if args else 2
    name, rest = args[0], args[1:]
    entry = group.get(name)
    if entry is None:
        print(f"{prog}: unknown command '{name}'\n\n{_usage(prog, group)}", file=sys.stderr)
        return 2
    if isinstance(entry, dict):
        return dispatch(rest, entry, f"{prog} {name}")
    cls = _load(entry[0])
    cls.model_config["cli_prog_name"] = f"{prog} {name}"
    section = config_section.set(name)
    try:
        return run_command(f"{prog} {name}", cls, rest)
    finally:
        config_section.reset(section)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args, path = _split_config_flag(list(sys.argv[1:] if argv is None else argv))
    except ConfigFileError as exc:
        print(f"tandem: {exc}", file=sys.stderr)
        return 2
    token = config_file.set(path)
    try:
        return dispatch(args)
    finally:
        config_file.reset(token)


if __name__ == "__main__":
    sys.exit(main())
