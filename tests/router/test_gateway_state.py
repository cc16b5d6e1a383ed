"""Shared state backends against a real redis-server (started here, killed mid-test)."""

from __future__ import annotations

from pathlib import Path

import pytest
from gatewayutil import RedisServer

from tandem.router.state import LocalReport, MemoryStateBackend, RedisStateBackend, SharedLoad


@pytest.fixture
def redis_server():
    server = RedisServer()
    yield server
    server.kill()


async def test_memory_backend_has_no_peers() -> None:
    view = await MemoryStateBackend().sync(LocalReport(members={"m": ["a"]},
                                                       load={"a": SharedLoad(pending_miss_tokens=5)}))
    assert view.peers == [] and view.load == {} and view.members == {"m": ["a"]}


async def test_redis_replicas_see_each_others_load_members_and_paths(redis_server: RedisServer) -> None:
    a = RedisStateBackend(redis_server.url, prefix="t1")
    b = RedisStateBackend(redis_server.url, prefix="t1")
    try:
        await a.sync(LocalReport(members={"m": ["x", "y"]}, load={"x": SharedLoad(pending_miss_tokens=100,
                                                                                     inflight_requests=2)},
                                 observed={"m": [[1, 2, 3]]}))
        view_b = await b.sync(LocalReport(members={"m": ["y", "z"]}, load={"x": SharedLoad(pending_miss_tokens=7)},
                                          observed={"m": [[9, 9]]}))
        assert view_b is not None
        assert view_b.peers == [a.replica_id]
        assert view_b.load == {"x": SharedLoad(pending_miss_tokens=100, inflight_requests=2)}  # own share excluded
        assert view_b.members == {"m": ["x", "y", "z"]}
        assert view_b.peer_observed == {"m": [[1, 2, 3]]}  # its own path [9, 9] is not echoed back
        view_a = await a.sync(LocalReport(members={"m": ["x", "y"]}, observed={"m": [[4, 5]]}))
        assert view_a is not None
        assert view_a.load["x"].pending_miss_tokens == 7
        assert view_a.peer_observed == {"m": [[9, 9]]}  # incremental: only what came since the last read
        view_b = await b.sync(LocalReport(members={"m": ["y", "z"]}))
        assert view_b is not None and view_b.peer_observed == {"m": [[4, 5]]}
        assert view_b.load == {}  # a's load report was replaced by an empty one
    finally:
        await a.close()
        await b.close()


async def test_redis_loss_reports_unreachable_then_recovers(redis_server: RedisServer) -> None:
    backend = RedisStateBackend(redis_server.url, prefix="t2", timeout=0.2)
    try:
        assert await backend.sync(LocalReport()) is not None
        redis_server.kill()
        assert await backend.sync(LocalReport(load={"x": SharedLoad(pending_miss_tokens=1)})) is None
        assert not backend.healthy
    finally:
        await backend.close()


async def test_operator_prefixes_keep_services_and_the_chart_gateway_apart(redis_server: RedisServer) -> None:
    """One Redis, three users: two replicas of service paths/x (the operator's prefix), another
    service, and the chart's gateway (prefix: the release's full name, here "tandem") serving a model
    whose name makes its stream key ``tandem:paths:x:replicas``; a "tandem:<ns>:<name>" prefix
    would give service paths/x's replica set that very key (Redis: WRONGTYPE)."""
    from tandem.api.models import LLMService
    from tandem.operator.plan import redis_prefix

    def prefix(namespace: str, name: str) -> str:
        return redis_prefix(LLMService.model_validate(
            {"metadata": {"name": name, "namespace": namespace},
             "spec": {"model": {"name": "m"}, "pools": {"unified": {}}}}))

    svc = [RedisStateBackend(redis_server.url, prefix=prefix("paths", "x")) for _ in range(2)]
    other = RedisStateBackend(redis_server.url, prefix=prefix("paths", "y"))
    chart = RedisStateBackend(redis_server.url, prefix="tandem")
    backends = [*svc, other, chart]
    try:
        for _ in range(2):
            views = [await chart.sync(LocalReport(members={"x:replicas": ["c"]}, observed={"x:replicas": [[7]]})),
                     *[await b.sync(LocalReport(members={"m": [f"s{i}"]}, observed={"m": [[i]]}))
                       for i, b in enumerate(svc)],
                     await other.sync(LocalReport(members={"m": ["o"]}))]
        assert all(v is not None for v in views) and all(b.healthy for b in backends)
        chart_view, a_view, b_view, other_view = views
        assert chart_view.peers == [] and chart_view.members == {"x:replicas": ["c"]}
        assert a_view.peers == [svc[1].replica_id] and b_view.peers == [svc[0].replica_id]
        assert b_view.members == {"m": ["s0", "s1"]}
        assert other_view.peers == [] and other_view.members == {"m": ["o"]}
    finally:
        for b in backends:
            await b.close()


def test_bench_state_sync_reports_the_loop_cost_of_a_sync(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Against a redis-server the bench starts: one row without and one with routed paths."""
    import re

    from tandem.cli import main

    assert main(["bench", "state-sync", "--replicas", "2", "--instances", "3", "--paths", "20", "--syncs", "10",
                 "--out", str(tmp_path)]) == 0
    rows = re.findall(r"(\d+) paths/sync: cpu ([0-9.]+) ms", capsys.readouterr().out)
    assert [int(n) for n, _ in rows] == [0, 20]
    assert all(float(cpu) > 0 for _, cpu in rows)
