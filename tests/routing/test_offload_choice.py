"""The queue-aware offload side choice and the link meter, on hand-made timelines.

Rates are chosen so the arithmetic is exact: an 8 Gbit/s link moves 1 GB per second.
"""

import pytest

from tandem.router.routing.offload import (
    Calibration,
    LinkMeter,
    OffloadController,
    OffloadSettings,
    PrefillPoolSpeed,
)

GB = 1_000_000_000
POOL = PrefillPoolSpeed(instances=2, per_token_s=1e-4, attn_pair_s=0.0)


def controller(**settings) -> OffloadController:
    base = dict(initial_threshold=10_000, min_threshold=0, link_window_s=10.0, high_water=0.85)
    return OffloadController(OffloadSettings(**{**base, **settings}), local=POOL, remote=POOL, decode_rps=1e9,
                             link_gbps=8.0, kv_bytes_per_token=1000)


def test_one_transfer_reads_bytes_over_its_time_without_the_rtt() -> None:
    link = LinkMeter(100.0, window_s=30.0, rtt_s=0.1)
    assert link.capacity_gbps(0.0) == 100.0  # nothing measured: nominal
    link.commit("a", 2 * GB)
    link.started("a", 0.0)
    link.transferred(2 * GB, 2.1, key="a")  # on the wire from 0.1 (the RTT), 2 GB in 2 s
    assert link.measured_gbps(2.1) == pytest.approx(8.0)
    assert link.committed_bytes == 0 and link.egress_gbps(2.1) == pytest.approx(16 / 30)


def test_fair_sharing_is_undone_even_while_a_long_transfer_is_still_in_flight() -> None:
    # A (2 GB) from 0, B (1 GB) from 0.5 on a 1 GB/s link shared fairly: A alone moves 0.5 GB, then
    # both at 0.5 GB/s; B ends at 2.5 with A still in flight. Bytes / busy time of the transfers
    # that ended would say 1 GB in 2 s = 4 Gbit/s; B's fair share of those 2 s was 1 s.
    link = LinkMeter(100.0, window_s=30.0)
    for key, size in (("a", 2 * GB), ("b", GB)):
        link.commit(key, size)
    link.started("a", 0.0)
    link.started("b", 0.5)
    link.transferred(GB, 2.5, key="b")
    assert link.measured_gbps(2.5) == pytest.approx(8.0)
    link.transferred(2 * GB, 3.0, key="a")  # A: 0.5 s alone + 2 s at half + 0.5 s alone = 2 fair seconds
    assert link.measured_gbps(3.0) == pytest.approx(8.0)


def test_a_slower_link_is_read_once_old_transfers_leave_the_window() -> None:
    link = LinkMeter(100.0, window_s=5.0)
    t = 0.0
    for i in range(3):  # 8 Gbit/s
        link.commit(f"f{i}", GB)
        link.started(f"f{i}", t)
        t += 1.0
        link.transferred(GB, t, key=f"f{i}")
    assert link.measured_gbps(t) == pytest.approx(8.0)
    for i in range(3, 9):  # the shaped rate halves: 1 GB now takes 2 s
        link.commit(f"f{i}", GB)
        link.started(f"f{i}", t)
        t += 2.0
        link.transferred(GB, t, key=f"f{i}")
        reading = link.measured_gbps(t)
        assert reading is not None and 4.0 - 1e-9 <= reading <= 8.0
    assert link.measured_gbps(t) == pytest.approx(4.0)


def test_aborted_and_untimed_transfers_do_not_skew_the_reading() -> None:
    link = LinkMeter(8.0, window_s=30.0)
    link.commit("a", GB)
    link.started("a", 0.0)
    link.abort("a")  # the decode failed: a retry will start its own transfer
    link.commit("b", GB)
    link.started("b", 0.0)
    link.transferred(GB, 1.0, key="b")  # alone: "a" no longer shares the link
    assert link.measured_gbps(1.0) == pytest.approx(8.0)
    assert link.committed_bytes == GB  # "a" is still committed: its request is retried
    link.transferred(5 * GB, 2.0, key="a")  # ended without a (live) start: bytes count, time does not
    assert link.committed_bytes == 0
    assert link.egress_gbps(2.0) == pytest.approx(6 * 8 / 30)
    link._measured_at = -1e9  # force a re-read
    assert link.measured_gbps(2.0) == pytest.approx(8.0)


def test_a_short_transfer_waits_only_its_fair_share_behind_long_ones() -> None:
    link = LinkMeter(8.0, window_s=30.0)
    link.commit("long1", 10 * GB)
    link.commit("long2", 10 * GB)
    assert link.ahead_s(GB, 0.0) == pytest.approx(2.0)  # each long one takes 1 GB of its time
    assert link.ahead_s(20 * GB, 0.0) == pytest.approx(20.0)  # a long one waits for everything
    assert link.headroom(GB, 0.0, 0.85)
    link.commit("x", 8 * GB)
    link.transferred(8 * GB, 1.0, key="x")  # 8 GB in a 30 s window: 2.1 of 8 Gbit/s
    assert link.headroom(GB, 1.0, 0.85) and not link.headroom(20 * GB, 1.0, 0.85)


def test_the_threshold_is_the_default_side() -> None:
    ctl = controller()
    # Idle pools and link, equal speeds: neither side is sooner, so t decides.
    short = ctl.choose(5_000, local_s=0.5, remote_prefill_s=0.5, kv_bytes=5_000_000, now=0.0)
    long = ctl.choose(20_000, local_s=2.0, remote_prefill_s=2.0, kv_bytes=20_000_000, now=0.0)
    assert (short.side, short.reason) == ("local", "threshold")
    assert (long.side, long.reason) == ("remote", "threshold")
    assert ctl.choices == {"local:threshold": 1, "remote:threshold": 1}


def test_a_short_prompt_goes_remote_when_sooner_there_and_the_link_has_room() -> None:
    ctl = controller()
    # The local pool has 4 s queued; the remote side is idle: 0.5 s + 5 MB over 8 Gbit/s.
    moved = ctl.choose(5_000, local_s=4.5, remote_prefill_s=0.5, kv_bytes=5_000_000, now=0.0)
    assert (moved.side, moved.reason) == ("remote", "faster")
    assert moved.remote_s == pytest.approx(0.5 + 0.005)
    # Not sooner: stays.
    assert ctl.choose(5_000, local_s=0.4, remote_prefill_s=0.5, kv_bytes=5_000_000, now=0.0).side == "local"
    # The link's window already carried 9.5 GB in 10 s (7.6 of 8 Gbit/s): 5 MB more fits, 1 GB does not.
    ctl.link.transferred(int(9.5 * GB), 1.0)
    assert ctl.choose(5_000, local_s=4.5, remote_prefill_s=0.5, kv_bytes=5_000_000, now=1.0).side == "remote"
    kept = ctl.choose(9_000, local_s=4.5, remote_prefill_s=0.5, kv_bytes=GB, now=1.0)
    assert (kept.side, kept.reason) == ("local", "threshold")
    # Another model's traffic on the same link counts against the room.
    assert ctl.choose(5_000, local_s=4.5, remote_prefill_s=0.5, kv_bytes=5_000_000, now=1.0,
                      link_other_gbps=0.5).side == "local"


def test_committed_link_traffic_keeps_a_prompt_local_when_the_link_is_the_queue() -> None:
    ctl = controller(link_window_s=30.0)
    for i in range(4):  # 4 long transfers of 4 GB committed: a 5 MB one shares 4 x 5 MB of link time
        ctl.link.commit(f"r{i}", 4 * GB)
    slipped = ctl.choose(5_000, local_s=4.5, remote_prefill_s=0.5, kv_bytes=5_000_000, now=0.0)
    assert slipped.side == "remote" and slipped.remote_s == pytest.approx(0.5 + 0.005)
    # A 5 GB one waits for 4 x its share (16 GB) at 1 GB/s: 16 s + 5 s, far later than local.
    big = ctl.choose(9_000, local_s=4.5, remote_prefill_s=0.9, kv_bytes=5 * GB, now=0.0)
    assert big.side == "local" and big.remote_s == pytest.approx(21.0)
    # 16 GB more committed: 32 s of backlog, longer than the 30 s window. Fair sharing would let the
    # 5 MB one slip past again, but a backlog that deep is where TCP sharing stops being fair.
    for i in range(4):
        ctl.link.commit(f"s{i}", 4 * GB)
    kept = ctl.choose(5_000, local_s=4.5, remote_prefill_s=0.5, kv_bytes=5_000_000, now=0.0)
    assert kept.side == "local" and kept.remote_s == pytest.approx(0.5 + 0.005)


def test_a_long_prompt_stays_local_only_when_the_remote_side_misses_its_slo_and_local_does_not() -> None:
    ctl = controller()
    for i in range(2000):  # 2,000 transfers of 20 MB committed: 40 s of link before a 20 MB one is through
        ctl.link.commit(f"jam{i}", 20_000_000)
    stays = ctl.choose(20_000, local_s=3.0, remote_prefill_s=1.0, kv_bytes=20_000_000, now=0.0, slo_s=30.0)
    assert (stays.side, stays.reason) == ("local", "slo")
    # Both would miss: the threshold decides (the link is the planned place for long prompts).
    both = ctl.choose(20_000, local_s=40.0, remote_prefill_s=1.0, kv_bytes=20_000_000, now=0.0, slo_s=30.0)
    assert (both.side, both.reason) == ("remote", "threshold")
    # No SLO known: the threshold decides.
    assert ctl.choose(20_000, local_s=3.0, remote_prefill_s=1.0, kv_bytes=20_000_000, now=0.0).side == "remote"


def test_missing_pools_pinned_threshold_and_threshold_mode() -> None:
    ctl = controller()
    assert ctl.choose(50_000, local_s=9.0, remote_prefill_s=None, kv_bytes=1, now=0.0).reason == "no_remote"
    assert ctl.choose(50, local_s=None, remote_prefill_s=0.1, kv_bytes=1, now=0.0).side == "remote"
    for fixed in (controller(fixed_threshold=10_000), controller(side_choice="threshold")):
        c = fixed.choose(5_000, local_s=100.0, remote_prefill_s=0.1, kv_bytes=1, now=0.0, slo_s=1.0)
        assert (c.side, c.reason) == ("local", "threshold")


def test_estimates_are_calibrated_by_the_prefill_legs_measured() -> None:
    ctl = controller()
    first = ctl.choose(5_000, local_s=2.0, remote_prefill_s=2.5, kv_bytes=1, now=0.0)
    assert first.side == "local" and first.prefill_s == 2.0
    for _ in range(50):  # local legs take twice what routing estimated
        ctl.learn(first, 4.0)
    assert ctl.calibration["local"].factor == pytest.approx(2.0)
    flipped = ctl.choose(5_000, local_s=2.0, remote_prefill_s=2.5, kv_bytes=1, now=0.0)
    assert flipped.side == "remote" and flipped.local_s == pytest.approx(4.0) and flipped.prefill_s == 2.5


def test_calibration_is_a_running_mean_of_log_ratios_and_bounded() -> None:
    cal = Calibration(weight=0.5)
    cal.learn(1.0, 2.0)
    cal.learn(1.0, 0.5)
    assert cal.factor == pytest.approx(1.0)  # the mean of log 2 and log 1/2
    for _ in range(100):
        cal.learn(1.0, 1e6)
    assert cal.factor == pytest.approx(4.0)
    cal.learn(0.0, 1.0)  # nothing to learn from
    assert cal.samples == 102


def test_the_threshold_follows_the_measured_link() -> None:
    lengths = [500] * 50 + [50_000] * 50
    remote = PrefillPoolSpeed(instances=10, per_token_s=1e-4, attn_pair_s=0.0)
    ctl = OffloadController(OffloadSettings(min_threshold=0, min_samples=10, resolve_every_s=0.5,
                                            link_window_s=5.0), local=POOL, remote=remote, decode_rps=1e9,
                            link_gbps=1000.0, kv_bytes_per_token=1000)
    for i, x in enumerate(lengths):
        ctl.observe(x, i * 0.01)  # ~70 req/s, half of them 50 MB of KV
    wide = ctl.maybe_resolve(1.0)
    assert wide is not None and wide.threshold_tokens == 500  # the long half goes remote
    # Transfers show the link carries 8 Gbit/s, not 1000: the long half would need ~14 Gbit/s.
    for i in range(3):
        ctl.link.commit(f"t{i}", GB // 10)
        ctl.transfer_started(f"t{i}", 1.0 + 0.15 * i)
        ctl.record_transfer(GB // 10, 1.1 + 0.15 * i, key=f"t{i}")
    narrow = ctl.maybe_resolve(1.5)
    assert ctl.status(1.5).link_gbps == pytest.approx(8.0) and ctl.status(1.5).link_nominal_gbps == 1000.0
    assert narrow is not None and narrow.threshold_tokens > 500
    assert narrow.link_gbps_at_arrival is not None and narrow.link_gbps_at_arrival <= 0.85 * 8.0
