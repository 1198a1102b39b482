"""CSV batch import through real brokers.

On RabbitMQ a tiny stand-in responder plays the pipeline worker (it consumes the batch
queue and answers each AIJob on its reply_to), which proves the broker path of
QueueSubmitter on its own. ``test_direct_end_to_end`` runs the real command with
``--direct``: the pipeline worker in the same process, the mock provider, the local queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
import typer
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from typer.testing import CliRunner

from chatprocessor.batch import QueueSubmitter, run_batch
from chatprocessor.cli_batch import batch
from chatprocessor.core.errors import Unroutable
from chatprocessor.transports.rabbitmq import RabbitMQTransport
from tests.conftest import RABBITMQ_URL

pytestmark = pytest.mark.timeout(90)

MESSAGES = ["good morning", "this is bad", "where is it?", "great, thanks", "meh"]


def write_csv(path: Path, messages: list[str] = MESSAGES) -> Path:
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["Conversation", "Text"])
        for number, message in enumerate(messages, start=1):
            writer.writerow([f"conv-{number}", message])
    return path


def answer(job: dict[str, Any]) -> dict[str, Any]:
    """The AIResponse a pipeline worker would send (the sentiment made up from the text)."""
    content = job["payload"]["content"]
    mood = "positive" if any(w in content for w in ("good", "great")) else "neutral"
    return {
        "jobId": job["id"],
        "tenantId": job["tenantId"],
        "conversationId": job["conversationId"],
        "messageId": f"{job['id']}:response",
        "inReplyTo": job["messageId"],
        "type": job["type"],
        "status": "completed",
        "content": mood,
        "intent": None,
        "sentiment": mood,
        "confidence": 0.9,
        "suggestedActions": [],
        "metadata": {
            "model": "stand-in",
            "provider": "stand-in",
            "processingTime": 1,
            "cached": False,
            "tokenUsage": {"promptTokens": 10, "completionTokens": 1, "totalTokens": 11},
            "cost": 0.01,
            "currency": "EUR",
        },
        "error": None,
    }


@pytest.fixture
async def amqp_connection() -> AsyncIterator[AbstractConnection]:
    connection = await aio_pika.connect(RABBITMQ_URL)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def batch_queue(amqp_connection: AbstractConnection) -> AsyncIterator[str]:
    """A lane queue of this test, declared as the worker declares its lanes (priorities)."""
    name = f"test.{uuid.uuid4().hex[:10]}.ai-batch"
    channel = await amqp_connection.channel()
    await channel.declare_queue(name, durable=True, arguments={"x-max-priority": 10})
    yield name
    with contextlib.suppress(Exception):
        await channel.queue_delete(name)
    with contextlib.suppress(Exception):
        await channel.close()


@pytest.mark.rabbitmq
async def test_queue_submitter_through_rabbitmq(
    amqp_connection: AbstractConnection, batch_queue: str, tmp_path: Path
) -> None:
    seen: list[AbstractIncomingMessage] = []
    channel = await amqp_connection.channel()
    queue = await channel.get_queue(batch_queue)

    async def respond(message: AbstractIncomingMessage) -> None:
        async with message.process():
            seen.append(message)
            job = orjson.loads(message.body)
            assert message.reply_to is not None
            # a reply nobody waits for (another run's) must be dropped, not break the run
            await channel.default_exchange.publish(
                aio_pika.Message(b'{"jobId": "stale"}', correlation_id="someone-else"),
                routing_key=message.reply_to,
            )
            if job["payload"]["content"] == "meh":
                return  # never answered: the row times out
            await channel.default_exchange.publish(
                aio_pika.Message(orjson.dumps(answer(job)), correlation_id=message.correlation_id),
                routing_key=message.reply_to,
            )

    tag = await queue.consume(respond)
    transport = RabbitMQTransport(RABBITMQ_URL)
    await transport.connect(attempts=1)
    try:
        submitter = await QueueSubmitter.open(transport, batch_queue)
        try:
            report = await run_batch(
                write_csv(tmp_path / "chats.csv"),
                mapping="content=Text,conversationId=Conversation",
                job_type="sentiment_analysis",
                tenant="acme",
                priority=4,
                submitter=submitter,
                concurrency=2,
                timeout=2.0,
                results=tmp_path / "results.jsonl",
                report=tmp_path / "report.json",
                restart=False,
                retry_failed=False,
                progress=False,
                currency="EUR",
            )
        finally:
            await submitter.close()
    finally:
        await queue.cancel(tag)
        await transport.close()

    assert (report.rows, report.processed, report.failed) == (5, 4, 1)
    assert (report.input_tokens, report.cost) == (40, pytest.approx(0.04))
    assert report.failures == [(5, "no answer within 2s")]
    records = [orjson.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["sentiment"] for r in records[:4]] == ["positive", "neutral", "neutral", "positive"]
    # the AMQP properties: priority, ids = the job id, a private reply queue
    assert len(seen) == 5
    for message in seen:
        job = orjson.loads(message.body)
        assert message.priority == 4 and job["priority"] == 4
        assert message.message_id == message.correlation_id == job["id"]
        assert message.reply_to and message.reply_to == seen[0].reply_to != batch_queue
        assert job["tenantId"] == "acme" and job["type"] == "sentiment_analysis"
    assert sorted(orjson.loads(m.body)["conversationId"] for m in seen) == [
        f"conv-{n}" for n in range(1, 6)
    ]


@pytest.mark.rabbitmq
async def test_queue_submitter_without_the_lane_queue_says_how_to_fix_it() -> None:
    transport = RabbitMQTransport(RABBITMQ_URL)
    await transport.connect(attempts=1)
    try:
        submitter = await QueueSubmitter.open(transport, f"test.{uuid.uuid4().hex}.missing")
        try:
            job = {"id": "j1", "priority": 3, "payload": {"content": "x"}}
            with pytest.raises(Unroutable, match="--direct"):
                await submitter.submit(job, 5.0)
        finally:
            await submitter.close()
    finally:
        await transport.close()


@pytest.mark.rabbitmq
async def test_queue_submitter_waits_for_a_queue_being_declared(
    amqp_connection: AbstractConnection,
) -> None:
    """With --direct the in-process worker may still be declaring the lanes."""
    name = f"test.{uuid.uuid4().hex[:10]}.ai-batch"
    channel = await amqp_connection.channel()

    async def late_worker() -> None:
        await asyncio.sleep(0.5)
        queue = await channel.declare_queue(name, durable=True, arguments={"x-max-priority": 10})

        async def respond(message: AbstractIncomingMessage) -> None:
            async with message.process():
                job = orjson.loads(message.body)
                assert message.reply_to is not None
                await channel.default_exchange.publish(
                    aio_pika.Message(
                        orjson.dumps(answer(job)), correlation_id=message.correlation_id
                    ),
                    routing_key=message.reply_to,
                )

        await queue.consume(respond)

    transport = RabbitMQTransport(RABBITMQ_URL)
    await transport.connect(attempts=1)
    worker = asyncio.create_task(late_worker())
    try:
        submitter = await QueueSubmitter.open(transport, name, wait_for_queue=10)
        try:
            job = {
                "id": "late-1",
                "tenantId": "t",
                "conversationId": "c",
                "messageId": "m",
                "type": "chat_response",
                "priority": 3,
                "payload": {"content": "good"},
            }
            reply = await submitter.submit(job, 10)
            assert reply["jobId"] == "late-1" and reply["sentiment"] == "positive"
        finally:
            await submitter.close()
    finally:
        await worker
        await transport.close()
        with contextlib.suppress(Exception):
            await channel.queue_delete(name)


def test_direct_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The command with --direct: the pipeline worker runs in the process (mock provider,
    local queue); a second run finds every row done and sends nothing."""
    monkeypatch.setenv("TRANSPORT", "local")
    monkeypatch.setenv("PROVIDERS", "mock")
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    app = typer.Typer()
    app.command("batch")(batch)
    app.command("other")(lambda: None)
    source = write_csv(tmp_path / "chats.csv")
    args = [
        "batch",
        str(source),
        "--mapping",
        "content=Text,conversationId=Conversation",
        "--type",
        "chat_response",
        "--tenant",
        "acme",
        "--direct",
        "--timeout",
        "30",
        "--quiet",
    ]

    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    records = [
        orjson.loads(line) for line in (tmp_path / "chats.results.jsonl").read_text().splitlines()
    ]
    assert [r["row"] for r in records] == [1, 2, 3, 4, 5]
    assert all(r["status"] == "completed" for r in records), records
    assert "good morning" in records[0]["content"]  # the mock provider echoes the prompt
    report = orjson.loads((tmp_path / "chats.report.json").read_bytes())
    assert (report["rows"], report["processed"], report["failed"], report["skipped"]) == (
        5,
        5,
        0,
        0,
    )
    assert report["tenant"] == "acme" and report["type"] == "chat_response"
    assert "processed" in first.output and "results:" in first.output

    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    report = orjson.loads((tmp_path / "chats.report.json").read_bytes())
    assert (report["processed"], report["skipped"], report["doneNow"]) == (5, 5, 0)
