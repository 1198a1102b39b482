"""Kafka through aiokafka, behind the Transport protocol.

- A consumer group (CONSUMER_GROUP) reads the input topic and its retry topic;
  offsets are committed by hand, only up to the first record not yet settled, and
  a record is settled after its reply was produced and acknowledged (the producer
  uses acks=all and idempotence). A worker that dies before that leaves the offset
  behind, and the group hands the records to another member: nothing is lost.
- Records with the same key are processed one at a time, in order; different keys
  run side by side, up to PREFETCH_COUNT records at once.
- A failed attempt is produced to ``<topic>.retry`` (headers say the attempt and the
  due time, the record is held in memory until then) and a dead one to
  ``<topic>.dlq``; then its offset is settled, so one poison record never blocks its
  partition. A retried record may be passed by later records of its key.
- On a rebalance, records of revoked partitions not yet started are dropped (the new
  owner reads them again from the committed offset) and those in flight get a few
  seconds to finish before the commit.

The clients are made by a factory (``KafkaClients``) so tests can put an in-memory
broker behind the same calls (tests/fakes/kafka.py): no Kafka broker can be
installed on these machines.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Iterable
from typing import Any, Protocol

from chatprocessor.core.errors import BrokerUnavailable, PublishFailed, TransportError
from chatprocessor.transports.base import (
    RETRY_AT_HEADER,
    Delivery,
    Outgoing,
    header_number,
)

log = logging.getLogger(__name__)

MESSAGE_ID_HEADER = "message_id"
#: How long records of revoked partitions may take to finish before the rebalance goes on.
REVOKE_GRACE = 10.0
_POLL_MS = 100


def retry_topic(topic: str) -> str:
    return f"{topic}.retry"


def dead_letter_topic(topic: str) -> str:
    return f"{topic}.dlq"


class KafkaClients(Protocol):
    """Makes aiokafka's consumer and producer (or a test double with the same calls)."""

    def consumer(self, *, group_id: str) -> Any: ...

    def producer(self) -> Any: ...


class AIOKafkaClients:
    """The real clients; BOOTSTRAP_SERVER is a comma-separated host:port list."""

    def __init__(self, bootstrap: str, *, client_id: str = "chatprocessor") -> None:
        self.bootstrap = bootstrap
        self.client_id = client_id

    def consumer(self, *, group_id: str) -> Any:
        from aiokafka import AIOKafkaConsumer

        return AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            client_id=self.client_id,
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )

    def producer(self) -> Any:
        from aiokafka import AIOKafkaProducer

        return AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            client_id=self.client_id,
            acks="all",
            enable_idempotence=True,
        )


def _kafka_errors() -> tuple[type[BaseException], ...]:
    from aiokafka.errors import KafkaError

    return (KafkaError, OSError)


class KafkaDelivery(Delivery):
    """One record; settling it produces what it must, then marks its offset done."""

    def __init__(self, transport: KafkaTransport, record: Any, queue: str) -> None:
        self._transport = transport
        self.record = record
        self.queue = queue
        self.tp = (record.topic, record.partition)
        self.offset: int = record.offset
        self.key: bytes | None = record.key
        self.body = record.value or b""
        headers = {name: value.decode(errors="replace") for name, value in record.headers or ()}
        own_id = headers.pop(MESSAGE_ID_HEADER, None)
        self.message_id = own_id or f"{record.topic}-{record.partition}-{record.offset}"
        self.correlation_id = self.key.decode(errors="replace") if self.key else None
        self.reply_to = None
        self.type = None
        self.headers = headers
        self.redelivered = False  # Kafka cannot tell; the idempotency store does
        #: Its partition was revoked while it ran: the new owner reads it again.
        self.orphaned = False

    async def _ack(self) -> None:
        await self._transport._settled(self)

    async def _dead_letter(self, error: str, headers: dict[str, Any]) -> None:
        await self._transport._copy(self, dead_letter_topic(self.queue), headers)
        await self._transport._settled(self)

    async def _retry(self, delay: float, headers: dict[str, Any]) -> None:
        await self._transport._copy(self, retry_topic(self.queue), headers)
        await self._transport._settled(self)

    async def _release(self) -> None:
        self._transport._put_back(self)


class KafkaTransport:
    """See the module docstring. One consumer per ``consume`` call, one shared producer."""

    def __init__(self, clients: KafkaClients, *, group_id: str) -> None:
        self.clients = clients
        self.group_id = group_id
        self._producer: Any = None
        self._consumer: Any = None
        self._wake = asyncio.Event()
        self._ready: deque[KafkaDelivery] = deque()
        self._held: list[tuple[float, int, KafkaDelivery]] = []  # retries not due yet
        self._order = itertools.count()
        self._busy_keys: dict[bytes, deque[KafkaDelivery]] = {}
        self._in_flight: set[KafkaDelivery] = set()
        self._outstanding: dict[tuple[str, int], set[int]] = defaultdict(set)
        self._next_offset: dict[tuple[str, int], int] = {}

    # -- connection ------------------------------------------------------------------------

    async def connect(self, *, attempts: int | None = None) -> None:
        if self._producer is not None:
            return
        tries = itertools.count(1) if attempts is None else range(1, attempts + 1)
        for attempt in tries:
            producer = self.clients.producer()
            try:
                await producer.start()
            except _kafka_errors() as exc:
                with contextlib.suppress(*_kafka_errors()):
                    await producer.stop()
                if attempts is not None and attempt >= attempts:
                    raise BrokerUnavailable(f"Kafka not reachable: {exc}") from exc
                log.warning("Kafka not reachable (%s); retrying in 5s", exc)
                await asyncio.sleep(5)
                continue
            self._producer = producer
            return

    async def declare(self, queue: str) -> None:
        """Topics are made by the brokers (auto.create.topics.enable) or by the operator."""

    async def declare_input(self, queue: str) -> None:
        """Same for ``<topic>.retry`` and ``<topic>.dlq``."""

    async def ping(self) -> bool:
        return self._producer is not None

    async def close(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            with contextlib.suppress(*_kafka_errors()):
                await producer.stop()

    # -- producing -------------------------------------------------------------------------

    async def publish(self, destination: str, message: Outgoing) -> None:
        """Produce and wait for acks=all; the reply's key is the request's (correlation id)."""
        headers: dict[str, Any] = dict(message.headers or {})
        if message.message_id:
            headers[MESSAGE_ID_HEADER] = message.message_id
        if message.type:
            headers["type"] = message.type
        key = message.correlation_id.encode() if message.correlation_id else None
        await self._produce(destination, message.body, key, headers)

    async def _produce(
        self, topic: str, body: bytes, key: bytes | None, headers: dict[str, Any]
    ) -> None:
        if self._producer is None:
            raise BrokerUnavailable("not connected to Kafka")
        encoded = [(name, _header_bytes(value)) for name, value in headers.items()]
        try:
            await self._producer.send_and_wait(topic, value=body, key=key, headers=encoded)
        except _kafka_errors() as exc:
            from aiokafka.errors import KafkaConnectionError

            if isinstance(exc, KafkaConnectionError | OSError):
                raise BrokerUnavailable(f"producing to {topic!r} failed: {exc}") from exc
            raise PublishFailed(f"Kafka refused the record for {topic!r}: {exc}") from exc

    async def _copy(self, delivery: KafkaDelivery, topic: str, headers: dict[str, Any]) -> None:
        """A retry or dead-letter copy: same body and key, same message id."""
        headers = {**headers, MESSAGE_ID_HEADER: delivery.message_id}
        await self._produce(topic, delivery.body, delivery.key, headers)

    # -- consuming -------------------------------------------------------------------------

    async def consume(self, queue: str, prefetch: int) -> AsyncIterator[Delivery]:
        from aiokafka import ConsumerRebalanceListener

        transport = self

        class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
            async def on_partitions_revoked(self, revoked: Iterable[Any]) -> None:
                await transport._revoked({(tp.topic, tp.partition) for tp in revoked})

            async def on_partitions_assigned(self, assigned: Iterable[Any]) -> None:
                names = sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned)
                log.info("assigned partitions: %s", ", ".join(names))

        consumer = self.clients.consumer(group_id=self.group_id)
        consumer.subscribe([queue, retry_topic(queue)], listener=Listener())
        try:
            await consumer.start()
        except _kafka_errors() as exc:
            raise BrokerUnavailable(f"consuming {queue!r} failed: {exc}") from exc
        self._consumer = consumer
        try:
            while True:
                self._release_due()
                while self._ready and len(self._in_flight) < prefetch:
                    delivery = self._ready.popleft()
                    self._in_flight.add(delivery)
                    yield delivery
                room = prefetch - len(self._in_flight) - len(self._ready) - len(self._held)
                if room <= 0:
                    await self._wait(self._next_due())
                    continue
                try:
                    batch = await consumer.getmany(timeout_ms=_POLL_MS, max_records=room)
                except _kafka_errors() as exc:
                    raise BrokerUnavailable(f"consuming {queue!r} failed: {exc}") from exc
                for records in batch.values():
                    for record in records:
                        self._admit(KafkaDelivery(self, record, queue))
        finally:
            self._consumer = None
            with contextlib.suppress(*_kafka_errors()):
                await consumer.stop()

    def _admit(self, delivery: KafkaDelivery) -> None:
        tp = delivery.tp
        self._outstanding[tp].add(delivery.offset)
        self._next_offset[tp] = max(self._next_offset.get(tp, 0), delivery.offset + 1)
        due = header_number(delivery.headers, RETRY_AT_HEADER) / 1000
        if due > time.time():
            heapq.heappush(self._held, (due, next(self._order), delivery))
            return
        self._queue_in_key_order(delivery)

    def _queue_in_key_order(self, delivery: KafkaDelivery) -> None:
        if delivery.key is None:
            self._ready.append(delivery)
        elif delivery.key in self._busy_keys:
            self._busy_keys[delivery.key].append(delivery)  # waits for the one before it
        else:
            self._busy_keys[delivery.key] = deque()
            self._ready.append(delivery)

    def _release_due(self) -> None:
        now = time.time()
        while self._held and self._held[0][0] <= now:
            self._queue_in_key_order(heapq.heappop(self._held)[2])

    def _next_due(self) -> float | None:
        return self._held[0][0] - time.time() if self._held else None

    async def _wait(self, timeout: float | None) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(None if timeout is None else max(timeout, 0.0)):
                await self._wake.wait()

    def _next_of_key(self, delivery: KafkaDelivery) -> None:
        if delivery.key is None or delivery.key not in self._busy_keys:
            return
        waiting = self._busy_keys[delivery.key]
        if waiting:
            self._ready.append(waiting.popleft())
        else:
            del self._busy_keys[delivery.key]

    async def _settled(self, delivery: KafkaDelivery) -> None:
        """Its offset is done: commit up to the first record of the partition not yet done."""
        if delivery.orphaned:
            return
        self._in_flight.discard(delivery)
        self._next_of_key(delivery)
        self._wake.set()
        outstanding = self._outstanding.get(delivery.tp)
        if outstanding is None:  # its partition was revoked meanwhile: the new owner has it
            return
        outstanding.discard(delivery.offset)
        commit_to = min(outstanding) if outstanding else self._next_offset[delivery.tp]
        await self._commit({delivery.tp: commit_to})

    async def _commit(self, offsets: dict[tuple[str, int], int]) -> None:
        consumer = self._consumer
        if consumer is None or not offsets:
            return
        from aiokafka.structs import TopicPartition

        try:
            await consumer.commit({TopicPartition(t, p): o for (t, p), o in offsets.items()})
        except _kafka_errors() as exc:
            # A rebalance took the partition: its new owner starts from the last commit
            # and processes again what came after (the idempotency store answers those).
            log.warning("could not commit offsets %s (%s); they will be read again", offsets, exc)

    def _put_back(self, delivery: KafkaDelivery) -> None:
        """A release: processed again by this worker, in its key's order."""
        if delivery.orphaned:
            return
        self._in_flight.discard(delivery)
        self._ready.appendleft(delivery)
        self._wake.set()

    async def _revoked(self, partitions: set[tuple[str, int]]) -> None:
        """Drop what of these partitions has not started; let what runs finish, briefly."""
        self._ready = deque(d for d in self._ready if d.tp not in partitions)
        self._held = [h for h in self._held if h[2].tp not in partitions]
        heapq.heapify(self._held)
        for key, waiting in list(self._busy_keys.items()):
            self._busy_keys[key] = deque(d for d in waiting if d.tp not in partitions)
        running = [d for d in self._in_flight if d.tp in partitions]
        deadline = time.monotonic() + REVOKE_GRACE
        while any(d in self._in_flight for d in running) and time.monotonic() < deadline:
            await self._wait(0.05)
        late = [d for d in running if d in self._in_flight]
        for delivery in late:  # free their slots and keys; their settling changes nothing
            delivery.orphaned = True
            self._in_flight.discard(delivery)
            self._next_of_key(delivery)
        for tp in partitions:
            self._outstanding.pop(tp, None)
            self._next_offset.pop(tp, None)
        if running:
            log.warning(
                "partitions revoked with %d record(s) in flight, %d not finished in %.0fs: "
                "their new owner reads those again",
                len(running),
                len(late),
                REVOKE_GRACE,
            )

    async def open_reply_queue(self) -> Any:
        raise TransportError("request/reply over Kafka is not supported: read the reply topics")


def _header_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode()
