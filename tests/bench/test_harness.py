"""``tandem.bench.harness``: real child processes on loopback, started, awaited and stopped."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest

from tandem.bench.harness import HarnessError, Process, RedisServer, free_port, restartable_port, tandem_argv


def _refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_free_ports_are_bindable_and_restartable_ones_below_the_ephemeral_range() -> None:
    for port in (free_port(), restartable_port()):
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert 10000 <= restartable_port() < low


async def test_tandem_sim_on_a_free_port_is_ready_then_stopped(tmp_path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "sim.log"
    with Process("tandem sim", tandem_argv("sim", "--port", str(port)), log) as proc:
        await proc.until_http(url + "/health", limit_s=60)
        async with httpx.AsyncClient(trust_env=False) as c:
            assert (await c.get(url + "/v1/models")).json()["data"][0]["id"]
        pid = proc.pid
    assert not proc.running and proc.popen.returncode is not None
    assert _refused(port)
    assert log.exists()
    with pytest.raises(ProcessLookupError):  # reaped: no zombie left behind
        os.kill(pid, 0)


def test_a_bad_command_is_a_clear_error_long_before_the_timeout(tmp_path) -> None:
    log = tmp_path / "sim.log"
    proc = Process("tandem sim", tandem_argv("sim", "--port", "not-a-port"), log)
    proc.start()
    started = time.monotonic()
    try:
        with pytest.raises(HarnessError) as err:
            proc.wait_http(f"http://127.0.0.1:{free_port()}/health", limit_s=60)
    finally:
        proc.stop()
    assert time.monotonic() - started < 30  # it exited: no waiting out the 60 s
    message = str(err.value)
    assert "tandem sim exited with status 2" in message and str(log) in message
    assert "port" in message  # the CLI's own error, from the log's tail


def test_a_missing_executable_cannot_start() -> None:
    with pytest.raises(HarnessError, match="cannot start /nonexistent/tandem-x"):
        Process("x", ["/nonexistent/tandem-x"]).start()


def test_never_ready_fails_at_the_limit_and_stop_kills_what_ignores_sigterm(tmp_path) -> None:
    log = tmp_path / "stubborn.log"
    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); " \
             "time.sleep(60)"
    proc = Process("stubborn", [sys.executable, "-c", script], log, capture_stdout=True)
    proc.start()
    try:
        proc.wait_until(lambda: log.read_text() == "up\n", "SIGTERM ignored", limit_s=30)
        with pytest.raises(HarnessError, match=r"stubborn: http://127\.0\.0\.1:\d+/ not ready after 0\.5s"):
            proc.wait_http(f"http://127.0.0.1:{free_port()}/", limit_s=0.5)
        assert proc.running  # a timeout leaves the process to its owner
    finally:
        proc.stop(grace_s=0.5)
    assert proc.popen.returncode == -signal.SIGKILL  # SIGTERM ignored: killed after the grace period


def test_redis_server_answers_and_restarts_on_its_port(tmp_path) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    redis = RedisServer(tmp_path / "redis.log", port=restartable_port())
    with redis:
        redis.wait_ready()
        redis.kill()
        assert not redis.running and _refused(redis.port)
        redis.start()  # the log is appended to, the port is the same
        redis.wait_ready()
        assert redis.url == f"redis://127.0.0.1:{redis.port}/0"
    assert not redis.running
    assert "Ready to accept connections" in (tmp_path / "redis.log").read_text()
    with pytest.raises(HarnessError, match="'no-such-redis' not found"):
        RedisServer(exe="no-such-redis")
