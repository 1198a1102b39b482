"""What only the Redis Streams transport has: consumer-group recovery with XAUTOCLAIM,
poison entries, the delayed ZSET, release on close, approximate MAXLEN, private reply
streams. Against the real Redis on 127.0.0.1:6379 (db 15), one unique stream per test."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from chatprocessor.core.errors import BrokerUnavailable, Unroutable
from chatprocessor.settings import Settings
from chatprocessor.transports import build_transport
from chatprocessor.transports.base import (
    ATTEMPT_HEADER,
    DLQ_ERROR,
    DLQ_QUEUE,
    DLQ_REASON,
    Delivery,
    Outgoing,
    dead_letter_name,
)
from chatprocessor.transports.redis_streams import (
    POISON,
    RedisDelivery,
    RedisStreamsTransport,
    delayed_name,
)
from tests.conftest import REDIS_URL
from tests.faults.helpers import TcpProxy

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

GROUP = "chatprocessor"
ROOT = Path(__file__).resolve().parents[2]


class Taker:
    """Runs ``consume()`` in a task and queues what it yields."""

    def __init__(self, transport: RedisStreamsTransport, queue: str, prefetch: int = 10) -> None:
        self.got: asyncio.Queue[Delivery] = asyncio.Queue()
        self.task = asyncio.create_task(self._run(transport, queue, prefetch))

    async def _run(self, transport: RedisStreamsTransport, queue: str, prefetch: int) -> None:
        async for delivery in transport.consume(queue, prefetch):
            await self.got.put(delivery)

    async def next(self, timeout: float = 5) -> RedisDelivery:
        delivery = await asyncio.wait_for(self.got.get(), timeout)
        assert isinstance(delivery, RedisDelivery)
        return delivery

    async def nothing_for(self, seconds: float) -> None:
        with pytest.raises(TimeoutError):
            await self.next(seconds)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@pytest.fixture
async def raw() -> AsyncIterator[Any]:
    client = aioredis.Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


@pytest.fixture
async def queue(raw: Any) -> AsyncIterator[str]:
    name = f"test.redis.{uuid.uuid4().hex[:10]}"
    yield name
    await raw.delete(name, dead_letter_name(name), delayed_name(name))


@pytest.fixture
async def make() -> AsyncIterator[Callable[..., Awaitable[RedisStreamsTransport]]]:
    """Connected transports on the test Redis, all closed after the test."""
    made: list[RedisStreamsTransport] = []

    async def factory(url: str = REDIS_URL, **options: Any) -> RedisStreamsTransport:
        transport = RedisStreamsTransport(url, **options)
        await transport.connect(attempts=1)
        made.append(transport)
        return transport

    yield factory
    for transport in made:
        await transport.close()


async def publish(transport: RedisStreamsTransport, queue: str, *ids: str) -> None:
    for message_id in ids:
        await transport.publish(
            queue, Outgoing(f"job {message_id}".encode(), message_id=message_id)
        )


async def test_entries_published_before_the_group_existed_are_taken_with_all_properties(
    make: Callable[..., Awaitable[RedisStreamsTransport]], queue: str, raw: Any
) -> None:
    transport = await make()
    message = Outgoing(
        b"\x00binary\xff",
        message_id="m-1",
        correlation_id="c-1",
        reply_to="somewhere",
        type="UserPromptReceived",
        headers={"x-attempt": 2, "tenant": "acme", "raw": b"bytes"},
        content_type="application/json",
    )
    await transport.publish(queue, message)  # the stream is created by this write
    await transport.declare(queue)
    await transport.declare(queue)  # BUSYGROUP is fine
    taker = Taker(transport, queue)
    try:
        got = await taker.next()
    finally:
        await taker.stop()
    assert got.body == b"\x00binary\xff"
    assert (got.message_id, got.correlation_id, got.reply_to) == ("m-1", "c-1", "somewhere")
    assert got.type == "UserPromptReceived" and got.content_type == "application/json"
    assert got.headers == {"x-attempt": 2, "tenant": "acme", "raw": "bytes"}
    assert got.attempt == 2 and not got.redelivered
    await got.ack()
    assert await raw.xlen(queue) == 0
    assert (await raw.xpending(queue, GROUP))["pending"] == 0


async def test_an_entry_from_another_producer_reads_as_json_of_its_fields(
    make: Callable[..., Awaitable[RedisStreamsTransport]], queue: str, raw: Any
) -> None:
    transport = await make()
    await raw.xadd(queue, {"conversation_id": "5", "message": "hi"})
    taker = Taker(transport, queue)
    try:
        got = await taker.next()
    finally:
        await taker.stop()
    assert orjson.loads(got.body) == {"conversation_id": "5", "message": "hi"}
    await got.dead_letter("bad schema")
    [letter] = await transport.list_dead_letters(queue, 10)
    assert letter.body == got.body  # the original fields are kept in the dead letter


async def test_prefetch_bounds_unsettled_deliveries(
    make: Callable[..., Awaitable[RedisStreamsTransport]], queue: str
) -> None:
    transport = await make()
    await publish(transport, queue, *(f"p{i}" for i in range(5)))
    taker = Taker(transport, queue, prefetch=2)
    try:
        first, second = await taker.next(), await taker.next()
        await taker.nothing_for(0.6)
        await first.ack()
        third = await taker.next(2)
        await taker.nothing_for(0.3)
    finally:
        await taker.stop()
    assert [first.message_id, second.message_id, third.message_id] == ["p0", "p1", "p2"]


async def test_retry_comes_back_after_its_delay_and_not_before(
    make: Callable[..., Awaitable[RedisStreamsTransport]], queue: str, raw: Any
) -> None:
    transport = await make()
    await publish(transport, queue, "r-1")
    taker = Taker(transport, queue)
    try:
        got = await taker.next()
        started = time.monotonic()
        await got.retry(0.6, "HTTP 503")
        assert await raw.zcard(delayed_name(queue)) == 1 and await raw.xlen(queue) == 0
        again = await taker.next(5)
        waited = time.monotonic() - started
        await again.retry(0, "again at once")
        third = await taker.next(2)
    finally:
        await taker.stop()
    assert waited >= 0.6
    assert again.message_id == "r-1" and again.body == got.body
    assert again.attempt == 1 and again.headers[DLQ_ERROR] == "HTTP 503"
    assert not again.redelivered  # a new copy, not a redelivery
    assert third.attempt == 2
    await third.ack()
    assert await raw.exists(delayed_name(queue)) == 0 and await raw.xlen(queue) == 0


async def test_dead_letters_are_listed_replayed_and_purged(
    make: Callable[..., Awaitable[RedisStreamsTransport]], queue: str, raw: Any
) -> None:
    transport = await make()
    await publish(transport, queue, "a", "b", "c", "d")
    taker = Taker(transport, queue)
    try:
        for _ in range(4):
            got = await taker.next()
            await got.dead_letter(f"broken {got.message_id}", reason="failed")
        letters = await transport.list_dead_letters(queue, 10)
        assert [letter.message_id for letter in letters] == ["a", "b", "c", "d"]
        assert [letter.reason for letter in letters] == ["failed"] * 4
        assert letters[1].error == "broken b" and letters[1].attempts == 1
        assert letters[1].headers[DLQ_QUEUE] == queue and letters[1].body == b"job b"
        assert [x.message_id for x in await transport.list_dead_letters(queue, 2)] == ["a", "b"]
        assert await raw.xlen(queue) == 0

        assert await transport.replay_dead_letters(queue, message_id="b") == 1
        replayed = await taker.next()
        assert replayed.message_id == "b" and replayed.body == b"job b"
        assert DLQ_REASON not in replayed.headers and ATTEMPT_HEADER not in replayed.headers
        await replayed.ack()
        assert await transport.replay_dead_letters(queue, limit=1) == 1
        assert (await taker.next()).message_id == "a"
    finally:
        await taker.stop()
    assert [x.message_id for x in await transport.list_dead_letters(queue, 10)] == ["c", "d"]
    assert await transport.purge_dead_letters(queue) == 2
    assert await transport.list_dead_letters(queue, 10) == []
    assert await transport.purge_dead_letters(queue) == 0


async def test_close_releases_unsettled_entries_to_another_consumer_at_once(
    make: Callable[..., Awaitable[RedisStreamsTransport]], queue: str, raw: Any
) -> None:
    first = await make()
    await publish(first, queue, "x1", "x2", "x3")
    taker = Taker(first, queue, prefetch=2)
    held = [await taker.next(), await taker.next()]
    # A third entry read for this consumer but never delivered (a read cut by a cancel).
    await raw.xreadgroup(GROUP, first.consumer, {queue: ">"}, count=1)
    await taker.stop()
    await first.close()
    consumers = [c["name"].decode() for c in await raw.xinfo_consumers(queue, GROUP)]
    assert first.consumer not in consumers  # it left the group with nothing pending

    second = await make()  # claim_idle 60 s: only a release can hand them over this fast
    other = Taker(second, queue)
    try:
        got = {(d.message_id, d.redelivered) for d in [await other.next(2) for _ in range(3)]}
    finally:
        await other.stop()
    assert got == {("x1", True), ("x2", True), ("x3", False)}
    assert all(d.settled for d in held)


async def test_an_entry_taken_over_by_another_consumer_is_not_copied_by_its_old_holder(
    make: Callable[..., Awaitable[RedisStreamsTransport]], queue: str, raw: Any
) -> None:
    transport = await make()
    await publish(transport, queue, "t1", "t2")
    taker = Taker(transport, queue)
    try:
        first, second = await taker.next(), await taker.next()
    finally:
        await taker.stop()
    # We stalled past claim_idle and someone else took both over.
    await raw.xclaim(queue, GROUP, "other", 0, [first.entry_id, second.entry_id])
    await first.retry(5, "HTTP 503")
    await second.release()
    assert await raw.exists(delayed_name(queue)) == 0  # no delayed copy
    assert await raw.xlen(queue) == 2  # no copy at the tail, originals left to "other"
    pending = await raw.xpending_range(queue, GROUP, "-", "+", 10)
    assert {p["consumer"] for p in pending} == {b"other"}


_CRASHER = """
import asyncio, sys
from chatprocessor.transports.redis_streams import RedisStreamsTransport

async def main():
    transport = RedisStreamsTransport(sys.argv[1], claim_idle=0.5)
    await transport.connect(attempts=1)
    async for delivery in transport.consume(sys.argv[2], prefetch=1):
        print("took", delivery.message_id, flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_a_killed_consumers_entry_is_claimed_by_another_after_claim_idle(
    make: Callable[..., Awaitable[RedisStreamsTransport]], queue: str
) -> None:
    survivor = await make(claim_idle=0.5)
    await publish(survivor, queue, "k-1")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CRASHER,
        REDIS_URL,
        queue,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    taker: Taker | None = None
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        assert line.strip() == b"took k-1"
        taker = Taker(survivor, queue)
        # Alive, the holder keeps touching its entry: nobody takes it from it.
        await taker.nothing_for(1.5)
        process.send_signal(signal.SIGKILL)
        await process.wait()
        got = await taker.next(5)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        if taker is not None:
            await taker.stop()
    assert got.message_id == "k-1" and got.body == b"job k-1"
    assert got.redelivered and got.delivery_count == 2
    await got.ack()


async def test_an_entry_delivered_too_often_goes_to_the_dlq_as_poison(
    make: Callable[..., Awaitable[RedisStreamsTransport]], queue: str, raw: Any
) -> None:
    transport = await make(max_deliveries=3, claim_idle=0.2)
    await publish(transport, queue, "poison-1", "fine-1")
    await transport.declare_input(queue)
    # A consumer "ghost" took both and died; earlier crashes left these delivery counts.
    taken = await raw.xreadgroup(GROUP, "ghost", {queue: ">"}, count=2)
    (poison_id, _), (fine_id, _) = taken[0][1]
    await raw.xclaim(queue, GROUP, "ghost", 0, [poison_id], retrycount=3)
    await raw.xclaim(queue, GROUP, "ghost", 0, [fine_id], retrycount=1)
    await asyncio.sleep(0.3)
    taker = Taker(transport, queue)
    try:
        fine = await taker.next(3)
        await taker.nothing_for(0.5)
    finally:
        await taker.stop()
    assert fine.message_id == "fine-1" and fine.redelivered and fine.delivery_count == 2
    await fine.ack()
    [letter] = await transport.list_dead_letters(queue, 10)
    assert letter.message_id == "poison-1" and letter.body == b"job poison-1"
    assert letter.reason == POISON
    assert "delivered 4 times" in letter.error
    assert letter.headers[DLQ_QUEUE] == queue
    assert await raw.xlen(queue) == 0


async def test_publish_trims_the_stream_to_about_maxlen(
    make: Callable[..., Awaitable[RedisStreamsTransport]], queue: str, raw: Any
) -> None:
    transport = await make(maxlen=50)
    for i in range(1000):
        await transport.publish(queue, Outgoing(b"%d" % i))
    length = await raw.xlen(queue)
    # "~": whole nodes (100 entries by default) are dropped, never below MAXLEN.
    assert 50 <= length <= 250
    [(_, last)] = await raw.xrevrange(queue, count=1)
    assert last[b"body"] == b"999"


async def test_a_private_reply_stream_is_read_then_deleted(
    make: Callable[..., Awaitable[RedisStreamsTransport]], raw: Any
) -> None:
    transport = await make()
    private = await transport.open_reply_queue()
    assert await raw.exists(private.name) == 1 and await raw.pttl(private.name) > 0
    await transport.publish(private.name, Outgoing(b"answer", correlation_id="c-9"))

    async def first() -> Delivery:
        async for delivery in private.messages():
            return delivery
        raise AssertionError("ended")

    got = await asyncio.wait_for(first(), 5)
    assert got.body == b"answer" and got.correlation_id == "c-9" and got.settled
    await private.close()
    assert await raw.exists(private.name) == 0
    with pytest.raises(Unroutable):
        await transport.publish(private.name, Outgoing(b"too late"))
    assert await raw.exists(private.name) == 0  # not created again by the publish


async def test_consuming_goes_on_after_the_stream_was_deleted(
    make: Callable[..., Awaitable[RedisStreamsTransport]], queue: str, raw: Any
) -> None:
    transport = await make()
    taker = Taker(transport, queue)
    try:
        await publish(transport, queue, "before")
        await (await taker.next()).ack()
        await raw.delete(queue)
        await asyncio.sleep(0.3)
        await publish(transport, queue, "after")
        got = await taker.next(5)
    finally:
        await taker.stop()
    assert got.message_id == "after"
    await got.ack()


async def test_consuming_survives_a_redis_outage(
    make: Callable[..., Awaitable[RedisStreamsTransport]], queue: str
) -> None:
    async with TcpProxy("127.0.0.1", 6379) as proxy:
        transport = await make(url=f"redis://127.0.0.1:{proxy.port}/15")
        taker = Taker(transport, queue)
        try:
            await publish(transport, queue, "before")
            await (await taker.next()).ack()
            outage = asyncio.create_task(proxy.outage(1.0))  # cut, refused for 1 s
            await asyncio.sleep(0.2)
            with pytest.raises(BrokerUnavailable):
                await publish(transport, queue, "during")
            await outage
            deadline = time.monotonic() + 5
            while True:  # the first call after the cut may still meet a dead connection
                try:
                    await publish(transport, queue, "after")
                    break
                except BrokerUnavailable:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.1)
            got = await taker.next(10)
        finally:
            await taker.stop()
        assert got.message_id == "after"
        await got.ack()


async def test_an_unreachable_redis_is_broker_unavailable() -> None:
    transport = RedisStreamsTransport("redis://:secret@127.0.0.1:1/0")
    try:
        with pytest.raises(BrokerUnavailable) as caught:
            await transport.connect(attempts=1)
        assert "secret" not in str(caught.value)
        with pytest.raises(BrokerUnavailable):
            await transport.publish("anything", Outgoing(b"x"))
        assert await transport.ping() is False
    finally:
        await transport.close()


async def test_transport_redis_builds_a_configured_redis_streams_transport() -> None:
    settings = Settings(
        transport="redis",
        redis_url=REDIS_URL,
        redis_stream_group="workers",
        redis_max_deliveries=7,
        redis_claim_idle=12.5,
        redis_stream_maxlen=5000,
    )
    transport = build_transport(settings)
    assert isinstance(transport, RedisStreamsTransport)
    assert (transport.group, transport.max_deliveries) == ("workers", 7)
    assert (transport.claim_idle, transport.maxlen) == (12.5, 5000)
    try:
        await transport.connect(attempts=1)
        assert await transport.ping() is True
    finally:
        await transport.close()
