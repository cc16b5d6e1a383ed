"""Settings shared by every subcommand: flags > ``TANDEM_*`` env vars > YAML file > defaults.

Each subcommand is one pydantic-settings model, so the same validation runs whatever the
source of a value, and an invalid value is reported with the field's name.
"""

from __future__ import annotations

from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

config_file: ContextVar[Path | None] = ContextVar("tandem_config_file", default=None)
config_section: ContextVar[str | None] = ContextVar("tandem_config_section", default=None)


def split_urls(value: Any) -> Any:
    """Accept ``a,b`` (flag, env) as well as a YAML list; strip trailing slashes."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if isinstance(value, list):
        out = []
        for v in value:
            url = str(v).strip().rstrip("/")
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"'{url}' is not an http(s) URL")
            out.append(url)
        return out
    return value


# A list of http(s) URLs given comma-separated on the command line or in an env var (validate with split_urls).
UrlList = Annotated[list[str], NoDecode]


class ConfigFileError(ValueError):
    """The YAML config file is missing, unreadable or not a mapping."""


def load_yaml_section(path: Path, section: str | None) -> dict[str, Any]:
    """Read ``path``; when it has a top-level key named after the subcommand, use that section.

    One file can then configure several components (``gateway:``, ``sim:``) or just one.
    """
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigFileError(f"config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"config file {path}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigFileError(f"config file {path}: expected a mapping at the top level")
    if section and isinstance(data.get(section), dict):
        data = data[section]
    return {str(k).replace("-", "_"): v for k, v in data.items()}


class _YamlSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        path = config_file.get()
        self._data = load_yaml_section(path, config_section.get()) if path else {}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


class TandemSettings(BaseSettings):
    """Base of every subcommand's settings; subclasses set ``env_prefix`` (``TANDEM_<CMD>_``)."""

    model_config = SettingsConfigDict(
        cli_kebab_case=True,
        cli_implicit_flags=True,
        extra="forbid",
        validate_default=True,
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls))
