"""Local processes for the benches, the demo and the tests: ports, start, readiness, stop.

Every bench that runs real servers (``tandem sim``, ``tandem gateway``, ``redis-server``) as child
processes on loopback needs the same four steps: a free port, the child started with its output in
a log file, a wait until it answers (bounded, and cut short with the log's tail when the child
exits instead), and a stop that cannot hang (terminate, wait, kill). They live here once.

A failure is a :class:`HarnessError` whose message names the process, its exit status and the end
of its log; a command turns it into its own CLI message.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import IO

import httpx

LOOPBACK = "127.0.0.1"
_POLL_S = 0.05
_PROBE_TIMEOUT_S = 2.0
_LOG_TAIL_CHARS = 2000


class HarnessError(RuntimeError):
    """A child process could not be started, exited during start-up, or was not ready in time."""


def free_port() -> int:
    """A loopback port that is free now (the kernel picks it from the ephemeral range)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def restartable_port() -> int:
    """A free loopback port below the kernel's ephemeral range, for a child that is restarted on it.

    A child binds its port only after start-up; a port from the ephemeral range could meanwhile
    become the source port of some outgoing connection (clients, gateways, a neighbouring test),
    and a restarted child must get its old port back. Ports below the range are never handed out
    that way.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, max(10001, low))
        with socket.socket() as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
        return port
    raise HarnessError("no free loopback port below the ephemeral range")


def tandem_argv(*args: str) -> list[str]:
    """``tandem <args>`` run by this interpreter (so the child imports the same tandem)."""
    return [sys.executable, "-m", "tandem.cli", *args]


class Process:
    """One child process with its output in a log file; started again with the same arguments.

    ``log`` None discards the output. The ``tandem`` commands log to stderr, so only stderr goes to
    the log unless ``capture_stdout`` (redis-server logs to stdout). The first start truncates the
    log, a restart appends to it. ``cpus`` pins the child before its interpreter has started
    anything, so the processes it spawns later inherit the set. As a context manager it is started
    on entry and stopped on exit, whatever happened in between. Readiness: the ``wait_*`` methods
    block (tests, synchronous start-up), the ``until*`` ones are awaited (a bench's event loop).
    """

    def __init__(self, name: str, argv: list[str], log: Path | None = None, *, cpus: tuple[int, ...] = (),
                 capture_stdout: bool = False, cwd: Path | None = None) -> None:
        self.name, self.argv, self.log = name, argv, log
        self.cpus, self.capture_stdout, self.cwd = cpus, capture_stdout, cwd
        self._popen: subprocess.Popen | None = None
        self._starts = 0

    def start(self) -> None:
        if self.running:
            raise HarnessError(f"{self.name}: already running (pid {self.pid})")
        with contextlib.ExitStack() as stack:
            err: IO[bytes] | int = subprocess.DEVNULL
            if self.log is not None:
                err = stack.enter_context(self.log.open("ab" if self._starts else "wb"))
            try:
                self._popen = subprocess.Popen(self.argv, stdout=err if self.capture_stdout else subprocess.DEVNULL,
                                               stderr=err, cwd=self.cwd)
            except OSError as exc:
                raise HarnessError(f"{self.name}: cannot start {self.argv[0]}: {exc}") from exc
        self._starts += 1
        if self.cpus:
            os.sched_setaffinity(self._popen.pid, self.cpus)

    @property
    def popen(self) -> subprocess.Popen:
        if self._popen is None:
            raise HarnessError(f"{self.name}: not started")
        return self._popen

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.running:
            self.popen.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL and reap: the child vanishes at once, as in a crash."""
        if self.running:
            self.popen.kill()
            self.popen.wait()

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM, up to ``grace_s`` to exit (a server drains), then SIGKILL."""
        if not self.running:
            return
        self.popen.terminate()
        try:
            self.popen.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.kill()

    async def exit_within(self, limit_s: float) -> None:
        """Wait without blocking the event loop for the child to exit; SIGKILL it past ``limit_s``."""
        deadline = time.monotonic() + limit_s
        while self.running:
            if time.monotonic() > deadline:
                self.popen.kill()
            await asyncio.sleep(_POLL_S)

    def check(self) -> None:
        """Raise, with the end of the log, if the child has exited."""
        if self._popen is None or self._popen.poll() is None:
            return
        raise HarnessError(f"{self.name} exited with status {self._popen.returncode}{self._log_tail()}")

    def _log_tail(self) -> str:
        if self.log is None:
            return " (its output was discarded)"
        try:
            tail = self.log.read_text(errors="replace")[-_LOG_TAIL_CHARS:].rstrip()
        except OSError:
            return f" (log {self.log} unreadable)"
        return f"; log {self.log}" + (f", last lines:\n{tail}" if tail else " is empty")

    def _not_ready(self, what: str, started: float, limit_s: float) -> None:
        self.check()
        if time.monotonic() - started > limit_s:
            raise HarnessError(f"{self.name}: {what} not ready after {limit_s:g}s{self._log_tail()}")

    def wait_until(self, probe: Callable[[], bool], what: str, limit_s: float) -> None:
        """Block until ``probe()`` holds; fail at once if the child exits, or after ``limit_s``."""
        started = time.monotonic()
        while not probe():
            self._not_ready(what, started, limit_s)
            time.sleep(_POLL_S)

    async def until(self, probe: Callable[[], Awaitable[bool]], what: str, limit_s: float) -> None:
        """:meth:`wait_until` for an event loop: the loop keeps running while the child starts."""
        started = time.monotonic()
        while not await probe():
            self._not_ready(what, started, limit_s)
            await asyncio.sleep(_POLL_S)

    def wait_http(self, url: str, limit_s: float = 60.0) -> None:
        """Block until ``url`` answers 200."""
        self.wait_until(lambda: http_ok(url), url, limit_s)

    async def until_http(self, url: str, limit_s: float = 60.0) -> None:
        """Until ``url`` answers 200, without blocking the event loop."""
        async with httpx.AsyncClient(timeout=_PROBE_TIMEOUT_S, trust_env=False) as client:
            async def ok() -> bool:
                with contextlib.suppress(httpx.HTTPError):
                    return (await client.get(url)).status_code == 200
                return False

            await self.until(ok, url, limit_s)

    def __enter__(self) -> Process:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()



def http_ok(url: str) -> bool:
    """Does ``url`` answer 200 now? (no proxy from the environment: these are loopback servers)"""
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(url, timeout=_PROBE_TIMEOUT_S, trust_env=False).status_code == 200
    return False


def redis_pong(port: int) -> bool:
    """Does the redis-server on ``port`` answer PING now?"""
    with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=0.2) as conn:
        conn.sendall(b"PING\r\n")
        return conn.recv(16).startswith(b"+PONG")
    return False


class RedisServer(Process):
    """A throwaway redis-server on loopback: no persistence, so a restart starts empty."""

    def __init__(self, log: Path | None = None, *, exe: str = "redis-server", port: int | None = None,
                 cpus: tuple[int, ...] = (), args: tuple[str, ...] = ()) -> None:
        path = shutil.which(exe)
        if path is None:
            raise HarnessError(f"redis-server executable '{exe}' not found")
        self.port = port if port is not None else free_port()
        self.url = f"redis://{LOOPBACK}:{self.port}/0"
        super().__init__("redis-server", [path, "--port", str(self.port), "--bind", LOOPBACK, "--save", "",
                                          "--appendonly", "no", *args], log, cpus=cpus, capture_stdout=True)

    def wait_ready(self, limit_s: float = 10.0) -> None:
        """Block until it answers PING (a blocking probe: redis-server starts in milliseconds)."""
        self.wait_until(lambda: redis_pong(self.port), "PING", limit_s)
