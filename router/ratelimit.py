"""Per-key rate limits (requests and tokens per minute), one budget across every gateway process.

A key's limits are token buckets refilled continuously (a minute's quota as burst). A gateway with
``--redis-url`` keeps the buckets in Redis and takes from them with one Lua script (atomic: both
buckets are checked and charged together, on Redis's own clock), so the limit holds for the key
whatever number of workers and replicas serve it. Without Redis the buckets are this process's.

When Redis does not answer (down, partitioned, slow past ``timeout``), a process falls back to local
buckets holding ``1/N`` of each limit, N being the gateway processes (workers and replicas) it last
saw in the shared state: the total stays near the limit while the load is spread evenly, and no
request fails because Redis did. It tries Redis again ``retry_s`` later.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tandem.router.security import Principal

log = logging.getLogger("tandem.gateway.ratelimit")


@dataclass(frozen=True, slots=True)
class LimitDecision:
    ok: bool
    message: str = ""
    retry_after: float = 0.0


def _refused(p: Principal, which: str, wait: float) -> LimitDecision:
    per = f"{p.rpm} requests/minute" if which == "rpm" else f"{p.tpm} tokens/minute"
    return LimitDecision(False, f"rate limit: {per} for key '{p.name}'", wait)


@dataclass(slots=True)
class _Bucket:
    level: float
    updated: float

    def refill(self, capacity: float, now: float) -> float:
        return min(capacity, self.level + max(0.0, now - self.updated) * capacity / 60.0)


def _wait(amount: float, level: float, capacity: float) -> float:
    """0 when ``amount`` may be taken from ``level``, else the seconds until it may. An amount larger
    than the whole bucket goes through on a full one (the bucket goes negative and refills)."""
    if amount <= level or (amount > capacity and level >= capacity):
        return 0.0
    return (min(amount, capacity) - level) * 60.0 / capacity


@dataclass
class LocalLimiter:
    """This process's buckets; ``share`` divides every limit (the fallback's 1/N)."""

    _buckets: dict[tuple[str, str], _Bucket] = field(default_factory=dict)

    def admit(self, p: Principal, tokens: int, now: float, share: int = 1) -> LimitDecision:
        wanted = [(which, cap / share, amount) for which, cap, amount in (("rpm", p.rpm, 1), ("tpm", p.tpm, tokens))
                  if cap]
        levels = []
        for which, cap, amount in wanted:
            bucket = self._buckets.setdefault((p.name, which), _Bucket(cap, now))
            level = bucket.refill(cap, now)
            if wait := _wait(amount, level, cap):
                return _refused(p, which, wait)
            levels.append((bucket, level - amount))
        for bucket, level in levels:  # all or nothing: a refused request takes from no bucket
            bucket.level, bucket.updated = level, now
        return LimitDecision(True)


# KEYS: one bucket per limit; ARGV[1]: key expiry (ms), then capacity and amount per key.
# Returns {0, "0"} when taken, else {index of the refusing bucket, seconds to wait}.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local levels = {}
for i, key in ipairs(KEYS) do
  local cap = tonumber(ARGV[2 * i])
  local amount = tonumber(ARGV[2 * i + 1])
  local state = redis.call('HMGET', key, 'level', 'at')
  local level = tonumber(state[1]) or cap
  local at = tonumber(state[2]) or now
  level = math.min(cap, level + math.max(0, now - at) * cap / 60)
  if not (amount <= level or (amount > cap and level >= cap)) then
    return {i, tostring((math.min(amount, cap) - level) * 60 / cap)}
  end
  levels[i] = level - amount
end
for i, key in ipairs(KEYS) do
  redis.call('HSET', key, 'level', tostring(levels[i]), 'at', tostring(now))
  redis.call('PEXPIRE', key, ARGV[1])
end
return {0, '0'}
"""


class RedisUnavailable(Exception):
    """Redis did not answer the rate-limit script."""


class RedisLimiter:
    """The buckets in Redis (``{prefix}:ratelimit:{key name}:{rpm|tpm}``), shared by every process."""

    def __init__(self, url: str, prefix: str, timeout: float) -> None:
        import redis.asyncio as aioredis

        self.prefix = prefix
        self._redis = aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                              health_check_interval=0)
        self._take = self._redis.register_script(_TAKE)

    async def admit(self, p: Principal, tokens: int) -> LimitDecision:
        from redis.exceptions import RedisError

        wanted = [(which, cap, amount) for which, cap, amount in (("rpm", p.rpm, 1), ("tpm", p.tpm, tokens)) if cap]
        keys = [f"{self.prefix}:ratelimit:{p.name}:{which}" for which, _, _ in wanted]
        args: list[float] = [120_000]
        for _, cap, amount in wanted:
            args += [cap, amount]
        try:
            index, wait = await self._take(keys=keys, args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            raise RedisUnavailable(type(exc).__name__) from None
        if int(index) == 0:
            return LimitDecision(True)
        return _refused(p, wanted[int(index) - 1][0], float(wait))

    async def close(self) -> None:
        await self._redis.aclose()


class RateLimiter:
    """What admission asks: Redis when configured and answering, else the local fallback."""

    def __init__(self, redis: RedisLimiter | None, processes: Callable[[], int], retry_s: float = 1.0) -> None:
        self.redis, self.processes, self.retry_s = redis, processes, retry_s
        self.local = LocalLimiter()
        self._redis_down_until = 0.0

    async def admit(self, p: Principal | None, tokens: int) -> LimitDecision:
        if p is None or not (p.rpm or p.tpm):
            return LimitDecision(True)
        now = time.monotonic()
        if self.redis is None:
            return self.local.admit(p, tokens, now)
        if now >= self._redis_down_until:
            try:
                decision = await self.redis.admit(p, tokens)
            except RedisUnavailable as exc:
                if self._redis_down_until == 0.0:
                    log.warning("rate limits: Redis unreachable (%s); each process enforces 1/%d of every limit",
                                exc, self.processes())
                self._redis_down_until = time.monotonic() + self.retry_s
            else:
                if self._redis_down_until:
                    log.warning("rate limits: Redis reachable again; limits shared")
                self._redis_down_until = 0.0
                return decision
        return self.local.admit(p, tokens, now, share=max(1, self.processes()))

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.close()
