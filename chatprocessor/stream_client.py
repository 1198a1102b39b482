"""What a gateway does with the stream door, for ``chatprocessor chat`` and tests.

``ask`` publishes one ``chat.request`` and follows its events on the Redis Stream
until ``done``; ``cancel`` asks the workers to stop a job.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import orjson
import redis.asyncio as redis

from chatprocessor.events.redis_sink import read_entry
from chatprocessor.stores.redis_client import redis_client
from chatprocessor.transports.base import Outgoing, Transport


async def last_id(client: redis.Redis, stream: str) -> str:
    """The stream's newest entry id ("0-0" when empty): events after it are ours."""
    entries = await client.xrevrange(stream, count=1)
    if not entries:
        return "0-0"
    entry_id = entries[0][0]
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


async def follow(
    client: redis.Redis,
    stream: str,
    job_id: str,
    *,
    after: str = "0-0",
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """The job's events in stream order, from ``after`` until its ``done`` event."""
    events: list[dict[str, Any]] = []
    cursor = after
    job_key = job_id.encode()
    while True:
        answer: Any = await client.xread({stream: cursor}, block=1000, count=500)
        for _, entries in answer or ():
            for entry_id, fields in entries:
                cursor = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                if fields.get(b"jobId") != job_key:
                    continue
                event = read_entry(fields)
                event["streamId"] = cursor
                events.append(event)
                if on_event is not None:
                    on_event(event)
                if event.get("type") == "done":
                    return events


async def ask(
    transport: Transport,
    redis_url: str,
    *,
    topic: str,
    events_stream: str,
    message: str,
    user_id: str,
    session_id: str,
    mode: str = "gen",
    tenant_id: str | None = None,
    job_id: str | None = None,
    timeout: float = 120.0,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Send one chat.request and return its events (token..., final or error, done)."""
    job_id = job_id or uuid.uuid4().hex
    request: dict[str, Any] = {
        "jobId": job_id,
        "userId": user_id,
        "sessionId": session_id,
        "mode": mode,
        "message": message,
    }
    if tenant_id:
        request["tenantId"] = tenant_id
    client = redis_client(redis_url)
    try:
        after = await last_id(client, events_stream)  # before sending: no event is missed
        await transport.publish(topic, Outgoing(orjson.dumps(request), message_id=job_id))
        return await asyncio.wait_for(
            follow(client, events_stream, job_id, after=after, on_event=on_event), timeout
        )
    finally:
        await client.aclose()
