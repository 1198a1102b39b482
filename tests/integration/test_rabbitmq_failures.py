"""RabbitMQ failures: forced reconnects, a deleted input queue, a queue refusing replies."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
import uuid

import pytest

from chatprocessor.client import send_prompt
from chatprocessor.contracts.chat import ChatCodec
from chatprocessor.core.worker import Worker, WorkerConfig
from chatprocessor.providers.mock import MockProvider
from chatprocessor.transports.rabbitmq import RabbitMQTransport
from tests.conftest import IN_CI, RABBITMQ_URL

pytestmark = pytest.mark.rabbitmq


async def started_worker(
    queue_names: tuple[str, str],
    *,
    provider: MockProvider | None = None,
    connection_name: str | None = None,
) -> Worker:
    """A started worker on RabbitMQ answering with the mock provider."""
    input_queue, output_queue = queue_names
    worker = Worker(
        RabbitMQTransport(RABBITMQ_URL, connection_name=connection_name),
        provider or MockProvider(),
        ChatCodec(max_bytes=65536),
        WorkerConfig(input_queue=input_queue, output_queue=output_queue),
    )
    await worker.start()
    return worker


async def _close_connection_named(name: str) -> None:
    """Have the broker force-close a connection, as a broker restart or a network cut would."""
    listing = await asyncio.create_subprocess_exec(
        "rabbitmqctl",
        "list_connections",
        "pid",
        "client_properties",
        "--no-table-headers",
        "-q",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await listing.communicate()
    # One line per connection: the pid, a tab, the client properties naming the connection.
    pids = [line.split("\t")[0] for line in out.decode().splitlines() if f'"{name}"' in line]
    assert pids, f"connection {name!r} not found"
    for pid in pids:
        closing = await asyncio.create_subprocess_exec(
            "rabbitmqctl", "close_connection", pid, "test: forced close", "-q"
        )
        assert await closing.wait() == 0


@pytest.mark.skipif(
    shutil.which("rabbitmqctl") is None and not IN_CI, reason="needs rabbitmqctl (fails in CI)"
)
async def test_worker_answers_again_after_broker_closed_its_connection(
    queue_names: tuple[str, str],
) -> None:
    input_queue, _ = queue_names
    name = f"chatprocessor-test-{uuid.uuid4().hex[:8]}"
    worker = await started_worker(queue_names, connection_name=name)
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    client = RabbitMQTransport(RABBITMQ_URL)
    await client.connect()
    try:
        first = await send_prompt(client, input_queue, "before", conversation_id=1, timeout=10)
        assert first["message"] == "[mock] You said: before"

        await _close_connection_named(name)
        await asyncio.sleep(1)  # aio-pika reconnects after its reconnect interval (5 s max)

        second = await send_prompt(client, input_queue, "after", conversation_id=2, timeout=20)
        assert second["conversation_id"] == 2
        assert second["message"] == "[mock] You said: after"
        assert not running.done()

        # The broker-cancel hook must survive the reconnect too.
        channel = await client.connection.channel()
        await channel.queue_delete(input_queue)
        from chatprocessor.core.errors import BrokerUnavailable

        with pytest.raises(BrokerUnavailable, match=input_queue):
            await asyncio.wait_for(asyncio.shield(running), 10)
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(running, 10)
        await worker.transport.close()
        channel = await client.connection.channel()
        for queue in queue_names:
            with contextlib.suppress(Exception):
                await channel.queue_delete(queue)
        await client.close()


async def test_deleting_the_input_queue_stops_the_worker_loudly(
    queue_names: tuple[str, str],
) -> None:
    """The broker cancels the consumer; the worker must not sit idle forever."""
    from chatprocessor.core.errors import BrokerUnavailable

    input_queue, output_queue = queue_names
    worker = await started_worker(queue_names)
    running = asyncio.create_task(worker.run(asyncio.Event()))
    client = RabbitMQTransport(RABBITMQ_URL)
    await client.connect()
    try:
        await asyncio.sleep(0.3)
        channel = await client.connection.channel()
        await channel.queue_delete(input_queue)
        with pytest.raises(BrokerUnavailable, match=input_queue):
            await asyncio.wait_for(running, 10)
    finally:
        await worker.transport.close()
        channel = await client.connection.channel()
        with contextlib.suppress(Exception):
            await channel.queue_delete(output_queue)
        await client.close()


class CountingMock(MockProvider):
    """The mock provider, counting how often the model is asked."""

    calls = 0

    async def chat(self, request, *, stream=False):  # type: ignore[no-untyped-def]
        CountingMock.calls += 1
        async for chunk in super().chat(request, stream=stream):
            yield chunk


async def test_reply_refused_by_the_broker_is_dead_lettered_once_not_looped(
    queue_names: tuple[str, str],
) -> None:
    """An output queue that nacks every publish must not make the job spin through the LLM."""
    import aio_pika
    import orjson

    input_queue, output_queue = queue_names
    client = RabbitMQTransport(RABBITMQ_URL)
    await client.connect()
    channel = await client.connection.channel()
    await channel.declare_queue(
        output_queue, durable=True, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
    )
    dlq = await channel.declare_queue(f"{input_queue}.dlq", durable=True)
    await channel.declare_queue(
        input_queue,
        durable=True,
        arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dlq.name},
    )
    CountingMock.calls = 0
    worker = await started_worker(queue_names, provider=CountingMock())
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    try:
        await channel.default_exchange.publish(
            aio_pika.Message(orjson.dumps({"conversation_id": 3, "message": "hi"})),
            routing_key=input_queue,
        )
        message = None
        async with asyncio.timeout(10):
            while message is None:
                message = await dlq.get(no_ack=True, fail=False)
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # a requeue loop would call the model many times by now
        assert CountingMock.calls == 1
        assert orjson.loads(message.body)["conversation_id"] == 3
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(running, 10)
        await worker.transport.close()
        for queue in (*queue_names, f"{input_queue}.dlq"):
            with contextlib.suppress(Exception):
                await channel.queue_delete(queue)
        await client.close()


class SlowThreadedModel(MockProvider):
    """Inference that takes ``seconds`` of CPU time off the event loop, as the embedded model
    does (llama.cpp on its own thread), or on it when ``block_loop`` (what must never happen)."""

    def __init__(self, seconds: float, *, block_loop: bool = False) -> None:
        self.seconds = seconds
        self.block_loop = block_loop
        self.calls = 0

    async def chat(self, request, *, stream=False):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.block_loop and self.calls == 1:
            time.sleep(self.seconds)  # noqa: ASYNC251 - the failure this test demonstrates
        else:
            await asyncio.to_thread(time.sleep, self.seconds)
        async for chunk in super().chat(request, stream=stream):
            yield chunk


@pytest.mark.parametrize("block_loop", [False, True], ids=["threaded", "blocking-contrast"])
async def test_heartbeats_keep_flowing_during_long_inference(
    queue_names: tuple[str, str], block_loop: bool
) -> None:
    """A 4 s generation on a 1 s heartbeat: with inference off the loop the connection lives
    and the job is answered once. The contrast case blocks the loop once and shows what the
    test would catch: the broker drops the silent connection, the job is redelivered and the
    model is asked a second time."""
    input_queue, output_queue = queue_names
    model = SlowThreadedModel(4.0, block_loop=block_loop)
    worker = Worker(
        RabbitMQTransport(RABBITMQ_URL + "?heartbeat=1"),
        model,
        ChatCodec(max_bytes=65536),
        WorkerConfig(input_queue=input_queue, output_queue=output_queue, graceful_timeout=1),
    )
    await worker.start()
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    client = RabbitMQTransport(RABBITMQ_URL)
    await client.connect()
    try:
        reply = await send_prompt(client, input_queue, "long one", conversation_id=9, timeout=40)
        assert reply["message"] == "[mock] You said: long one"
        await asyncio.sleep(1.5)  # a redelivery would have reached the model again by now
        assert model.calls == (2 if block_loop else 1)
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(running, 15)
        await worker.transport.close()
        await client.close()
