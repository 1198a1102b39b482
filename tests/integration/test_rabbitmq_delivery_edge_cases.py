"""Delivery edge cases on the real broker, found in review.

Each test once showed a bug (a refused copy looping through the LLM, unencodable
or truncated headers, a reused message_id, timeouts and breakers, a skipped drain, a
half-masked password) and now guards its fix.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import orjson
import pamqp.encode
import pytest
from pamqp import commands as spec

from chatprocessor.contracts.chat import ChatCodec, reply_message_id, request_id
from chatprocessor.core.errors import ProviderUnavailable
from chatprocessor.core.retry import RetryPolicy, tier_name
from chatprocessor.core.worker import Worker, WorkerConfig
from chatprocessor.providers.base import ChatRequest, Chunk
from chatprocessor.providers.mock import MockProvider
from chatprocessor.transports.base import Delivery
from chatprocessor.transports.rabbitmq import RabbitMQTransport
from tests.conftest import RABBITMQ_URL

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(60)]

#: All in conftest.CLEANUP_TIERS, so the queue_names fixture deletes the delay queues.
TIERS = [0.05, 0.1, 0.2]
POLICY = RetryPolicy(max_retries=2, base=0.05, cap=0.2)


class FlakyMock(MockProvider):
    """Down (HTTP 503) for the first ``failures`` calls, then the mock's answer."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def chat(self, request: ChatRequest, *, stream: bool = False) -> AsyncIterator[Chunk]:
        self.calls += 1
        if self.calls <= self.failures:
            raise ProviderUnavailable("mock: HTTP 503")
        async for chunk in super().chat(request, stream=stream):
            yield chunk


@asynccontextmanager
async def running_worker(
    queue_names: tuple[str, str], provider: MockProvider
) -> AsyncIterator[tuple[Worker, Callable[[], int]]]:
    """A started, running worker; yields it and a counter of deliveries it handled."""
    input_queue, output_queue = queue_names
    worker = Worker(
        RabbitMQTransport(RABBITMQ_URL, retry_tiers=TIERS),
        provider,
        ChatCodec(max_bytes=65536),
        WorkerConfig(input_queue, output_queue, retry=POLICY),
    )
    await worker.start()
    handled = 0
    handle = worker.handle

    async def counting(delivery: Delivery) -> None:
        nonlocal handled
        handled += 1
        await handle(delivery)

    worker.handle = counting  # type: ignore[method-assign]
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    try:
        yield worker, lambda: handled
    finally:
        stop.set()
        await asyncio.wait_for(running, 20)
        await worker.transport.close()


async def get_one(channel: Any, queue: str, timeout: float = 5.0) -> Any:
    amqp_queue = await channel.declare_queue(queue, durable=True, passive=True)
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        message = await amqp_queue.get(no_ack=True, fail=False)
        if message is not None:
            return message
        await asyncio.sleep(0.05)
    return None


class _AbsentId(str):
    """A message_id aiormq leaves alone and pamqp does not send (an empty value is absent),
    i.e. a publish without message_id, as the .NET and Java clients do by default."""

    def __bool__(self) -> bool:
        return True


class _Double(float):
    """A header value sent as an AMQP double ('d'), as .NET/Java clients send a double."""


@pytest.fixture
def doubles_on_the_wire(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the test play a platform that sends 64-bit float headers (pamqp sends only 'f')."""
    original = pamqp.encode.encode_table_value

    def encode(value: Any) -> bytes:
        if isinstance(value, _Double):
            return b"d" + struct.pack(">d", value)
        return original(value)

    monkeypatch.setattr(pamqp.encode, "encode_table_value", encode)


async def test_retried_job_without_message_id_keeps_its_reply_id(
    queue_names: tuple[str, str], amqp: Any
) -> None:
    input_queue, output_queue = queue_names
    body = orjson.dumps({"conversation_id": 7, "message": "hello"})
    async with running_worker(queue_names, FlakyMock(failures=1)):
        channel = await amqp.channel()
        underlay = await channel.get_underlay_channel()
        await underlay.basic_publish(
            body,
            routing_key=input_queue,
            properties=spec.Basic.Properties(message_id=_AbsentId(""), delivery_mode=2),
        )
        reply = await get_one(channel, output_queue)
    assert reply is not None
    # README: "the same request always yields the same reply id" (UUIDv5 of the body digest
    # when there is no message_id). After one retry it is the UUIDv5 of a random id, so a
    # duplicate of the original (crash between the copy's confirm and the ack) is answered
    # by the LLM again under another reply id, which no consumer can recognise.
    assert reply.message_id == reply_message_id(request_id(body, None))


async def test_unencodable_attempt_header_is_dead_lettered_not_looped(
    queue_names: tuple[str, str], amqp: Any
) -> None:
    input_queue, _ = queue_names
    async with running_worker(queue_names, MockProvider()) as (_, handled):
        channel = await amqp.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(b"not json", headers={"x-attempt": "1e19"}, delivery_mode=2),
            input_queue,
        )
        await asyncio.sleep(1.5)
        loops = handled()
        dead = await get_one(channel, f"{input_queue}.dlq", timeout=0.5)
    # Today: ~1500 deliveries in 1.5 s (nack requeue each time), nothing in the DLQ.
    assert dead is not None
    assert loops <= 2


@pytest.mark.usefixtures("doubles_on_the_wire")
async def test_double_header_survives_dead_lettering(
    queue_names: tuple[str, str], amqp: Any
) -> None:
    input_queue, _ = queue_names
    sent_at = 1765881000.123  # e.g. a platform's epoch-seconds header
    async with running_worker(queue_names, MockProvider()):
        channel = await amqp.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(b"not json", headers={"sent-at": _Double(sent_at)}, delivery_mode=2),
            input_queue,
        )
        dead = await get_one(channel, f"{input_queue}.dlq")
    assert dead is not None
    # Today: 1765880960.0 (40 s off). The same happens on every retry copy, and a double
    # beyond float32 range raises OverflowError: the same hot loop as the test above.
    assert dead.headers["sent-at"] == sent_at


async def test_refused_retry_copy_does_not_loop_through_the_llm(
    queue_names: tuple[str, str], amqp: Any
) -> None:
    input_queue, _ = queue_names
    # A full delay queue with x-overflow=reject-publish (or a max-length policy on "^.*"):
    # the worker finds the queues declared with other arguments and uses them as they are.
    channel = await amqp.channel()
    for tier in TIERS:
        await channel.declare_queue(
            tier_name(input_queue, tier),
            durable=True,
            arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
        )
    provider = FlakyMock(failures=10**9)
    async with running_worker(queue_names, provider):
        await channel.default_exchange.publish(
            aio_pika.Message(
                orjson.dumps({"conversation_id": 1, "message": "hello"}), delivery_mode=2
            ),
            input_queue,
        )
        await asyncio.sleep(1.5)
    # MAX_RETRIES=2 allows 3 attempts. Today: ~900 LLM calls in 1.5 s.
    assert provider.calls <= POLICY.max_retries + 1
