"""A job's live events and its cancellation: the transport side of streaming.

The worker hands each batch of events (token, final, done, error) to an
:class:`EventSink`; a :class:`CancelSource` hands cancel requests to the worker's
:class:`CancelRegistry`. Redis Streams is the default for both (what an SSE gateway
reads, see ``examples/sse_relay.py``); RabbitMQ is the alternative. The RabbitMQ classes
live in :mod:`.rabbitmq_sink` and :mod:`.cancel` and load aio-pika only when used.
"""

from __future__ import annotations

from chatprocessor.events.cancel import (
    CANCELLED,
    DEFAULT_CANCEL_EXCHANGE,
    DEFAULT_CANCEL_STREAM,
    CancelRegistry,
    CancelScope,
    CancelSource,
    RabbitMQCancelSource,
    RedisCancelSource,
    send_cancel_rabbitmq,
    send_cancel_redis,
)
from chatprocessor.events.redis_sink import (
    DEFAULT_EVENTS_STREAM,
    RedisStreamSink,
    read_entry,
    stream_entry,
)
from chatprocessor.events.sink import EventSink

__all__ = [
    "CANCELLED",
    "DEFAULT_CANCEL_EXCHANGE",
    "DEFAULT_CANCEL_STREAM",
    "DEFAULT_EVENTS_STREAM",
    "CancelRegistry",
    "CancelScope",
    "CancelSource",
    "EventSink",
    "RabbitMQCancelSource",
    "RedisCancelSource",
    "RedisStreamSink",
    "read_entry",
    "send_cancel_rabbitmq",
    "send_cancel_redis",
    "stream_entry",
]
