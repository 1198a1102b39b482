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
import uuid
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Iterable
from typing import Any, Protocol

from chatprocessor.core.errors import BrokerUnavailable, PublishFailed
from chatprocessor.core.retry import MAX_WAIT
from chatprocessor.transports.base import (
    RETRY_AT_HEADER,
    DeadLetter,
    Delivery,
    Outgoing,
    header_number,
    replay_headers,
)

log = logging.getLogger(__name__)

MESSAGE_ID_HEADER = "message_id"
#: Where the reply goes (a topic), for contracts that let the requester choose (chat).
REPLY_TO_HEADER = "reply_to"
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

    def __init__(
        self, bootstrap: str, *, client_id: str = "chatprocessor", max_poll_interval: float = 900.0
    ) -> None:
        self.bootstrap = bootstrap
        self.client_id = client_id
        #: The consumer polls only when a slot is free: a job may take JOB_TIMEOUT first.
        self.max_poll_interval = max_poll_interval

    def consumer(self, *, group_id: str) -> Any:
        from aiokafka import AIOKafkaConsumer

        return AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            client_id=self.client_id,
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_interval_ms=round(self.max_poll_interval * 1000),
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

    def __init__(self, reader: _Reader, record: Any, queue: str) -> None:
        self._reader = reader
        self._transport = reader.transport
        self.record = record
        self.queue = queue
        self.tp = (record.topic, record.partition)
        self.offset: int = record.offset
        self.key: bytes | None = record.key
        self.body = record.value or b""
        headers = {
            name: (value or b"").decode(errors="replace") for name, value in record.headers or ()
        }
        own_id = headers.pop(MESSAGE_ID_HEADER, None)
        self.message_id = own_id or f"{record.topic}-{record.partition}-{record.offset}"
        self.correlation_id = self.key.decode(errors="replace") if self.key else None
        self.reply_to = headers.pop(REPLY_TO_HEADER, None)
        self.type = headers.pop("type", None)
        self.headers = headers
        self.redelivered = False  # Kafka cannot tell; the idempotency store does
        #: Its partition was revoked while it ran: the new owner reads it again.
        self.orphaned = False

    async def _ack(self) -> None:
        await self._reader.settled(self)

    async def _dead_letter(self, error: str, headers: dict[str, Any]) -> None:
        await self._transport._copy(self, dead_letter_topic(self.queue), headers)
        await self._reader.settled(self)

    async def _retry(self, delay: float, headers: dict[str, Any]) -> None:
        await self._transport._copy(self, retry_topic(self.queue), headers)
        await self._reader.settled(self)

    async def _release(self) -> None:
        self._reader.put_back(self)


class KafkaTransport:
    """See the module docstring. One consumer per ``consume`` call, one shared producer."""

    def __init__(self, clients: KafkaClients, *, group_id: str) -> None:
        self.clients = clients
        self.group_id = group_id
        self._producer: Any = None

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
        if message.reply_to:
            headers[REPLY_TO_HEADER] = message.reply_to
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
        """A retry or dead-letter copy: same body, key, message id and reply_to."""
        headers = {**headers, MESSAGE_ID_HEADER: delivery.message_id}
        if delivery.reply_to:
            headers[REPLY_TO_HEADER] = delivery.reply_to
        if delivery.type:
            headers["type"] = delivery.type
        await self._produce(topic, delivery.body, delivery.key, headers)

    # -- consuming -------------------------------------------------------------------------

    async def consume(self, queue: str, prefetch: int) -> AsyncIterator[Delivery]:
        """Records of ``queue`` and ``<queue>.retry``; see the module docstring."""
        reader = _Reader(self)
        consumer = self.clients.consumer(group_id=self.group_id)
        consumer.subscribe([queue, retry_topic(queue)], listener=reader.listener())
        try:
            await consumer.start()
        except _kafka_errors() as exc:
            raise BrokerUnavailable(f"consuming {queue!r} failed: {exc}") from exc
        reader.consumer = consumer
        try:
            while True:
                reader.release_due()
                while reader.ready and len(reader.in_flight) < prefetch:
                    delivery = reader.ready.popleft()
                    reader.in_flight.add(delivery)
                    yield delivery
                waiting = sum(len(queue) for queue in reader.busy_keys.values())
                room = prefetch - len(reader.in_flight) - len(reader.ready) - len(reader.held)
                room -= waiting  # one busy key must not pull its whole backlog into memory
                if room <= 0:
                    await reader.wait(reader.next_due())
                    continue
                try:
                    batch = await consumer.getmany(timeout_ms=_POLL_MS, max_records=room)
                except _kafka_errors() as exc:
                    raise BrokerUnavailable(f"consuming {queue!r} failed: {exc}") from exc
                for records in batch.values():
                    for record in records:
                        reader.admit(KafkaDelivery(reader, record, queue))
        finally:
            # Stopping (or failing): records in flight get REVOKE_GRACE to settle and commit
            # before this member leaves the group; else the others would process them again.
            deadline = time.monotonic() + REVOKE_GRACE
            while reader.in_flight and time.monotonic() < deadline:
                await reader.wait(0.05)
            reader.consumer = None
            with contextlib.suppress(*_kafka_errors()):
                await consumer.stop()

    async def open_reply_queue(self) -> KafkaReplyQueue:
        return KafkaReplyQueue(self)

    # -- dead letters (chatprocessor dlq) ------------------------------------------------------
    #
    # A topic cannot delete records: the group ``<CONSUMER_GROUP>.dlq`` keeps, as its committed
    # offsets, how far the dead letters were replayed or purged. ``dlq list`` shows those past.

    async def _dead_letters(self, queue: str) -> tuple[Any, list[Any]]:
        """A reader on ``<queue>.dlq`` (committing for the dlq group) and its unhandled records."""
        from aiokafka.structs import TopicPartition

        consumer = self.clients.consumer(group_id=f"{self.group_id}.dlq")
        try:
            await consumer.start()
            topic = dead_letter_topic(queue)
            await consumer.topics()  # loads the topic's metadata
            partitions = [
                TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())
            ]
            consumer.assign(partitions)
            ends = await consumer.end_offsets(partitions)
            records: list[Any] = []
            for tp in partitions:
                position = await consumer.committed(tp) or 0
                consumer.seek(tp, position)
                while position < ends[tp]:
                    batch = await consumer.getmany(tp, timeout_ms=1000)
                    if not batch:
                        break
                    for record in batch.get(tp, []):
                        if record.offset < ends[tp]:
                            records.append(record)
                        position = record.offset + 1
        except _kafka_errors() as exc:
            with contextlib.suppress(*_kafka_errors()):
                await consumer.stop()
            raise BrokerUnavailable(f"reading {dead_letter_topic(queue)!r} failed: {exc}") from exc
        return consumer, records

    async def _close_reader(self, consumer: Any, handled: list[Any]) -> None:
        """Commit past ``handled`` (the records replayed or purged), then stop the reader."""
        from aiokafka.structs import TopicPartition

        offsets: dict[Any, int] = {}
        for record in handled:
            tp = TopicPartition(record.topic, record.partition)
            offsets[tp] = max(offsets.get(tp, 0), record.offset + 1)
        try:
            if offsets:
                await consumer.commit(offsets)
        finally:
            with contextlib.suppress(*_kafka_errors()):
                await consumer.stop()

    async def list_dead_letters(self, queue: str, limit: int) -> list[DeadLetter]:
        consumer, records = await self._dead_letters(queue)
        await self._close_reader(consumer, [])
        return [_dead_letter(record) for record in records[:limit]]

    async def replay_dead_letters(
        self, queue: str, *, limit: int | None = None, message_id: str | None = None
    ) -> int:
        """Produce dead letters back to ``queue`` with a fresh retry budget. With
        ``message_id`` only that one is replayed, and the others stay listed before it."""
        consumer, records = await self._dead_letters(queue)
        handled: list[Any] = []
        try:
            for record in records[:limit]:
                letter = _dead_letter(record)
                if message_id is not None and letter.message_id != message_id:
                    continue
                headers = replay_headers(letter.headers)
                if letter.message_id:
                    headers[MESSAGE_ID_HEADER] = letter.message_id
                await self._produce(queue, letter.body, record.key, headers)
                handled.append(record)
        finally:
            # Offsets commit in order: a letter replayed by id stays listed (a later full
            # replay sends it again; the idempotency store answers that copy).
            await self._close_reader(consumer, [] if message_id is not None else handled)
        return len(handled)

    async def purge_dead_letters(self, queue: str) -> int:
        consumer, records = await self._dead_letters(queue)
        await self._close_reader(consumer, records)
        return len(records)


class _Reader:
    """The state of one ``consume``: what is held, waiting, running, and the offsets."""

    def __init__(self, transport: KafkaTransport) -> None:
        self.transport = transport
        self.consumer: Any = None
        self.wake = asyncio.Event()
        self.ready: deque[KafkaDelivery] = deque()
        self.held: list[tuple[float, int, KafkaDelivery]] = []  # retries not due yet
        self.order = itertools.count()
        self.busy_keys: dict[bytes, deque[KafkaDelivery]] = {}
        self.in_flight: set[KafkaDelivery] = set()
        self.outstanding: dict[tuple[str, int], set[int]] = defaultdict(set)
        self.next_offset: dict[tuple[str, int], int] = {}

    def listener(self) -> Any:
        from aiokafka import ConsumerRebalanceListener

        reader = self

        class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
            async def on_partitions_revoked(self, revoked: Iterable[Any]) -> None:
                await reader.revoked({(tp.topic, tp.partition) for tp in revoked})

            async def on_partitions_assigned(self, assigned: Iterable[Any]) -> None:
                names = sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned)
                log.info("assigned partitions: %s", ", ".join(names) or "none")

        return Listener()

    def admit(self, delivery: KafkaDelivery) -> None:
        tp = delivery.tp
        self.outstanding[tp].add(delivery.offset)
        self.next_offset[tp] = max(self.next_offset.get(tp, 0), delivery.offset + 1)
        due = header_number(delivery.headers, RETRY_AT_HEADER) / 1000
        # A due time beyond any retry delay (a skewed clock, a forged header) is not held:
        # it would keep a slot and its partition's commits forever.
        if time.time() < due <= time.time() + MAX_WAIT:
            heapq.heappush(self.held, (due, next(self.order), delivery))
            return
        self.queue_in_key_order(delivery)

    def queue_in_key_order(self, delivery: KafkaDelivery) -> None:
        if delivery.key is None:
            self.ready.append(delivery)
        elif delivery.key in self.busy_keys:
            self.busy_keys[delivery.key].append(delivery)  # waits for the one before it
        else:
            self.busy_keys[delivery.key] = deque()
            self.ready.append(delivery)

    def release_due(self) -> None:
        now = time.time()
        while self.held and self.held[0][0] <= now:
            self.queue_in_key_order(heapq.heappop(self.held)[2])

    def next_due(self) -> float | None:
        return self.held[0][0] - time.time() if self.held else None

    async def wait(self, timeout: float | None) -> None:
        self.wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(None if timeout is None else max(timeout, 0.0)):
                await self.wake.wait()

    def _rebuild_keys(self, dropped: set[tuple[str, int]]) -> None:
        """Key ownership after dropping the records of ``dropped`` that had not started:
        a key is busy while a record of it runs or is ready; its waiting records stay queued,
        and a key whose owner was dropped passes to its first waiting record."""
        waiting = {
            key: deque(d for d in queue if d.tp not in dropped)
            for key, queue in self.busy_keys.items()
        }
        owners = {d.key for d in (*self.in_flight, *self.ready) if d.key is not None}
        self.busy_keys = {}
        for key, queue in waiting.items():
            if key in owners:
                self.busy_keys[key] = queue
            elif queue:
                self.ready.append(queue.popleft())
                self.busy_keys[key] = queue

    def next_of_key(self, delivery: KafkaDelivery) -> None:
        if delivery.key is None or delivery.key not in self.busy_keys:
            return
        waiting = self.busy_keys[delivery.key]
        if waiting:
            self.ready.append(waiting.popleft())
        else:
            del self.busy_keys[delivery.key]

    async def settled(self, delivery: KafkaDelivery) -> None:
        """Its offset is done: commit up to the first record of the partition not yet done."""
        if delivery.orphaned:
            return
        self.in_flight.discard(delivery)
        self.next_of_key(delivery)
        self.wake.set()
        outstanding = self.outstanding.get(delivery.tp)
        if outstanding is None:  # its partition was revoked meanwhile: the new owner has it
            return
        outstanding.discard(delivery.offset)
        commit_to = min(outstanding) if outstanding else self.next_offset[delivery.tp]
        await self.commit({delivery.tp: commit_to})

    async def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        consumer = self.consumer
        if consumer is None or not offsets:
            return
        from aiokafka.structs import TopicPartition

        try:
            await consumer.commit({TopicPartition(t, p): o for (t, p), o in offsets.items()})
        except _kafka_errors() as exc:
            # A rebalance took the partition: its new owner starts from the last commit
            # and processes again what came after (the idempotency store answers those).
            log.warning("could not commit offsets %s (%s); they will be read again", offsets, exc)

    def put_back(self, delivery: KafkaDelivery) -> None:
        """A release: processed again by this worker, in its key's order."""
        if delivery.orphaned:
            return
        self.in_flight.discard(delivery)
        self.ready.appendleft(delivery)
        self.wake.set()

    async def revoked(self, partitions: set[tuple[str, int]]) -> None:
        """Drop what of these partitions has not started; let what runs finish, briefly."""
        self.ready = deque(d for d in self.ready if d.tp not in partitions)
        self.held = [h for h in self.held if h[2].tp not in partitions]
        heapq.heapify(self.held)
        self._rebuild_keys(partitions)
        running = [d for d in self.in_flight if d.tp in partitions]
        deadline = time.monotonic() + REVOKE_GRACE
        while any(d in self.in_flight for d in running) and time.monotonic() < deadline:
            await self.wait(0.05)
        late = [d for d in running if d in self.in_flight]
        for delivery in late:  # free their slots and keys; their settling changes nothing
            delivery.orphaned = True
            self.in_flight.discard(delivery)
            self.next_of_key(delivery)
        for tp in partitions:
            self.outstanding.pop(tp, None)
            self.next_offset.pop(tp, None)
        if running:
            log.warning(
                "partitions revoked with %d record(s) in flight, %d not finished in %.0fs: "
                "their new owner reads those again",
                len(running),
                len(late),
                REVOKE_GRACE,
            )


class KafkaReplyQueue:
    """A private topic for replies (``chatprocessor send``): read by a group of its own."""

    def __init__(self, transport: KafkaTransport) -> None:
        self.name = f"chatprocessor.reply.{uuid.uuid4().hex}"
        self._reader = KafkaTransport(transport.clients, group_id=self.name)
        self._reader._producer = transport._producer

    async def messages(self) -> AsyncIterator[Delivery]:
        async for delivery in self._reader.consume(self.name, prefetch=16):
            await delivery.ack()
            yield delivery

    async def close(self) -> None:
        """Topics are not deleted by clients: the broker's retention removes it."""


def _headers(record: Any) -> dict[str, str]:
    """A record's headers as text; Kafka allows a header without a value (None)."""
    return {name: (value or b"").decode(errors="replace") for name, value in record.headers or ()}


def _dead_letter(record: Any) -> DeadLetter:
    headers = {
        name: (value or b"").decode(errors="replace") for name, value in record.headers or ()
    }
    message_id = headers.pop(MESSAGE_ID_HEADER, None)
    return DeadLetter(
        id=f"{record.partition}:{record.offset}",
        body=record.value or b"",
        message_id=message_id,
        headers=headers,
    )


def _header_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode()
