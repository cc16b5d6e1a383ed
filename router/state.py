"""State shared by gateway replicas: in-memory (one process) or Redis (several replicas agree).

Nothing on a request's path waits for the backend. A background loop periodically *syncs*: it
publishes this replica's contribution (per-instance pending miss tokens, their attention pairs and
request counts, the endpoints it serves, the block-hash paths it routed since the last sync) and
reads back the sum of the other live replicas' contributions plus the paths they routed. Each
replica then routes on local + remote load, and its adaptive key sees every replica's traffic, so
all replicas key a hot prefix at the same depth.

If Redis fails, ``sync`` returns ``None``; the caller drops the remote part and routes on local
state alone (a warning metric says so) until Redis answers again. Requests never fail for it.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Protocol

from pydantic import BaseModel, Field, ValidationError

from tandem.router.cachereset import CacheReset

log = logging.getLogger("tandem.gateway.state")


class SharedLoad(BaseModel):
    """One replica's contribution to one instance's load, as replicas share it through the backend.

    (Not :class:`tandem.api.observations.InstanceLoad`, an instance's row in the observations the
    autoscaler reads.)
    """

    pending_miss_tokens: int = 0
    pending_attn_pairs: int = 0  # attention pairs of those tokens (the TTFT estimate's quadratic term)
    queued_requests: int = 0
    inflight_requests: int = 0

    def __add__(self, other: SharedLoad) -> SharedLoad:
        return SharedLoad(pending_miss_tokens=self.pending_miss_tokens + other.pending_miss_tokens,
                          pending_attn_pairs=self.pending_attn_pairs + other.pending_attn_pairs,
                          queued_requests=self.queued_requests + other.queued_requests,
                          inflight_requests=self.inflight_requests + other.inflight_requests)


class LocalReport(BaseModel):
    load: dict[str, SharedLoad] = Field(default_factory=dict)
    members: dict[str, list[str]] = Field(default_factory=dict)  # pool -> instance ids this replica serves
    # pool -> block-hash paths of the requests routed since the last sync (the adaptive key's input)
    observed: dict[str, list[list[int]]] = Field(default_factory=dict)
    resets: list[CacheReset] = Field(default_factory=list)  # engine cache resets this replica saw since the last sync


class SharedView(BaseModel):
    """What the other live replicas contribute (this replica's own share excluded)."""

    peers: list[str] = Field(default_factory=list)
    load: dict[str, SharedLoad] = Field(default_factory=dict)
    members: dict[str, list[str]] = Field(default_factory=dict)  # pool -> union over live replicas, self included
    # pool -> paths the peers routed since our last read: fed to our adaptive keyer so every replica
    # keys hot prefixes at the same depth and so maps them to the same candidate pair.
    peer_observed: dict[str, list[list[int]]] = Field(default_factory=dict)
    # instance -> the latest cache reset any replica saw (ours included): each replica clears its
    # views of the instance once per reset it has not applied yet.
    resets: dict[str, CacheReset] = Field(default_factory=dict)


def _resets(raw: dict[str, str]) -> dict[str, CacheReset]:
    """The shared resets; an entry this version cannot read (another version's) is skipped."""
    out: dict[str, CacheReset] = {}
    for instance, value in raw.items():
        try:
            out[instance] = CacheReset.model_validate_json(value)
        except ValidationError:
            continue
    return out


class StateBackend(Protocol):
    name: str
    replica_id: str

    async def sync(self, report: LocalReport) -> SharedView | None:
        """Publish ``report`` and read the others' share; ``None`` when the backend is unreachable."""
        ...

    async def close(self) -> None: ...


class MemoryStateBackend:
    """The embedded default: this process is the only replica, so there is nothing remote."""

    name = "memory"

    def __init__(self) -> None:
        self.replica_id = uuid.uuid4().hex[:12]

    async def sync(self, report: LocalReport) -> SharedView:
        return SharedView(members=dict(report.members))

    async def close(self) -> None:
        return None


class RedisStateBackend:
    """Redis layout (all keys under ``prefix``), every replica-owned key expiring after ``ttl``:

    - ``{p}:replicas``           sorted set replica id -> last sync time (live = seen within ttl)
    - ``{p}:load:{replica}``     hash instance id -> JSON SharedLoad
    - ``{p}:members:{replica}``  hash pool -> JSON list of instance ids
    - ``{p}:resets``             hash instance id -> JSON CacheReset, the latest reset seen of each engine's
                                 cache (expires an hour after the last one)
    - ``{p}:paths:{pool}``       stream of routed block-hash paths, one entry per replica sync
                                 (paths ';'-separated, hashes ','-separated; capped), read incrementally.
                                 (Earlier versions wrote one entry per path to ``{p}:observed:{pool}``:
                                 a new key, so old and new replicas in a rolling update do not parse
                                 each other's entries; they only share no paths until it ends.)
    """

    name = "redis"

    RESETS_TTL_MS = 3_600_000

    def __init__(self, url: str, prefix: str = "tandem", ttl: float = 2.0, stream_len: int = 1024,
                 timeout: float = 0.5, first_read: int = 16) -> None:
        import redis.asyncio as aioredis

        self.replica_id = uuid.uuid4().hex[:12]
        self.prefix, self.ttl, self.stream_len = prefix, ttl, stream_len
        self.first_read = first_read  # entries (peer syncs) read back on the first sync: what they saw recently
        self._read_from: dict[str, str] = {}  # pool -> last stream id read
        self._redis = aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                              health_check_interval=0, decode_responses=True)
        self.healthy = True

    async def sync(self, report: LocalReport) -> SharedView | None:
        from redis.exceptions import RedisError

        p, me, now = self.prefix, self.replica_id, time.time()
        ttl_ms = int(self.ttl * 1000)
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.zadd(f"{p}:replicas", {me: now})
            pipe.zremrangebyscore(f"{p}:replicas", "-inf", now - self.ttl)
            load_key, members_key = f"{p}:load:{me}", f"{p}:members:{me}"
            pipe.delete(load_key)
            if report.load:
                pipe.hset(load_key, mapping={k: v.model_dump_json() for k, v in report.load.items()})
                pipe.pexpire(load_key, ttl_ms)
            pipe.delete(members_key)
            if report.members:
                pipe.hset(members_key, mapping={k: json.dumps(v) for k, v in report.members.items()})
                pipe.pexpire(members_key, ttl_ms)
            for pool, paths in report.observed.items():
                if paths:  # one entry per sync, not per path: parsing per-path entries cost ms per sync
                    pipe.xadd(f"{p}:paths:{pool}", {"r": me, "h": ";".join(",".join(map(str, path))
                                                                                for path in paths)},
                              maxlen=self.stream_len, approximate=True)
            if report.resets:
                pipe.hset(f"{p}:resets", mapping={r.instance: r.model_dump_json() for r in report.resets})
                pipe.pexpire(f"{p}:resets", self.RESETS_TTL_MS)
            pipe.zrangebyscore(f"{p}:replicas", now - self.ttl, "+inf")
            replicas: list[str] = (await pipe.execute())[-1]
            peers = [r for r in replicas if r != me]
            pools = sorted(set(report.members) | set(report.observed))
            pipe = self._redis.pipeline(transaction=False)
            for r in peers:
                pipe.hgetall(f"{p}:load:{r}")
                pipe.hgetall(f"{p}:members:{r}")
            for pool in pools:
                # First sync: start from the stream's tail window (what the peers saw recently).
                start = self._read_from.get(pool)
                if start is None:
                    pipe.xrevrange(f"{p}:paths:{pool}", "+", "-", count=self.first_read)
                else:
                    pipe.xrange(f"{p}:paths:{pool}", f"({start}", "+", count=self.stream_len)
            pipe.hgetall(f"{p}:resets")
            results = await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            if self.healthy:
                log.warning("shared state: Redis unreachable (%s); routing on local state", type(exc).__name__)
            self.healthy = False
            return None
        if not self.healthy:
            log.warning("shared state: Redis reachable again")
        self.healthy = True
        view = SharedView(peers=peers, resets=_resets(results[-1]))
        members: dict[str, set[str]] = {k: set(v) for k, v in report.members.items()}
        for i in range(len(peers)):
            for inst, raw in results[2 * i].items():
                view.load[inst] = view.load.get(inst, SharedLoad()) + SharedLoad.model_validate_json(raw)
            for pool, raw in results[2 * i + 1].items():
                members.setdefault(pool, set()).update(json.loads(raw))
        view.members = {k: sorted(v) for k, v in members.items()}
        for j, pool in enumerate(pools):
            entries = results[2 * len(peers) + j]
            if pool not in self._read_from:
                entries = list(reversed(entries))
            if entries:
                self._read_from[pool] = entries[-1][0]
            elif pool not in self._read_from:
                self._read_from[pool] = "0-0"
            view.peer_observed[pool] = [[int(h) for h in path.split(",") if h] for _, f in entries
                                        if f.get("r") != me for path in f["h"].split(";")]
        return view

    async def close(self) -> None:
        from redis.exceptions import RedisError

        try:
            await self._redis.zrem(f"{self.prefix}:replicas", self.replica_id)
            me = self.replica_id
            await self._redis.delete(f"{self.prefix}:load:{me}", f"{self.prefix}:members:{me}")
        except (RedisError, OSError, TimeoutError):
            pass
        await self._redis.aclose()
