"""Events appended to a Redis Stream (``sse:chat:events``), the feed an SSE gateway relays.

Each event is one entry: the routing fields a relay filters on (``type``, ``jobId``,
``userId``, ``sessionId``, ``seq``) beside ``data``, the whole event as JSON, so a relay
can forward ``data`` without parsing it. Several events go in one MULTI/EXEC, so a
reader never sees half a batch. ``MAXLEN ~`` keeps the stream bounded at almost no cost
(Redis trims whole macro nodes). Delivery is at least once: a batch whose EXEC reply was
lost is sent again, so readers drop repeats by (jobId, seq).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
import redis.asyncio as redis

from chatprocessor.core.errors import BrokerUnavailable, MalformedMessage, PublishFailed
from chatprocessor.events.sink import event_json, safe_url
from chatprocessor.ops.metrics import EVENTS_SENT, labelled
from chatprocessor.stores.redis_client import CALL_TIMEOUT, UNREACHABLE, redis_client

__all__ = [
    "CALL_TIMEOUT",
    "DEFAULT_EVENTS_STREAM",
    "RedisStreamSink",
    "read_entry",
    "redis_client",
    "stream_entry",
]

log = logging.getLogger(__name__)

DEFAULT_EVENTS_STREAM = "sse:chat:events"


def stream_entry(event: Mapping[str, Any]) -> dict[str, bytes | str]:
    """The stream entry for ``event``: routing fields plus ``data`` (the event as JSON)."""
    try:
        return {
            "type": str(event["type"]),
            "jobId": str(event["jobId"]),
            "userId": str(event["userId"]),
            "sessionId": "" if event.get("sessionId") is None else str(event["sessionId"]),
            "seq": str(event.get("seq", "")),
            "data": event_json(event),
        }
    except (KeyError, TypeError) as exc:
        raise PublishFailed(f"event lacks a routing field or is not JSON: {exc!r}") from exc


def read_entry(fields: Mapping[bytes, bytes] | Mapping[str, str]) -> dict[str, Any]:
    """The event a stream entry holds (its ``data``); raises MalformedMessage when there is none."""
    data = fields.get(b"data", fields.get("data"))  # type: ignore[call-overload]
    if data is None:
        raise MalformedMessage("stream entry has no data field")
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise MalformedMessage(f"stream entry data is not JSON: {exc}") from exc
    if not isinstance(event, dict):
        raise MalformedMessage("stream entry data is not a JSON object")
    return event


class RedisStreamSink:
    """An :class:`~chatprocessor.events.sink.EventSink` writing to one Redis Stream."""

    def __init__(
        self, url: str, *, stream: str = DEFAULT_EVENTS_STREAM, maxlen: int = 10_000
    ) -> None:
        self.stream = stream
        self.maxlen = maxlen
        self._safe_url = safe_url(url)
        # Connects lazily, then reuses its pool.
        self._redis = redis_client(url, name="chatprocessor-events")

    async def connect(self) -> None:
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                await self._redis.ping()
        except UNREACHABLE as exc:
            raise BrokerUnavailable(f"cannot reach Redis at {self._safe_url}: {exc}") from exc
        log.info("stream events go to Redis %s, stream %r", self._safe_url, self.stream)

    async def send(self, events: Sequence[Mapping[str, Any]]) -> None:
        if not events:
            return
        # Any: redis-py types fields as an invariant Dict[FieldT, EncodableT].
        entries: list[dict[Any, Any]] = [stream_entry(event) for event in events]
        try:
            if len(entries) == 1:  # one command is atomic already: skip MULTI/EXEC
                await self._redis.xadd(
                    self.stream, entries[0], maxlen=self.maxlen, approximate=True
                )
            else:
                async with self._redis.pipeline(transaction=True) as pipe:
                    for entry in entries:
                        pipe.xadd(self.stream, entry, maxlen=self.maxlen, approximate=True)
                    await pipe.execute()
        except UNREACHABLE as exc:
            raise BrokerUnavailable(f"Redis at {self._safe_url} unreachable: {exc}") from exc
        except redis.RedisError as exc:
            raise PublishFailed(f"Redis refused events for {self.stream!r}: {exc}") from exc
        for entry in entries:
            labelled(EVENTS_SENT, entry["type"]).inc()

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                return bool(await self._redis.ping())
        except (redis.RedisError, OSError):
            return False

    async def close(self) -> None:
        await self._redis.aclose()
