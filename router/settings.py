"""Configuration of the gateway (``tandem gateway``): flags > ``TANDEM_GATEWAY_*`` env > YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from tandem.config import TandemSettings, UrlList, split_urls
from tandem.kvevents import KVEventsSource, parse_kv_events
from tandem.router.calibration import CalibrationSettings
from tandem.router.routing.offload import OffloadSettings


def _split_kv_events(value: Any) -> Any:
    """``URL=SPEC;URL=SPEC`` (flag, env), a YAML list of such strings, or a YAML mapping URL -> SPEC."""
    if value is None:
        return {}
    if isinstance(value, str):
        value = [v for v in value.split(";") if v.strip()]
    if isinstance(value, list):
        out: dict[str, str] = {}
        for item in value:
            url, sep, spec = str(item).strip().partition("=")
            if not sep or not spec:
                raise ValueError(f"'{item}' is not URL=ENDPOINT (e.g. http://10.0.0.7:8000=tcp://10.0.0.7:5557)")
            out[url.rstrip("/")] = spec
        return out
    if isinstance(value, dict):
        return {str(k).rstrip("/"): str(v) for k, v in value.items()}
    return value


class GatewaySettings(TandemSettings):
    model_config = SettingsConfigDict(env_prefix="TANDEM_GATEWAY_")

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8080, ge=0, le=65535, description="TCP port (0 picks a free one)")
    instances: UrlList = Field(default_factory=list,
                               description="unified engine URLs, comma-separated (static discovery)")
    prefill_instances: UrlList = Field(default_factory=list, description="prefill engine URLs (disaggregated serving)")
    decode_instances: UrlList = Field(default_factory=list, description="decode engine URLs (disaggregated serving)")
    pd_engine: Literal["vllm", "sglang"] = Field("vllm", description="KV handshake of the prefill/decode engines: "
                                                 "vllm (kv_transfer_params) or sglang (bootstrap room)")
    pd_bootstrap_port: int | None = Field(None, gt=0, le=65535, description="sglang: prefill bootstrap port "
                                          "(default: the prefill's own port, as the simulator serves it)")
    pd_max_hops: int = Field(2, ge=0, le=16, description="prefill refusals (full queue) forwarded to the next "
                             "candidate before answering 503")
    remote_prefill_instances: UrlList = Field(default_factory=list, description="prefill engines of a remote "
                                              "datacenter (RemotePrefillPool endpoints); KV returns over the link")
    remote_link_gbps: float = Field(100.0, gt=0, description="RemotePrefillPool link bandwidth, Gbit/s")
    remote_prefill_pool: str | None = Field(None, description="name of the RemotePrefillPool (in --k8s-namespace) "
                                            "whose status this gateway writes: reachable, measured link traffic, "
                                            "queued tokens (set from the operator's service.json)")
    remote_status_interval: float = Field(15.0, gt=0, le=3600, description="seconds between RemotePrefillPool "
                                          "status writes")
    remote_prefill_token: SecretStr | None = Field(None, description="bearer token for the remote prefill pool's "
                                                   "engines (env TANDEM_GATEWAY_REMOTE_PREFILL_TOKEN; the operator "
                                                   "sets it from the RemotePrefillPool's credentials Secret); sent "
                                                   "only to them, never logged")
    remote_profile: str | None = Field(None, description="remote prefill engines' profile (default: profile)")
    offload_threshold: int | None = Field(None, ge=0, description="offload uncached prompts longer than this "
                                          "(default: solved from the live length distribution)")
    remote_link_rtt_ms: float = Field(0.0, ge=0, le=10_000, description="RemotePrefillPool link round trip, ms "
                                      "(the remote side's estimate and the link measurement allow for it)")
    offload: dict[str, Any] = Field(default_factory=dict, description="offload controller settings (YAML mapping: "
                                    "window, resolve_every_s, min_samples, high_water, link_window_s, side_choice, "
                                    "...; see OffloadSettings)")
    offload_decode_rps: float | None = Field(None, gt=0, description="decode capacity the offload solver "
                                             "assumes (req/s; default: estimated from the profile)")
    service_config: Path | None = Field(None, description="the operator's service.json (SLOs, PD engine, remote "
                                        "prefill pool); explicit flags win over it")
    discovery: Literal["static", "kubernetes"] = Field("static", description="where instances come from")
    k8s_namespace: str = Field("default", description="kubernetes discovery: namespace to watch")
    k8s_selector: str = Field("serving.tandem.dev/service", description="kubernetes discovery: pod label selector")
    k8s_port: int = Field(8000, gt=0, le=65535,
                          description="engine port when a pod names none (annotation/port 'http')")
    k8s_watch_timeout: int = Field(60, gt=0, le=3600, description="seconds one pod watch lasts before it is renewed")
    kubeconfig: Path | None = Field(None, description="kubeconfig file (default: in-cluster, then ~/.kube/config)")
    policy: str = Field("dualmap", description="routing policy (dualmap, round_robin, least_request, ...)")
    expose_topology: bool = Field(False, description="name engines by their URLs in /metrics labels and the "
                                  "x-tandem-*instance response headers and error messages, and list the admin "
                                  "routes in /openapi.json and /docs (debugging); off: an opaque stable id per "
                                  "engine (its pod name under Kubernetes discovery, else i-<hash of its URL>)")
    policy_header: bool = Field(False, description="let the X-Tandem-Policy request header pick the routing policy "
                                "(experiments); honoured only with an admin key in X-Tandem-Admin-Key, or on a "
                                "gateway with no keys at all")
    routing: dict[str, Any] = Field(default_factory=dict, description="extra policy configuration (YAML mapping)")
    slo_ttft: float = Field(5.0, gt=0, description="TTFT SLO in seconds (DualMap's alpha x SLO budget)")
    slo_tpot: float = Field(0.1, gt=0, description="TPOT SLO in seconds (the TPOT attainment /admin/observations "
                            "reports to the autoscaler)")
    observation_horizon: float = Field(900.0, gt=0, le=86400, description="longest window /admin/observations "
                                       "can report on (s); memory: one 1-second bucket per service per second")
    block_size: int = Field(512, gt=0, description="routing block size in tokens for text prompts")
    trust_prompt_hints: bool = Field(False, description="simulator benchmarks only: believe the x_tandem prompt "
                                     "hints a client declares (block ids, token count) for routing, limits and "
                                     "budgets; off (the default), a request carrying them is refused with 400")
    tokenizer: Path | None = Field(None, description="the engine's tokenizer.json (Hugging Face tokenizers format) "
                                   "for routing keys; default: a cheap, stable word/punctuation chunking")
    profile: str = Field("llama3-8b-h100", description="engine performance profile for prefill seconds/token")
    prefill_calibration: bool = Field(True, description="scale each engine's prefill estimates by its measured "
                                      "prefill time over the profile's (vLLM's request_prefill_time_seconds); "
                                      "off: every engine runs at the profile's speed")
    calibration: dict[str, Any] = Field(default_factory=dict, description="prefill calibration settings (YAML "
                                        "mapping: window_tokens, smoothing, min_scale, max_scale; see "
                                        "CalibrationSettings)")
    shadow_capacity_tokens: int | None = Field(None, gt=0,
                                               description="shadow prefix cache per instance (default: profile KV)")
    redis_url: str | None = Field(None, description="shared state in Redis (default: in-memory, this process only); "
                                  "redis://:PASSWORD@host:6379/0, rediss:// for TLS (?ssl_ca_certs=/path/ca.pem)")
    redis_prefix: str = Field("tandem", description="Redis key prefix (one per gateway deployment)")
    state_sync_interval: float = Field(0.2, gt=0, le=10, description="seconds between shared-state syncs")
    scrape_interval: float = Field(0.5, gt=0, le=60, description="seconds between engine /metrics scrapes")
    scrape_timeout: float = Field(1.0, gt=0, le=60, description="timeout of one scrape")
    stale_after: float = Field(3.0, gt=0, description="an instance with no good scrape for this long is suspect")
    connect_timeout: float = Field(2.0, gt=0, description="upstream connect timeout (s)")
    first_byte_timeout: float = Field(15.0, gt=0, description="seconds an engine has to start a stream (response "
                                      "headers and first chunk), plus the prompt's prefill (next); slower: "
                                      "retried on another engine")
    first_byte_prefill_factor: float = Field(4.0, ge=0, description="the first-byte timeout grows by this many "
                                             "times the profile's prefill estimate of the prompt, so that long "
                                             "prompts get their prefill (0: a flat timeout)")
    stream_idle_timeout: float = Field(30.0, gt=0, description="longest silence between two chunks of a started "
                                       "stream (s); longer: the stream ends with an error event")
    max_stream_duration: float = Field(3600.0, gt=0, description="longest a stream may last once started (s; an "
                                       "engine trickling tokens forever); longer: ended with an error event")
    request_timeout: float = Field(300.0, gt=0, description="whole-request timeout (s): queueing, the start on "
                                   "an engine and, for a non-streamed request, its whole answer")
    queue_timeout: float = Field(60.0, gt=0, description="longest wait in the gateway's queue before 503 (s)")
    max_attempts: int = Field(3, ge=1, le=10, description="tries per request before the first byte (retries on others)")
    retry_backoff: float = Field(0.05, ge=0, description="base backoff between tries (s), doubled each retry")
    breaker_failures: int = Field(3, ge=1, description="consecutive failures that open an instance's circuit")
    breaker_cooldown: float = Field(5.0, gt=0, description="seconds an open circuit waits before a trial request")
    max_queue: int = Field(2048, gt=0, description="requests waiting in the gateway (all instances) before 429")
    max_queue_per_instance: int = Field(512, gt=0, description="requests waiting per instance before 429")
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0, description="largest request body accepted (413 above)")
    max_prompt_tokens: int = Field(1_000_000, gt=0, description="longest prompt accepted, in routing tokens (413)")
    max_output_tokens: int = Field(131_072, gt=0, description="largest max_tokens accepted (413)")
    max_n: int = Field(128, ge=1, description="largest n (choices per request) accepted (400 above)")
    default_output_tokens: int | None = Field(None, gt=0, description="output tokens a request without max_tokens "
                                              "is charged against its key's tokens/minute (default: the model's "
                                              "context length as its engines report it, less the prompt; else "
                                              "max_output_tokens)")
    max_active_requests: int = Field(10_000, gt=0, description="requests inside the gateway at once (queued, "
                                     "starting or streaming) before 503 + Retry-After")
    admission_threads: int = Field(2, ge=1, le=64, description="threads that parse, tokenize and hash big request "
                                   "bodies (over 32 KiB) off the event loop")
    admission_queue: int = Field(64, ge=0, description="big bodies waiting for an admission thread before 503 + "
                                 "Retry-After")
    max_scrape_bytes: int = Field(4 * 1024 * 1024, gt=0, description="largest engine /metrics body read (bigger: "
                                  "a failed scrape)")
    header_timeout: float = Field(10.0, gt=0, le=3600, description="seconds a client has to send a request's "
                                  "line and headers (from the connection's opening, or from the first byte of "
                                  "a later request on it); slower: the connection is closed (slowloris)")
    body_timeout: float = Field(30.0, gt=0, le=3600, description="seconds a client has to send a generation "
                                "request's whole body once its headers are in; slower: 408 and the connection "
                                "closed. The request counts toward --max-active-requests meanwhile")
    max_header_bytes: int = Field(65_536, ge=1024, description="largest request line + headers in bytes; larger: "
                                  "431 and the connection closed")
    max_client_connections: int = Field(16_384, gt=0, description="open client connections per gateway process; "
                                        "a connection beyond them is closed at once")
    keep_alive_timeout: int = Field(65, gt=0, description="seconds an idle client connection stays open (longer "
                                    "than clients' own idle expiry, so they never race the close)")
    drain_timeout: float = Field(30.0, ge=0, description="on shutdown, seconds to let in-flight requests finish")
    shutdown_grace: float = Field(2.0, ge=0, description="on SIGTERM, seconds to keep listening while new requests "
                                  "get 503 + Connection: close (clients and Kubernetes move away), before closing")
    rebalance_interval: float = Field(0.25, gt=0, description="seconds between hotspot-migration passes")
    api_keys_file: Path | None = Field(None, description="YAML/JSON file of API keys and per-key limits")
    api_keys: str | None = Field(None, description="comma-separated API keys (env TANDEM_GATEWAY_API_KEYS)")
    rate_limit_rpm: int | None = Field(None, gt=0, description="default requests/minute per key")
    rate_limit_tpm: int | None = Field(None, gt=0, description="default prompt+output tokens/minute per key")
    admin_api_keys_file: Path | None = Field(None, description="YAML/JSON file of the admin API's own keys")
    admin_api_keys: str | None = Field(None, description="comma-separated admin API keys (env "
                                       "TANDEM_GATEWAY_ADMIN_API_KEYS); client API keys never open /admin")
    admin: Literal["auto", "disabled"] = Field("auto", description="admin API: auto = behind the admin keys when "
                                               "set, off when only client keys are set, open when the gateway has "
                                               "no keys at all (local use); disabled = always 404")
    engine_tls_ca_file: Path | None = Field(None, description="CA bundle that signs the engines' certificates "
                                            "(https:// instance URLs); default: the system store")
    engine_tls_verify: bool = Field(True, description="verify engines' TLS certificates and host names")
    engine_tls_cert_file: Path | None = Field(None, description="client certificate for mutual TLS to engines")
    engine_tls_key_file: Path | None = Field(None, description="its private key")
    max_connections: int = Field(1024, gt=0, description="pooled upstream connections")
    decisions_kept: int = Field(256, gt=0, description="recent routing decisions kept for /admin/decisions")
    workers: int = Field(1, ge=1, le=256, description="gateway processes accepting on the one port (more than one "
                         "needs --redis-url: they share load as replicas do); /metrics, drain and observations "
                         "cover all of them")
    loop: Literal["uvloop", "asyncio"] = Field("uvloop", description="event loop + HTTP parser: uvloop+httptools "
                                               "(when installed) or asyncio+h11")
    gc_gen0_threshold: int = Field(50_000, ge=0, description="after start-up, freeze the heap out of the cyclic "
                                   "collector and collect generation 0 every this many allocations (0: "
                                   "Python's defaults); full collections of the start-up heap paused the "
                                   "event loop for tens of ms, seen as TTFT p99 (tandem bench gateway)")
    log_level: Literal["debug", "info", "warning", "error"] = Field("warning", description="log level")
    kv_events: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict, description="engines publishing KV-cache events (static discovery; Kubernetes: the "
        "pod annotation serving.tandem.dev/kv-events): 'URL=PUB[,replay=REPLAY][,topic=T]' separated by ';', "
        "PUB/REPLAY a ZMQ endpoint or a port on the URL's host, e.g. "
        "'http://10.0.0.7:8000=5557,replay=5558'; their instances are routed on the exact cache view")
    kv_index_blocks: int = Field(65536, gt=0, le=16_777_216, description="engine KV blocks the exact view indexes "
                                 "per instance (the oldest stored are dropped beyond; ~150 bytes each)")
    kv_events_queue: int = Field(4096, gt=0, le=1_000_000, description="received event batches waiting to be "
                                 "applied per instance; beyond, batches are dropped and replayed")
    kv_replay_timeout: float = Field(2.0, gt=0, le=60, description="seconds a replay of missed event batches may take")

    _split = field_validator("instances", "prefill_instances", "decode_instances", "remote_prefill_instances",
                             mode="before")(
        classmethod(lambda cls, v: split_urls(v)))
    _split_kv = field_validator("kv_events", mode="before")(classmethod(lambda cls, v: _split_kv_events(v)))

    def kv_event_sources(self) -> dict[str, KVEventsSource]:
        """``kv_events`` parsed: instance URL -> its event sockets (bare ports on the URL's host)."""
        return {url: parse_kv_events(spec, urlsplit(url).hostname or "") for url, spec in self.kv_events.items()}

    @field_validator("offload", "calibration")
    @classmethod
    def _nested(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """A JSON flag checked against its model here, its error naming the flag and the field."""
        model = {"offload": OffloadSettings, "calibration": CalibrationSettings}[info.field_name]
        try:
            model(**v)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(map(str, err["loc"]))
            raise ValueError(f"{info.field_name}{'.' + loc if loc else ''}: {err['msg']}") from None
        return v

    def offload_settings(self) -> OffloadSettings:
        """The offload controller's settings: the pinned threshold and link RTT flags, then ``offload``."""
        return OffloadSettings(**{"fixed_threshold": self.offload_threshold,
                                  "link_rtt_s": self.remote_link_rtt_ms / 1000, **self.offload})

    @model_validator(mode="after")
    def _has_instances(self) -> GatewaySettings:
        if self.discovery == "static" and not (self.instances or self.prefill_instances or self.decode_instances
                                               or self.remote_prefill_instances):
            raise ValueError("instances: static discovery needs at least one URL (--instances http://host:port,...)")
        if self.scrape_timeout > self.stale_after:
            raise ValueError("scrape_timeout: must not exceed stale_after")
        known = {*self.instances, *self.prefill_instances, *self.decode_instances, *self.remote_prefill_instances}
        for url in self.kv_events:
            if self.discovery == "static" and url not in known:
                raise ValueError(f"kv_events: {url} is not one of the instances")
        try:
            self.kv_event_sources()
        except ValueError as exc:
            raise ValueError(f"kv_events: {exc}") from None
        return self
