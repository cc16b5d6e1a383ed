"""`tandem operator ...` as a user types it: help, CRD generation, configuration errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tandem.api.crd import render_crds
from tandem.cli import main


def test_operator_group_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["operator", "--help"]) == 0
    out = capsys.readouterr().out
    assert "run" in out and "crds" in out


def test_run_help_lists_its_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["operator", "run", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--namespace", "--all-namespaces", "--liveness-port", "--resync-seconds", "--gateway-image"):
        assert flag in out


def test_crds_command_writes_the_generated_files(tmp_path: Path) -> None:
    assert main(["operator", "crds", "--out", str(tmp_path)]) == 0
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == render_crds()


def test_crds_to_stdout_is_one_multi_document_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    assert main(["operator", "crds", "--stdout"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["metadata"]["name"] for d in docs] == [
        "llmservices.serving.tandem.dev",
        "remoteprefillpools.serving.tandem.dev",
    ]


@pytest.mark.parametrize("args", [[], ["--namespace", "a", "--all-namespaces"]])
def test_run_needs_exactly_one_scope(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["operator", "run", *args]) == 2
    assert "--all-namespaces" in capsys.readouterr().err


def test_bad_value_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["operator", "run", "--all-namespaces", "--resync-seconds", "-1"]) == 2
    assert "resync_seconds (--resync-seconds / TANDEM_OPERATOR_RESYNC_SECONDS)" in capsys.readouterr().err


def test_scope_from_repeated_flags_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from tandem.operator.cli import OperatorRunCommand

    cmd = OperatorRunCommand(_cli_parse_args=["--namespace", "a", "--namespace", "b", "--liveness-port", "0"])
    assert (cmd.namespace, cmd.all_namespaces, cmd.liveness_port) == (["a", "b"], False, 0)
    monkeypatch.setenv("TANDEM_OPERATOR_ALL_NAMESPACES", "true")
    assert OperatorRunCommand(_cli_parse_args=[]).all_namespaces is True


def test_gateway_redis_url_from_flag_or_environment_is_never_echoed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tandem.operator.cli import OperatorRunCommand

    assert main(["operator", "run", "--all-namespaces", "--gateway-redis-url", "http://:hunter2@redis:6379"]) == 2
    err = capsys.readouterr().err
    assert "gateway_redis_url (--gateway-redis-url / TANDEM_OPERATOR_GATEWAY_REDIS_URL)" in err
    assert "hunter2" not in err
    monkeypatch.setenv("TANDEM_OPERATOR_GATEWAY_REDIS_URL", "redis://:hunter2@redis:6379/0")
    cmd = OperatorRunCommand(_cli_parse_args=["--all-namespaces"])
    assert cmd.gateway_redis_url is not None
    assert cmd.gateway_redis_url.get_secret_value() == "redis://:hunter2@redis:6379/0"
    assert "hunter2" not in repr(cmd)
