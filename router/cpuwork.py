"""A few threads for the CPU-heavy part of admission (parsing and keying big prompts), bounded.

Parsing a multi-megabyte body, tokenizing its prompt and hashing its blocks take tenths of a second;
on the event loop they stall every other request (and ``/healthz``) for that long. Here they run on
``threads`` threads, with at most ``queue`` more waiting; beyond that the caller is told to come
back (503). The work is written to give the interpreter lock back often (the text is tokenized in
windows, see ``tandem.prefix.tokenize``), so the loop keeps its turns while a thread works.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class CpuBusy(Exception):
    """Every thread is busy and the queue is full."""


class CpuWork:
    def __init__(self, threads: int, queue: int) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="tandem-admission")
        self._slots = threads + queue
        self._taken = 0

    async def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` on a thread; its slot is held until the thread is done with it, even when the
        caller stops waiting (a client that leaves does not free a thread still working for it)."""
        if self._taken >= self._slots:
            raise CpuBusy(f"{self._slots} big requests are being parsed or wait for it")
        loop = asyncio.get_running_loop()
        self._taken += 1
        future = self._pool.submit(fn)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release))
        return await asyncio.wrap_future(future)

    def _release(self) -> None:
        self._taken -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
