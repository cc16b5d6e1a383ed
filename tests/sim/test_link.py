"""The shared link: fair share, never above capacity, utilisation accounting, async wrapper."""

import asyncio
import random

import pytest

from tandem.sim.link import AsyncLink, SharedLink

GB = 1e9


def drain(link: SharedLink) -> dict[str, float]:
    done = {}
    while (t := link.next_completion()) is not None:
        for c in link.advance(t):
            done[c.flow_id] = c.time
    return done


def test_one_flow_takes_bytes_over_bandwidth() -> None:
    link = SharedLink(capacity_gbps=8.0)  # 1 GB/s
    link.start("a", 2 * GB, 0.0)
    assert drain(link) == {"a": pytest.approx(2.0)}


def test_two_flows_share_fairly_and_the_short_one_releases_its_share() -> None:
    link = SharedLink(capacity_gbps=8.0)
    link.start("big", 3 * GB, 0.0)
    link.start("small", 1 * GB, 0.0)
    done = drain(link)
    assert done["small"] == pytest.approx(2.0)  # 0.5 GB/s each until small is done
    assert done["big"] == pytest.approx(4.0)  # then 2 GB left at the full 1 GB/s


def test_per_flow_cap_leaves_capacity_unused() -> None:
    link = SharedLink(capacity_gbps=8.0, per_flow_gbps=2.0)  # one flow: 0.25 GB/s at most
    link.start("a", 1 * GB, 0.0)
    assert drain(link)["a"] == pytest.approx(4.0)
    assert link.utilisation(0.0, 4.0) == pytest.approx(0.25)


def test_random_traffic_never_exceeds_capacity_in_any_window() -> None:
    rng = random.Random(7)
    link = SharedLink(capacity_gbps=100.0)
    cap = link.capacity_bytes_per_s
    t, sizes, finished = 0.0, {}, {}
    for i in range(400):
        t += rng.expovariate(40.0)
        for c in link.advance(t):
            finished[c.flow_id] = c
        sizes[f"f{i}"] = rng.lognormvariate(20.0, 1.0)  # ~0.5 GB median, heavy tail
        link.start(f"f{i}", sizes[f"f{i}"], t)
        assert link.total_rate() <= cap * (1 + 1e-12)
    for c in link.advance(1e6):
        finished[c.flow_id] = c
    assert set(finished) == set(sizes)
    end = max(c.time for c in finished.values())
    assert link.delivered_bytes == pytest.approx(sum(sizes.values()), rel=1e-9)
    for w in (0.01, 0.1, 1.0):
        utils = link.window_utilisation(0.0, end, w)
        assert max(utils) <= 1 + 1e-9
    # Every flow took at least its bytes at full capacity (no flow is faster than the link).
    for fid, c in finished.items():
        assert c.time - c.started >= sizes[fid] / cap * (1 - 1e-9)
    # Overloaded, the link runs at capacity: the busy period moves everything at exactly 1.0.
    assert link.utilisation(0.0, end) == pytest.approx(sum(sizes.values()) / (cap * end), rel=1e-9)


def test_cancel_and_bad_input() -> None:
    link = SharedLink(capacity_gbps=8.0)
    link.start("a", 2 * GB, 0.0)
    link.start("b", 2 * GB, 0.0)
    assert link.cancel("b", 1.0) and not link.cancel("b", 1.0)
    assert drain(link)["a"] == pytest.approx(2.5)  # 0.5 GB by t=1, then 1.5 GB alone
    with pytest.raises(ValueError):
        SharedLink(capacity_gbps=0)
    with pytest.raises(ValueError):
        link.start("c", 1.0, 0.5)  # time went backwards


async def test_async_link_shares_on_the_wall_clock() -> None:
    link = AsyncLink(capacity_gbps=8.0)  # 1 GB/s: 0.1 GB takes 0.1 s alone, 0.2 s shared by two
    link.start()
    try:
        alone = await link.transfer(0.1 * GB)
        t0 = asyncio.get_running_loop().time()
        both = await asyncio.gather(link.transfer(0.1 * GB), link.transfer(0.1 * GB))
        wall = asyncio.get_running_loop().time() - t0
    finally:
        await link.stop()
    assert alone == pytest.approx(0.1, abs=0.01)
    assert both == [pytest.approx(0.2, abs=0.01)] * 2
    assert 0.19 < wall < 0.5
    assert link.link.delivered_bytes == pytest.approx(0.3 * GB)
