"""KafkaTransport against the in-memory cluster of tests/fakes/kafka.py.

No Kafka broker can be installed on these machines: the fake keeps aiokafka's calls and
structs (partitions by key hash, a group coordinator with committed offsets and
rebalances calling the listener), and these tests check what the transport promises:
commits only up to the first unsettled record, per-key order, retries through
``<topic>.retry`` held until due, dead letters in ``<topic>.dlq``, no loss on a rebalance.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
import pytest
from aiokafka.structs import TopicPartition

from chatprocessor.contracts.chat import ChatCodec
from chatprocessor.core.errors import BrokerUnavailable
from chatprocessor.core.retry import RetryPolicy
from chatprocessor.core.worker import Worker, WorkerConfig
from chatprocessor.providers.mock import MockProvider
from chatprocessor.transports import kafka
from chatprocessor.transports.base import Delivery, Outgoing
from chatprocessor.transports.kafka import KafkaTransport, dead_letter_topic, retry_topic
from tests.fakes.kafka import FakeKafka

pytestmark = pytest.mark.timeout(30)

TOPIC = "eater-send-photo"
GROUP = "models-processor-group"


@pytest.fixture(autouse=True)
def short_revoke_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    """Streams closed with records unsettled give them 0.2 s, not 10 s, before going."""
    monkeypatch.setattr(kafka, "REVOKE_GRACE", 0.2)


@pytest.fixture
def cluster() -> FakeKafka:
    return FakeKafka()


@pytest.fixture
async def transport(cluster: FakeKafka) -> AsyncIterator[KafkaTransport]:
    t = KafkaTransport(cluster.clients(), group_id=GROUP)
    await t.connect(attempts=1)
    yield t
    await t.close()


def produce(cluster: FakeKafka, key: str | None, value: bytes, topic: str = TOPIC) -> None:
    cluster.append(topic, value, key.encode() if key else None, [])


async def take(
    transport: KafkaTransport, n: int, *, prefetch: int = 10, timeout: float = 5
) -> tuple[list[Delivery], AsyncIterator[Delivery]]:
    """The first ``n`` deliveries (unsettled) and the still-open stream."""
    stream = transport.consume(TOPIC, prefetch)
    got: list[Delivery] = []

    async def collect() -> None:
        async for delivery in stream:
            got.append(delivery)
            if len(got) == n:
                return

    await asyncio.wait_for(collect(), timeout)
    return got, stream


def committed(cluster: FakeKafka, topic: str = TOPIC) -> dict[int, int]:
    return {
        tp.partition: offset for tp, offset in cluster.committed[GROUP].items() if tp.topic == topic
    }


async def test_a_record_is_delivered_with_its_key_and_a_stable_id(
    cluster: FakeKafka, transport: KafkaTransport
) -> None:
    produce(cluster, "req-1", b'{"prompt": "hi"}')
    [delivery], stream = await take(transport, 1)
    assert delivery.body == b'{"prompt": "hi"}'
    assert delivery.correlation_id == "req-1"  # the key travels to the reply
    assert delivery.message_id is not None and delivery.message_id.startswith(f"{TOPIC}-")
    assert committed(cluster) == {}  # nothing committed before it is settled
    await delivery.ack()
    tp = (TOPIC, TopicPartition(TOPIC, 0).partition)
    assert sum(committed(cluster).values()) == 1, tp
    await stream.aclose()


async def test_commits_stop_at_the_first_unsettled_record(
    cluster: FakeKafka, transport: KafkaTransport
) -> None:
    for i in range(3):  # no key: one partition, three different "keys" of order
        produce(cluster, None, b"%d" % i)
    got, stream = await take(transport, 3)
    await got[1].ack()
    await got[2].ack()
    assert committed(cluster) == {0: 0}  # record 0 still runs: nothing past it is committed
    await got[0].ack()
    assert committed(cluster) == {0: 3}
    await stream.aclose()


async def test_records_of_one_key_run_one_at_a_time_in_order(
    cluster: FakeKafka, transport: KafkaTransport
) -> None:
    for i in range(3):
        produce(cluster, "user-a", b"a%d" % i)
    produce(cluster, "user-b", b"b0")
    stream = transport.consume(TOPIC, 10)
    first = await anext(stream)
    second = await anext(stream)
    assert {first.body, second.body} == {b"a0", b"b0"}  # a1 waits for a0; b0 runs beside it
    nothing = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.3)
    assert not nothing.done()
    a0 = first if first.body == b"a0" else second
    await a0.ack()
    assert (await asyncio.wait_for(nothing, 2)).body == b"a1"
    await stream.aclose()


async def test_a_retry_goes_through_the_retry_topic_and_waits_until_due(
    cluster: FakeKafka, transport: KafkaTransport
) -> None:
    produce(cluster, "k", b"job")
    [delivery], stream = await take(transport, 1)
    started = time.monotonic()
    await delivery.retry(0.4, "ollama: HTTP 503")
    [copy] = cluster.records(retry_topic(TOPIC))
    assert copy.key == b"k" and copy.value == b"job"
    headers = dict(copy.headers)
    assert headers["x-attempt"] == b"1"
    assert headers["message_id"] == delivery.message_id.encode()  # same identity
    again = await asyncio.wait_for(anext(stream), 5)
    assert time.monotonic() - started >= 0.35  # held until its due time
    assert again.message_id == delivery.message_id and again.attempt == 1
    assert sum(committed(cluster).values()) == 1  # the original's offset is settled
    await again.ack()
    await stream.aclose()


async def test_a_dead_letter_lands_in_the_dlq_topic_and_frees_the_partition(
    cluster: FakeKafka, transport: KafkaTransport
) -> None:
    produce(cluster, "k", b"poison")
    produce(cluster, "k", b"next")
    [poison], stream = await take(transport, 1)
    await poison.dead_letter("not JSON")
    [letter] = cluster.records(dead_letter_topic(TOPIC))
    assert letter.value == b"poison"
    assert dict(letter.headers)["x-dead-letter-reason"] == b"rejected"
    following = await asyncio.wait_for(anext(stream), 2)
    assert following.body == b"next"  # one poison record never blocks its key or partition
    await following.ack()
    await stream.aclose()


async def test_the_reply_is_produced_with_the_request_key(
    cluster: FakeKafka, transport: KafkaTransport
) -> None:
    await transport.publish(
        "gemini-response", Outgoing(b'{"response": "ok"}', message_id="r1", correlation_id="req-9")
    )
    [record] = cluster.records("gemini-response")
    assert record.key == b"req-9"
    assert dict(record.headers)["message_id"] == b"r1"


async def test_a_failed_produce_is_broker_unavailable(
    cluster: FakeKafka, transport: KafkaTransport
) -> None:
    cluster.fail_sends = 1
    with pytest.raises(BrokerUnavailable):
        await transport.publish("gemini-response", Outgoing(b"{}"))


async def test_connect_fails_after_its_attempts_when_the_cluster_is_down(
    cluster: FakeKafka,
) -> None:
    cluster.down = True
    with pytest.raises(BrokerUnavailable):
        await KafkaTransport(cluster.clients(), group_id=GROUP).connect(attempts=1)


async def test_a_rebalance_loses_nothing(
    cluster: FakeKafka, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker A holds six records, settles one, then B joins and A's grace runs out: the
    five A never settled are read again by whoever owns their partition now."""
    monkeypatch.setattr(kafka, "REVOKE_GRACE", 0.2)
    for i in range(6):
        produce(cluster, f"key-{i}", b"%d" % i)
    a = KafkaTransport(cluster.clients(), group_id=GROUP)
    b = KafkaTransport(cluster.clients(), group_id=GROUP)
    await a.connect(attempts=1)
    await b.connect(attempts=1)
    got_a, stream_a = await take(a, 6)
    await got_a[0].ack()
    handled = [got_a[0].body]

    async def serve(stream: AsyncIterator[Delivery]) -> None:
        async for delivery in stream:
            handled.append(delivery.body)
            await delivery.ack()

    workers = [
        asyncio.create_task(serve(stream_a)),
        asyncio.create_task(serve(b.consume(TOPIC, 10))),
    ]
    deadline = time.monotonic() + 5
    while sorted(set(handled)) != [b"%d" % i for i in range(6)]:
        assert time.monotonic() < deadline, handled
        await asyncio.sleep(0.05)
    for delivery in got_a[1:]:
        await delivery.ack()  # too late: their partitions moved; nothing wrong is committed
    for worker in workers:
        worker.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    assert sum(committed(cluster).values()) == 6
    await a.close()
    await b.close()


# -- the worker on Kafka -----------------------------------------------------------------------


async def run_worker(
    cluster: FakeKafka, check: Callable[[], Awaitable[bool]], **config: object
) -> None:
    worker = Worker(
        KafkaTransport(cluster.clients(), group_id=GROUP),
        MockProvider(),
        ChatCodec(max_bytes=65536),
        WorkerConfig(
            input_queue=TOPIC,
            output_queue="BotResponseCreated",
            prefetch=4,
            retry=RetryPolicy(max_retries=1, base=0.05, cap=0.1),
        ),
    )
    await worker.start()
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        deadline = time.monotonic() + 10
        while not await check():
            assert time.monotonic() < deadline, "the worker did not finish in time"
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task
        await worker.transport.close()


async def test_the_worker_answers_each_record_and_commits_it(cluster: FakeKafka) -> None:
    for i in range(5):
        body = orjson.dumps({"conversation_id": i, "message": f"question {i}"})
        produce(cluster, f"conv-{i}", body)
    produce(cluster, "bad", b"{not json")

    async def finished() -> bool:
        return (
            len(cluster.records("BotResponseCreated")) == 5
            and len(cluster.records(dead_letter_topic(TOPIC))) == 1
        )

    await run_worker(cluster, finished)
    replies = {r.key: orjson.loads(r.value) for r in cluster.records("BotResponseCreated")}
    assert {k: v["conversation_id"] for k, v in replies.items()} == {
        f"conv-{i}".encode(): i for i in range(5)
    }
    assert sum(committed(cluster).values()) == 6  # every record settled, the poison one too


# -- found in review ----------------------------------------------------------------------------


async def test_a_header_without_a_value_does_not_stop_the_consumer(
    cluster: FakeKafka, transport: KafkaTransport
) -> None:
    cluster.append(TOPIC, b"job", b"k", [("trace", None)])  # type: ignore[list-item]
    [delivery], stream = await take(transport, 1)
    assert delivery.body == b"job" and delivery.headers["trace"] == ""
    await stream.aclose()


async def test_a_due_time_far_ahead_is_not_held_forever(
    cluster: FakeKafka, transport: KafkaTransport
) -> None:
    """A forged or skewed x-retry-at must not keep the only slot and the partition's commits."""
    cluster.append(retry_topic(TOPIC), b"late", b"k", [("x-retry-at", b"99999999999999")])
    [delivery], stream = await take(transport, 1, prefetch=1)
    assert delivery.body == b"late"
    await stream.aclose()


async def test_a_busy_key_does_not_pull_its_backlog_into_memory(
    cluster: FakeKafka, transport: KafkaTransport
) -> None:
    for i in range(200):
        produce(cluster, "hot", b"%d" % i)
    stream = transport.consume(TOPIC, 2)
    first = await anext(stream)
    waiter = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.3)
    fetched = sum(p for p in cluster.members[GROUP][0].position.values())
    assert fetched <= 3  # the one running and at most the room left, not 200
    waiter.cancel()
    await first.ack()


async def test_replay_by_message_id_finds_a_letter_past_the_first(
    cluster: FakeKafka, transport: KafkaTransport
) -> None:
    for name in ("m0", "m1", "m2"):
        cluster.append(
            dead_letter_topic(TOPIC), name.encode(), None, [("message_id", name.encode())]
        )
    assert await transport.replay_dead_letters(TOPIC, message_id="m1") == 1
    [replayed] = cluster.records(TOPIC)
    assert replayed.value == b"m1"
    assert len(await transport.list_dead_letters(TOPIC, 10)) == 3  # stays listed (in order)


async def test_after_a_rebalance_a_key_whose_next_record_was_ready_goes_on(
    cluster: FakeKafka, transport: KafkaTransport
) -> None:
    """K2 became ready when K1 settled, then the partitions were dealt again: when the
    records come back, K2 must not wait behind an owner that is gone."""
    produce(cluster, "k", b"K1")
    produce(cluster, "k", b"K2")
    stream = transport.consume(TOPIC, 5)
    k1 = await anext(stream)
    await k1.ack()  # K2 is now ready but not yet handed out
    await cluster.rebalance(GROUP)
    k2 = await asyncio.wait_for(anext(stream), 5)
    assert k2.body == b"K2"
    await k2.ack()
    assert sum(committed(cluster).values()) == 2
    await stream.aclose()


async def test_a_graceful_stop_commits_the_records_in_flight_before_leaving(
    cluster: FakeKafka, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiokafka leaves the group on stop without a revoke callback: the worker's jobs in
    flight must commit first, or the next member would answer them again."""
    monkeypatch.setattr(kafka, "REVOKE_GRACE", 5.0)

    class Slow(MockProvider):
        async def chat(self, request, *, stream=False):  # type: ignore[no-untyped-def]
            await asyncio.sleep(0.5)
            async for chunk in super().chat(request, stream=stream):
                yield chunk

    produce(cluster, "c1", orjson.dumps({"conversation_id": 1, "message": "slow"}))
    worker = Worker(
        KafkaTransport(cluster.clients(), group_id=GROUP),
        Slow(),
        ChatCodec(max_bytes=65536),
        WorkerConfig(input_queue=TOPIC, output_queue="BotResponseCreated", graceful_timeout=5),
    )
    await worker.start()
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    await asyncio.sleep(0.2)  # the job is running
    stop.set()
    await task
    await worker.transport.close()
    assert len(cluster.records("BotResponseCreated")) == 1
    assert sum(committed(cluster).values()) == 1  # committed before the member left
