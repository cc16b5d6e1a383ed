"""A real bandwidth-limited link on one machine: a private network namespace joined by a veth pair.

The far end of the pair lives in a namespace of its own (the "remote datacenter"); its egress,
the direction a remote prefill pool's KV takes to the local decode engines, is shaped with a
``tbf`` qdisc (``netem`` and ``fq`` are not available on these machines, so the link has a rate,
not a delay). Addresses come from a private /30 in 10.211.0.0/16 that no interface here uses;
traffic never leaves the machine. Everything created is removed on exit, on an exception, and
at interpreter exit if the process is torn down another way (``atexit``).

Creating namespaces needs root and the ``ip`` and ``tc`` tools: :func:`unavailable` says why not,
so tests and benches skip with that reason.
"""

from __future__ import annotations

import atexit
import os
import random
import re
import shutil
import subprocess
from types import TracebackType

_TC_SENT = re.compile(r"Sent (\d+) bytes")


class LinkUnavailable(RuntimeError):
    """Network namespaces cannot be made here (the message says why)."""


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise LinkUnavailable(f"{' '.join(argv)}: {proc.stderr.strip() or f'exit {proc.returncode}'}")
    return proc


def unavailable() -> str | None:
    """Why a shaped link cannot be made on this machine, or None when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (iproute2)"
    return None


def _free_subnet() -> int:
    """A 10.211.x.y/30 (as the integer of its network address) that no interface here uses."""
    used = _run("ip", "-4", "-o", "addr", "show").stdout
    rng = random.Random()
    for _ in range(100):
        third, fourth = rng.randrange(256), rng.randrange(0, 256, 4)
        if f"10.211.{third}." not in used:
            return (10 << 24) | (211 << 16) | (third << 8) | fourth
    raise LinkUnavailable("no free 10.211.x.0/30 subnet")


def _ip(addr: int) -> str:
    return ".".join(str((addr >> s) & 255) for s in (24, 16, 8, 0))


class ShapedLink:
    """``with ShapedLink(rate_mbit=40) as link:`` a namespace ``link.ns`` reachable at
    ``link.remote_ip`` from here (``link.local_ip`` from there), its egress shaped to the rate."""

    def __init__(self, rate_mbit: float, *, burst_kbit: int = 64) -> None:
        if rate_mbit <= 0:
            raise ValueError("rate_mbit must be positive")
        tag = f"{os.getpid() % 100_000}{random.randrange(1000):03d}"
        self.ns = f"tandem-link-{tag}"
        self.local_dev, self.remote_dev = f"tl{tag}a", f"tl{tag}b"  # <= 15 characters
        self.rate_mbit, self.burst_kbit = rate_mbit, burst_kbit
        self.local_ip = self.remote_ip = ""
        self._made = False

    def __enter__(self) -> ShapedLink:
        why = unavailable()
        if why:
            raise LinkUnavailable(why)
        atexit.register(self.close)
        try:
            net = _free_subnet()
            self.local_ip, self.remote_ip = _ip(net + 1), _ip(net + 2)
            _run("ip", "netns", "add", self.ns)
            self._made = True
            _run("ip", "link", "add", self.local_dev, "type", "veth", "peer", "name", self.remote_dev)
            _run("ip", "link", "set", self.remote_dev, "netns", self.ns)
            _run("ip", "addr", "add", f"{self.local_ip}/30", "dev", self.local_dev)
            _run("ip", "link", "set", self.local_dev, "up")
            self._in("ip", "addr", "add", f"{self.remote_ip}/30", "dev", self.remote_dev)
            self._in("ip", "link", "set", self.remote_dev, "up")
            self._in("ip", "link", "set", "lo", "up")
            self._tc("add")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Remove the veth pair (both ends) and the namespace; safe to call twice."""
        if not self._made:
            return
        self._made = False
        for argv in (("ip", "link", "del", self.local_dev), ("ip", "netns", "del", self.ns)):
            for _ in range(3):  # an overloaded machine may time a command out: try again
                try:
                    _run(*argv, check=False)
                    break
                except subprocess.TimeoutExpired:
                    continue
        atexit.unregister(self.close)

    def _in(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return _run("ip", "netns", "exec", self.ns, *argv)

    def _tc(self, verb: str) -> None:
        self._in("tc", "qdisc", verb, "dev", self.remote_dev, "root", "tbf", "rate", f"{self.rate_mbit:g}mbit",
                 "burst", f"{self.burst_kbit}kbit", "latency", "400ms")

    def set_rate(self, rate_mbit: float) -> None:
        """Change the shaped rate now (``tc qdisc change``)."""
        if rate_mbit <= 0:
            raise ValueError("rate_mbit must be positive")
        self.rate_mbit = rate_mbit
        self._tc("change")

    def sent_bytes(self) -> int:
        """Bytes the shaped egress (remote to local) has sent so far."""
        match = _TC_SENT.search(self._in("tc", "-s", "qdisc", "show", "dev", self.remote_dev).stdout)
        return int(match.group(1)) if match else 0

    def argv(self, *argv: str) -> list[str]:
        """``argv`` run inside the namespace."""
        return ["ip", "netns", "exec", self.ns, *argv]
