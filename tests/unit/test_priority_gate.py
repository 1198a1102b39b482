"""PriorityGate: model slots go to the highest priority first, cancellation never leaks a slot."""

from __future__ import annotations

import asyncio

import pytest

from chatprocessor.core.priority import PriorityGate


async def test_waiters_are_served_by_priority_then_arrival() -> None:
    gate = PriorityGate(1)
    order: list[str] = []
    release = asyncio.Event()

    async def holder() -> None:
        async with gate.slot(1):
            await release.wait()

    async def job(name: str, priority: int) -> None:
        async with gate.slot(priority):
            order.append(name)

    first = asyncio.create_task(holder())
    await asyncio.sleep(0)
    waiting = [
        asyncio.create_task(job(name, priority))
        for name, priority in [
            ("batch-1", 3),
            ("std", 5),
            ("high-1", 9),
            ("batch-2", 3),
            ("high-2", 9),
        ]
    ]
    await asyncio.sleep(0)
    assert gate.waiting == 5
    release.set()
    await asyncio.gather(first, *waiting)
    assert order == ["high-1", "high-2", "std", "batch-1", "batch-2"]


async def test_at_most_slots_holders_at_once() -> None:
    gate = PriorityGate(2)
    inside = 0
    most = 0

    async def job(priority: int) -> None:
        nonlocal inside, most
        async with gate.slot(priority):
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(0.001)
            inside -= 1

    await asyncio.gather(*(job(p % 10) for p in range(30)))
    assert most == 2
    assert gate.waiting == 0


async def test_a_cancelled_waiter_does_not_take_or_lose_a_slot() -> None:
    gate = PriorityGate(1)
    release = asyncio.Event()
    served: list[str] = []

    async def holder() -> None:
        async with gate.slot(1):
            await release.wait()

    async def job(name: str, priority: int) -> None:
        async with gate.slot(priority):
            served.append(name)

    first = asyncio.create_task(holder())
    await asyncio.sleep(0)
    doomed = asyncio.create_task(job("doomed", 9))
    other = asyncio.create_task(job("other", 1))
    await asyncio.sleep(0)
    doomed.cancel()
    release.set()
    await asyncio.gather(first, other)
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert served == ["other"]
    async with gate.slot(5):  # the slot came back: no deadlock
        served.append("after")
    assert served == ["other", "after"]


async def test_cancelled_just_after_being_handed_the_slot_passes_it_on() -> None:
    gate = PriorityGate(1)
    served: list[str] = []

    async def job(name: str, priority: int) -> None:
        async with gate.slot(priority):
            served.append(name)

    await gate._acquire(1)
    handed = asyncio.create_task(job("handed", 9))
    behind = asyncio.create_task(job("behind", 1))
    await asyncio.sleep(0)
    gate._release()  # hands the slot to "handed" (its future is resolved) ...
    handed.cancel()  # ... which is cancelled before it runs
    await asyncio.gather(handed, behind, return_exceptions=True)
    assert served == ["behind"]


def test_needs_a_slot() -> None:
    with pytest.raises(ValueError, match="slots"):
        PriorityGate(0)
