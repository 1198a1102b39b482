"""Events published to a RabbitMQ topic exchange (``chat.events``), for platforms that
relay them from a queue instead of a Redis Stream.

Routing key ``chat.<type>`` (``chat.token``, ``chat.final``...), so a consumer binds what
it needs (``chat.#`` for all). Messages are persistent and confirmed; their
``message_id`` is the event's ``id`` (derived from the job), so a consumer drops the
duplicates a retried batch can produce. An event nobody is bound for is dropped by the
broker, as on any pub/sub feed (no ``mandatory``). AMQP has no atomic multi-publish
compatible with confirms: a batch is published back to back on one channel (so it stays
in order) and ``send`` returns once the broker confirmed all of it, or raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Mapping, Sequence
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection

from chatprocessor.core.errors import BrokerUnavailable, PublishFailed
from chatprocessor.events.sink import event_json, safe_url
from chatprocessor.ops.metrics import EVENTS_SENT, labelled
from chatprocessor.transports.rabbitmq import _CONNECTION_ERRORS

__all__ = ["CONNECTION_ERRORS", "DEFAULT_EVENTS_EXCHANGE", "RabbitMQEventSink", "connection_name"]

log = logging.getLogger(__name__)

DEFAULT_EVENTS_EXCHANGE = "chat.events"
#: What aio-pika raises when the broker cannot be reached (shared with the transport).
CONNECTION_ERRORS = _CONNECTION_ERRORS


def connection_name(role: str) -> str:
    """The name shown in the management UI, as the transport names its connection."""
    return f"chatprocessor {role} {socket.gethostname()}:{os.getpid()}"


class RabbitMQEventSink:
    """An :class:`~chatprocessor.events.sink.EventSink` publishing to a durable topic exchange."""

    def __init__(self, url: str, *, exchange: str = DEFAULT_EVENTS_EXCHANGE) -> None:
        self.exchange_name = exchange
        self._url = url
        self._safe_url = safe_url(url)
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None

    async def connect(self) -> None:
        try:
            connection = await aio_pika.connect_robust(
                self._url,
                timeout=10,
                client_properties={"connection_name": connection_name("events")},
            )
        except CONNECTION_ERRORS as exc:
            raise BrokerUnavailable(f"cannot reach RabbitMQ at {self._safe_url}: {exc}") from exc
        try:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.declare_exchange(
                self.exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
            )
        except (*CONNECTION_ERRORS, aiormq.exceptions.AMQPError) as exc:
            await connection.close()
            raise BrokerUnavailable(
                f"cannot declare exchange {self.exchange_name!r}: {exc}"
            ) from exc
        self._connection, self._channel, self._exchange = connection, channel, exchange
        log.info("stream events go to RabbitMQ %s, exchange %r", self._safe_url, exchange.name)

    async def send(self, events: Sequence[Mapping[str, Any]]) -> None:
        if not events:
            return
        if self._exchange is None:
            await self.connect()
        exchange = self._exchange
        if exchange is None:
            raise BrokerUnavailable("not connected to RabbitMQ")
        messages = [(f"chat.{event['type']}", _message(event)) for event in events]
        # Started in order, the publishes take the channel's lock in order, so the frames
        # (and the deliveries) keep the batch's order while the confirms come back together.
        results = await asyncio.gather(
            *(exchange.publish(message, key, mandatory=False) for key, message in messages),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, Exception):
                raise _translated(result, self.exchange_name) from result
            if isinstance(result, BaseException):  # a publish was cancelled: so is the send
                raise result
        for event in events:
            labelled(EVENTS_SENT, str(event["type"])).inc()

    async def ping(self) -> bool:
        return (
            self._connection is not None
            and not self._connection.is_closed
            and self._channel is not None
            and not self._channel.is_closed
        )

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        self._channel = self._exchange = None
        if connection is not None:
            with contextlib.suppress(*CONNECTION_ERRORS):
                await connection.close()


def _message(event: Mapping[str, Any]) -> aio_pika.Message:
    headers: dict[str, Any] = {
        key: "" if event.get(key) is None else str(event[key])
        for key in ("jobId", "userId", "sessionId", "type")
    }
    return aio_pika.Message(
        event_json(event),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=str(event.get("id") or f"{event['jobId']}.{event.get('seq', '')}"),
        headers=headers,
    )


def _translated(exc: Exception, exchange: str) -> Exception:
    if isinstance(exc, aiormq.exceptions.DeliveryError):
        return PublishFailed(f"broker refused events for exchange {exchange!r}")
    if isinstance(exc, CONNECTION_ERRORS):
        return BrokerUnavailable(f"publishing to exchange {exchange!r} failed: {exc}")
    return PublishFailed(f"publishing to exchange {exchange!r} failed: {exc!r}")
