"""A real Prometheus scraping a real Tandem stack on 127.0.0.1, labelled as the Helm chart labels it.

The stack, every part started through the CLI (``python -m tandem.cli ...``):

* service ``chat`` (aggregated): a ``tandem sim`` with vLLM metrics and one with SGLang metrics,
  behind two gateway replicas;
* service ``pd`` (disaggregated, with a remote prefill pool): a prefill, a decode and a remote
  prefill ``tandem sim``, behind one gateway with an offload threshold;
* ``tandem autoscaler`` over both services, against kmock's in-memory Kubernetes API (a mock: no
  cluster can run here) holding the two LLMServices and their engine pods, observing the real gateways;
* ``prometheus`` (Debian's package) with the repository's rules (the recording group evaluated every
  second instead of every 30 s) and static scrape configs that reproduce what the chart's
  PodMonitors and ServiceMonitor give Prometheus: each target carries the ``__meta_kubernetes_*``
  labels Kubernetes service discovery would give its pod, and goes through the relabeling the
  Prometheus Operator generates for the monitor (namespace, pod, container, job, endpoint; service
  for a ServiceMonitor) followed by the chart's own ``relabelings`` (``CHART_RELABELINGS``, checked
  against the rendered chart in tests/shared/test_chart.py).

``PromStack`` is used by tests/e2e/test_prometheus_tier.py (one stack per test session) and can be run
by hand (``python tests/promstack.py``) to look at it or to render the dashboards from it
(tools/render_dashboards.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gatewayutil import ROOT, free_port

NAMESPACE = "prod"
RELEASE_NAMESPACE = "tandem-system"
SCRAPE_INTERVAL_S = 1
# The chart's monitors (charts/tandem/templates/monitoring.yaml), as rendered: relabelings per endpoint.
CHART_RELABELINGS: dict[str, list[dict[str, Any]]] = {
    "engines": [
        {"sourceLabels": ["__meta_kubernetes_pod_label_serving_tandem_dev_role"], "targetLabel": "role"},
        {"sourceLabels": ["__meta_kubernetes_pod_label_serving_tandem_dev_service"], "targetLabel": "service"},
        {"sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_component"], "targetLabel": "component"},
    ],
    "service-gateways": [
        {"sourceLabels": ["__meta_kubernetes_pod_label_serving_tandem_dev_role"], "targetLabel": "role"},
        {"sourceLabels": ["__meta_kubernetes_pod_label_serving_tandem_dev_service"], "targetLabel": "service"},
        {"sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_component"], "targetLabel": "component"},
    ],
    "endpoint-pickers": [
        {"sourceLabels": ["__meta_kubernetes_pod_label_serving_tandem_dev_role"], "targetLabel": "role"},
        {"sourceLabels": ["__meta_kubernetes_pod_label_serving_tandem_dev_service"], "targetLabel": "service"},
        {"sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_component"], "targetLabel": "component"},
    ],
    "servicemonitor/http": [
        {"sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_component"], "targetLabel": "component"},
    ],
    "servicemonitor/metrics": [
        {"sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_component"], "targetLabel": "component"},
    ],
}


def _relabel(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Prometheus Operator's camelCase relabelings as Prometheus' relabel_configs."""
    keys = {"sourceLabels": "source_labels", "targetLabel": "target_label"}
    return [{keys.get(k, k): v for k, v in r.items()} for r in rules]


def _pod_monitor_job(name: str, port: str, targets: list[dict[str, Any]]) -> dict[str, Any]:
    """A PodMonitor endpoint (honorLabels) as the Operator generates it, over static targets."""
    operator = [
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {"target_label": "job", "replacement": f"{RELEASE_NAMESPACE}/tandem-{name}"},
        {"target_label": "endpoint", "replacement": port},
    ]
    return {"job_name": f"podMonitor/{RELEASE_NAMESPACE}/tandem-{name}/0", "honor_labels": True,
            "static_configs": targets, "relabel_configs": operator + _relabel(CHART_RELABELINGS[name])}


def _service_monitor_job(port: str, targets: list[dict[str, Any]]) -> dict[str, Any]:
    operator = [
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
        {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job"},
        {"target_label": "endpoint", "replacement": port},
    ]
    return {"job_name": f"serviceMonitor/{RELEASE_NAMESPACE}/tandem/{port}", "honor_labels": True,
            "static_configs": targets,
            "relabel_configs": operator + _relabel(CHART_RELABELINGS[f"servicemonitor/{port}"])}


def _pod_target(url: str, pod: str, container: str, labels: dict[str, str], namespace: str = NAMESPACE
                ) -> dict[str, Any]:
    meta = {"__meta_kubernetes_namespace": namespace, "__meta_kubernetes_pod_name": pod,
            "__meta_kubernetes_pod_container_name": container}
    meta.update({"__meta_kubernetes_pod_label_" + k.replace(".", "_").replace("/", "_").replace("-", "_"): v
                 for k, v in labels.items()})
    return {"targets": [url.removeprefix("http://")], "labels": meta}


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the process that started it dies (Linux
    PR_SET_PDEATHSIG), so a test worker that is killed (a crash, a timeout) leaves no stack behind."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class KubeApi:
    """kmock's Kubernetes API emulator on a loopback port, in a thread with its own event loop."""

    def __init__(self, objects: list[tuple[str, dict[str, Any]]]) -> None:
        self.objects = objects
        self.url = ""
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="kmock", daemon=True)

    def start(self, timeout: float = 20) -> None:
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise RuntimeError(f"kmock did not start: {self._error!r}")

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        import kmock
        from kmock._internal.apps import Server

        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with kmock.KubernetesEmulator() as k, Server(k):
            info = k.ResourceInfo
            k.resources["serving.tandem.dev/v1alpha1/llmservices"] = info(
                kind="LLMService", namespaced=True, subresources={"status", "scale"},
                verbs={"get", "list", "watch", "patch", "create"})
            k.resources["v1/pods"] = info(kind="Pod", namespaced=True, subresources={"status"},
                                          verbs={"get", "list", "patch", "create"})
            k.resources["v1/events"] = info(kind="Event", namespaced=True, verbs={"create", "list"})
            self.url = str(k.url).rstrip("/")
            async with httpx.AsyncClient(base_url=self.url, timeout=10) as client:
                for path, body in self.objects:
                    (await client.post(path, json=body)).raise_for_status()
            self._ready.set()
            await self._stop.wait()

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "kmock", "user": {}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}]}))
        return path


def _llmservice(name: str, mode: str, pools: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "serving.tandem.dev/v1alpha1", "kind": "LLMService",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"model": {"name": "meta-llama/Llama-3.1-8B-Instruct", "servedName": name}, "mode": mode,
                     "replicas": 1, "pools": pools, "slo": {"ttftSeconds": 5.0},
                     "autoscaling": {"enabled": True, "profile": "llama3-8b-h100"}}}


def _pod(service: str, role: str, i: int) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{service}-{role}-{i}", "namespace": NAMESPACE,
                         "labels": {"serving.tandem.dev/service": service, "serving.tandem.dev/role": role}},
            "spec": {"containers": [{"name": "engine", "image": "example.invalid/engine:0"}]},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}


class PromStack:
    """Start with :meth:`start`, stop with :meth:`stop` (every process it started, and kmock)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.urls: dict[str, str] = {}
        self.kube: KubeApi | None = None
        self.prometheus = ""
        self.started_at = 0.0

    # --- processes ---------------------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                           preexec_fn=_die_with_parent))
        log.close()

    def _tandem(self, name: str, *args: str) -> str:
        port = free_port()
        self._spawn(name, [sys.executable, "-m", "tandem.cli", *args, "--port", str(port)])
        self.urls[name] = f"http://127.0.0.1:{port}"
        return self.urls[name]

    def start(self) -> None:
        exe = shutil.which("prometheus")
        if exe is None:
            raise RuntimeError("prometheus not installed (make test installs it: apt-get install prometheus)")
        self.started_at = time.time()
        engines = {
            "chat-vllm": ("chat", "unified", "vllm"), "chat-sglang": ("chat", "unified", "sglang"),
            "pd-prefill": ("pd", "prefill", "vllm"), "pd-decode": ("pd", "decode", "sglang"),
            "pd-remote-prefill": ("pd", "remote-prefill", "vllm"),
        }
        for name, (model, role, dialect) in engines.items():
            sim_role = "prefill" if role == "remote-prefill" else role
            self._tandem(name, "sim", "--served-model-name", model, "--role", sim_role, "--metrics", dialect)
        u = self.urls
        common = ["--scrape-interval", "0.5", "--retry-backoff", "0", "--breaker-cooldown", "1"]
        for replica in ("chat-gateway-0", "chat-gateway-1"):
            self._tandem(replica, "gateway", "--instances", f"{u['chat-vllm']},{u['chat-sglang']}", *common)
        self._tandem("pd-gateway-0", "gateway", "--prefill-instances", u["pd-prefill"], "--decode-instances",
                     u["pd-decode"], "--remote-prefill-instances", u["pd-remote-prefill"],
                     "--offload-threshold", "2048", "--trust-prompt-hints", *common)  # its prompts: x_tandem
        self.kube = KubeApi([
            (f"/apis/serving.tandem.dev/v1alpha1/namespaces/{NAMESPACE}/llmservices",
             _llmservice("chat", "aggregated", {"unified": {"maxReplicas": 4}})),
            (f"/apis/serving.tandem.dev/v1alpha1/namespaces/{NAMESPACE}/llmservices",
             _llmservice("pd", "disaggregated", {"prefill": {"replicas": 1, "maxReplicas": 4},
                                                 "decode": {"maxReplicas": 4}})),
            *[(f"/api/v1/namespaces/{NAMESPACE}/pods", _pod(svc, role, 0))
              for svc, role in (("chat", "unified"), ("pd", "prefill"), ("pd", "decode"))],
        ])
        self.kube.start()
        metrics_port = free_port()
        gateways = ",".join(u[g] for g in ("chat-gateway-0", "chat-gateway-1", "pd-gateway-0"))
        self._spawn("autoscaler", [sys.executable, "-m", "tandem.cli", "autoscaler", "--kubeconfig",
                                   str(self.kube.kubeconfig(self.workdir / "kubeconfig")), "--namespaces", NAMESPACE,
                                   "--gateway-url", gateways, "--interval-s", "1", "--window-s", "10",
                                   "--mix-window-s", "20", "--metrics-port", str(metrics_port)])
        u["autoscaler"] = f"http://127.0.0.1:{metrics_port}"
        self._write_prometheus_config()
        port = free_port()
        self._spawn("prometheus", [exe, f"--config.file={self.workdir / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                                   f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"])
        self.prometheus = f"http://127.0.0.1:{port}"
        self._wait_ready()

    def _write_prometheus_config(self) -> None:
        u = self.urls
        engine_pods = {"chat-vllm": ("chat", "unified", "chat-unified-0"),
                       "chat-sglang": ("chat", "unified", "chat-unified-1"),
                       "pd-prefill": ("pd", "prefill", "pd-prefill-0"), "pd-decode": ("pd", "decode", "pd-decode-0"),
                       "pd-remote-prefill": ("pd", "remote-prefill", "pd-remote-prefill-0")}
        engines = [_pod_target(u[name], pod, "engine", {
            "app.kubernetes.io/name": "tandem", "app.kubernetes.io/component": role,
            "serving.tandem.dev/role": role, "serving.tandem.dev/service": svc})
            for name, (svc, role, pod) in engine_pods.items()]
        # The operator's per-service gateway pods (operator/plan.py gateway_deployment labels).
        gateways = [_pod_target(u[name], name, "gateway", {
            "app.kubernetes.io/name": "tandem", "app.kubernetes.io/instance": name.split("-")[0],
            "app.kubernetes.io/component": "gateway", "serving.tandem.dev/service": name.split("-")[0]})
            for name in ("chat-gateway-0", "chat-gateway-1", "pd-gateway-0")]
        autoscaler = _pod_target(u["autoscaler"], "tandem-autoscaler-0", "autoscaler", {
            "app.kubernetes.io/name": "tandem", "app.kubernetes.io/instance": "tandem",
            "app.kubernetes.io/component": "autoscaler"}, namespace=RELEASE_NAMESPACE)
        autoscaler["labels"]["__meta_kubernetes_service_name"] = "tandem-autoscaler"
        rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "tandem-rules.yaml").read_text())
        for group in rules["groups"]:
            group["interval"] = f"{SCRAPE_INTERVAL_S}s"
        (self.workdir / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
        config = {
            "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "scrape_timeout": "900ms",
                       "evaluation_interval": f"{SCRAPE_INTERVAL_S}s"},
            "rule_files": ["rules.yaml"],
            "scrape_configs": [_pod_monitor_job("engines", "http", engines),
                               _pod_monitor_job("service-gateways", "http", gateways),
                               _service_monitor_job("metrics", [autoscaler])],
        }
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))

    def _wait_ready(self, limit_s: float = 90) -> None:  # ~5 s on an idle machine
        deadline = time.monotonic() + limit_s
        checks = {name: url + ("/metrics" if name == "autoscaler" else "/health" if "gateway" not in name
                               else "/readyz") for name, url in self.urls.items()}
        checks["prometheus"] = self.prometheus + "/-/ready"
        pending = dict(checks)
        with httpx.Client(timeout=1) as client:
            while pending:
                for name, url in list(pending.items()):
                    with contextlib.suppress(httpx.HTTPError):
                        if client.get(url).status_code == 200:
                            del pending[name]
                dead = [p.args for p in self.procs if p.poll() is not None]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"not ready: {sorted(pending)}; exited: {dead}; logs in {self.workdir}")
                time.sleep(0.1)
            # Every target scraped once before any traffic: a series first seen after its first
            # increment would hide that increment from increase() (the point of the zero-initialised series).
            while True:
                targets = client.get(self.prometheus + "/api/v1/targets").json()["data"]["activeTargets"]
                down = [t["scrapeUrl"] for t in targets if t["health"] != "up"]
                if targets and not down:
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Prometheus has not scraped {down} (logs in {self.workdir})")
                time.sleep(0.1)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.kube is not None:
            self.kube.stop()

    # --- traffic -----------------------------------------------------------------------------------

    def drive(self, rounds: int = 3) -> dict[str, int]:
        """Requests through every gateway: streamed and not, with shared prefixes (cache hits); one
        engine answering 500 for a while (retries and upstream errors), one request that fails on
        both engines (outcome upstream_error); disaggregated requests kept local and offloaded.
        Returns the count of each (kind of request, HTTP status)."""
        u = self.urls
        codes: dict[str, int] = {}
        chat = [u["chat-gateway-0"], u["chat-gateway-1"]]

        def count(resp: httpx.Response, what: str) -> None:
            key = f"{what} {resp.status_code}"
            codes[key] = codes.get(key, 0) + 1

        with httpx.Client(timeout=30) as client:
            for r in range(rounds):
                for i in range(8):
                    body = {"model": "chat", "prompt": f"system prompt {i % 3} " * 60 + f"question {r}.{i}",
                            "max_tokens": 8, "stream": i % 2 == 1}
                    count(client.post(chat[i % 2] + "/v1/completions", json=body), "chat")
                for tokens in (1000, 6000):  # prefill kept local; prefill offloaded to the remote pool
                    body = {"model": "pd", "prompt": "x", "max_tokens": 4, "stream": r % 2 == 0,
                            "x_tandem": {"hash_ids": [r * 10_000 + tokens], "prompt_tokens": tokens,
                                         "block_size": 512}}
                    count(client.post(u["pd-gateway-0"] + "/v1/completions", json=body), "pd")
                if r == 0:  # the vLLM engine fails every request for a moment: retried on SGLang
                    client.post(u["chat-vllm"] + "/admin/fault", json={"mode": "error", "error_rate": 1.0})
                    for i in range(4):
                        count(client.post(chat[0] + "/v1/completions",
                                          json={"model": "chat", "prompt": f"retry {i}", "max_tokens": 4}), "retried")
                    client.post(u["chat-sglang"] + "/admin/fault", json={"mode": "error", "error_rate": 1.0})
                    count(client.post(chat[0] + "/v1/completions",
                                      json={"model": "chat", "prompt": "fails on both", "max_tokens": 4}), "failing")
                    for name in ("chat-vllm", "chat-sglang"):
                        client.post(u[name] + "/admin/fault", json={"mode": "none"})
                    time.sleep(1.5)  # the gateway's breakers (--breaker-cooldown 1) let them back in
                time.sleep(1.0)
        return codes

    # --- queries -----------------------------------------------------------------------------------

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": expr, **({"time": str(at)} if at is not None else {})}
        resp = httpx.get(self.prometheus + "/api/v1/query", params=params, timeout=10)
        resp.raise_for_status()
        return resp.json()["data"]["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict[str, Any]]:
        resp = httpx.get(self.prometheus + "/api/v1/query_range",
                         params={"query": expr, "start": str(start), "end": str(end), "step": str(step)}, timeout=10)
        resp.raise_for_status()
        return resp.json()["data"]["result"]

    def label_values(self, label: str, series: str) -> list[str]:
        resp = httpx.get(f"{self.prometheus}/api/v1/label/{label}/values",
                         params={"match[]": series, "start": str(self.started_at)}, timeout=10)
        resp.raise_for_status()
        return resp.json()["data"]


if __name__ == "__main__":  # run it by hand: python tests/promstack.py (Ctrl-C stops it)
    stack = PromStack(Path(tempfile.mkdtemp(prefix="tandem-promstack-")))
    try:
        stack.start()
        print("traffic:", stack.drive())
        print("prometheus:", stack.prometheus, "\n" + "\n".join(f"{k}: {v}" for k, v in stack.urls.items()))
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()
