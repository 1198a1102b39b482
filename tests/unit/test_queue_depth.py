"""QueueDepthPoller: jobs waiting per lane become ai_queue_depth{queue_name, priority}."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from chatprocessor.core.errors import BrokerUnavailable
from chatprocessor.ops.queue_depth import QueueDepthPoller
from chatprocessor.transports.base import Outgoing
from chatprocessor.transports.local import LocalTransport

pytestmark = pytest.mark.timeout(30)


def gauge(queue: str, lane: str) -> float | None:
    return REGISTRY.get_sample_value("ai_queue_depth", {"queue_name": queue, "priority": lane})


def lanes() -> dict[str, str]:
    """Unique queue names per test: the gauge is process-wide."""
    tag = uuid.uuid4().hex[:8]
    return {lane: f"test.{tag}.{lane}" for lane in ("high", "standard", "batch")}


class CountingTransport:
    """A transport whose queues hold ``depths[queue]`` jobs; ``failing`` queues raise."""

    def __init__(self, depths: dict[str, int]) -> None:
        self.depths = depths
        self.failing: set[str] = set()
        self.calls: list[str] = []

    async def depth(self, queue: str) -> int:
        self.calls.append(queue)
        if queue in self.failing:
            raise BrokerUnavailable("connection lost")
        return self.depths[queue]


class NoDepthTransport:
    """Like Kafka or the task API: nothing to count."""


async def test_poll_once_sets_the_gauge_per_lane() -> None:
    names = lanes()
    transport = CountingTransport({names["high"]: 3, names["standard"]: 0, names["batch"]: 250})
    poller = QueueDepthPoller(transport, names)

    assert await poller.poll_once() == {"high": 3, "standard": 0, "batch": 250}
    assert gauge(names["high"], "high") == 3
    assert gauge(names["standard"], "standard") == 0
    assert gauge(names["batch"], "batch") == 250

    transport.depths[names["batch"]] = 10  # the batch lane drains
    await poller.poll_once()
    assert gauge(names["batch"], "batch") == 10


async def test_a_failed_read_keeps_the_last_value_and_the_other_lanes_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    names = lanes()
    transport = CountingTransport({names["high"]: 1, names["standard"]: 2, names["batch"]: 7})
    poller = QueueDepthPoller(transport, names)
    await poller.poll_once()

    transport.failing.add(names["batch"])
    transport.depths[names["batch"]] = 0
    transport.depths[names["high"]] = 5
    with caplog.at_level("DEBUG", logger="chatprocessor.ops.queue_depth"):
        assert await poller.poll_once() == {"high": 5, "standard": 2}
    assert gauge(names["batch"], "batch") == 7, "a broker hiccup is not an empty queue"
    assert gauge(names["high"], "high") == 5
    assert any(names["batch"] in record.getMessage() for record in caplog.records)


async def test_a_transport_without_depth_reports_nothing() -> None:
    names = lanes()
    poller = QueueDepthPoller(NoDepthTransport(), names)
    assert not poller.supported
    assert await poller.poll_once() == {}
    assert all(gauge(queue, lane) is None for lane, queue in names.items())

    # run() lives until cancelled, whatever the transport, and sets nothing.
    task = asyncio.create_task(poller.run())
    await asyncio.sleep(0.05)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_run_polls_every_interval_until_cancelled() -> None:
    names = {"high": f"test.{uuid.uuid4().hex[:8]}.high"}
    transport = CountingTransport({names["high"]: 4})
    poller = QueueDepthPoller(transport, names, interval=0.02)
    task = asyncio.create_task(poller.run())
    try:
        async with asyncio.timeout(5):
            while len(transport.calls) < 3:
                await asyncio.sleep(0.01)
        assert gauge(names["high"], "high") == 4
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert task.cancelled()
    calls = len(transport.calls)
    await asyncio.sleep(0.06)
    assert len(transport.calls) == calls, "no polling after cancel"


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval"):
        QueueDepthPoller(NoDepthTransport(), {}, interval=0)


@pytest.fixture
async def local_transport(tmp_path: Path) -> AsyncIterator[LocalTransport]:
    transport = LocalTransport(tmp_path / "queue.sqlite3")
    await transport.connect()
    try:
        yield transport
    finally:
        await transport.close()


async def test_the_local_queue_counts_what_was_published(local_transport: LocalTransport) -> None:
    names = lanes()
    for _ in range(3):
        await local_transport.publish(names["batch"], Outgoing(b"{}"))
    await local_transport.publish(names["high"], Outgoing(b"{}"))
    poller = QueueDepthPoller(local_transport, names)

    assert await poller.poll_once() == {"high": 1, "standard": 0, "batch": 3}
    assert gauge(names["batch"], "batch") == 3
