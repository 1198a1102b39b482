"""The stream door (seed 003) in the worker: token events, history, cancel, timeout, ownership.

The worker runs with the in-memory transport, a list as its event sink and the
SQLite history store; the Redis and Postgres versions are in tests/integration.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from chatprocessor.contracts.chat import ChatCodec
from chatprocessor.contracts.stream import StreamCodec
from chatprocessor.core.worker import Worker, WorkerConfig
from chatprocessor.events.cancel import CancelRegistry
from chatprocessor.features.conversation import Conversations
from chatprocessor.features.history import SQLiteHistoryStore
from chatprocessor.providers.base import ChatRequest, Chunk
from chatprocessor.transports.base import FORBIDDEN, REJECTED
from tests.fakes.memory import MemoryDelivery, MemoryTransport

pytestmark = pytest.mark.timeout(30)


class Talker:
    """Streams ``words`` tokens ("w0 w1 ..."), one every ``delay`` seconds; records requests."""

    name = "talker"
    default_model = "talker-1"

    def __init__(self, words: int = 5, delay: float = 0.0) -> None:
        self.words = words
        self.delay = delay
        self.requests: list[ChatRequest] = []
        self.stopped_after: int | None = None

    async def chat(self, request: ChatRequest, *, stream: bool = False) -> AsyncIterator[Chunk]:
        self.requests.append(request)
        sent = 0
        try:
            for i in range(self.words):
                if self.delay:
                    await asyncio.sleep(self.delay)
                sent += 1
                yield Chunk(f"w{i} ", model=self.default_model)
            yield Chunk("", done=True, prompt_tokens=7, completion_tokens=self.words)
        finally:
            if sent < self.words:
                self.stopped_after = sent

    async def list_models(self) -> list[str]:
        return [self.default_model]

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None


class ListSink:
    """An EventSink keeping what it was sent."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.sends = 0

    async def connect(self) -> None:
        return None

    async def send(self, events: Sequence[Mapping[str, Any]]) -> None:
        self.sends += 1
        self.events.extend(dict(e) for e in events)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None

    def of(self, job_id: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["jobId"] == job_id]


def request(
    job: str, message: str, *, user: str = "u1", session: str = "s1", **extra: Any
) -> bytes:
    return orjson.dumps(
        {"jobId": job, "userId": user, "sessionId": session, "message": message, **extra}
    )


def stream_worker(
    provider: Talker,
    *,
    events: ListSink,
    interval: float = 0.05,
    store: Any = None,
    **features: Any,
) -> Worker:
    """The stream door's worker on the in-memory transport."""
    return Worker(
        MemoryTransport(),  # type: ignore[arg-type]
        provider,
        StreamCodec(max_bytes=65536),
        WorkerConfig("chat.request", "unused", stream_flush_interval=interval),
        store,
        events=events,
        **features,
    )


@pytest.fixture
async def door(tmp_path: Path) -> AsyncIterator[tuple[Worker, Talker, ListSink]]:
    provider = Talker()
    sink = ListSink()
    history = SQLiteHistoryStore(tmp_path / "history.sqlite3", ttl=3600, max_messages=50)
    worker = stream_worker(
        provider,
        conversations=Conversations(provider, history=history, max_tokens=2048),
        events=sink,
        cancels=CancelRegistry(),
        interval=0.0,
    )
    yield worker, provider, sink
    await history.close()


async def handle(worker: Worker, body: bytes) -> MemoryDelivery:
    delivery = MemoryDelivery(body)
    await worker.handle(delivery)
    return delivery


async def test_tokens_then_final_then_done_in_order(door: tuple[Worker, Talker, ListSink]) -> None:
    worker, _, sink = door
    delivery = await handle(worker, request("j1", "hello"))
    assert delivery.kinds == ["ack"]
    events = sink.of("j1")
    assert [e["type"] for e in events] == ["token"] * 5 + ["final", "done"]
    assert [e["seq"] for e in events[:5]] == [0, 1, 2, 3, 4]
    assert "".join(e["delta"] for e in events[:5]).strip() == events[5]["text"]
    final, done = events[5], events[6]
    assert final["status"] == "completed" and done["status"] == "completed"
    assert final["completionTokens"] == 5 and final["model"] == "talker-1"
    assert final["timeToFirstTokenMs"] is not None
    assert {(e["userId"], e["sessionId"]) for e in events} == {("u1", "s1")}
    assert len({e["id"] for e in events}) == len(events)  # ids tell events apart


async def test_tokens_are_batched_by_time(tmp_path: Path) -> None:
    provider = Talker(words=200)
    sink = ListSink()
    worker = stream_worker(provider, events=sink, interval=10.0)
    await handle(worker, request("j1", "hello"))
    tokens = [e for e in sink.events if e["type"] == "token"]
    # The first piece goes at once, the rest within the interval in one batch.
    assert len(tokens) == 2
    assert "".join(e["delta"] for e in tokens).split() == [f"w{i}" for i in range(200)]


async def test_second_turn_sees_the_first(door: tuple[Worker, Talker, ListSink]) -> None:
    worker, provider, _sink = door
    await handle(worker, request("j1", "my name is Ada"))
    await handle(worker, request("j2", "what is my name?"))
    second = provider.requests[-1].messages
    assert [(m.role, m.content) for m in second] == [
        ("user", "my name is Ada"),
        ("assistant", "w0 w1 w2 w3 w4"),
        ("user", "what is my name?"),
    ]
    # Another session of the same user starts empty.
    await handle(worker, request("j3", "hi", session="s2"))
    assert [m.content for m in provider.requests[-1].messages] == ["hi"]


async def test_another_users_conversation_is_refused(
    door: tuple[Worker, Talker, ListSink], caplog: pytest.LogCaptureFixture
) -> None:
    worker, provider, sink = door
    await handle(worker, request("j1", "secret plan", user="alice"))
    calls = len(provider.requests)
    delivery = await handle(worker, request("j2", "what did we say?", user="mallory"))
    assert len(provider.requests) == calls  # no model call
    [(kind, headers)] = delivery.settlements
    assert kind == "dead_letter" and headers["x-dead-letter-reason"] == FORBIDDEN
    events = sink.of("j2")
    assert [e["type"] for e in events] == ["error", "done"]
    assert events[0]["code"] == "forbidden" and events[1]["status"] == "forbidden"
    assert events[0]["userId"] == "mallory"  # only the requester hears of it
    assert "secret plan" not in orjson.dumps(events).decode()
    assert any(
        r.name == "chatprocessor.audit" and "mallory" in r.getMessage() for r in caplog.records
    )


async def test_cancel_stops_generation_and_keeps_the_partial_text(tmp_path: Path) -> None:
    provider = Talker(words=1000, delay=0.01)
    sink = ListSink()
    cancels = CancelRegistry()
    worker = stream_worker(provider, events=sink, cancels=cancels, interval=0.0)
    job = asyncio.create_task(handle(worker, request("j1", "talk")))
    while len(sink.of("j1")) < 3:
        await asyncio.sleep(0.005)
    assert not cancels.request("j1", "someone-else")  # only the owner may cancel
    asked = asyncio.get_running_loop().time()
    assert cancels.request("j1", "u1")
    delivery = await job
    took = asyncio.get_running_loop().time() - asked
    assert took < 0.5
    assert delivery.kinds == ["ack"]
    events = sink.of("j1")
    final, done = events[-2], events[-1]
    assert final["status"] == done["status"] == "cancelled"
    assert final["text"] and len(final["text"].split()) < 1000
    assert provider.stopped_after is not None and provider.stopped_after < 1000
    streamed = "".join(e["delta"] for e in events if e["type"] == "token")
    assert streamed.strip() == final["text"]  # every generated piece was sent


async def test_cancel_before_the_job_starts_applies_when_it_does(tmp_path: Path) -> None:
    provider = Talker(words=50, delay=0.01)
    sink = ListSink()
    cancels = CancelRegistry()
    worker = stream_worker(provider, events=sink, cancels=cancels)
    cancels.request("j1", "u1")
    await handle(worker, request("j1", "talk"))
    assert sink.of("j1")[-1]["status"] == "cancelled"
    assert provider.requests == [] or provider.stopped_after == 0


async def test_per_job_timeout_keeps_the_partial_text(tmp_path: Path) -> None:
    provider = Talker(words=1000, delay=0.01)
    sink = ListSink()
    worker = stream_worker(provider, events=sink, interval=0.0)
    delivery = await handle(worker, request("j1", "talk", timeoutSeconds=0.3))
    assert delivery.kinds == ["ack"]  # a timed-out stream is answered, not retried
    final, done = sink.of("j1")[-2:]
    assert final["status"] == done["status"] == "timeout"
    assert 0 < len(final["text"].split()) < 1000


async def test_malformed_request_gets_error_and_done_when_ids_are_readable(
    door: tuple[Worker, Talker, ListSink],
) -> None:
    worker, provider, sink = door
    delivery = await handle(worker, orjson.dumps({"jobId": "j9", "userId": "u1", "mode": "x"}))
    [(kind, headers)] = delivery.settlements
    assert kind == "dead_letter" and headers["x-dead-letter-reason"] == REJECTED
    error, done = sink.of("j9")
    assert error["type"] == "error" and "message" in error["error"]  # the reason, for the user
    assert done["type"] == "done" and done["status"] == REJECTED
    assert provider.requests == []
    # Without a jobId there is nobody to tell: dead-lettered, no event.
    before = len(sink.events)
    await handle(worker, b"not json")
    assert len(sink.events) == before


async def test_redelivered_job_resends_its_events_without_a_model_call(tmp_path: Path) -> None:
    from chatprocessor.stores.replies import SQLiteReplyStore

    provider = Talker()
    sink = ListSink()
    store = SQLiteReplyStore(tmp_path / "replies.sqlite3", 3600)
    worker = stream_worker(provider, store=store, events=sink)
    body = request("j1", "hello")
    await handle(worker, body)
    first_close = sink.of("j1")[-2:]
    await handle(worker, body)
    assert len(provider.requests) == 1
    assert sink.of("j1")[-2:] == first_close  # same final and done, same ids
    await store.close()


async def test_seed_000_door_keeps_history_when_enabled(tmp_path: Path) -> None:
    from chatprocessor.app import build_worker
    from chatprocessor.settings import Settings

    off = build_worker(Settings(data_dir=tmp_path, providers=["mock"]))
    assert off.conversations is None  # seed 000's door answers each prompt on its own
    on = build_worker(Settings(data_dir=tmp_path, providers=["mock"], history_enabled=True))
    assert on.conversations is not None and on.conversations.history is not None
    provider = Talker()
    worker = Worker(
        MemoryTransport(),  # type: ignore[arg-type]
        provider,
        ChatCodec(max_bytes=65536),
        WorkerConfig("UserPromptReceived", "BotResponseCreated"),
        conversations=Conversations(provider, history=on.conversations.history),
    )
    for text in ("I am Ada", "who am I?"):
        body = orjson.dumps({"conversation_id": 7, "user_id": 1, "message": text})
        assert (await handle(worker, body)).kinds == ["ack"]
    assert [m.content for m in provider.requests[-1].messages] == [
        "I am Ada",
        "w0 w1 w2 w3 w4",
        "who am I?",
    ]
    await on.conversations.close()


@pytest.mark.parametrize("transport", ["kafka", "rabbitmq", "redis", "local"])
def test_stream_door_on_every_transport_reads_chat_request(transport: str, tmp_path: Path) -> None:
    from chatprocessor.app import build_worker
    from chatprocessor.settings import Settings

    settings = Settings(
        transport=transport,
        contract="stream",
        redis_url="redis://127.0.0.1:6379/15",
        data_dir=tmp_path,
        providers=["mock"],
    )
    worker = build_worker(settings)
    assert worker.config.input_queue == "chat.request"
    assert isinstance(worker.codec, StreamCodec)
    assert worker.events is not None and worker.cancels is not None
    assert worker.job_metrics is not None and worker.conversations is not None


def test_stream_door_without_redis_stops_startup_naming_the_setting(tmp_path: Path) -> None:
    from chatprocessor.core.errors import ConfigError
    from chatprocessor.settings import Settings

    with pytest.raises(ConfigError, match="REDIS_URL"):
        Settings.load(contract="stream", data_dir=tmp_path)
    with pytest.raises(ConfigError, match="TRANSPORT=redis needs REDIS_URL"):
        Settings.load(transport="redis", data_dir=tmp_path)


async def test_rejected_and_internal_errors_are_recorded_with_a_known_status(
    tmp_path: Path,
) -> None:
    from chatprocessor.stores.database import create_engine
    from chatprocessor.stores.job_metrics import JobMetrics

    metrics = JobMetrics(create_engine(f"sqlite+aiosqlite:///{tmp_path / 'jobs.db'}"))
    await metrics.start()
    sink = ListSink()

    class Broken(Talker):
        async def chat(self, request: ChatRequest, *, stream: bool = False) -> AsyncIterator[Chunk]:
            raise RuntimeError("a bug")
            yield Chunk("")  # pragma: no cover - makes this an async generator

    for provider in (Talker(), Broken()):
        worker = stream_worker(provider, events=sink, job_metrics=metrics)
        bad = orjson.dumps({"jobId": f"bad-{provider.name}-{id(provider)}", "userId": "u1"})
        delivery = await handle(worker, bad)
        assert [kind for kind, _ in delivery.settlements] == ["dead_letter"]
    broken = await handle(worker, request("j-bug", "hello"))
    [(kind, headers)] = broken.settlements
    assert kind == "dead_letter" and headers["x-dead-letter-reason"] == "internal_error"
    await metrics.flush()
    rows = {job: await metrics.get(job) for job in {e["jobId"] for e in sink.events}}
    statuses = sorted(row["status"] for row in rows.values() if row is not None)
    assert statuses == ["failed", "rejected", "rejected"]
    # Each job closed once: one error and one done, never a second error reply.
    for job in rows:
        assert [e["type"] for e in sink.of(job)] == ["error", "done"]
    await metrics.close()
