"""The ``tandem`` command: help for every subcommand, config precedence, clear errors."""

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from tandem import cli
from tandem.config import TandemSettings, config_file, config_section


def leaf_commands(group=cli.COMMANDS, prefix=()):
    for name, entry in group.items():
        if isinstance(entry, dict):
            yield from leaf_commands(entry, (*prefix, name))
        else:
            yield (*prefix, name)


@pytest.mark.parametrize("command", list(leaf_commands()), ids=" ".join)
def test_every_subcommand_prints_help(command, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([*command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: tandem {' '.join(command)}")
    assert "--" in out  # lists its options


def test_top_level_help_lists_commands(capsys) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out
    assert cli.main(["nope"]) == 2


def test_bad_value_names_the_field() -> None:
    proc = subprocess.run([sys.executable, "-m", "tandem.cli", "sim", "--port", "70000"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "port (--port / TANDEM_SIM_PORT)" in proc.stderr and "65535" in proc.stderr


class Probe(TandemSettings):
    """A subcommand used only to observe how settings are resolved."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_PROBE_")
    port: int = Field(1, ge=1, description="a port")
    name: str = Field("default", description="a name")

    def cli_cmd(self) -> None:
        Probe.last = self


def run_probe(args: list[str], yaml_path: Path | None = None) -> int:
    token, section = config_file.set(yaml_path), config_section.set("probe")
    try:
        return cli.run_command("tandem probe", Probe, args)
    finally:
        config_file.reset(token)
        config_section.reset(section)


def test_precedence_flags_over_env_over_yaml(tmp_path, monkeypatch) -> None:
    cfg = tmp_path / "tandem.yaml"
    cfg.write_text("probe:\n  port: 3\n  name: from-yaml\n")
    assert run_probe([], cfg) == 0 and (Probe.last.port, Probe.last.name) == (3, "from-yaml")
    monkeypatch.setenv("TANDEM_PROBE_PORT", "4")
    assert run_probe([], cfg) == 0 and Probe.last.port == 4
    assert run_probe(["--port", "5"], cfg) == 0 and Probe.last.port == 5


def test_yaml_errors_are_named(tmp_path, capsys) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("port: 0\n")
    assert run_probe([], cfg) == 2
    assert "port (--port / TANDEM_PROBE_PORT)" in capsys.readouterr().err
    cfg.write_text("colour: red\n")
    assert run_probe([], cfg) == 2
    assert "colour" in capsys.readouterr().err
    assert run_probe([], tmp_path / "missing.yaml") == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_bad_offload_settings_name_the_nested_field() -> None:
    proc = subprocess.run([sys.executable, "-m", "tandem.cli", "gateway", "--instances", "http://127.0.0.1:1",
                           "--offload", '{"link_window_s": -1}'], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "offload.link_window_s" in proc.stderr and "offload (--offload" in proc.stderr
