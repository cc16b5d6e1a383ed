"""``tandem gateway --workers N``: one port served by N processes, as one gateway.

Real processes throughout: the supervisor and its workers (spawned), two ``tandem sim`` engines, a
real redis-server; every call over real HTTP with a fresh connection each, so the kernel spreads
them over the workers.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from gatewayutil import ROOT, RedisServer, completion_body, free_port, sim_process


def fresh(method: str, url: str, **kw: object) -> httpx.Response:
    """One call on its own connection (a pooled one would keep hitting the same worker)."""
    with httpx.Client(timeout=10.0) as client:
        return client.request(method, url, **kw)


def workers_of(pid: int) -> set[int]:
    """The supervisor's live worker processes (multiprocessing's resource tracker is not one)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if ppid == pid and b"resource_tracker" not in cmdline:
            out.add(int(entry.name))
    return out


def until(predicate: Callable[[], bool], limit: float = 20.0) -> None:
    end = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.1)


def answered_by_each(url: str, count: int, check: Callable[[httpx.Response], None]) -> None:
    """Ask fresh connections until each of ``count`` workers has answered and passed ``check``."""
    seen: set[str] = set()
    for _ in range(200):
        resp = fresh("GET", url)
        check(resp)
        seen.add(resp.headers["x-tandem-worker"])
        if len(seen) == count:
            return
    raise AssertionError(f"only workers {sorted(seen)} answered")


@pytest.fixture()
def gateway() -> Iterator[tuple[str, subprocess.Popen, list[str]]]:
    redis = RedisServer()
    with sim_process() as (a, _), sim_process() as (b, _):
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", "gateway", "--port", str(port),
                                 "--instances", f"{a},{b}", "--workers", "2", "--redis-url", redis.url,
                                 "--scrape-interval", "0.2", "--state-sync-interval", "0.1",
                                 "--shutdown-grace", "0.5", "--drain-timeout", "5", "--expose-topology"],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        url = f"http://127.0.0.1:{port}"
        try:
            def ready() -> bool:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                try:
                    return fresh("GET", url + "/readyz").status_code == 200
                except httpx.HTTPError:
                    return False

            until(ready, 60.0)
            yield url, proc, [a, b]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            redis.kill()


@pytest.mark.slow
def test_workers_serve_one_port_as_one_gateway(gateway: tuple[str, subprocess.Popen, list[str]]) -> None:
    url, proc, (a, b) = gateway
    for i in range(20):
        resp = fresh("POST", url + "/v1/completions", json=completion_body(f"request {i}", max_tokens=4))
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["completion_tokens"] == 4

    def total(text: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("tandem_requests_total{"))

    def counts_all(resp: httpx.Response) -> None:
        assert resp.status_code == 200
        assert total(resp.text) == 20.0, f"worker {resp.headers['x-tandem-worker']} reports {total(resp.text)}"

    # /metrics: whichever worker answers counts every worker's requests.
    answered_by_each(url + "/metrics", 2, counts_all)

    # A drain asked of one worker holds in all of them: no worker routes to it afterwards.
    assert fresh("POST", url + "/admin/drain", params={"instance": a}).status_code == 200

    def drained(resp: httpx.Response) -> None:
        states = {i["id"]: i["draining"] for i in resp.json()["instances"]}
        assert states.get(a, True), f"worker {resp.headers['x-tandem-worker']} still routes to {a}: {states}"

    answered_by_each(url + "/admin/instances", 2, drained)

    def one_healthy(resp: httpx.Response) -> None:  # the same engines, seen by both: not added up
        healthy = [line for line in resp.text.splitlines()
                   if line.startswith("tandem_instances{") and 'state="healthy"' in line]
        assert healthy and float(healthy[0].rsplit(" ", 1)[1]) == 1.0, healthy

    until(lambda: "1.0" in "".join(line for line in fresh("GET", url + "/metrics").text.splitlines()
                                   if line.startswith("tandem_instances{") and 'state="healthy"' in line))
    answered_by_each(url + "/metrics", 2, one_healthy)
    for i in range(10):
        resp = fresh("POST", url + "/v1/completions", json=completion_body(f"after drain {i}", max_tokens=2))
        assert resp.status_code == 200 and resp.headers["x-tandem-instance"] == b
        assert resp.headers["x-tandem-worker"] in ("0", "1")

    # A worker that dies is replaced, and the port keeps answering.
    before = workers_of(proc.pid)
    assert len(before) == 2
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    until(lambda: len(workers_of(proc.pid) - {victim}) == 2)
    until(lambda: all(fresh("GET", url + "/readyz").status_code == 200 for _ in range(6)))

    # SIGTERM: the supervisor passes it on, the workers drain, everything exits cleanly.
    last = workers_of(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in last)


def test_more_than_one_worker_needs_redis() -> None:
    done = subprocess.run([sys.executable, "-m", "tandem.cli", "gateway", "--instances", "http://127.0.0.1:9",
                           "--workers", "2"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "workers" in done.stderr and "--redis-url" in done.stderr


def test_workers_on_a_taken_port_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "tandem.cli", "gateway", "--instances", "http://127.0.0.1:9",
                               "--workers", "2", "--redis-url", "redis://127.0.0.1:9/0", "--port", str(port)],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert f"port: cannot listen on 127.0.0.1:{port}" in done.stderr, done.stderr
