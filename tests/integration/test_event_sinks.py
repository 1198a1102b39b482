"""Event sinks against real servers: order, completeness, atomic batches, trimming, outages."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import redis.asyncio as redis
from prometheus_client import REGISTRY

from chatprocessor.core.errors import BrokerUnavailable, MalformedMessage, PublishFailed
from chatprocessor.events import RedisStreamSink, read_entry, stream_entry
from chatprocessor.events.rabbitmq_sink import RabbitMQEventSink
from tests.conftest import RABBITMQ_URL, REDIS_URL

pytestmark = pytest.mark.timeout(60)


def token(seq: int, job: str = "job-1", user: str = "alice") -> dict[str, Any]:
    return {
        "type": "token",
        "jobId": job,
        "userId": user,
        "sessionId": "s-1",
        "seq": seq,
        "delta": f"t{seq} ",
    }


@pytest.fixture
async def stream() -> AsyncIterator[str]:
    name = f"test:events:{uuid.uuid4().hex}"
    yield name
    client = redis.Redis.from_url(REDIS_URL)
    await client.delete(name)
    await client.aclose()


@pytest.fixture
async def reader() -> AsyncIterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


@pytest.fixture
async def sink(stream: str) -> AsyncIterator[RedisStreamSink]:
    sink = RedisStreamSink(REDIS_URL, stream=stream)
    await sink.connect()
    yield sink
    await sink.close()


# -- entry format ------------------------------------------------------------------------


def test_an_entry_carries_routing_fields_and_the_whole_event() -> None:
    event = {**token(7), "sessionId": None}
    entry = stream_entry(event)

    assert {k: entry[k] for k in ("type", "jobId", "userId", "sessionId", "seq")} == {
        "type": "token",
        "jobId": "job-1",
        "userId": "alice",
        "sessionId": "",
        "seq": "7",
    }
    assert orjson.loads(entry["data"]) == event
    assert read_entry({k.encode(): v for k, v in entry.items()}) == event  # type: ignore[union-attr]


def test_an_event_without_routing_fields_is_refused() -> None:
    with pytest.raises(PublishFailed):
        stream_entry({"type": "token", "userId": "alice"})


@pytest.mark.parametrize("fields", [{}, {b"data": b"not json"}, {b"data": b"[1, 2]"}])
def test_read_entry_rejects_entries_without_an_event(fields: dict[bytes, bytes]) -> None:
    with pytest.raises(MalformedMessage):
        read_entry(fields)


# -- Redis Stream --------------------------------------------------------------------------


@pytest.mark.redis
async def test_every_event_arrives_in_order(
    sink: RedisStreamSink, stream: str, reader: redis.Redis
) -> None:
    events = [token(seq) for seq in range(1000)]
    sizes = [1, 7, 50, 3, 100]
    position = 0
    while position < len(events):
        size = sizes[position % len(sizes)]
        await sink.send(events[position : position + size])
        position += size

    entries = await reader.xrange(stream)

    assert [read_entry(fields) for _, fields in entries] == events
    assert [int(fields[b"seq"]) for _, fields in entries] == list(range(1000))
    assert {fields[b"jobId"] for _, fields in entries} == {b"job-1"}


@pytest.mark.redis
async def test_a_batch_is_never_seen_half_written(
    sink: RedisStreamSink, stream: str, reader: redis.Redis
) -> None:
    batch, batches = 5, 200
    seen: list[list[int]] = []

    async def read_all() -> None:
        last: Any = "0-0"
        count = 0
        while count < batch * batches:
            reply = await reader.xread({stream: last}, block=1000)
            for _, entries in reply:
                seen.append([int(fields[b"seq"]) for _, fields in entries])
                last = entries[-1][0]
                count += len(entries)

    task = asyncio.create_task(read_all())
    for start in range(0, batch * batches, batch):
        await sink.send([token(seq) for seq in range(start, start + batch)])
        await asyncio.sleep(0)  # let the reader in between batches
    await asyncio.wait_for(task, 30)

    assert [seq for reply in seen for seq in reply] == list(range(batch * batches))
    assert len(seen) > 1  # the reader really read while batches were being written
    # Every read ends on a batch boundary: MULTI/EXEC never exposes part of a batch.
    assert all(len(reply) % batch == 0 and reply[0] % batch == 0 for reply in seen)


@pytest.mark.redis
async def test_maxlen_trims_the_stream_approximately(stream: str, reader: redis.Redis) -> None:
    sink = RedisStreamSink(REDIS_URL, stream=stream, maxlen=100)
    try:
        for start in range(0, 2000, 20):
            await sink.send([token(seq) for seq in range(start, start + 20)])
    finally:
        await sink.close()

    length = await reader.xlen(stream)
    assert 100 <= length < 400  # "~": trimmed in whole macro nodes, never below MAXLEN
    newest = await reader.xrevrange(stream, count=1)
    assert read_entry(newest[0][1])["seq"] == 1999


@pytest.mark.redis
async def test_sent_events_are_counted_by_type(sink: RedisStreamSink) -> None:
    def sent(kind: str) -> float:
        return REGISTRY.get_sample_value("chatprocessor_events_sent_total", {"type": kind}) or 0.0

    before_token, before_done = sent("token"), sent("done")
    await sink.send([token(0), token(1), {**token(2), "type": "done", "status": "ok"}])

    assert (sent("token") - before_token, sent("done") - before_done) == (2, 1)
    assert await sink.ping() is True


@pytest.mark.redis
async def test_redis_refusing_the_command_is_a_publish_failure(
    sink: RedisStreamSink, stream: str, reader: redis.Redis
) -> None:
    await reader.set(stream, "not a stream")  # WRONGTYPE for XADD

    with pytest.raises(PublishFailed):
        await sink.send([token(0)])
    with pytest.raises(PublishFailed):
        await sink.send([token(1), token(2)])


async def test_redis_down_fails_fast() -> None:
    sink = RedisStreamSink("redis://:secret@127.0.0.1:1/0", stream="never")
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable) as raised:
        await sink.connect()
    with pytest.raises(BrokerUnavailable):
        await sink.send([token(0)])
    with pytest.raises(BrokerUnavailable):
        await sink.send([token(1), token(2)])
    assert await sink.ping() is False
    await sink.close()

    assert time.monotonic() - started < 2
    assert "secret" not in str(raised.value)


# -- RabbitMQ exchange ---------------------------------------------------------------------


@pytest.mark.rabbitmq
async def test_a_bound_queue_receives_the_events_in_order_with_headers(amqp: Any) -> None:
    import aio_pika

    exchange_name = f"test.events.{uuid.uuid4().hex[:10]}"
    sink = RabbitMQEventSink(RABBITMQ_URL, exchange=exchange_name)
    await sink.connect()
    channel = await amqp.channel()
    queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
    await queue.bind(exchange_name, routing_key="chat.#")
    events = [token(seq) for seq in range(200)]
    events += [
        {**token(200), "type": "final", "text": "all", "status": "ok"},
        {**token(201), "type": "done", "status": "ok"},
    ]
    try:
        for start in range(0, len(events), 25):
            await sink.send(events[start : start + 25])
        assert await sink.ping() is True

        received: list[aio_pika.abc.AbstractIncomingMessage] = []
        async with queue.iterator(no_ack=True) as messages:
            async for message in messages:
                received.append(message)
                if len(received) == len(events):
                    break
    finally:
        await sink.close()
        await channel.exchange_delete(exchange_name)

    assert [orjson.loads(m.body) for m in received] == events
    assert [m.routing_key for m in received] == ["chat.token"] * 200 + ["chat.final", "chat.done"]
    first = received[0]
    assert first.headers == {
        "jobId": "job-1",
        "userId": "alice",
        "sessionId": "s-1",
        "type": "token",
    }
    assert first.message_id == "job-1.0"
    assert received[-1].message_id == "job-1.201"
    assert first.content_type == "application/json"
    assert first.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert await sink.ping() is False  # closed


@pytest.mark.rabbitmq
async def test_events_are_confirmed_even_with_no_queue_bound() -> None:
    exchange_name = f"test.events.{uuid.uuid4().hex[:10]}"
    sink = RabbitMQEventSink(RABBITMQ_URL, exchange=exchange_name)
    try:
        await sink.send([token(0), token(1)])  # connects on first use; nobody listens
    finally:
        import aio_pika

        connection = await aio_pika.connect(RABBITMQ_URL)
        async with connection:
            await (await connection.channel()).exchange_delete(exchange_name)
        await sink.close()


async def test_rabbitmq_down_is_broker_unavailable() -> None:
    sink = RabbitMQEventSink("amqp://guest:secret@127.0.0.1:1/")
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable) as raised:
        await sink.connect()
    assert time.monotonic() - started < 5
    assert "secret" not in str(raised.value)
    assert await sink.ping() is False
