"""One engine's KV-cache event stream into its exact cache view (ZMQ SUB, off the request path).

Per instance that publishes events: a receiver task reads the PUB socket into a bounded queue
(beyond it, batches are dropped: the sequence gap that leaves is repaired like any other), and a
consumer task decodes and applies them in sequence order to the instance's
:class:`~tandem.kvindex.EventCacheView`, yielding to the event loop after every batch. Requests
never wait on any of it; they read the view.

Sequence numbers (:class:`Sequencer`, pure) decide what a batch means:

* the next one: applied;
* an older one with an older or equal timestamp: a duplicate (a batch the replay already gave);
* an older one with a newer timestamp: the engine restarted (its counter starts at 0 again): the
  view is cleared, the restart reported, the batch applied;
* a later one: batches were missed. They are replayed from the engine's replay socket, starting at
  the last batch applied: if that one comes back with the same timestamp the stream is the same
  process and the missed batches are applied; with another, the engine restarted meanwhile (cleared,
  replayed from 0). Without a replay socket, or when its buffer no longer holds them, the view is
  cleared: it then only misses blocks (under-estimates), it never keeps stale ones.

On start the whole replay buffer is applied (seq 0 on), so a gateway that starts after the engine
still learns what it cached, as far as the buffer goes back (the resets in it are applied, not
reported: they happened before this gateway, whose views start empty). A batch with ``AllBlocksCleared`` is
applied in order (the view clears itself) and reported, so the instance's shadow cache is cleared
too, here and, through the shared state, in every other gateway process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Literal

import zmq
import zmq.asyncio

from tandem.kvevents import (
    AllBlocksCleared,
    KVEventFormatError,
    KVEventsSource,
    KVMessage,
    decode_pub,
    decode_replay,
    replay_request,
)
from tandem.kvindex import EventCacheView
from tandem.router.cachereset import CacheReset
from tandem.router.metrics import GatewayMetrics

log = logging.getLogger("tandem.gateway.kvevents")

Verdict = Literal["apply", "duplicate", "restart", "gap"]
MAX_REPLAY = 1_000_000  # batches one replay may return (vLLM buffers 10,000 by default)


class Sequencer:
    """Where a batch stands relative to what was applied (pure; see the module docstring)."""

    __slots__ = ("last_ts", "next_seq")

    def __init__(self) -> None:
        self.next_seq: int | None = None
        self.last_ts: float | None = None

    def classify(self, seq: int, ts: float) -> Verdict:
        if self.next_seq is None or seq == self.next_seq:
            return "apply"
        if seq > self.next_seq:
            return "gap"
        return "restart" if self.last_ts is not None and ts > self.last_ts else "duplicate"

    def applied(self, seq: int, ts: float) -> None:
        self.next_seq = seq + 1
        self.last_ts = ts

    def reset(self) -> None:
        self.next_seq = self.last_ts = None


OnReset = Callable[[CacheReset], None]


class KVEventSubscriber:
    """``instance_id`` names the instance in its resets (the shared state's key); ``label`` in /metrics
    (an opaque id unless the gateway exposes its topology; the instance id when not given)."""

    def __init__(self, instance_id: str, source: KVEventsSource, view: EventCacheView, ctx: zmq.asyncio.Context,
                 on_reset: OnReset, metrics: GatewayMetrics, *, label: str | None = None, queue_size: int = 4096,
                 replay_timeout: float = 2.0) -> None:
        self.instance_id, self.source, self.view, self.ctx = instance_id, source, view, ctx
        self.label = label or instance_id
        self.on_reset, self.metrics = on_reset, metrics
        self.replay_timeout = replay_timeout
        self.seq = Sequencer()
        self.oldest_ts: float | None = None  # engine time of the oldest batch the view still reflects
        self.queue: asyncio.Queue[list[bytes]] = asyncio.Queue(maxsize=queue_size)
        self.dropped = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._batches = metrics.kv_batches.labels(self.label)
        self._blocks = metrics.kv_index_blocks.labels(self.label)

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        sub = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, self.queue.maxsize)
        sub.setsockopt(zmq.SUBSCRIBE, self.source.topic.encode())
        sub.connect(self.source.endpoint)
        self._tasks = [asyncio.create_task(self._receive(sub), name=f"kv-events-rx {self.instance_id}"),
                       asyncio.create_task(self._consume(), name=f"kv-events {self.instance_id}")]

    async def stop(self) -> None:
        self.view.live = False
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    # --- receiving --------------------------------------------------------------------------

    async def _receive(self, sub: zmq.asyncio.Socket) -> None:
        try:
            while True:
                frames = await sub.recv_multipart()
                try:
                    self.queue.put_nowait(frames)
                except asyncio.QueueFull:
                    self.dropped += 1  # its sequence number will be missing: repaired as a gap
        finally:
            sub.close(linger=0)

    async def _consume(self) -> None:
        try:
            await self._initial_sync()
            self.view.live = True
            while True:
                frames = await self.queue.get()
                try:
                    msg = decode_pub(frames)
                except KVEventFormatError as exc:
                    log.warning("instance %s: malformed KV-event message (%s): view cleared", self.instance_id, exc)
                    self.clear()
                    continue
                if msg.topic != self.source.topic.encode():
                    continue  # ZMQ topic filters match prefixes; the engine's topic is exact
                await self._handle(msg)
                await asyncio.sleep(0)  # one batch at a time: requests interleave
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must not leave a stale view in use: fall back to the shadow
            self.view.live = False
            log.exception("instance %s: KV-event subscriber failed; routing on the shadow view", self.instance_id)

    async def _initial_sync(self) -> None:
        if self.source.replay is None:
            return
        msgs = await self._replay(0)
        for m in msgs or ():
            self._apply(m, report=False)  # resets from before this subscriber are history, not news

    async def _handle(self, msg: KVMessage) -> None:
        verdict = self.seq.classify(msg.seq, msg.batch.ts)
        if verdict == "apply":
            self._apply(msg)
        elif verdict == "restart":
            self._restarted(msg.batch.ts)
            self._apply(msg)
        elif verdict == "gap":
            await self._repair(msg)

    # --- applying ---------------------------------------------------------------------------

    def _apply(self, msg: KVMessage, report: bool = True) -> None:
        batch = msg.batch
        if self.oldest_ts is None:
            self.oldest_ts = batch.ts
        self.view.index.apply(batch.events)
        self.seq.applied(msg.seq, batch.ts)
        self._batches.inc()
        self._blocks.set(len(self.view.index))
        if any(isinstance(e, AllBlocksCleared) for e in batch.events):
            # The view cleared itself in order; what it holds now is from this batch on.
            self.oldest_ts = batch.ts
            if report:
                self._report("cleared", batch.ts)

    def clear(self) -> None:
        """Forget everything: the view's blocks and where the stream stood (the next batch starts it)."""
        self.view.reset()
        self.oldest_ts = None
        self.seq.reset()
        self._blocks.set(0)

    def _restarted(self, ts: float) -> None:
        log.warning("instance %s: engine restarted (KV-event sequence started over): cache view cleared",
                    self.instance_id)
        self.clear()
        self._report("events_restart", ts)

    def _report(self, reason: Literal["cleared", "events_restart"], ts: float) -> None:
        self.on_reset(CacheReset(instance=self.instance_id, reason=reason, source="events", after=ts,
                                 token=f"events:{reason}:{ts!r}"))

    async def _repair(self, msg: KVMessage) -> None:
        """Batches before ``msg`` were missed: replay them, or clear the view."""
        assert self.seq.next_seq is not None
        start = max(0, self.seq.next_seq - 1)  # the last applied batch too: it tells whether the process is the same
        msgs = await self._replay(start) if self.source.replay is not None else None
        if msgs and msgs[0].seq == start and start < self.seq.next_seq:
            if msgs[0].batch.ts != self.seq.last_ts:  # another process answered: the engine restarted
                self._restarted(msgs[0].batch.ts)
                msgs = await self._replay(0) or []
            else:
                msgs = msgs[1:]
            for m in msgs:
                if self.seq.classify(m.seq, m.batch.ts) == "apply":
                    self._apply(m)
            verdict = self.seq.classify(msg.seq, msg.batch.ts)
            if verdict in ("duplicate", "apply"):  # the replay brought it (it was buffered before we asked)
                if verdict == "apply":
                    self._apply(msg)
                self.metrics.kv_gaps.labels(self.label, "replayed").inc()
                return
        # Not replayable (no replay socket, its buffer no longer holds them, or no answer).
        log.warning("instance %s: KV-event batches before %d missed and not replayable: cache view cleared",
                    self.instance_id, msg.seq)
        self.metrics.kv_gaps.labels(self.label, "cleared").inc()
        self.clear()
        self._apply(msg)

    async def _replay(self, start: int) -> list[KVMessage] | None:
        """Every buffered batch from ``start`` on, in order; None when the replay socket does not answer."""
        assert self.source.replay is not None
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        out: list[KVMessage] = []
        try:
            sock.connect(self.source.replay)
            async with asyncio.timeout(self.replay_timeout):
                await sock.send_multipart(replay_request(start))
                while len(out) < MAX_REPLAY:
                    msg = decode_replay(await sock.recv_multipart())
                    if msg is None:
                        return out
                    if msg.topic in (b"", self.source.topic.encode()):
                        out.append(msg)
        except (TimeoutError, KVEventFormatError, zmq.ZMQError) as exc:
            log.warning("instance %s: KV-event replay from %d failed (%s)", self.instance_id, start,
                        type(exc).__name__)
            return None
        finally:
            sock.close(linger=0)
        return out
