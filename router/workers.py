"""Several gateway processes on one port (``tandem gateway --workers N``).

Why: one Python process is one event loop. At 1,000 streamed requests/s the loop is past half busy
and a request's first chunk waits behind other requests' callbacks (``tandem bench gateway``,
docs/gateway.md); a pod with more cores serves the same port from N loops instead.

The supervisor (this module) binds one listening socket per worker on the one port and hands each
to its spawned worker (see :func:`listen_sockets` for why not one shared socket). Each worker is a
whole gateway: its own scrapes, queues and upstream pools; the workers agree on load, ring
membership and the adaptive prefix keys through Redis exactly as replicas do (``--redis-url`` is
required, as the Helm chart requires it for more than one replica).

What is per worker and what is not:

* ``/metrics`` covers all workers: prometheus_client's multiprocess mode (each worker writes its
  series to files in a private directory; any worker answers with their sum, gauges by the mode
  each one declares in :mod:`tandem.router.metrics`).
* ``POST /admin/drain`` and ``GET /admin/observations`` cover all workers: the worker that takes the
  call forwards it to its siblings over their private Unix sockets (:mod:`tandem.router.siblings`).
* the other admin reads (queues, decisions, rings, instances) describe the worker that answered; its
  index is in the ``x-tandem-worker`` header of every response.
* the RemotePrefillPool status is written by worker 0 only.

A worker that dies is replaced (its live gauges dropped); one that keeps dying (``restart_limit``
times within a minute) stops the gateway with an error, so Kubernetes restarts the pod rather than
a crash loop hiding inside it. SIGTERM/SIGINT to the supervisor is passed on to every worker, which
drains as a single gateway does (``--shutdown-grace``, ``--drain-timeout``); a second signal is
passed on too and stops them at once.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections import deque
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from pydantic import BaseModel, Field

from tandem.router.settings import GatewaySettings

log = logging.getLogger("tandem.gateway.workers")

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client reads it when first imported


class WorkerContext(BaseModel):
    """What one worker knows about the others."""

    index: int = Field(ge=0)
    supervisor_pid: int
    own_socket: Path = Field(description="this worker's private Unix socket (siblings call it)")
    sibling_sockets: list[Path] = Field(default_factory=list, description="the other workers' private sockets")
    metrics_dir: Path = Field(description="prometheus_client multiprocess directory shared by the workers")


def listen_sockets(host: str, port: int, count: int, backlog: int = 2048) -> list[socket.socket]:
    """One listening socket per worker, all on one port (SO_REUSEPORT; ``port`` 0: a free one).

    The kernel spreads new connections over them by a hash of the client's address and port, so the
    long-lived keep-alive connections of a client pool split evenly; with one shared socket, whichever
    worker is awake first takes the next connection, and a burst of connections at a pool's start
    was seen to pile onto a few workers. The supervisor holds every socket for the gateway's life:
    connections waiting in a dead worker's queue are taken by its replacement, not reset."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    out: list[socket.socket] = []
    for _ in range(count):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            for other in out:
                other.close()
            raise ValueError(f"port: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        port = sock.getsockname()[1]
        sock.listen(backlog)
        sock.set_inheritable(True)
        out.append(sock)
    return out


class Supervisor:
    """Starts, replaces and stops the workers; serves nothing itself."""

    def __init__(self, settings: GatewaySettings, restart_limit: int = 5) -> None:
        if settings.workers > 1 and not settings.redis_url:
            raise ValueError("workers: more than one worker shares load, ring membership and prefix keys "
                             "through Redis; set --redis-url (as for several gateway replicas)")
        self.settings = settings
        self.restart_limit = restart_limit
        self.listeners = listen_sockets(settings.host, settings.port, settings.workers)
        self.port: int = self.listeners[0].getsockname()[1]
        self.worker_settings = settings.model_copy(update={"port": self.port})  # port 0: the one picked
        self.dir = _private_dir()
        self.metrics_dir = self.dir / "metrics"
        self.metrics_dir.mkdir()
        self.sockets = [self.dir / f"worker-{i}.sock" for i in range(settings.workers)]
        self.procs: list[BaseProcess | None] = [None] * settings.workers
        self._ctx = multiprocessing.get_context("spawn")
        self._signals: deque[int] = deque(maxlen=4)
        self._deaths: deque[float] = deque(maxlen=restart_limit)

    def context(self, index: int) -> WorkerContext:
        return WorkerContext(index=index, supervisor_pid=os.getpid(), own_socket=self.sockets[index],
                             sibling_sockets=[p for i, p in enumerate(self.sockets) if i != index],
                             metrics_dir=self.metrics_dir)

    def _start(self, index: int) -> None:
        proc = self._ctx.Process(target=run_worker,
                                 args=(self.worker_settings, self.context(index), self.listeners[index]),
                                 name=f"tandem-gateway-worker-{index}", daemon=False)
        proc.start()
        self.procs[index] = proc

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self._signals.append(sig)

    def run(self) -> int:
        """Serve until told to stop; the exit status: 0 after a clean stop, 1 when workers kept dying."""
        os.environ[METRICS_DIR_ENV] = str(self.metrics_dir)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for i in range(len(self.procs)):
                self._start(i)
            log.info("gateway: %d workers on %s:%d", len(self.procs), self.settings.host, self.port)
            return self._supervise()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self._stop_all()
            for sock in self.listeners:
                sock.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def _supervise(self) -> int:
        stopping = False
        deadline = float("inf")
        while True:
            while self._signals:
                sig = self._signals.popleft()
                for proc in self._alive():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, sig if stopping else signal.SIGTERM)  # type: ignore[arg-type]
                if not stopping:
                    stopping = True
                    s = self.settings
                    deadline = time.monotonic() + s.shutdown_grace + s.drain_timeout + 10.0
            alive = self._alive()
            if stopping and (not alive or time.monotonic() > deadline):
                return 0
            if alive:
                wait([p.sentinel for p in alive], timeout=0.2)
            if stopping:
                continue
            for i, proc in enumerate(self.procs):
                if proc is not None and not proc.is_alive():
                    self._forget(proc)
                    now = time.monotonic()
                    self._deaths.append(now)
                    if len(self._deaths) == self.restart_limit and now - self._deaths[0] < 60.0:
                        log.error("gateway: workers died %d times within a minute; stopping", self.restart_limit)
                        return 1
                    log.error("gateway: worker %d (pid %s) exited with %s; starting a new one", i, proc.pid,
                              proc.exitcode)
                    self._start(i)

    def _alive(self) -> list[BaseProcess]:
        return [p for p in self.procs if p is not None and p.is_alive()]

    def _forget(self, proc: BaseProcess) -> None:
        """A dead worker's live gauges must not count any more (its counters still do)."""
        from prometheus_client import multiprocess

        if proc.pid is not None:
            multiprocess.mark_process_dead(proc.pid, str(self.metrics_dir))

    def _stop_all(self) -> None:
        for proc in self._alive():
            proc.kill()
        for proc in self.procs:
            if proc is not None:
                proc.join(5)
                self._forget(proc)


def _private_dir() -> Path:
    """A new 0700 directory for the workers' sockets and metric files. A Unix socket's path must fit
    in 108 bytes, so a long $TMPDIR (pytest's, say) gives way to /tmp."""
    for base in (None, "/tmp"):
        path = Path(tempfile.mkdtemp(prefix="tandem-gw-", dir=base))
        if len(str(path / "worker-000.sock")) < _UNIX_PATH_MAX:
            return path
        path.rmdir()
    raise ValueError("workers: no temporary directory with a path short enough for a Unix socket")


_UNIX_PATH_MAX = 108


def run_worker(settings: GatewaySettings, worker: WorkerContext, sock: socket.socket) -> None:
    """Entry point of one spawned worker: a whole gateway on the shared socket plus a private one."""
    from tandem.router.server import run_gateway_process

    logging.basicConfig(level=settings.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s %(name)s[w{worker.index}]: %(message)s")
    private = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        worker.own_socket.unlink()  # a replaced worker's predecessor left it
    private.bind(str(worker.own_socket))
    private.listen(64)
    run_gateway_process(settings, [sock, private], worker)
