"""What only RabbitMQ has: queues declared by others, durability flags, mandatory returns,
dead-letter exchanges, and request/reply on private queues. Checked with a raw aio-pika
client playing the chat platform, against the real broker on 127.0.0.1:5672."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import aio_pika
import aiormq
import aiormq.channel
import orjson
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from prometheus_client import REGISTRY

from chatprocessor.client import send_prompt
from chatprocessor.contracts.chat import ChatCodec, reply_message_id
from chatprocessor.core.errors import PublishFailed
from chatprocessor.core.retry import RetryPolicy
from chatprocessor.core.worker import REPLY_TYPE, Worker, WorkerConfig
from chatprocessor.providers.ollama import OllamaProvider
from chatprocessor.transports.base import Outgoing
from chatprocessor.transports.rabbitmq import RabbitMQTransport
from tests.conftest import RABBITMQ_URL
from tests.fakes.ollama import FakeOllama

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(60)]

SEED_PROMPT = {
    "conversation_id": 123,
    "message": "What is the capital of France?",
    "user_id": 456,
    "timestamp": "2025-12-16T10:30:00Z",
}
ECHO = "Echo: What is the capital of France?"
RABBIT_LOGGER = "chatprocessor.transports.rabbitmq"
WORKER_LOGGER = "chatprocessor.core.worker"


@dataclass
class Running:
    worker: Worker
    stop: asyncio.Event
    task: asyncio.Task[None]

    async def halt(self) -> None:
        """Stop consuming and close the worker's connection (unacked messages go back)."""
        self.stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.task, 10)
        await self.worker.transport.close()
        await self.worker.provider.close()


@pytest.fixture
async def channel(amqp: AbstractConnection) -> AsyncIterator[AbstractChannel]:
    ch = await amqp.channel()
    yield ch
    with contextlib.suppress(Exception):
        await ch.close()


@pytest.fixture
async def doomed(amqp: AbstractConnection) -> AsyncIterator[list[str]]:
    """Names of queues to delete after the test, whatever happened."""
    names: list[str] = []
    yield names
    ch = await amqp.channel()
    for name in names:
        with contextlib.suppress(Exception):
            await ch.queue_delete(name)
    with contextlib.suppress(Exception):
        await ch.close()


@pytest.fixture
def queues(queue_names: tuple[str, str], doomed: list[str]) -> tuple[str, str]:
    doomed.extend(queue_names)
    return queue_names


@pytest.fixture
async def start_worker(
    fake_ollama: FakeOllama, queues: tuple[str, str]
) -> AsyncIterator[Callable[..., Awaitable[Running]]]:
    started: list[Running] = []

    async def factory(**config: Any) -> Running:
        input_queue, output_queue = queues
        worker = Worker(
            RabbitMQTransport(RABBITMQ_URL),
            OllamaProvider(fake_ollama.url, model="llama2", timeout=5, connect_timeout=1),
            ChatCodec(max_bytes=65536),
            WorkerConfig(input_queue=input_queue, output_queue=output_queue, **config),
        )
        await asyncio.wait_for(worker.start(), 15)
        stop = asyncio.Event()
        running = Running(worker, stop, asyncio.create_task(worker.run(stop)))
        started.append(running)
        return running

    yield factory
    for running in started:
        await running.halt()


async def publish_raw(channel: AbstractChannel, queue: str, body: bytes, **props: Any) -> None:
    """Publish the way a plain AMQP client (the chat platform) does."""
    await channel.default_exchange.publish(
        aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **props),
        routing_key=queue,
    )


async def get_raw(
    channel: AbstractChannel, queue: str, n: int = 1, timeout: float = 10
) -> list[AbstractIncomingMessage]:
    """The next ``n`` messages of ``queue`` by basic.get (acked as they are taken)."""
    amqp_queue = await channel.get_queue(queue, ensure=True)
    got: list[AbstractIncomingMessage] = []
    async with asyncio.timeout(timeout):
        while len(got) < n:
            message = await amqp_queue.get(no_ack=True, fail=False)
            if message is None:
                await asyncio.sleep(0.05)
                continue
            got.append(message)
    return got


async def ready_count(amqp: AbstractConnection, queue: str) -> int:
    ch = await amqp.channel()
    try:
        declared = await ch.declare_queue(queue, passive=True)
        count = declared.declaration_result.message_count
        assert count is not None
        return count
    finally:
        await ch.close()


def counter(outcome: str) -> float:
    value = REGISTRY.get_sample_value("chatprocessor_messages_total", {"outcome": outcome})
    return value or 0.0


# -- (a) a queue the platform declared with other arguments ---------------------------------------


@pytest.mark.parametrize(
    "arguments", [{"x-message-ttl": 60000}, {"x-max-length": 1000}], ids=["ttl", "max-length"]
)
async def test_input_queue_declared_by_others_is_used_as_it_is(
    *,
    start_worker: Callable[..., Awaitable[Running]],
    amqp: AbstractConnection,
    channel: AbstractChannel,
    queues: tuple[str, str],
    caplog: pytest.LogCaptureFixture,
    arguments: dict[str, Any],
) -> None:
    input_queue, output_queue = queues
    await channel.declare_queue(input_queue, durable=True, arguments=arguments)
    caplog.set_level(logging.WARNING, logger=RABBIT_LOGGER)

    running = await start_worker()  # declare() must not raise

    advice = [
        r
        for r in caplog.records
        if r.name == RABBIT_LOGGER
        and r.levelno == logging.WARNING
        and "rabbitmqctl set_policy" in r.getMessage()
    ]
    assert len(advice) == 1, [r.getMessage() for r in caplog.records]
    assert input_queue in advice[0].getMessage()
    transport = running.worker.transport
    assert isinstance(transport, RabbitMQTransport)
    assert transport.existing_queues == {input_queue}

    await publish_raw(channel, input_queue, orjson.dumps(SEED_PROMPT), message_id="a-1")
    [reply] = await get_raw(channel, output_queue)
    data = orjson.loads(reply.body)
    assert data["conversation_id"] == 123
    assert data["message"] == ECHO
    assert "error" not in data

    # The queue keeps the platform's arguments: declaring it with them still succeeds.
    probe = await amqp.channel()
    await probe.declare_queue(input_queue, durable=True, arguments=arguments)
    await probe.close()


async def test_retries_and_dead_letters_work_on_a_platform_declared_queue(
    *,
    start_worker: Callable[..., Awaitable[Running]],
    channel: AbstractChannel,
    queues: tuple[str, str],
    fake_ollama: FakeOllama,
) -> None:
    """The worker's own delay and dead-letter queues need nothing from the input's arguments."""
    input_queue, output_queue = queues
    await channel.declare_queue(input_queue, durable=True, arguments={"x-max-length": 1000})
    await start_worker(retry=RetryPolicy(max_retries=1, base=0.05, cap=0.05))
    fake_ollama.fail_next(1, status=500)  # first job: one failure, then answered
    await publish_raw(channel, input_queue, orjson.dumps(SEED_PROMPT), message_id="r-1")
    [reply] = await get_raw(channel, output_queue)
    assert orjson.loads(reply.body)["message"] == ECHO

    fake_ollama.fail_next(2, status=500)  # second job: fails both attempts
    doomed = {**SEED_PROMPT, "conversation_id": 124}
    await publish_raw(channel, input_queue, orjson.dumps(doomed), message_id="r-2")
    [error_reply] = await get_raw(channel, output_queue)
    assert orjson.loads(error_reply.body)["conversation_id"] == 124
    assert "HTTP 500" in orjson.loads(error_reply.body)["error"]
    [dead] = await get_raw(channel, f"{input_queue}.dlq")
    assert dead.message_id == "r-2"
    assert dead.headers["x-dead-letter-reason"] == "retries_exhausted"
    assert dead.headers["x-attempts"] == 2


async def test_queues_declared_as_expected_log_no_advice(
    start_worker: Callable[..., Awaitable[Running]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=RABBIT_LOGGER)
    running = await start_worker()
    assert not [r for r in caplog.records if "set_policy" in r.getMessage()]
    transport = running.worker.transport
    assert isinstance(transport, RabbitMQTransport)
    assert transport.existing_queues == set()


# -- (b) durability -------------------------------------------------------------------------------


async def test_queues_durable_and_replies_persistent_json(
    start_worker: Callable[..., Awaitable[Running]],
    amqp: AbstractConnection,
    channel: AbstractChannel,
    queues: tuple[str, str],
) -> None:
    input_queue, output_queue = queues
    await start_worker()
    for queue in (input_queue, output_queue):
        probe = await amqp.channel()
        await probe.declare_queue(queue, durable=True)  # same flags: accepted
        await probe.close()
        probe = await amqp.channel()
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
            await probe.declare_queue(queue, durable=False)  # it is durable

    await publish_raw(channel, input_queue, orjson.dumps(SEED_PROMPT), message_id="b-1")
    got: list[AbstractIncomingMessage] = []
    done = asyncio.Event()

    async def on_message(message: AbstractIncomingMessage) -> None:
        got.append(message)
        await message.ack()
        done.set()

    amqp_queue = await channel.get_queue(output_queue, ensure=True)
    tag = await amqp_queue.consume(on_message)
    try:
        await asyncio.wait_for(done.wait(), 10)
    finally:
        await amqp_queue.cancel(tag)
    [reply] = got
    assert reply.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert int(reply.delivery_mode) == 2
    assert reply.content_type == "application/json"
    assert reply.type == REPLY_TYPE
    assert reply.message_id == reply_message_id("b-1")
    assert reply.correlation_id == "b-1"
    assert orjson.loads(reply.body)["message"] == ECHO


# -- (c) the requester vanished -------------------------------------------------------------------


async def publish_to_missing_reply_queue(channel: AbstractChannel, input_queue: str) -> None:
    missing = f"test.gone.{uuid.uuid4().hex}"
    await publish_raw(
        channel,
        input_queue,
        orjson.dumps({**SEED_PROMPT, "conversation_id": 1}),
        message_id="c-1",
        reply_to=missing,
        correlation_id="c-1",
    )
    await publish_raw(
        channel, input_queue, orjson.dumps({**SEED_PROMPT, "conversation_id": 2}), message_id="c-2"
    )


async def test_reply_to_a_missing_queue_acks_the_input_and_goes_on(
    start_worker: Callable[..., Awaitable[Running]],
    amqp: AbstractConnection,
    channel: AbstractChannel,
    queues: tuple[str, str],
) -> None:
    input_queue, output_queue = queues
    running = await start_worker()
    await publish_to_missing_reply_queue(channel, input_queue)
    # The worker goes on: the next message is answered on the output queue.
    [reply] = await get_raw(channel, output_queue)
    assert orjson.loads(reply.body)["conversation_id"] == 2
    # Acked, not merely unacked: once the worker's connection is gone nothing comes back.
    await running.halt()
    await asyncio.sleep(0.3)
    assert await ready_count(amqp, input_queue) == 0
    assert await ready_count(amqp, output_queue) == 0  # the lost reply went nowhere else


async def test_reply_to_a_missing_queue_is_logged_as_requester_gone(
    start_worker: Callable[..., Awaitable[Running]],
    channel: AbstractChannel,
    queues: tuple[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    input_queue, output_queue = queues
    caplog.set_level(logging.INFO, logger=WORKER_LOGGER)
    gone_before = counter("requester_gone")
    await start_worker()
    await publish_to_missing_reply_queue(channel, input_queue)
    [reply] = await get_raw(channel, output_queue)
    assert orjson.loads(reply.body)["conversation_id"] == 2
    gone = [r for r in caplog.records if "requester is gone" in r.getMessage()]
    assert len(gone) == 1
    assert gone[0].levelno == logging.WARNING
    assert counter("requester_gone") == gone_before + 1


async def test_publish_to_a_missing_queue_raises_publish_failed() -> None:
    transport = RabbitMQTransport(RABBITMQ_URL)
    await asyncio.wait_for(transport.connect(attempts=3), 15)
    try:
        with pytest.raises(PublishFailed):
            await asyncio.wait_for(
                transport.publish(f"test.gone.{uuid.uuid4().hex}", Outgoing(b"{}")), 10
            )
    finally:
        await transport.close()


async def test_deleted_output_queue_is_declared_again_and_gets_the_reply(
    start_worker: Callable[..., Awaitable[Running]],
    amqp: AbstractConnection,
    channel: AbstractChannel,
    queues: tuple[str, str],
) -> None:
    input_queue, output_queue = queues
    await start_worker()
    await channel.queue_delete(output_queue)
    await publish_raw(channel, input_queue, orjson.dumps(SEED_PROMPT), message_id="c-3")

    async with asyncio.timeout(5):
        while True:
            probe = await amqp.channel()
            try:
                await probe.declare_queue(output_queue, passive=True)
                break
            except aiormq.exceptions.ChannelNotFoundEntity:
                await asyncio.sleep(0.1)
            finally:
                with contextlib.suppress(Exception):
                    await probe.close()
    [reply] = await get_raw(channel, output_queue)
    assert orjson.loads(reply.body)["conversation_id"] == 123


# -- (d) malformed input, and a platform queue with its own dead-letter arguments ---------------


async def test_malformed_message_lands_in_the_dead_letter_queue_unchanged(
    start_worker: Callable[..., Awaitable[Running]],
    channel: AbstractChannel,
    queues: tuple[str, str],
    doomed: list[str],
) -> None:
    input_queue, output_queue = queues
    dlq = f"{input_queue}.dlq"
    doomed.append(dlq)
    await channel.declare_queue(dlq, durable=True)
    await channel.declare_queue(
        input_queue,
        durable=True,
        arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dlq},
    )
    await start_worker()

    await publish_raw(channel, input_queue, b"{not json", message_id="d-1")
    schema_error = orjson.dumps({"conversation_id": 77})
    await publish_raw(channel, input_queue, schema_error, message_id="d-2")
    await publish_raw(channel, input_queue, orjson.dumps(SEED_PROMPT), message_id="d-3")

    dead = await get_raw(channel, dlq, n=2)
    assert [m.body for m in dead] == [b"{not json", schema_error]
    assert [m.message_id for m in dead] == ["d-1", "d-2"]
    # Parked by the worker itself (publish, confirm, ack), with its reasons in headers:
    # the queue's own dead-letter arguments are not needed and not used.
    headers = dead[0].headers
    assert "x-death" not in headers
    assert headers["x-dead-letter-reason"] == "rejected"
    assert "not valid JSON" in str(headers["x-last-error"])
    assert headers["x-original-queue"] == input_queue
    assert headers["x-attempts"] == 0

    replies = await get_raw(channel, output_queue, n=2)
    bodies = [orjson.loads(m.body) for m in replies]
    assert bodies[0]["conversation_id"] == 77 and bodies[0]["error"]
    assert bodies[1]["conversation_id"] == 123 and "error" not in bodies[1]
    await asyncio.sleep(0.3)
    assert await channel.get_queue(dlq, ensure=True)  # still there
    assert (await get_raw_or_none(channel, dlq)) is None  # nothing else dead-lettered


async def get_raw_or_none(channel: AbstractChannel, queue: str) -> AbstractIncomingMessage | None:
    amqp_queue = await channel.get_queue(queue, ensure=True)
    return await amqp_queue.get(no_ack=True, fail=False)


# -- (e) reply ids derived from content -----------------------------------------------------------


async def test_reply_id_derived_from_the_body_when_there_is_no_message_id(
    start_worker: Callable[..., Awaitable[Running]],
    channel: AbstractChannel,
    queues: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    input_queue, output_queue = queues
    # aiormq gives every message without one a random message_id; .NET and other clients
    # send none. Make aiormq's random id None, so the property is really absent.
    monkeypatch.setattr(aiormq.channel, "UUID", lambda **_: SimpleNamespace(hex=None))
    probe = await channel.declare_queue("", exclusive=True)
    await publish_raw(channel, probe.name, b"probe")
    [probed] = await get_raw(channel, probe.name)
    assert probed.message_id is None

    await start_worker()
    body = orjson.dumps(SEED_PROMPT)
    other = orjson.dumps({**SEED_PROMPT, "conversation_id": 124})
    for payload in (body, body, other):
        await publish_raw(channel, input_queue, payload)  # no message_id
    replies = await get_raw(channel, output_queue, n=3)
    ids = [r.message_id for r in replies]
    assert ids[0] is not None
    assert ids[0] == ids[1]
    assert ids[2] != ids[0]
    job_id = hashlib.sha256(body).hexdigest()[:32]
    assert ids[0] == reply_message_id(job_id)
    assert replies[0].correlation_id == replies[1].correlation_id == job_id


# -- (f) chatprocessor send over RabbitMQ ---------------------------------------------------------


async def test_send_prompt_uses_a_private_reply_queue(
    start_worker: Callable[..., Awaitable[Running]],
    amqp: AbstractConnection,
    channel: AbstractChannel,
    queues: tuple[str, str],
    fake_ollama: FakeOllama,
) -> None:
    input_queue, output_queue = queues
    await start_worker(stream_flush_interval=0)
    fake_ollama.token_delay = 0.01

    seen_on_output: list[bytes] = []

    async def on_output(message: AbstractIncomingMessage) -> None:
        seen_on_output.append(message.body)
        await message.ack()

    output = await channel.get_queue(output_queue, ensure=True)
    tag = await output.consume(on_output)

    client = RabbitMQTransport(RABBITMQ_URL)
    await asyncio.wait_for(client.connect(attempts=3), 15)
    try:
        reply = await send_prompt(
            client, input_queue, SEED_PROMPT["message"], conversation_id=41, timeout=15
        )
        assert reply["conversation_id"] == 41
        assert reply["message"] == ECHO
        assert reply["model_used"] == "llama2"
        assert "error" not in reply

        deltas: list[str] = []
        streamed = await send_prompt(
            client,
            input_queue,
            SEED_PROMPT["message"],
            conversation_id=42,
            stream=True,
            timeout=15,
            on_delta=deltas.append,
        )
        assert streamed["conversation_id"] == 42
        assert streamed["message"] == ECHO
        assert len(deltas) > 1
        assert "".join(deltas) == ECHO
        await asyncio.sleep(0.5)
    finally:
        await output.cancel(tag)
        await client.close()
    assert seen_on_output == []
    assert await ready_count(amqp, input_queue) == 0


async def test_send_prompt_times_out_without_a_worker(
    amqp: AbstractConnection, channel: AbstractChannel, queues: tuple[str, str]
) -> None:
    input_queue, _ = queues
    await channel.declare_queue(input_queue, durable=True)
    client = RabbitMQTransport(RABBITMQ_URL)
    await asyncio.wait_for(client.connect(attempts=3), 15)
    try:
        with pytest.raises(TimeoutError):
            await send_prompt(client, input_queue, "anyone?", conversation_id=1, timeout=0.5)
    finally:
        await client.close()
    [request] = await get_raw(channel, input_queue)
    assert request.reply_to and request.reply_to not in queues
    assert request.correlation_id and request.correlation_id == request.message_id
    assert request.type == "UserPromptReceived"
    assert request.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert orjson.loads(request.body)["message"] == "anyone?"
    probe = await amqp.channel()
    with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
        await probe.declare_queue(request.reply_to, passive=True)  # deleted by send_prompt


async def test_a_delay_queue_changed_by_hand_is_reported_with_the_fix(
    *,
    start_worker: Callable[..., Awaitable[Running]],
    channel: AbstractChannel,
    queues: tuple[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without its TTL a delay queue would keep retries forever: say so, and how to fix it."""
    input_queue, _ = queues
    tier = f"{input_queue}.retry.1000ms"  # the default tier of a bare RabbitMQTransport
    await channel.declare_queue(tier, durable=True)
    caplog.set_level(logging.WARNING, logger=RABBIT_LOGGER)
    await start_worker()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(tier in m and "rabbitmqctl delete_queue" in m for m in errors), errors
    assert not any(
        "set_policy" in r.getMessage() and tier in r.getMessage() for r in caplog.records
    )
