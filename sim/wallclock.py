"""Run a virtual-time model against the event loop's clock.

The engine and the KV link are pure models in virtual time (``next event at t``, ``advance to
now``), shared with the discrete-event simulator. In a live process the same models are driven
here: the driver sleeps until the model's next event or until new work wakes it, then advances
the model to the current time and hands what happened to the subclass.
"""

from __future__ import annotations

import asyncio
from contextlib import suppress


class WallClockDriver:
    """Subclasses say when the model's next event is and what advancing to ``now`` produces."""

    task_name = "wallclock-driver"

    def __init__(self, time_scale: float = 1.0) -> None:
        """``time_scale``: model seconds per wall-clock second (benchmarks replay a long trace faster;
        every time the model reports, such as TTFT in its metrics, is in model seconds)."""
        if time_scale <= 0:
            raise ValueError("time_scale must be positive")
        self._loop = asyncio.get_running_loop()
        self._t0 = self._loop.time()
        self.time_scale = time_scale
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def now(self) -> float:
        return (self._loop.time() - self._t0) * self.time_scale

    def wake(self) -> None:
        """New work arrived: re-plan the sleep."""
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.task_name)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def next_event_time(self) -> float | None:
        raise NotImplementedError

    def advance(self, now: float) -> None:
        raise NotImplementedError

    async def _run(self) -> None:
        while True:
            due = self.next_event_time()
            if due is None:
                await self._wake.wait()
            else:
                delay = (due - self.now()) / self.time_scale
                if delay > 0:
                    with suppress(TimeoutError):  # (not wait_for: it can swallow a racing cancel on 3.11)
                        async with asyncio.timeout(delay):
                            await self._wake.wait()
            self._wake.clear()
            self.advance(self.now())
