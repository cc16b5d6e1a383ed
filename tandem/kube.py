"""A small asyncio Kubernetes client for the operator's own reads and writes.

kopf watches and dispatches; it has no public client for arbitrary objects, and the official
``kubernetes`` client is synchronous. The operator needs six verbs on a handful of kinds, all
plain JSON, so this is a thin aiohttp wrapper with a timeout on every call. Credentials come from
the same source kopf logs in with (``kubeconfig`` or the in-cluster service account).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import BaseModel

from tandem.api.models import GROUP, VERSION

log = logging.getLogger("tandem.kube")


class Kind(BaseModel, frozen=True):
    group: str
    version: str
    plural: str
    kind: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if namespace is not None:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name is not None:
            base += f"/{name}"
        if subresource is not None:
            base += f"/{subresource}"
        return base


LLMSERVICES = Kind(group=GROUP, version=VERSION, plural="llmservices", kind="LLMService")
REMOTEPREFILLPOOLS = Kind(group=GROUP, version=VERSION, plural="remoteprefillpools", kind="RemotePrefillPool")
DEPLOYMENTS = Kind(group="apps", version="v1", plural="deployments", kind="Deployment")
SERVICES = Kind(group="", version="v1", plural="services", kind="Service")
CONFIGMAPS = Kind(group="", version="v1", plural="configmaps", kind="ConfigMap")
PDBS = Kind(group="policy", version="v1", plural="poddisruptionbudgets", kind="PodDisruptionBudget")
# The Gateway API Inference Extension's pool (its CRD comes with the GIE release, not with Tandem).
INFERENCEPOOLS = Kind(group="inference.networking.k8s.io", version="v1", plural="inferencepools",
                      kind="InferencePool")
# Order of deletion/creation does not matter to the server; this order reads well in logs.
CHILD_KINDS = (CONFIGMAPS, DEPLOYMENTS, SERVICES, PDBS)
# Children whose API may be absent from a cluster (CRD not installed): listed when served, not watched.
OPTIONAL_CHILD_KINDS = (INFERENCEPOOLS,)
KIND_OF = {k.kind: k for k in (LLMSERVICES, REMOTEPREFILLPOOLS, *CHILD_KINDS, *OPTIONAL_CHILD_KINDS)}

IN_CLUSTER_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


class KubeCredentials(BaseModel):
    """Where the API server is and how to authenticate: what kopf's ConnectionInfo also carries."""

    server: str
    ca_path: str | None = None
    insecure: bool = False
    token: str | None = None
    token_path: str | None = None
    cert_path: str | None = None
    key_path: str | None = None

    def ssl_context(self) -> ssl.SSLContext | bool:
        """Blocking (reads files): build it once, off the event loop."""
        if not self.server.startswith("https"):
            return False
        if self.insecure:
            return False
        ctx = ssl.create_default_context(cafile=self.ca_path)
        if self.cert_path and self.key_path:
            ctx.load_cert_chain(self.cert_path, self.key_path)
        return ctx


def load_credentials(kubeconfig: Path | None) -> KubeCredentials:
    """Resolve credentials the way kubectl does (blocking: call it from a thread or a sync handler).

    ``kubeconfig`` None means in-cluster first, then ``$KUBECONFIG``/``~/.kube/config``.
    """
    import kubernetes.client
    import kubernetes.config

    cfg = kubernetes.client.Configuration()
    token_path = None
    if kubeconfig is None:
        try:
            kubernetes.config.load_incluster_config(client_configuration=cfg)
            token_path = str(IN_CLUSTER_TOKEN)
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config(client_configuration=cfg)
    else:
        kubernetes.config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization")
    token = header.split(" ", 1)[-1] if header else None
    return KubeCredentials(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        token=token,
        token_path=token_path,
        cert_path=cfg.cert_file,
        key_path=cfg.key_file,
    )


class ApiError(Exception):
    """A non-2xx answer of the API server, with its Status reason and message."""

    def __init__(self, status: int, reason: str, message: str, retry_after: str | None = None) -> None:
        super().__init__(f"HTTP {status} {reason}: {message}")
        self.retry_after = retry_after
        self.status = status
        self.reason = reason
        self.message = message


# Answers worth another try: the API server (or etcd behind it) is briefly unavailable, throttling,
# or reports a write conflict. 409 AlreadyExists is not transient (the object is there): callers handle it.
TRANSIENT_STATUS = frozenset({409, 429, 500, 502, 503, 504})


def is_transient(status: int, reason: str) -> bool:
    return status in TRANSIENT_STATUS and not (status == 409 and reason == "AlreadyExists")


def retry_delay(attempt: int, base: float, cap: float, retry_after: str | None = None) -> float:
    """Seconds before retry number ``attempt`` (1-based): the server's Retry-After when it gives one
    (capped), else exponential backoff."""
    if retry_after is not None and retry_after.isdigit():
        return min(cap, float(retry_after))
    return min(cap, base * 2 ** (attempt - 1))


class KubeClient:
    """JSON in, JSON out; one aiohttp session, created lazily on the loop that uses it.

    Transient failures (see :func:`is_transient`, and connection errors) are retried with
    exponential backoff, ``retries`` times; every write the operator makes is idempotent (fixed
    names, merge patches), and a create retried after its first try did land answers 409
    AlreadyExists, which the reconciler treats as "compare it on the next pass".
    """

    def __init__(
        self,
        credentials: KubeCredentials,
        ssl_context: ssl.SSLContext | bool,
        timeout: float = 10.0,
        user_agent: str = "tandem-operator",
        field_manager: str = "tandem-operator",
        retries: int = 4,
        backoff: float = 0.2,
        backoff_cap: float = 5.0,
    ) -> None:
        self.retries, self.backoff, self.backoff_cap = retries, backoff, backoff_cap
        self._user_agent = user_agent
        self._field_manager = field_manager
        self._credentials = credentials
        self._ssl = ssl_context
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _refresh_token(self) -> bool:
        """Projected service-account tokens rotate: re-read the file after a 401."""
        path = self._credentials.token_path
        if not path:
            return False
        token = (await asyncio.to_thread(Path(path).read_text)).strip()
        changed = token != self._credentials.token
        self._credentials = self._credentials.model_copy(update={"token": token})
        return changed

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        json: Any = None,
        content_type: str = "application/json",
    ) -> Any:
        attempt = 0
        while True:
            try:
                return await self._request_once(method, path, params, json, content_type)
            except ApiError as exc:
                if attempt >= self.retries or not is_transient(exc.status, exc.reason):
                    raise
                delay = retry_delay(attempt + 1, self.backoff, self.backoff_cap, exc.retry_after)
                what = f"HTTP {exc.status} {exc.reason}"
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                if attempt >= self.retries:
                    raise
                delay = retry_delay(attempt + 1, self.backoff, self.backoff_cap)
                what = type(exc).__name__
            attempt += 1
            log.info("%s %s: %s; retry %d/%d in %.2fs", method, path, what, attempt, self.retries, delay)
            await asyncio.sleep(delay)

    async def _request_once(
        self, method: str, path: str, params: dict[str, str] | None, json: Any, content_type: str
    ) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        for attempt in range(2):
            headers = {
                "Accept": "application/json",
                "Content-Type": content_type,
                "User-Agent": self._user_agent,
            }
            if self._credentials.token:
                headers["Authorization"] = f"Bearer {self._credentials.token}"
            async with self._session.request(
                method,
                self._credentials.server.rstrip("/") + path,
                params=params,
                json=json,
                headers=headers,
                ssl=self._ssl,
            ) as resp:
                if resp.status == 401 and attempt == 0 and await self._refresh_token():
                    continue
                if resp.status >= 400:
                    try:
                        data = await resp.json(content_type=None)
                    except ValueError:
                        data = {}
                    data = data if isinstance(data, dict) else {}
                    raise ApiError(
                        resp.status,
                        str(data.get("reason") or resp.reason),
                        str(data.get("message") or ""),
                        retry_after=resp.headers.get("Retry-After"),
                    )
                return await resp.json(content_type=None)
        raise AssertionError("unreachable: the loop returns or raises")

    async def get(self, kind: Kind, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self.request("GET", kind.path(namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def list(
        self, kind: Kind, namespace: str | None, labels: dict[str, str] | None = None
    ) -> list[dict[str, Any]]:
        """Objects of ``kind`` with all ``labels`` (filtered here too: test servers ignore selectors)."""
        params = {"labelSelector": ",".join(f"{k}={v}" for k, v in labels.items())} if labels else None
        data = await self.request("GET", kind.path(namespace), params=params)
        items = data.get("items", []) or []
        wanted = labels or {}
        return [
            o
            for o in items
            if all((o.get("metadata", {}).get("labels") or {}).get(k) == v for k, v in wanted.items())
        ]

    async def create(self, kind: Kind, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request(
            "POST", kind.path(namespace), json=body, params={"fieldManager": self._field_manager}
        )

    async def merge_patch(
        self, kind: Kind, namespace: str, name: str, patch: dict[str, Any], subresource: str | None = None
    ) -> dict[str, Any]:
        return await self.request(
            "PATCH",
            kind.path(namespace, name, subresource),
            json=patch,
            content_type="application/merge-patch+json",
            params={"fieldManager": self._field_manager},
        )

    async def delete(self, kind: Kind, namespace: str, name: str) -> None:
        try:
            await self.request(
                "DELETE",
                kind.path(namespace, name),
                json={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"},
            )
        except ApiError as exc:
            if exc.status != 404:
                raise
