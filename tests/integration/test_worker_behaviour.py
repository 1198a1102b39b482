"""Worker behaviour written once and run against every transport: local SQLite, RabbitMQ,
Redis Streams, Kafka.

Every test drives a real Worker with the fake Ollama as provider; the RabbitMQ and
Redis variants talk to the real services on this machine. No Kafka broker can be installed
on these machines: the Kafka variant runs KafkaTransport against the in-memory
cluster of tests/fakes/kafka.py, which keeps aiokafka's calls.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY

from chatprocessor.contracts.chat import ChatCodec, reply_message_id
from chatprocessor.core.retry import RetryPolicy, tier_name
from chatprocessor.core.worker import CHUNK_TYPE, REPLY_TYPE, Worker, WorkerConfig
from chatprocessor.providers.mock import MockProvider
from chatprocessor.providers.ollama import OllamaProvider
from chatprocessor.stores.replies import SQLiteReplyStore
from chatprocessor.transports.base import DeadLetter, Delivery, Outgoing, Transport
from chatprocessor.transports.kafka import KafkaTransport
from chatprocessor.transports.local import LocalTransport
from chatprocessor.transports.rabbitmq import RabbitMQTransport
from chatprocessor.transports.redis_streams import RedisStreamsTransport, delayed_name
from tests.conftest import RABBITMQ_URL, REDIS_URL
from tests.fakes.kafka import FakeKafka
from tests.fakes.ollama import FakeOllama


def chat_calls(fake: FakeOllama) -> list[dict[str, Any]]:
    return [r for r in fake.requests if r["path"] == "/api/chat"]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


SEED_PROMPT = {
    "conversation_id": 123,
    "message": "What is the capital of France?",
    "user_id": 456,
    "timestamp": "2025-12-16T10:30:00Z",
}


@dataclass
class Env:
    """A running worker plus a second transport playing the chat platform."""

    worker: Worker
    client: Transport
    input_queue: str
    output_queue: str
    fake: FakeOllama
    stop: asyncio.Event
    task: asyncio.Task[None]

    async def publish(self, body: bytes | dict[str, Any], **props: Any) -> None:
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        await self.client.publish(self.input_queue, Outgoing(raw, **props))

    async def replies(
        self, queue: str | None = None, n: int = 1, timeout: float = 10
    ) -> list[Delivery]:
        got: list[Delivery] = []

        async def collect() -> None:
            # Closed when done: a Kafka consumer leaves its group then, for the next one.
            stream = self.client.consume(queue or self.output_queue, prefetch=10)
            async with contextlib.aclosing(stream):  # type: ignore[type-var]
                async for delivery in stream:
                    await delivery.ack()
                    got.append(delivery)
                    if len(got) >= n:
                        return

        await asyncio.wait_for(collect(), timeout)
        return got

    async def no_dead_letters(self) -> None:
        admin: Any = self.client
        assert await admin.list_dead_letters(self.input_queue, 10) == []

    async def no_more_replies(self, wait: float = 0.5) -> None:
        with pytest.raises(TimeoutError):
            await self.replies(timeout=wait)

    async def dead_letters(self, n: int, timeout: float = 10) -> list[DeadLetter]:
        """Wait until ``n`` dead letters are parked (they stay there), oldest first."""
        admin: Any = self.client
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            letters: list[DeadLetter] = await admin.list_dead_letters(self.input_queue, 100)
            if len(letters) >= n or asyncio.get_running_loop().time() > deadline:
                assert len(letters) == n, [letter.error for letter in letters]
                return letters
            await asyncio.sleep(0.05)


def make_transport(kind: str, tmp_path: Path, cluster: FakeKafka, group: str) -> Transport:
    if kind == "local":
        return LocalTransport(tmp_path / "queue.sqlite3", visibility_timeout=2)
    if kind == "kafka":
        return KafkaTransport(cluster.clients(), group_id=group)
    if kind == "redis":
        return RedisStreamsTransport(REDIS_URL, group=group, claim_idle=5)
    return RabbitMQTransport(RABBITMQ_URL, retry_tiers=RETRY_TIERS)


RETRY_TIERS = [0.05, 0.1]


@pytest.fixture(
    params=[
        "local",
        pytest.param("rabbitmq", marks=pytest.mark.rabbitmq),
        pytest.param("redis", marks=pytest.mark.redis),
        "kafka",
    ]
)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def start_env(
    kind: str, tmp_path: Path, queue_names: tuple[str, str], fake_ollama: FakeOllama
) -> AsyncIterator[Callable[..., Any]]:
    """An async factory of running workers; everything it starts is stopped after the test."""
    started: list[Env] = []
    cluster = FakeKafka()

    async def factory(**config: Any) -> Env:
        input_queue, output_queue = queue_names
        naming = config.pop("naming", "snake")
        provider = config.pop("provider", None) or OllamaProvider(
            fake_ollama.url, model="llama2", timeout=5, connect_timeout=1
        )
        store = config.pop("store", None)
        # Fast retries: 0.05 s, 0.1 s; then the dead-letter queue.
        config.setdefault("retry", RetryPolicy(max_retries=2, base=0.05, cap=0.1))
        worker = Worker(
            make_transport(kind, tmp_path, cluster, "chatprocessor"),
            provider,
            ChatCodec(max_bytes=config.pop("max_bytes", 65536), naming=naming),
            WorkerConfig(input_queue=input_queue, output_queue=output_queue, **config),
            store=store,
        )
        await worker.start()
        client = make_transport(kind, tmp_path, cluster, "platform")
        await client.connect()
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        env = Env(worker, client, input_queue, output_queue, fake_ollama, stop, task)
        started.append(env)
        return env

    yield factory
    for env in started:
        env.stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(env.task, 10)
        await env.worker.transport.close()
        await env.worker.provider.close()
        if isinstance(env.client, RabbitMQTransport):
            channel = await env.client.connection.channel()
            derived = [f"{env.input_queue}.dlq"]
            derived += [tier_name(env.input_queue, tier) for tier in RETRY_TIERS]
            for queue in (env.input_queue, env.output_queue, *derived):
                with contextlib.suppress(Exception):
                    await channel.queue_delete(queue)
        if isinstance(env.client, RedisStreamsTransport):
            with contextlib.suppress(Exception):
                await env.client.client.delete(
                    env.input_queue,
                    env.output_queue,
                    f"{env.input_queue}.dlq",
                    delayed_name(env.input_queue),
                )
        await env.client.close()


async def test_seed_prompt_gets_seed_reply(start_env: Callable[..., Any]) -> None:
    env: Env = await start_env()
    await env.publish(SEED_PROMPT, message_id="req-1")
    [reply] = await env.replies()
    data = orjson.loads(reply.body)
    assert data["conversation_id"] == 123
    assert data["message"] == "Echo: What is the capital of France?"
    assert data["user_id"] == 0
    assert data["model_used"] == "llama2"
    assert data["timestamp"].endswith("Z") and len(data["timestamp"]) == 20
    assert data["prompt_tokens"] == 6 and data["completion_tokens"] == 7
    assert isinstance(data["latency_ms"], int)
    assert "error" not in data
    assert reply.type == REPLY_TYPE
    assert reply.message_id == reply_message_id("req-1")
    assert reply.correlation_id == "req-1"
    sent = env.fake.requests[-1]["body"]
    assert sent["messages"] == [{"role": "user", "content": SEED_PROMPT["message"]}]


async def test_dotnet_names_in_and_pascal_case_out(start_env: Callable[..., Any]) -> None:
    env: Env = await start_env(naming="pascal")
    await env.publish(
        {
            "ConversationId": 9,
            "Message": "hi there",
            "UserId": 1,
            "Timestamp": "2025-12-16T10:30:00Z",
        }
    )
    [reply] = await env.replies()
    data = orjson.loads(reply.body)
    assert data["ConversationId"] == 9
    assert data["Message"] == "Echo: hi there"
    assert data["ModelUsed"] == "llama2"


async def test_reply_goes_to_reply_to_with_correlation(start_env: Callable[..., Any]) -> None:
    env: Env = await start_env()
    private = await env.client.open_reply_queue()
    try:
        await env.publish(
            SEED_PROMPT, reply_to=private.name, correlation_id="corr-7", message_id="m-7"
        )

        async def first() -> Delivery:
            async for delivery in private.messages():
                return delivery
            raise AssertionError("reply queue closed")

        reply = await asyncio.wait_for(first(), 10)
    finally:
        await private.close()
    assert reply.correlation_id == "corr-7"
    assert orjson.loads(reply.body)["conversation_id"] == 123


async def test_options_model_and_system_prompt_reach_ollama(start_env: Callable[..., Any]) -> None:
    env: Env = await start_env(system_prompt="default system")
    env.fake.add_model("mistral")
    await env.publish(
        {
            **SEED_PROMPT,
            "model": "mistral",
            "system_prompt": "Be brief.",
            "options": {"temperature": 0.2, "max_tokens": 3},
        }
    )
    [reply] = await env.replies()
    data = orjson.loads(reply.body)
    assert data["model_used"].startswith("mistral")
    assert data["completion_tokens"] == 3
    sent = env.fake.requests[-1]["body"]
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    assert sent["options"] == {"temperature": 0.2, "num_predict": 3}


async def test_malformed_messages_are_dead_lettered_and_worker_goes_on(
    start_env: Callable[..., Any], kind: str
) -> None:
    env: Env = await start_env()
    await env.publish(b"{not json")
    await env.publish({"conversation_id": 5})  # no message: schema error, id readable
    await env.publish(b"x" * 70000)  # over max_bytes
    await env.publish(SEED_PROMPT)
    replies = await env.replies(n=2)
    bodies = [orjson.loads(r.body) for r in replies]
    assert bodies[0]["conversation_id"] == 5 and "message" in bodies[0]["error"]
    assert bodies[0]["message"] == ""
    assert bodies[1]["conversation_id"] == 123 and "error" not in bodies[1]
    dead = await env.dead_letters(n=3)
    errors = [letter.error for letter in dead]
    assert "not valid JSON" in errors[0]
    assert "UserPromptReceived" in errors[1]
    assert "MAX_MESSAGE_BYTES" in errors[2]
    assert [letter.reason for letter in dead] == ["rejected"] * 3
    assert dead[2].body == b"x" * 70000  # unchanged


async def test_transient_failures_are_retried_then_answered(start_env: Callable[..., Any]) -> None:
    env: Env = await start_env()
    retries = metric("chatprocessor_retries_total", error="ProviderUnavailable")
    env.fake.fail_next(2, status=500)  # MAX_RETRIES=2: the third attempt succeeds
    await env.publish(SEED_PROMPT, message_id="flaky-1")
    [reply] = await env.replies()
    data = orjson.loads(reply.body)
    assert data["message"] == "Echo: What is the capital of France?"
    assert "error" not in data
    assert reply.message_id == reply_message_id("flaky-1")
    assert len(chat_calls(env.fake)) == 3
    assert metric("chatprocessor_retries_total", error="ProviderUnavailable") == retries + 2
    await env.no_dead_letters()


async def test_a_provider_that_never_recovers_ends_in_the_dlq_with_one_error_reply(
    start_env: Callable[..., Any],
) -> None:
    env: Env = await start_env()
    env.fake.fail_next(100, status=503)
    await env.publish(SEED_PROMPT, message_id="doomed-1")
    [reply] = await env.replies()
    data = orjson.loads(reply.body)
    assert data["conversation_id"] == 123 and data["message"] == ""
    assert "HTTP 503" in data["error"]
    [dead] = await env.dead_letters(n=1)
    assert dead.reason == "retries_exhausted"
    assert dead.attempts == 3  # the first try and MAX_RETRIES=2 retries
    assert "HTTP 503" in dead.error
    assert dead.message_id == "doomed-1"
    assert orjson.loads(dead.body) == SEED_PROMPT  # unchanged
    assert dead.headers["x-original-queue"] == env.input_queue
    assert len(chat_calls(env.fake)) == 3
    await env.no_more_replies()


async def test_a_permanent_provider_error_is_dead_lettered_at_once(
    start_env: Callable[..., Any],
) -> None:
    env: Env = await start_env()
    await env.publish({**SEED_PROMPT, "model": "no-such-model"}, message_id="bad-model")
    [reply] = await env.replies()
    assert "not found" in orjson.loads(reply.body)["error"]
    [dead] = await env.dead_letters(n=1)
    assert dead.reason == "failed" and dead.attempts == 1
    assert len(chat_calls(env.fake)) == 1


async def test_retry_after_is_honoured(start_env: Callable[..., Any]) -> None:
    env: Env = await start_env()
    env.fake.retry_after = 0.6
    env.fake.fail_next(1, status=429)
    started = asyncio.get_running_loop().time()
    await env.publish(SEED_PROMPT)
    [reply] = await env.replies()
    assert "error" not in orjson.loads(reply.body)
    # The backoff alone is 0.05 s; the provider asked for 0.6 s.
    assert asyncio.get_running_loop().time() - started >= 0.6


async def test_job_timeout_ends_a_hung_attempt_and_the_retry_answers(
    start_env: Callable[..., Any],
) -> None:
    env: Env = await start_env(job_timeout=0.5)
    env.fake.hang_next(1)
    await env.publish(SEED_PROMPT)
    [reply] = await env.replies()
    assert orjson.loads(reply.body)["message"].startswith("Echo:")
    assert len(chat_calls(env.fake)) == 2


async def test_a_redelivered_answered_job_gets_the_stored_reply_without_the_llm(
    start_env: Callable[..., Any], tmp_path: Path
) -> None:
    env: Env = await start_env(store=SQLiteReplyStore(tmp_path / "replies.sqlite3", 60))
    duplicates = metric("chatprocessor_duplicates_total")
    await env.publish(SEED_PROMPT, message_id="twice-1")
    [first] = await env.replies()
    # The platform (or a redelivery after a crash before the ack) sends it again.
    await env.publish(SEED_PROMPT, message_id="twice-1")
    [second] = await env.replies()
    assert second.message_id == first.message_id == reply_message_id("twice-1")
    assert second.body == first.body
    assert len(chat_calls(env.fake)) == 1
    assert metric("chatprocessor_duplicates_total") == duplicates + 1


async def test_replayed_dead_letters_are_answered(start_env: Callable[..., Any]) -> None:
    env: Env = await start_env()
    env.fake.fail_next(3, status=500)
    await env.publish(SEED_PROMPT, message_id="replay-1")
    [error_reply] = await env.replies()
    assert "error" in orjson.loads(error_reply.body)
    await env.dead_letters(n=1)
    admin: Any = env.client
    assert await admin.replay_dead_letters(env.input_queue) == 1
    [reply] = await env.replies()
    assert orjson.loads(reply.body)["message"].startswith("Echo:")
    await env.no_dead_letters()


async def test_dead_letters_can_be_purged(start_env: Callable[..., Any]) -> None:
    env: Env = await start_env()
    await env.publish(b"{broken")
    await env.publish(b"{broken too")
    await env.dead_letters(n=2)
    admin: Any = env.client
    assert await admin.purge_dead_letters(env.input_queue) == 2
    await env.no_dead_letters()


async def test_a_retried_stream_starts_again_from_index_zero(
    start_env: Callable[..., Any],
) -> None:
    env: Env = await start_env(stream_flush_interval=0)
    env.fake.token_delay = 0.01
    env.fake.fail_mid_stream_next(1)
    private = await env.client.open_reply_queue()
    chunks: list[tuple[str | None, int]] = []
    try:
        await env.publish({**SEED_PROMPT, "stream": True}, reply_to=private.name)

        async def until_final() -> dict[str, Any]:
            async for delivery in private.messages():
                if delivery.type == CHUNK_TYPE:
                    chunks.append((delivery.message_id, orjson.loads(delivery.body)["index"]))
                else:
                    return dict(orjson.loads(delivery.body))
            raise AssertionError("closed")

        final = await asyncio.wait_for(until_final(), 10)
    finally:
        await private.close()
    assert final["message"] == "Echo: What is the capital of France?"
    indexes = [index for _, index in chunks]
    restart = indexes.index(0, 1)  # the second attempt starts from 0 again
    assert indexes[restart:] == list(range(len(indexes) - restart))
    ids = [message_id for message_id, _ in chunks]
    assert len(set(ids)) == len(ids)  # the attempts' chunks never share a message id


async def test_streaming_chunks_go_to_reply_to(start_env: Callable[..., Any]) -> None:
    env: Env = await start_env(stream_flush_interval=0)
    env.fake.token_delay = 0.01
    private = await env.client.open_reply_queue()
    chunks: list[str] = []
    try:
        await env.publish(
            {**SEED_PROMPT, "stream": True}, reply_to=private.name, correlation_id="s-1"
        )

        async def until_final() -> dict[str, Any]:
            async for delivery in private.messages():
                if delivery.type == CHUNK_TYPE:
                    chunks.append(orjson.loads(delivery.body)["delta"])
                else:
                    return dict(orjson.loads(delivery.body))
            raise AssertionError("closed")

        final = await asyncio.wait_for(until_final(), 10)
    finally:
        await private.close()
    assert len(chunks) == 7
    assert "".join(chunks) == "Echo: What is the capital of France?"
    assert final["message"] == "Echo: What is the capital of France?"


async def test_prefetch_jobs_run_concurrently(start_env: Callable[..., Any]) -> None:
    env: Env = await start_env(prefetch=4)
    env.fake.latency = 0.3
    for i in range(8):
        await env.publish({**SEED_PROMPT, "conversation_id": i})
    replies = await env.replies(n=8, timeout=20)
    assert sorted(orjson.loads(r.body)["conversation_id"] for r in replies) == list(range(8))
    assert env.fake.max_in_flight == 4


async def test_shutdown_finishes_in_flight_job(start_env: Callable[..., Any]) -> None:
    env: Env = await start_env(graceful_timeout=5)
    env.fake.latency = 0.5
    await env.publish(SEED_PROMPT)
    while env.fake.in_flight == 0:
        await asyncio.sleep(0.01)
    env.stop.set()
    await asyncio.wait_for(env.task, 10)
    [reply] = await env.replies()
    assert orjson.loads(reply.body)["message"].startswith("Echo:")


async def test_shutdown_returns_unfinished_job_to_queue(
    start_env: Callable[..., Any], kind: str
) -> None:
    env: Env = await start_env(graceful_timeout=0.2)
    env.fake.hang_next(1)
    await env.publish(SEED_PROMPT, message_id="slow-1")
    while env.fake.in_flight == 0:
        await asyncio.sleep(0.01)
    env.stop.set()
    await asyncio.wait_for(env.task, 10)
    # The job is back on the input queue, untouched, for the next worker.
    got: list[Delivery] = []

    async def take() -> None:
        async for delivery in env.client.consume(env.input_queue, prefetch=1):
            got.append(delivery)
            await delivery.ack()
            return

    await asyncio.wait_for(take(), 10)
    assert got[0].message_id == "slow-1"
    assert got[0].redelivered or kind == "kafka"  # Kafka cannot tell a record was read before


class ExplodingOnce(MockProvider):
    """A provider with a bug: the first call raises something that is not a ProviderError."""

    def __init__(self) -> None:
        self.calls = 0

    async def chat(self, request, *, stream=False):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("boom")
        async for chunk in super().chat(request, stream=stream):
            yield chunk


async def test_unexpected_error_settles_the_message_and_worker_goes_on(
    start_env: Callable[..., Any], kind: str
) -> None:
    env: Env = await start_env(provider=ExplodingOnce())
    await env.publish({**SEED_PROMPT, "conversation_id": 1}, message_id="bug-1")
    await env.publish({**SEED_PROMPT, "conversation_id": 2}, message_id="ok-2")
    first, second = (orjson.loads(r.body) for r in await env.replies(n=2))
    assert first["conversation_id"] == 1
    assert "internal error: RuntimeError: boom" in first["error"]
    assert second["conversation_id"] == 2 and "error" not in second
    [dead] = await env.dead_letters(n=1)
    assert dead.message_id == "bug-1"
    assert dead.reason == "internal_error"


async def test_streaming_to_a_vanished_reply_queue_is_dropped_and_worker_goes_on(
    start_env: Callable[..., Any],
) -> None:
    """`send --stream` gave up and its private queue is gone before the worker answers."""
    env: Env = await start_env(stream_flush_interval=0)
    private = await env.client.open_reply_queue()
    gone = private.name
    await private.close()
    await env.publish({**SEED_PROMPT, "stream": True}, reply_to=gone, correlation_id="g-1")
    await env.publish({**SEED_PROMPT, "conversation_id": 8})
    [reply] = await env.replies()
    assert orjson.loads(reply.body)["conversation_id"] == 8


async def test_error_replies_to_different_bad_messages_have_different_ids(
    start_env: Callable[..., Any],
) -> None:
    """Same conversation, no message ids: a consumer dropping duplicates must keep both."""
    env: Env = await start_env()
    await env.publish({"conversation_id": 4, "message": ""})
    await env.publish({"conversation_id": 4, "message": "   "})
    replies = await env.replies(n=2)
    assert all(orjson.loads(r.body)["error"] for r in replies)
    assert replies[0].message_id != replies[1].message_id
