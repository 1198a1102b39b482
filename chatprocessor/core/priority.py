"""Model slots handed out highest priority first (seed 004's lanes inside one worker).

RabbitMQ orders the jobs waiting in a queue; once several jobs are in the worker (one
consumer per lane, each with its own prefetch), they still compete for the model. A
:class:`PriorityGate` with MODEL_CONCURRENCY slots makes a high-priority chat wait only
for a call already running, never for batch jobs that arrived before it. Ties go in
arrival order. asyncio has no priority semaphore, and ``asyncio.PriorityQueue`` cannot
withdraw a waiter that was cancelled, hence this small one.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import AsyncIterator


class PriorityGate:
    """At most ``slots`` holders at once; waiters are served by priority, then arrival."""

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError("slots must be >= 1")
        self.slots = slots
        self._free = slots
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    @property
    def waiting(self) -> int:
        return sum(1 for _, _, future in self._waiters if not future.done())

    @contextlib.asynccontextmanager
    async def slot(self, priority: int) -> AsyncIterator[None]:
        """Hold one slot for the block; a higher ``priority`` is served first."""
        await self._acquire(priority)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, priority: int) -> None:
        if self._free > 0 and not self.waiting:
            self._free -= 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (-priority, next(self._order), future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release()  # the slot was handed over as we were cancelled: pass it on
            else:
                future.cancel()  # skipped when popped
            raise

    def _release(self) -> None:
        while self._waiters:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)  # the slot goes straight to the waiter
                return
        self._free += 1
