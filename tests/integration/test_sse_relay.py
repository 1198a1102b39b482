"""examples/sse_relay.py: one job's events, only to its owner, in order, resumable."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as redis
import uvicorn

from chatprocessor.events import RedisStreamSink
from examples import sse_relay
from examples.sse_relay import create_app
from tests.conftest import REDIS_URL

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


class _Server(uvicorn.Server):
    """uvicorn without signal handling: the test process keeps its Ctrl-C."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@pytest.fixture
async def stream() -> AsyncIterator[str]:
    name = f"test:sse:{uuid.uuid4().hex}"
    yield name
    client = redis.Redis.from_url(REDIS_URL)
    await client.delete(name)
    await client.aclose()


@pytest.fixture
async def relay(stream: str) -> AsyncIterator[str]:
    """The example app served by uvicorn on an ephemeral port in this event loop."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        create_app(REDIS_URL, stream),
        http="h11",
        ws="none",
        lifespan="on",
        log_config=None,
        log_level="warning",
        timeout_graceful_shutdown=1,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    deadline = time.monotonic() + 10
    while not server.started:
        assert not task.done() and time.monotonic() < deadline, "relay did not start"
        await asyncio.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    await asyncio.wait_for(task, 10)
    sock.close()


def event(kind: str, job: str, user: str, seq: int, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "jobId": job, "userId": user, "sessionId": "s", "seq": seq, **fields}


def conversation(job: str, user: str, words: list[str]) -> list[dict[str, Any]]:
    tokens = [event("token", job, user, n, delta=word) for n, word in enumerate(words)]
    final = event("final", job, user, len(words), text="".join(words), status="completed")
    return [*tokens, final, event("done", job, user, len(words) + 1, status="completed")]


async def read_sse(
    base: str, job: str, user: str, *, timeout: float = 10, **headers: str
) -> list[dict[str, str]]:
    """The SSE messages (id, event, data) until the server ends the stream or ``timeout``."""
    messages: list[dict[str, str]] = []
    current: dict[str, str] = {}
    with contextlib.suppress(TimeoutError):
        async with (
            asyncio.timeout(timeout),
            httpx.AsyncClient(base_url=base, timeout=None) as http,
            http.stream(
                "GET", f"/jobs/{job}/events", headers={"X-User-Id": user, **headers}
            ) as response,
        ):
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            async for line in response.aiter_lines():
                if not line:
                    if current:
                        messages.append(current)
                    current = {}
                elif not line.startswith(":"):
                    field, _, value = line.partition(": ")
                    current[field] = value
    return messages


async def test_the_owner_gets_exactly_the_jobs_events_in_order(relay: str, stream: str) -> None:
    sink = RedisStreamSink(REDIS_URL, stream=stream)
    alice = conversation("job-a", "alice", ["Hel", "lo", " Ada"])
    bob = conversation("job-b", "bob", ["Hi", " Bob", "!", "?"])
    intruder = event("token", "job-a", "mallory", 99, delta="injected")  # right job, wrong user
    try:
        # Interleaved, the way two workers' batches land in the shared stream.
        for n in range(max(len(alice), len(bob))):
            await sink.send([*alice[n : n + 1], *bob[n : n + 1]])
            if n == 1:
                await sink.send([intruder])
    finally:
        await sink.close()

    got = await read_sse(relay, "job-a", "alice")

    assert [orjson.loads(m["data"]) for m in got] == alice
    assert [m["event"] for m in got] == ["token", "token", "token", "final", "done"]
    ids = [m["id"] for m in got]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    assert len(set(ids)) == len(ids)


async def test_last_event_id_resumes_after_it(relay: str, stream: str) -> None:
    sink = RedisStreamSink(REDIS_URL, stream=stream)
    events = conversation("job-r", "alice", ["a", "b", "c", "d"])
    try:
        await sink.send(events)
    finally:
        await sink.close()
    first = await read_sse(relay, "job-r", "alice")

    resumed = await read_sse(relay, "job-r", "alice", **{"Last-Event-ID": first[1]["id"]})

    assert resumed == first[2:]
    assert [orjson.loads(m["data"])["seq"] for m in resumed] == [2, 3, 4, 5]


async def test_events_written_while_connected_are_streamed_live(relay: str, stream: str) -> None:
    events = conversation("job-l", "alice", ["x", "y"])
    reader = asyncio.create_task(read_sse(relay, "job-l", "alice"))
    await asyncio.sleep(0.3)  # the relay is now blocked in XREAD
    sink = RedisStreamSink(REDIS_URL, stream=stream)
    try:
        for one in events:
            await sink.send([one])
    finally:
        await sink.close()

    got = await asyncio.wait_for(reader, 10)
    assert [orjson.loads(m["data"]) for m in got] == events


async def test_another_user_gets_nothing_of_the_job(relay: str, stream: str) -> None:
    sink = RedisStreamSink(REDIS_URL, stream=stream)
    try:
        await sink.send(conversation("job-s", "alice", ["secret"]))
    finally:
        await sink.close()

    got = await read_sse(relay, "job-s", "mallory", timeout=0.5)

    assert got == []  # the stream stays open (no done for mallory) and silent


async def test_requests_without_a_user_or_with_a_bad_resume_id_are_refused(relay: str) -> None:
    async with httpx.AsyncClient(base_url=relay) as http:
        anonymous = await http.get("/jobs/job-1/events")
        bad_id = await http.get(
            "/jobs/job-1/events", headers={"X-User-Id": "alice", "Last-Event-ID": "$"}
        )

    assert anonymous.status_code == 401
    assert bad_id.status_code == 400


async def test_a_quiet_stream_gets_keep_alive_comments(
    relay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sse_relay, "KEEP_ALIVE", 0.2)
    lines: list[str] = []
    with contextlib.suppress(TimeoutError):
        async with (
            asyncio.timeout(2.5),
            httpx.AsyncClient(base_url=relay, timeout=None) as http,
            http.stream("GET", "/jobs/none/events", headers={"X-User-Id": "alice"}) as response,
        ):
            async for line in response.aiter_lines():
                lines.append(line)

    assert ": keep-alive" in lines
    assert not any(line.startswith("data:") for line in lines)
