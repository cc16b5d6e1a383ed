"""``tandem bench state-sync``: what one shared-state sync costs the event loop of a gateway.

Every ``--state-sync-interval`` each replica (or worker) publishes its share to Redis and reads its
peers' (router/state.py). The request path never waits for it, but the sync runs on the same event
loop, so its CPU time is a pause every request in flight waits out: at 1,000 req/s a 4 ms sync
every 0.2 s is felt by about 2 % of the requests, at the p99. This measures that CPU time against a
redis-server it starts, for ``replicas`` replicas each routing ``paths`` requests per sync, and
reports it as a share of the sync interval next to the same sync with no routed paths (the floor:
load and membership only).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from tandem.bench.harness import HarnessError, RedisServer
from tandem.bench.stats import quantiles
from tandem.config import TandemSettings


class BenchStateSyncCommand(TandemSettings):
    """CPU time of one shared-state sync (Redis) per replica, with and without routed paths."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_BENCH_STATE_SYNC_")

    replicas: int = Field(4, ge=1, le=64, description="gateway replicas/workers sharing the Redis")
    instances: int = Field(8, ge=1, le=4096, description="engine instances each replica reports load for")
    paths: int = Field(50, ge=0, le=100_000, description="requests each replica routed since its last sync "
                       "(1,000 req/s over 4 workers at the default 0.2 s interval: 50)")
    syncs: int = Field(200, ge=10, le=100_000, description="syncs measured per replica")
    interval: float = Field(0.2, gt=0, description="the gateway's --state-sync-interval, for the share")
    redis_server: str = Field("redis-server", description="redis-server executable")
    out: Path = Field(Path("out"), description="directory for the redis-server log")

    def cli_cmd(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            with RedisServer(self.out / "bench-state-redis.log", exe=self.redis_server) as redis:
                redis.wait_ready()
                floor = asyncio.run(self._measure(redis.url, "floor", 0))
                routed = asyncio.run(self._measure(redis.url, "routed", self.paths))
        except HarnessError as exc:
            raise SystemExit(f"tandem bench state-sync: {exc}") from exc
        print(f"shared-state sync, {self.replicas} replicas x {self.instances} instances, one replica's view "
              f"(CPU ms of its event loop per sync; share of a {self.interval:g} s interval)")
        for name, paths, (cpu, wall_p50, wall_p99) in (("load only", 0, floor), ("routed", self.paths, routed)):
            print(f"  {name:9s} {paths:6d} paths/sync: cpu {cpu:.3f} ms ({cpu / 1000 / self.interval:.2%} of the "
                  f"interval), wall p50 {wall_p50:.3f} ms p99 {wall_p99:.3f} ms")
        print(f"  routed / load only: {routed[0] / floor[0]:.2f}x CPU")

    async def _measure(self, url: str, name: str, paths: int) -> tuple[float, float, float]:
        from tandem.router.state import LocalReport, RedisStateBackend, SharedLoad

        rng = random.Random(0)
        prefix = f"bench-{name}-{time.time_ns()}"
        backends = [RedisStateBackend(url, prefix=prefix) for _ in range(self.replicas)]
        instances = [f"http://10.0.{i // 250}.{i % 250}:8000" for i in range(self.instances)]

        def report() -> LocalReport:
            return LocalReport(
                load={i: SharedLoad(pending_miss_tokens=rng.randrange(10_000),
                                      pending_attn_pairs=rng.randrange(10**8),
                                      queued_requests=rng.randrange(8), inflight_requests=rng.randrange(32))
                      for i in instances},
                members={"model": instances},
                observed={"model": [[rng.getrandbits(63) for _ in range(rng.randrange(1, 8))]
                                    for _ in range(paths)]})

        try:
            for b in backends:  # joined, and past the first read of the streams
                if await b.sync(report()) is None:
                    raise SystemExit(f"tandem bench state-sync: Redis at {url} did not answer")
            walls: list[float] = []
            cpu = 0.0
            for _ in range(self.syncs):
                for b in backends:
                    r = report()  # built outside the timing: the gateway builds it from state it has
                    c0, w0 = time.process_time(), time.perf_counter()
                    await b.sync(r)
                    cpu += time.process_time() - c0
                    walls.append(time.perf_counter() - w0)
            p50, p99 = quantiles(walls, (0.5, 0.99))
            return cpu * 1000 / len(walls), p50 * 1000, p99 * 1000
        finally:
            for b in backends:
                with contextlib.suppress(Exception):
                    await b.close()
