"""A minimal SSE relay: what a gateway does with chatprocessor's stream events.

``GET /jobs/{job_id}/events`` streams one job's events from the Redis Stream the worker
writes (``sse:chat:events``) as Server-Sent Events, and ends after its ``done`` event.
Only entries with that jobId *and* the caller's userId are relayed. Resume: the browser
sends ``Last-Event-ID`` after a reconnect (or pass ``?from=<stream id>``); without either
the relay reads from the start of the stream ("0-0"), which the worker keeps short with
MAXLEN. Run it with ``REDIS_URL=redis://127.0.0.1:6379/0 uvicorn examples.sse_relay:app``.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import AsyncIterator

import redis.asyncio as redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

KEEP_ALIVE = 15.0  # seconds without an event before a comment line keeps proxies open
STREAM_ID = re.compile(r"\d+(-\d+)?")


def create_app(redis_url: str, stream: str = "sse:chat:events") -> Starlette:
    client = redis.Redis.from_url(redis_url)  # one connection pool for every request

    async def relay(job_id: str, user_id: str, last_id: str) -> AsyncIterator[str]:
        job, user, quiet_since = job_id.encode(), user_id.encode(), time.monotonic()
        while True:
            reply = await client.xread({stream: last_id}, count=100, block=1000)
            for entry_id, fields in reply[0][1] if reply else ():
                last_id = entry_id.decode()
                if fields.get(b"jobId") != job or fields.get(b"userId") != user:
                    continue  # another job, or someone else's: never relayed
                kind = fields[b"type"].decode()
                yield f"id: {last_id}\nevent: {kind}\ndata: {fields[b'data'].decode()}\n\n"
                quiet_since = time.monotonic()
                if kind == "done":
                    return
            if time.monotonic() - quiet_since >= KEEP_ALIVE:
                yield ": keep-alive\n\n"
                quiet_since = time.monotonic()

    async def job_events(request: Request) -> Response:
        # A real gateway takes the user from its authentication (a verified token), never
        # from a header the client chooses; the header keeps this example short.
        user_id = request.headers.get("x-user-id")
        if not user_id:
            return PlainTextResponse("X-User-Id required", status_code=401)
        start = request.headers.get("last-event-id") or request.query_params.get("from", "0-0")
        if not STREAM_ID.fullmatch(start):
            return PlainTextResponse("bad Last-Event-ID", status_code=400)
        events = relay(request.path_params["job_id"], user_id, start)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    return Starlette(routes=[Route("/jobs/{job_id}/events", job_events)], lifespan=lifespan)


app = create_app(
    os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
    os.environ.get("EVENTS_STREAM", "sse:chat:events"),
)
