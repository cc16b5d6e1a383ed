"""API keys and the limits configured per key (requests and tokens per minute).

Keys come from a YAML/JSON file and/or a comma-separated env var. Only their SHA-256 digests are
kept in memory after loading, and a key is identified everywhere (logs, metrics, errors) by its
configured name or the first 8 hex digits of its digest, never by the key itself.
The limits are enforced by ``tandem.router.ratelimit`` (across processes through Redis).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, ValidationError


class ApiKeySpec(BaseModel):
    key: str = Field(min_length=8, description="the secret itself")
    name: str | None = Field(None, description="who it belongs to (shown in logs and metrics)")
    rpm: int | None = Field(None, gt=0, description="requests per minute")
    tpm: int | None = Field(None, gt=0, description="prompt + output tokens per minute")


class ApiKeysFile(BaseModel):
    keys: list[ApiKeySpec] = Field(default_factory=list)


class ApiKeyError(ValueError):
    """The keys file is unreadable or invalid (message names the field, never a key)."""


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(slots=True)
class Principal:
    name: str
    rpm: int | None
    tpm: int | None


class AuthResult(BaseModel):
    ok: bool
    status: int = 200
    message: str = ""
    principal: str | None = None


class KeyRing:
    """Known keys (by digest) with their limits, and the buckets that enforce them."""

    def __init__(self, specs: list[ApiKeySpec], default_rpm: int | None = None,
                 default_tpm: int | None = None) -> None:
        self._keys: dict[str, Principal] = {}
        for spec in specs:
            d = _digest(spec.key)
            self._keys[d] = Principal(spec.name or d[:8], spec.rpm or default_rpm, spec.tpm or default_tpm)
        self._by_name = {p.name: p for p in self._keys.values()}

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    @classmethod
    def load(cls, path: Path | None, env_keys: str | None, default_rpm: int | None = None,
             default_tpm: int | None = None) -> KeyRing:
        specs: list[ApiKeySpec] = []
        if path is not None:
            try:
                raw = path.read_text()
                data = json.loads(raw) if path.suffix == ".json" else yaml.safe_load(raw)
                specs.extend(ApiKeysFile.model_validate(data or {}).keys)
            except OSError as exc:
                raise ApiKeyError(f"api_keys_file {path}: {exc.strerror}") from exc
            except (yaml.YAMLError, json.JSONDecodeError) as exc:
                raise ApiKeyError(f"api_keys_file {path}: not valid YAML/JSON") from exc
            except ValidationError as exc:
                err = exc.errors()[0]
                field = ".".join(str(p) for p in err["loc"])
                raise ApiKeyError(f"api_keys_file {path}: {field}: {err['msg']}") from None
        for i, key in enumerate(k.strip() for k in (env_keys or "").split(",") if k.strip()):
            if len(key) < 8:
                raise ApiKeyError(f"api_keys: key #{i + 1} is shorter than 8 characters")
            specs.append(ApiKeySpec(key=key, name=f"env-{i + 1}"))
        return cls(specs, default_rpm, default_tpm)

    def authenticate(self, authorization: str | None, x_api_key: str | None = None) -> AuthResult:
        if not self.enabled:
            return AuthResult(ok=True)
        key = x_api_key
        if authorization and authorization[:7].lower() == "bearer ":
            key = authorization[7:].strip()
        if not key:
            return AuthResult(ok=False, status=401, message="missing API key (Authorization: Bearer <key>)")
        digest = _digest(key)
        for known, principal in self._keys.items():
            if hmac.compare_digest(known, digest):
                return AuthResult(ok=True, principal=principal.name)
        return AuthResult(ok=False, status=401, message="invalid API key")

    def principal(self, name: str | None) -> Principal | None:
        """The key's name and limits (``tandem.router.ratelimit`` enforces them)."""
        return self._by_name.get(name) if name else None


AdminMode = Literal["open", "keys", "disabled"]


def admin_mode(setting: Literal["auto", "disabled"], clients: KeyRing, admins: KeyRing) -> AdminMode:
    """Who may use /admin. Its own keys when configured; otherwise off as soon as the gateway has client
    keys (a client key must never open the admin API), and open only on a gateway with no keys at all,
    where every endpoint is open anyway (local runs, demos)."""
    if setting == "disabled":
        return "disabled"
    if admins.enabled:
        return "keys"
    return "disabled" if clients.enabled else "open"


def engine_ssl_context(ca_file: Path | None, verify: bool, cert_file: Path | None,
                       key_file: Path | None) -> ssl.SSLContext:
    """TLS settings for https:// engines (requests and scrapes). ``verify=False`` is for test clusters
    with self-signed certificates only."""
    try:
        ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        if cert_file:
            ctx.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    except (OSError, ssl.SSLError) as exc:
        field = "engine_tls_ca_file" if ca_file and not cert_file else "engine_tls_cert_file"
        raise ValueError(f"{field}: cannot load: {exc}") from None
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
