"""The gateway's KV-event subscriber over real ZMQ sockets, against the simulator's publisher.

The publisher is ``tandem sim``'s (the same framing and replay protocol as vLLM's, checked against
real vLLM recordings in tests/shared/test_kvevents.py). A batch "lost on the way" is one the
publisher buffers for replay without sending: exactly what a subscriber sees when ZMQ drops a
message past its high-water mark.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import pytest

from tandem.kvevents import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch, KVEventsSource, encode_batch
from tandem.kvindex import EventCacheView, PromptTokens
from tandem.router.cachereset import CacheReset, exact_view_stale, restart_from_metrics
from tandem.router.enginemetrics import EngineSnapshot
from tandem.router.kvsubscriber import KVEventSubscriber, Sequencer
from tandem.router.metrics import GatewayMetrics
from tandem.sim.kvpublisher import KVEventPublisher

TOKENS = list(range(1, 65))  # 4 blocks of 16


def stored(first: int, blocks: int, parent: int | None = None) -> BlockStored:
    return BlockStored(tuple(range(first, first + blocks)), parent, tuple(TOKENS[(first - 1) * 16:
                                                                                  (first - 1 + blocks) * 16]), 16)


def cached_blocks(view: EventCacheView) -> int:
    return view.index.prefix_blocks(PromptTokens(TOKENS).keys(16))


def lose(pub: KVEventPublisher, events: list) -> None:
    """A batch the publisher sent but the subscriber never got (ZMQ dropped it): buffered, not sent."""
    pub.buffer.append((pub.seq, encode_batch(EventBatch(time.time(), tuple(events), 0))))
    pub.seq += 1


def test_sequencer_tells_next_duplicate_restart_and_gap() -> None:
    s = Sequencer()
    assert s.classify(7, 1.0) == "apply"  # the first batch seen, whatever its number
    s.applied(7, 1.0)
    assert s.classify(8, 2.0) == "apply"
    assert s.classify(5, 0.5) == "duplicate"  # replayed earlier
    assert s.classify(0, 3.0) == "restart"  # counter back at 0 with a newer engine time
    assert s.classify(10, 3.0) == "gap"


def test_reset_reasons_are_the_metric_series_created_at_join() -> None:
    from typing import get_args

    from tandem.router.cachereset import ResetReason
    from tandem.router.metrics import CACHE_RESET_REASONS

    assert set(get_args(ResetReason)) == set(CACHE_RESET_REASONS)


def test_restarts_from_metrics_and_which_views_they_make_stale() -> None:
    a = EngineSnapshot(start_time=100.0, prompt_tokens=500, generation_tokens=50)
    assert restart_from_metrics("i", a, a.model_copy(update={"prompt_tokens": 600}), 99.0) is None
    r = restart_from_metrics("i", a, EngineSnapshot(start_time=200.0, prompt_tokens=0), 150.0)
    assert r is not None and (r.reason, r.after, r.token) == ("restart", 200.0, "start:200.0")
    sg = EngineSnapshot(flavor="sglang", prompt_tokens=500)  # no start time: counters going backwards
    r2 = restart_from_metrics("i", sg, sg.model_copy(update={"prompt_tokens": 10}), 150.0)
    assert r2 is not None and (r2.reason, r2.after) == ("counters", 150.0)
    # An exact view with blocks from before the restart is stale; one rebuilt since is not.
    assert exact_view_stale(r, live=True, oldest_ts=150.0)
    assert not exact_view_stale(r, live=True, oldest_ts=201.0)
    assert not exact_view_stale(r, live=True, oldest_ts=None)
    # A reset seen in an event stream reaches every live view in its own stream.
    ev = CacheReset(instance="i", reason="cleared", source="events", after=300.0, token="t")
    assert not exact_view_stale(ev, live=True, oldest_ts=1.0) and exact_view_stale(ev, live=False, oldest_ts=1.0)


@pytest.fixture
def endpoints(tmp_path) -> KVEventsSource:
    return KVEventsSource(f"ipc://{tmp_path}/kv.pub", f"ipc://{tmp_path}/kv.replay", "kv")


async def _subscriber(source: KVEventsSource, **kw) -> tuple[KVEventSubscriber, list[CacheReset], GatewayMetrics]:
    import zmq.asyncio

    resets: list[CacheReset] = []
    metrics = GatewayMetrics()
    sub = KVEventSubscriber("e1", source, EventCacheView(), zmq.asyncio.Context.instance(), resets.append, metrics,
                            replay_timeout=1.0, **kw)
    sub.start()
    return sub, resets, metrics


async def eventually(check: Callable[[], bool], limit: float = 10.0) -> None:
    end = time.monotonic() + limit
    while not check():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.02)


def counter(metrics: GatewayMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_initial_replay_gap_repair_clear_and_restart(endpoints: KVEventsSource) -> None:
    pub = KVEventPublisher(endpoints.endpoint, endpoints.replay, endpoints.topic)
    pub.start()
    pub.publish([stored(2, 1), AllBlocksCleared(), stored(1, 1)])  # before the gateway subscribed: replay only
    sub, resets, metrics = await _subscriber(endpoints)
    view = sub.view
    try:
        await eventually(lambda: view.live and cached_blocks(view) == 1)
        assert len(view.index) == 1 and resets == []  # a reset from before the gateway is history, not news
        await asyncio.sleep(0.2)  # the subscription is in place
        lose(pub, [stored(2, 1, parent=1)])  # seq 1 never arrives
        pub.publish([stored(3, 1, parent=2)])  # seq 2: a gap, repaired from the replay socket
        await eventually(lambda: cached_blocks(view) == 3)
        assert counter(metrics, "tandem_kv_event_gaps_total", instance="e1", outcome="replayed") == 1
        pub.publish([BlockRemoved((3,)), AllBlocksCleared(), stored(1, 2)])
        await eventually(lambda: cached_blocks(view) == 2 and len(resets) == 1)
        assert resets[0].reason == "cleared" and resets[0].source == "events"
        # The engine restarts: a new process, its counter at 0 again, an empty cache.
        await pub.stop()
        pub = KVEventPublisher(endpoints.endpoint, endpoints.replay, endpoints.topic)
        pub.start()
        # Blocks under a parent the view never saw (not indexed), one batch at a time until the restart
        # is seen: ZMQ reconnects the subscriber in its own time, and a batch sent before that is lost.
        sent = 0
        while len(resets) < 2:
            assert sent < 100, "the restart was never seen"
            pub.publish([stored(4 + sent, 1, parent=99)])
            sent += 1
            with contextlib.suppress(AssertionError):
                await eventually(lambda: len(resets) == 2, limit=0.1)
        assert resets[1].reason == "events_restart"
        await eventually(lambda: sub.seq.next_seq == sent)  # the new process's sequence, gaps replayed
        assert cached_blocks(view) == 0 and len(view.index) == 0
    finally:
        await sub.stop()
        await pub.stop()
    assert not view.live


async def test_a_gap_the_replay_cannot_fill_clears_the_view(endpoints: KVEventsSource) -> None:
    pub = KVEventPublisher(endpoints.endpoint, endpoints.replay, endpoints.topic, buffer_steps=1)
    pub.start()
    sub, resets, metrics = await _subscriber(endpoints)
    view = sub.view
    try:
        await eventually(lambda: view.live)
        await asyncio.sleep(0.2)
        pub.publish([stored(1, 2)])
        await eventually(lambda: cached_blocks(view) == 2)
        lose(pub, [BlockRemoved((1, 2))])  # the removal is lost, and the one-batch buffer forgets it
        pub.publish([stored(3, 1)])  # unrelated root block
        await eventually(lambda: counter(metrics, "tandem_kv_event_gaps_total", instance="e1",
                                           outcome="cleared") == 1)
        assert cached_blocks(view) == 0  # never the stale blocks 1-2: cleared, then only the new batch
        assert len(view.index) == 1 and resets == []  # a local repair, not an engine reset
    finally:
        await sub.stop()
        await pub.stop()


async def test_without_a_replay_socket_the_view_is_live_at_once(tmp_path) -> None:
    source = KVEventsSource(f"ipc://{tmp_path}/kv.pub")
    pub = KVEventPublisher(source.endpoint)
    pub.start()
    sub, _, _ = await _subscriber(source)
    try:
        await eventually(lambda: sub.view.live)
        await asyncio.sleep(0.2)
        pub.publish([stored(1, 4)])
        await eventually(lambda: cached_blocks(sub.view) == 4)
    finally:
        await sub.stop()
        await pub.stop()


def test_event_endpoints_from_flags_and_annotations_name_what_is_wrong() -> None:
    from tandem.kvevents import parse_kv_events
    from tandem.router.discovery import endpoint_from_pod
    from tandem.router.settings import GatewaySettings

    assert parse_kv_events("5557,replay=5558,topic=kv", "10.0.0.7") == KVEventsSource(
        "tcp://10.0.0.7:5557", "tcp://10.0.0.7:5558", "kv")
    assert parse_kv_events("ipc:///run/kv.pub", "h") == KVEventsSource("ipc:///run/kv.pub")
    for bad, why in (("tcp://*:5557", "neither a port"), ("70000", "out of range"), ("replay=5", "starts with"),
                     ("5557,hwm=3", "unknown part")):
        with pytest.raises(ValueError, match=why):
            parse_kv_events(bad, "h")
    s = GatewaySettings(instances=["http://10.0.0.7:8000", "http://10.0.0.8:8000"],
                        kv_events="http://10.0.0.7:8000=5557,replay=5558")
    assert s.kv_event_sources() == {"http://10.0.0.7:8000": KVEventsSource("tcp://10.0.0.7:5557",
                                                                           "tcp://10.0.0.7:5558")}
    with pytest.raises(ValueError, match="is not one of the instances"):
        GatewaySettings(instances=["http://10.0.0.7:8000"], kv_events="http://10.9.9.9:1=5557")
    with pytest.raises(ValueError, match="not URL=ENDPOINT"):
        GatewaySettings(instances=["http://10.0.0.7:8000"], kv_events="5557")
    pod = {"metadata": {"name": "p", "annotations": {"serving.tandem.dev/kv-events": "tcp://*:1"}},
           "status": {"phase": "Running", "podIP": "10.0.0.9", "conditions": [{"type": "Ready", "status": "True"}]}}
    ep = endpoint_from_pod(pod, 8000)
    assert ep is not None and ep.kv_events is None  # a bad annotation: served on the shadow view, logged
