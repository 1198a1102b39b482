"""Queue depth per lane, polled for Prometheus (seed 004's ``ai_queue_depth``).

A broker knows how many jobs wait in a queue; the worker only sees the ones it took. So
every ``interval`` seconds the poller asks the transport (``depth(queue)``: a passive
declare's message count on RabbitMQ, a row count on the local queue) and sets
``ai_queue_depth{queue_name, priority=lane}``. A transport without ``depth`` (Kafka, the
task API) is skipped: the gauge stays absent rather than a misleading 0. A failed read
keeps the gauge at its last value: a broker hiccup is not an empty queue.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from chatprocessor.ops import metrics

log = logging.getLogger(__name__)


class QueueDepthPoller:
    """Every ``interval`` seconds, the jobs waiting in each lane's queue ->
    ``AI_QUEUE_DEPTH{queue_name, priority=lane}``.

    ``lanes`` maps a lane (high, standard, batch) to its queue name.
    """

    def __init__(self, transport: Any, lanes: Mapping[str, str], *, interval: float = 15.0) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.transport = transport
        self.lanes = dict(lanes)
        self.interval = interval
        depth = getattr(transport, "depth", None)
        self._depth: Callable[[str], Awaitable[int]] | None = depth if callable(depth) else None

    @property
    def supported(self) -> bool:
        """Whether the transport can count a queue's waiting jobs."""
        return self._depth is not None

    async def poll_once(self) -> dict[str, int]:
        """Read every lane's depth and set the gauge; ``{lane: depth}`` of the reads that
        succeeded (``{}`` when the transport has no ``depth``)."""
        if self._depth is None:
            return {}
        depths: dict[str, int] = {}
        for lane, queue in self.lanes.items():
            try:
                depth = int(await self._depth(queue))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any broker error: keep the last value, try again later
                log.debug("queue depth of %s (lane %s) unavailable: %r", queue, lane, exc)
                continue
            metrics.labelled(metrics.AI_QUEUE_DEPTH, queue, lane).set(depth)
            depths[lane] = depth
        return depths

    async def run(self) -> None:
        """Poll until cancelled; with a transport that has no ``depth``, just wait to be
        cancelled (so a supervisor sees the same lifetime whatever the transport)."""
        if self._depth is None:
            log.debug("transport %s has no depth(): ai_queue_depth not polled", self.transport)
            await asyncio.Event().wait()
        while True:
            await self.poll_once()
            await asyncio.sleep(self.interval)
