"""Reconciler concurrency: passes for one service are serialised and concurrent triggers coalesce."""

from __future__ import annotations

import asyncio

from tandem.operator.plan import OperatorDefaults
from tandem.operator.reconcile import Reconciler, ReconcileResult


class GatedReconciler(Reconciler):
    """The real scheduling logic; the pass itself is replaced by a gate (no API server involved)."""

    def __init__(self) -> None:
        super().__init__(OperatorDefaults(), timeout=5)
        self.passes: list[str] = []
        self.running = 0
        self.max_running = 0
        self.gate = asyncio.Event()

    async def _reconcile(self, namespace: str, name: str) -> ReconcileResult:
        self.passes.append(name)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        await self.gate.wait()
        self.running -= 1
        return ReconcileResult()


async def test_triggers_during_a_pass_coalesce_into_one_follow_up() -> None:
    r = GatedReconciler()
    tasks = [asyncio.create_task(r.reconcile("ns", "a")) for _ in range(6)]
    await asyncio.sleep(0.01)
    r.gate.set()
    results = await asyncio.gather(*tasks)
    assert r.passes == ["a", "a"]  # the running pass + one follow-up that reads the newest state
    assert sum(res.skipped for res in results) == 4
    assert r.max_running == 1


async def test_a_trigger_after_the_follow_up_started_gets_its_own_pass() -> None:
    r = GatedReconciler()
    first = asyncio.create_task(r.reconcile("ns", "a"))
    follow_up = asyncio.create_task(r.reconcile("ns", "a"))
    await asyncio.sleep(0.01)
    r.gate.set()
    await first
    await asyncio.sleep(0)  # the follow-up takes the lock
    r.gate.clear()
    late = asyncio.create_task(r.reconcile("ns", "a"))
    await asyncio.sleep(0.01)
    r.gate.set()
    assert not (await late).skipped
    await follow_up
    assert len(r.passes) == 3


async def test_services_reconcile_in_parallel() -> None:
    r = GatedReconciler()
    tasks = [asyncio.create_task(r.reconcile("ns", name)) for name in ("a", "b", "c")]
    await asyncio.sleep(0.01)
    assert r.max_running == 3
    r.gate.set()
    await asyncio.gather(*tasks)
    r.forget("ns", "a")
    assert ("ns", "a") not in r._locks
