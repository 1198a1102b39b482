"""Where a job's stream events go: the :class:`EventSink` protocol and its shared helpers.

An event is a mapping with at least ``type`` (token, final, done, error), ``jobId``,
``userId``, ``sessionId`` and ``seq`` (0, 1, 2... per job). The sinks do not look inside
it further: the integrator's codec owns the payload, the sinks own the transport.
Implementations: :mod:`~chatprocessor.events.redis_sink` (a Redis Stream, what an SSE
gateway reads) and :mod:`~chatprocessor.events.rabbitmq_sink` (a topic exchange).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import orjson

__all__ = ["EventSink", "event_json", "safe_url"]


class EventSink(Protocol):
    """Appends events in order and returns only once they are stored."""

    async def connect(self) -> None:
        """Open the connection; raises BrokerUnavailable when the server cannot be reached."""

    async def send(self, events: Sequence[Mapping[str, Any]]) -> None:
        """Append ``events`` in order, several at once as one batch.

        Returns once stored; raises PublishFailed when the server refuses them, or
        BrokerUnavailable when it cannot be reached.
        """

    async def ping(self) -> bool:
        """True when the server answers; never raises."""

    async def close(self) -> None:
        """Release the connection; safe to call twice."""


def event_json(event: Mapping[str, Any]) -> bytes:
    """The event as compact JSON (orjson: the hot path encodes a token batch every few ms)."""
    return orjson.dumps(event, option=orjson.OPT_NON_STR_KEYS)


def safe_url(url: str) -> str:
    """``url`` without its password, for log lines and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + host))
