"""``tandem sim --kv-events ENDPOINT``: the simulated engine publishes KV-cache events as vLLM does.

The same wire format (``tandem.kvevents``): a PUB socket sending ``[topic, seq, msgpack batch]``
with a counter from 0 per process, and a ROUTER answering replay requests from a bounded buffer of
the last batches (vLLM's ``buffer_steps``), then the end marker. So the gateway's subscriber is
tested against the simulator exactly as against vLLM, without vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence

import zmq
import zmq.asyncio

from tandem.kvevents import EventBatch, KVEvent, encode_batch, encode_pub, encode_replay, end_of_replay

log = logging.getLogger("tandem.sim.kvevents")


class KVEventPublisher:
    def __init__(self, endpoint: str, replay_endpoint: str | None = None, topic: str = "",
                 buffer_steps: int = 10_000) -> None:
        self.endpoint, self.replay_endpoint = endpoint, replay_endpoint
        self.topic = topic.encode()
        self.buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self.seq = 0
        # The PUB socket is a plain one: publish() is called from the engine's step and a PUB send
        # never blocks; replays are served by a ROUTER on the event loop.
        self._ctx = zmq.Context()
        self._actx = zmq.asyncio.Context()
        self._pub: zmq.Socket | None = None
        self._replay: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Bind the sockets (an address in use fails here, at start-up) and serve replays."""
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.bind(self.endpoint)
        if self.replay_endpoint is not None:
            self._replay = self._actx.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.bind(self.replay_endpoint)
            self._task = asyncio.create_task(self._serve_replays(), name="kv-events-replay")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._actx.destroy(linger=0)
        self._ctx.destroy(linger=0)

    def publish(self, events: Sequence[KVEvent]) -> None:
        """One batch (one engine step's events). A PUB send never waits: past its high-water mark
        ZMQ drops, the subscriber sees the gap and replays."""
        if not events or self._pub is None:
            return
        payload = encode_batch(EventBatch(time.time(), tuple(events), 0))
        seq, self.seq = self.seq, self.seq + 1
        self.buffer.append((seq, payload))
        with contextlib.suppress(zmq.Again):
            self._pub.send_multipart(encode_pub(self.topic, seq, payload), flags=zmq.NOBLOCK)

    async def _serve_replays(self) -> None:
        assert self._replay is not None
        while True:
            frames = await self._replay.recv_multipart()
            if len(frames) != 3 or len(frames[2]) != 8:
                log.warning("invalid KV-event replay request (%d frames)", len(frames))
                continue
            client, start = frames[0], int.from_bytes(frames[2], "big")
            for seq, payload in list(self.buffer):
                if seq >= start:
                    await self._replay.send_multipart([client, *encode_replay(self.topic, seq, payload)])
            await self._replay.send_multipart([client, *end_of_replay()])
