"""RabbitMQ on aio-pika: robust connection, durable queues, persistent messages, confirms.

Two channels: one consumes (its QoS is the prefetch), one publishes with
publisher confirms, so a slow consumer never holds up a confirm. Every publish
is ``mandatory``: a reply to a queue that does not exist comes back as
PublishFailed instead of vanishing.

Each input queue gets ``<queue>.dlq`` and one delay queue per retry tier
(``<queue>.retry.<ms>ms``: ``x-message-ttl`` on the queue, dead-lettering back
to the input through the default exchange). Retrying or dead-lettering publishes
a copy there, waits for its confirm, then acks the original; nothing relies on
the input queue's own arguments, so a queue the platform declared differently
keeps working.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import aiormq
import pamqp.encode
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)

from chatprocessor.contracts.chat import request_id
from chatprocessor.core.errors import (
    BrokerUnavailable,
    PublishFailed,
    TransportError,
    Unroutable,
)
from chatprocessor.core.retry import pick_tier, tier_name
from chatprocessor.transports.base import (
    DLQ_QUEUE,
    DeadLetter,
    Delivery,
    Outgoing,
    dead_letter_name,
    replay_headers,
)

log = logging.getLogger(__name__)

_BACKOFF_START = 0.5
_BACKOFF_CAP = 30.0
_CONNECTION_ERRORS = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)

POLICY_ADVICE = (
    "queue {queue!r} already exists with other arguments, so chatprocessor uses it as it is "
    "(passive declare). To add dead-lettering or other arguments without redeclaring it, set a "
    "policy instead, e.g.: rabbitmqctl set_policy chatprocessor-dlx '^{queue}$' "
    '\'{{"dead-letter-exchange":"","dead-letter-routing-key":"{queue}.dlq"}}\' '
    "--apply-to queues"
)


def encodable(value: Any) -> Any:
    """Header values as pamqp can write them back: it reads a long string that is not
    UTF-8 as bytes but writes only bytearray, and it cannot write an int beyond 64 bits."""
    if isinstance(value, dict):
        return {key: encodable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [encodable(item) for item in value]
    if isinstance(value, bytes):
        return bytearray(value)
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        return str(value)
    return value


def _encode_floats_as_doubles() -> None:
    """pamqp writes every float header as a 32-bit float ('f'): a platform's double
    (a timestamp, a score) copied into a retry or a dead letter would lose digits.
    Write floats as doubles ('d'), which every AMQP 0-9-1 peer reads."""
    original = pamqp.encode.encode_table_value
    if getattr(original, "doubles", False):
        return

    def encode_table_value(value: Any) -> bytes:
        if isinstance(value, float):
            return b"d" + pamqp.encode.double(value)
        return original(value)

    encode_table_value.doubles = True  # type: ignore[attr-defined]
    pamqp.encode.encode_table_value = encode_table_value


_encode_floats_as_doubles()


def copy_of(message: AbstractIncomingMessage, headers: dict[str, Any]) -> Outgoing:
    """``message`` with other headers, to publish to a delay or dead-letter queue (or back)."""
    return Outgoing(
        message.body,
        # Without a message_id aiormq would invent a random one, and the job's
        # identity (a digest of the body) would change from copy to copy.
        message_id=message.message_id or request_id(message.body, None),
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        type=message.type,
        headers=encodable(headers),
        content_type=message.content_type,
        priority=message.priority,  # a retried job keeps its place in line
    )


class RabbitDelivery(Delivery):
    """An AMQP message; settling it acks, rejects or requeues on its channel."""

    def __init__(
        self,
        message: AbstractIncomingMessage,
        transport: RabbitMQTransport | None = None,
        queue: str = "",
    ) -> None:
        self._message = message
        self._transport = transport
        self.queue = queue or message.routing_key or ""
        self.body = message.body
        self.message_id = message.message_id
        self.correlation_id = message.correlation_id
        self.reply_to = message.reply_to
        self.type = message.type
        self.headers = dict(message.headers or {})
        self.redelivered = bool(message.redelivered)

    async def _settle(self, action: str, **kwargs: Any) -> None:
        try:
            await getattr(self._message, action)(**kwargs)
        except _CONNECTION_ERRORS as exc:
            # The channel died with the connection: the broker already put the
            # message back and will redeliver it, which is the at-least-once promise.
            log.warning(
                "could not %s message %s (%s); the broker will redeliver it",
                action,
                self.message_id,
                exc,
            )

    async def _ack(self) -> None:
        await self._settle("ack")

    async def _dead_letter(self, error: str, headers: dict[str, Any]) -> None:
        if self._transport is None:  # a reply-queue message: nothing to park
            await self._settle("reject", requeue=False)
            return
        await self._transport.publish_declaring(
            dead_letter_name(self.queue), copy_of(self._message, headers)
        )
        await self._settle("ack")

    async def _retry(self, delay: float, headers: dict[str, Any]) -> None:
        if self._transport is None:
            await self._settle("nack", requeue=True)
            return
        tier = pick_tier(self._transport.retry_tiers, delay)
        await self._transport.publish_declaring(
            tier_name(self.queue, tier), copy_of(self._message, headers), input_queue=self.queue
        )
        await self._settle("ack")

    async def _release(self) -> None:
        await self._settle("nack", requeue=True)


class RabbitReplyQueue:
    """An exclusive, auto-deleted, server-named queue: private to one client connection."""

    def __init__(self, queue: aio_pika.abc.AbstractQueue) -> None:
        self._queue = queue
        self.name = queue.name

    async def messages(self) -> AsyncIterator[Delivery]:
        async with self._queue.iterator(no_ack=True) as iterator:
            async for message in iterator:
                yield RabbitDelivery(message)

    async def close(self) -> None:
        with contextlib.suppress(*_CONNECTION_ERRORS):
            await self._queue.delete(if_unused=False, if_empty=False)


class RabbitMQTransport:
    """A RabbitMQ broker reached through one robust connection."""

    def __init__(
        self,
        url: str,
        *,
        safe_url: str | None = None,
        connection_name: str | None = None,
        retry_tiers: list[float] | None = None,
        priority_queues: dict[str, int] | None = None,
    ) -> None:
        self._url = url
        #: Input queues declared with ``x-max-priority`` (the pipeline's lanes): name -> maximum.
        self.priority_queues = dict(priority_queues or {})
        self.retry_tiers = sorted(retry_tiers or [1.0])
        self._safe_url = safe_url or "the broker"
        # Shown in the management UI and rabbitmqctl list_connections.
        self.connection_name = (
            connection_name or f"chatprocessor {socket.gethostname()}:{os.getpid()}"
        )
        self._connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        self._publish_exchange: aio_pika.abc.AbstractExchange | None = None
        self._consume_channels: list[AbstractChannel] = []
        self.existing_queues: set[str] = set()

    @property
    def connection(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise BrokerUnavailable("not connected to RabbitMQ")
        return self._connection

    async def connect(self, *, attempts: int | None = None) -> None:
        """Connect, retrying with exponential backoff; ``attempts=None`` retries forever."""
        delay = _BACKOFF_START
        tried = 0
        while True:
            tried += 1
            try:
                self._connection = await aio_pika.connect_robust(
                    self._url,
                    timeout=10,
                    client_properties={"connection_name": self.connection_name},
                )
                break
            except _CONNECTION_ERRORS as exc:
                if attempts is not None and tried >= attempts:
                    raise BrokerUnavailable(
                        f"cannot reach RabbitMQ at {self._safe_url}: {exc}"
                    ) from exc
                log.warning(
                    "RabbitMQ at %s not reachable (%s); retrying in %.1fs",
                    self._safe_url,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_CAP)
        # on_return_raises: a mandatory message the broker returns (no such queue) must
        # fail the publish; by default aiormq would report it as delivered.
        self._publish_channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        self._publish_exchange = self._publish_channel.default_exchange
        log.info("connected to RabbitMQ at %s", self._safe_url)

    async def declare(self, queue: str, *, arguments: dict[str, Any] | None = None) -> None:
        """Declare durable; a queue declared otherwise is used as it is, with advice logged."""
        channels = [await self.connection.channel()]
        try:
            try:
                await channels[0].declare_queue(queue, durable=True, arguments=arguments)
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                if arguments and "x-max-priority" in arguments:
                    log.warning(
                        "queue %r exists without priorities (x-max-priority %s), so jobs in it "
                        "are taken in arrival order; lanes still keep a batch flood from high "
                        "jobs. A policy cannot add priorities: to have them, delete the queue "
                        "(rabbitmqctl delete_queue %s) while it is empty and restart the worker",
                        queue,
                        arguments["x-max-priority"],
                        queue,
                    )
                elif arguments:  # one of our delay queues, changed by hand: it may never deliver
                    log.error(
                        "delay queue %r exists with other arguments than chatprocessor's %s, so "
                        "retries through it may not come back; delete it (rabbitmqctl "
                        "delete_queue %s) and restart the worker to have it declared again",
                        queue,
                        arguments,
                        queue,
                    )
                else:
                    log.warning("%s (broker said: %s)", POLICY_ADVICE.format(queue=queue), exc)
                self.existing_queues.add(queue)
                channels.append(await self.connection.channel())
                await channels[1].declare_queue(queue, passive=True)
        finally:
            # Both: the broker closed the first one, and a robust channel reopens itself.
            for channel in channels:
                with contextlib.suppress(*_CONNECTION_ERRORS, aiormq.exceptions.ChannelClosed):
                    await channel.close()

    async def declare_input(self, queue: str) -> None:
        """The input, its dead-letter queue and its delay queues (one per retry tier)."""
        top = self.priority_queues.get(queue)
        await self.declare(queue, arguments={"x-max-priority": top} if top else None)
        await self.declare(dead_letter_name(queue))
        for tier in self.retry_tiers:
            await self._declare_tier(queue, tier)

    async def _declare_tier(self, queue: str, tier: float) -> None:
        # The TTL is the queue's, so messages expire in order; expiry routes them
        # back to the input through the default exchange.
        await self.declare(
            tier_name(queue, tier),
            arguments={
                "x-message-ttl": round(tier * 1000),
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": queue,
            },
        )

    async def consume(self, queue: str, prefetch: int) -> AsyncIterator[Delivery]:
        # The channel outlives the consumer: deliveries still being processed when
        # consuming stops are acked on it later. close() closes it.
        channel = await self.connection.channel()
        self._consume_channels.append(channel)
        await channel.set_qos(prefetch_count=prefetch)
        amqp_queue = await channel.get_queue(queue, ensure=True)
        try:
            # Entering starts the consumer, leaving cancels it.
            async with amqp_queue.iterator() as iterator:
                await self._watch_consumer(channel, iterator, queue)
                async for message in iterator:
                    yield RabbitDelivery(message, self, queue)
        except aiormq.exceptions.AMQPError as exc:
            raise BrokerUnavailable(f"consuming {queue!r} failed: {exc}") from exc

    async def _watch_consumer(self, channel: AbstractChannel, iterator: Any, queue: str) -> None:
        """End ``iterator`` when the broker cancels its consumer (e.g. the queue was deleted).

        aio-pika's iterator would otherwise wait forever. The hook lives on the
        underlying channel, which a reconnect replaces, so it is added again on reopen.
        """
        tasks: set[asyncio.Future[Any]] = set()

        def spawn(awaitable: Any) -> None:
            task = asyncio.ensure_future(awaitable)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        def on_broker_cancel(frame: Any) -> None:
            # Runs inside the channel's frame reader: closing must happen in a task.
            if frame.consumer_tag == getattr(iterator, "consumer_tag", None):
                log.error("the broker cancelled the consumer of %r (queue deleted?)", queue)
                spawn(iterator.close())

        async def hook() -> None:
            underlay = await channel.get_underlay_channel()
            underlay.on_consumer_cancel_callbacks.add(on_broker_cancel)

        await hook()
        reopen_callbacks = getattr(channel, "reopen_callbacks", None)
        if reopen_callbacks is not None:
            reopen_callbacks.add(lambda *_: spawn(hook()))

    async def depth(self, queue: str) -> int:
        """Messages ready in ``queue`` (not counting those delivered and unacked)."""
        channel = await self.connection.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
            return int(declared.declaration_result.message_count or 0)
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            raise TransportError(f"queue {queue!r} does not exist") from exc
        finally:
            with contextlib.suppress(*_CONNECTION_ERRORS, aiormq.exceptions.ChannelClosed):
                await channel.close()

    async def publish(self, destination: str, message: Outgoing) -> None:
        if self._publish_exchange is None:
            raise BrokerUnavailable("not connected to RabbitMQ")
        amqp_message = aio_pika.Message(
            message.body,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            type=message.type,
            headers=message.headers or None,
            content_type=message.content_type or "application/json",
            priority=message.priority,
        )
        try:
            await self._publish_exchange.publish(amqp_message, destination, mandatory=True)
        except aiormq.exceptions.PublishError as exc:
            raise Unroutable(f"queue {destination!r} does not exist: message returned") from exc
        except aiormq.exceptions.DeliveryError as exc:
            raise PublishFailed(f"broker refused the message for {destination!r}") from exc
        except _CONNECTION_ERRORS as exc:
            raise BrokerUnavailable(f"publish to {destination!r} failed: {exc}") from exc
        except (TypeError, ValueError, OverflowError, struct.error) as exc:
            raise PublishFailed(f"cannot encode the message for {destination!r}: {exc}") from exc

    async def publish_declaring(
        self, destination: str, message: Outgoing, *, input_queue: str | None = None
    ) -> None:
        """Publish to one of our own queues, declaring it again if someone deleted it."""
        try:
            await self.publish(destination, message)
        except Unroutable:
            log.warning("queue %r was missing; declaring it again", destination)
            if input_queue is not None:
                await self.declare_input(input_queue)
            else:
                await self.declare(destination)
            await self.publish(destination, message)

    # -- dead letters (chatprocessor dlq) ------------------------------------------------

    @staticmethod
    async def _dead_letter_queue(channel: AbstractChannel, queue: str) -> Any:
        try:
            return await channel.declare_queue(dead_letter_name(queue), passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            raise TransportError(
                f"queue {dead_letter_name(queue)!r} does not exist: no worker has consumed "
                f"{queue!r} yet"
            ) from exc

    async def _browse(
        self, queue: str, limit: int | None
    ) -> tuple[AbstractChannel, list[AbstractIncomingMessage]]:
        """Take up to ``limit`` messages unacked; closing the channel puts back the rest."""
        channel = await self.connection.channel()
        amqp_queue = await self._dead_letter_queue(channel, queue)
        messages: list[AbstractIncomingMessage] = []
        while limit is None or len(messages) < limit:
            message = await amqp_queue.get(no_ack=False, fail=False)
            if message is None:
                break
            messages.append(message)
        return channel, messages

    async def list_dead_letters(self, queue: str, limit: int) -> list[DeadLetter]:
        channel, messages = await self._browse(queue, limit)
        try:
            return [
                DeadLetter(
                    id=str(position),
                    body=message.body,
                    message_id=message.message_id,
                    headers=dict(message.headers or {}),
                )
                for position, message in enumerate(messages, start=1)
            ]
        finally:
            await channel.close()  # every browsed message goes back, in its place

    async def replay_dead_letters(
        self, queue: str, *, limit: int | None = None, message_id: str | None = None
    ) -> int:
        channel, messages = await self._browse(queue, None if message_id else limit)
        replayed = 0
        try:
            for message in messages:
                if message_id is not None and message.message_id != message_id:
                    continue
                if limit is not None and replayed >= limit:
                    break
                headers = dict(message.headers or {})
                target = str(headers.get(DLQ_QUEUE) or queue)
                copy = copy_of(message, replay_headers(headers))
                await self.publish(target, copy)  # confirmed before the dead letter goes
                await message.ack()
                replayed += 1
        finally:
            await channel.close()
        return replayed

    async def purge_dead_letters(self, queue: str) -> int:
        channel = await self.connection.channel()
        try:
            amqp_queue = await self._dead_letter_queue(channel, queue)
            result = await amqp_queue.purge()
            return int(result.message_count or 0)
        finally:
            await channel.close()

    async def open_reply_queue(self) -> RabbitReplyQueue:
        channel = await self.connection.channel()
        queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
        return RabbitReplyQueue(queue)

    async def ping(self) -> bool:
        return (
            self._connection is not None
            and not self._connection.is_closed
            and self._publish_channel is not None
            and not self._publish_channel.is_closed
        )

    async def close(self) -> None:
        for channel in self._consume_channels:
            with contextlib.suppress(*_CONNECTION_ERRORS, aiormq.exceptions.ChannelClosed):
                await channel.close()
        self._consume_channels.clear()
        if self._connection is not None:
            connection, self._connection = self._connection, None
            with contextlib.suppress(*_CONNECTION_ERRORS):
                await connection.close()
