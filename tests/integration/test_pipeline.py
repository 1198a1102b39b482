"""Seed 004 end to end: the whole service (``run_service``, CONTRACT=pipeline) on the real
RabbitMQ (lanes with priorities), Redis (rate limits, spend, cache) and Postgres (usage ledger).

The LLM is the fake Ollama: it echoes chats, answers ``format`` requests with
``fake.json_answer`` and counts tokens as words, so costs are predictable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY
from typer.testing import CliRunner

from chatprocessor.app import run_service
from chatprocessor.cli import app as cli_app
from chatprocessor.contracts.pipeline import ai_job
from chatprocessor.core.retry import RetryPolicy, tier_name
from chatprocessor.settings import Settings
from tests.conftest import RABBITMQ_URL, REDIS_URL
from tests.fakes.ollama import FakeOllama

pytestmark = [
    pytest.mark.rabbitmq,
    pytest.mark.redis,
    pytest.mark.postgres,
    pytest.mark.timeout(120),
]

ANALYSIS = {
    "sentiment": "negative",
    "intent": "complaint",
    "confidence": 0.87,
    "suggested_actions": ["Offer a refund"],
}
#: Per 1,000 tokens: the fake counts words, so a job's cost is easy to predict.
PRICES = {"llama2": {"input": 1.0, "output": 2.0}}


class Platform:
    """The chat platform's side: publishes AIJobs to lanes, reads AIResponses and alerts."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.responses: dict[str, dict[str, Any]] = {}
        self.arrived: dict[str, asyncio.Event] = {}
        self.order: list[str] = []

    async def __aenter__(self) -> Platform:
        self.connection = await aio_pika.connect(RABBITMQ_URL)
        self.channel = await self.connection.channel()
        self.replies = await self.channel.declare_queue("", exclusive=True, auto_delete=True)
        await self.replies.consume(self._on_reply, no_ack=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.connection.close()

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        body = orjson.loads(message.body)
        key = message.correlation_id or body["jobId"]
        self.responses[key] = body
        self.order.append(key)
        self.arrived.setdefault(key, asyncio.Event()).set()

    async def send(self, job: dict[str, Any], lane: str | None = None) -> None:
        queue = self.settings.lanes[lane or _lane(job)]
        self.arrived.setdefault(job["id"], asyncio.Event())
        await self.channel.default_exchange.publish(
            aio_pika.Message(
                orjson.dumps(job),
                message_id=job["id"],
                correlation_id=job["id"],
                reply_to=self.replies.name,
                priority=job["priority"],
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=queue,
        )

    async def answer(self, job: dict[str, Any], timeout: float = 20) -> dict[str, Any]:
        await self.send(job)
        return await self.wait(job["id"], timeout)

    async def wait(self, job_id: str, timeout: float = 20) -> dict[str, Any]:
        await asyncio.wait_for(self.arrived.setdefault(job_id, asyncio.Event()).wait(), timeout)
        return self.responses[job_id]


def _lane(job: dict[str, Any]) -> str:
    if job["priority"] >= 8:
        return "high"
    return "batch" if job["type"] == "batch_processing" else "standard"


def job(
    tenant: str, content: str, *, kind: str = "chat_response", priority: int = 5, **extra: Any
) -> dict[str, Any]:
    return ai_job(
        id=f"job-{uuid.uuid4().hex[:12]}",
        tenant_id=tenant,
        conversation_id=extra.pop("conversation_id", 42),
        message_id=f"m-{uuid.uuid4().hex[:8]}",
        type=kind,
        content=content,
        priority=priority,
        **extra,
    )


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def chats(fake: FakeOllama) -> list[dict[str, Any]]:
    return [r["body"] for r in fake.requests if r["path"] == "/api/chat"]


@contextlib.asynccontextmanager
async def pipeline_service(settings: Settings) -> AsyncIterator[None]:
    stop = asyncio.Event()
    service = asyncio.create_task(run_service(settings, stop))
    try:
        await _until_consuming(settings)
        yield
    finally:
        stop.set()
        await asyncio.wait_for(service, 30)
        await _delete_queues(settings)


async def _until_consuming(settings: Settings) -> None:
    connection = await aio_pika.connect(RABBITMQ_URL)
    async with connection:
        channel = await connection.channel()
        for _ in range(200):
            try:
                queues = [
                    await channel.declare_queue(q, passive=True) for q in settings.lanes.values()
                ]
            except aio_pika.exceptions.ChannelNotFoundEntity:
                channel = await connection.channel()
            else:
                if all(q.declaration_result.consumer_count for q in queues):
                    return
            await asyncio.sleep(0.05)
    raise AssertionError("the worker never consumed its lanes")


async def _delete_queues(settings: Settings) -> None:
    tiers = RetryPolicy.from_settings(settings).tiers()
    names = [settings.alerts_queue, settings.ai_response_queue]
    for queue in settings.lanes.values():
        names += [queue, f"{queue}.dlq", *(tier_name(queue, t) for t in tiers)]
    connection = await aio_pika.connect(RABBITMQ_URL)
    async with connection:
        channel = await connection.channel()
        for name in names:
            with contextlib.suppress(Exception):
                await channel.queue_delete(name)


def make_settings(
    fake: FakeOllama, database: str, data_dir: Path, tag: str, **extra: Any
) -> Settings:
    return Settings(
        transport="rabbitmq",
        contract="pipeline",
        redis_url=REDIS_URL,
        database_url=database,
        providers=["ollama"],
        ollama_base_url=fake.url,
        ollama_model="llama2",
        lane_high_queue=f"test.{tag}.ai-high",
        lane_standard_queue=f"test.{tag}.ai-standard",
        lane_batch_queue=f"test.{tag}.ai-batch",
        ai_response_queue=f"test.{tag}.ai-responses",
        alerts_queue=f"test.{tag}.ai-alerts",
        model_prices=PRICES,
        data_dir=data_dir,
        log_file="",
        ops_port=0,
        **extra,
    )


async def _seed_spend(tenant: str, amount: float) -> None:
    """Spend already recorded today by other workers (the Redis spend store's keys)."""
    now = datetime.now(UTC)
    client = aioredis.from_url(REDIS_URL)
    async with client:
        await client.set(f"ai:spend:{tenant}:day:{now:%Y-%m-%d}", amount, ex=86_400)


async def _alerts(settings: Settings) -> list[dict[str, Any]]:
    connection = await aio_pika.connect(RABBITMQ_URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(settings.alerts_queue, passive=True)
        found = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            found.append(orjson.loads(message.body))
        return found


async def test_answers_classifies_prices_caches_and_records(  # noqa: PLR0915
    database: str, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:10]
    acme, globex = f"acme-{tag}", f"globex-{tag}"
    async with FakeOllama(models=["llama2"]) as fake:
        fake.json_answer = dict(ANALYSIS)
        settings = make_settings(fake, database, tmp_path, tag)
        async with pipeline_service(settings), Platform(settings) as platform:
            cost_before = sample(
                "ai_cost_total", tenant_id=acme, provider="ollama", model="llama2", currency="USD"
            )
            # 1. A chat_response on the high lane: the answer, its labels, tokens and cost.
            request = job(
                acme,
                "My order arrived broken",
                priority=9,
                context=[{"sender": "visitor", "content": "Hello"}],
                chatbot_config={"personality": "friendly", "systemPrompt": "You are Acme's bot."},
            )
            response = await platform.answer(request)
            assert response["status"] == "completed", response
            assert response["content"].endswith("My order arrived broken")
            assert response["conversationId"] == 42
            assert response["inReplyTo"] == request["messageId"]
            assert response["sentiment"] == "negative" and response["intent"] == "complaint"
            assert response["confidence"] == pytest.approx(0.87)
            assert "Offer a refund" in response["suggestedActions"]
            meta = response["metadata"]
            usage = meta["tokenUsage"]
            assert usage["promptTokens"] > 0 and usage["completionTokens"] > 0
            expected = (usage["promptTokens"] * 1.0 + usage["completionTokens"] * 2.0) / 1000
            assert meta["cost"] == pytest.approx(expected)
            assert meta["cached"] is False and meta["model"] == "llama2"
            # The answer and the classification were two model calls; the first carried the
            # system prompt with the personality, the context, then the message.
            first, second = chats(fake)[-2:]
            assert [m["role"] for m in first["messages"]] == ["system", "user", "user"]
            assert "friendly" in first["messages"][0]["content"]
            assert "format" in second
            assert sample(
                "ai_cost_total", tenant_id=acme, provider="ollama", model="llama2", currency="USD"
            ) == pytest.approx(cost_before + expected)

            # 2. The same question again: from the cache, no model call, no cost.
            calls = len(chats(fake))
            hits = sample("ai_cache_hits_total", tenant_id=acme)
            again = await platform.answer(
                job(
                    acme,
                    "My order arrived broken",
                    priority=9,
                    context=[{"sender": "visitor", "content": "Hello"}],
                    chatbot_config={
                        "personality": "friendly",
                        "systemPrompt": "You are Acme's bot.",
                    },
                )
            )
            assert again["metadata"]["cached"] is True and again["metadata"]["cost"] == 0
            assert again["content"] == response["content"]
            assert again["sentiment"] == "negative"
            assert len(chats(fake)) == calls
            assert sample("ai_cache_hits_total", tenant_id=acme) == hits + 1

            # 3. Another tenant asking the same never sees acme's entry.
            other = await platform.answer(job(globex, "My order arrived broken", priority=9))
            assert other["metadata"]["cached"] is False
            assert len(chats(fake)) > calls

            # 4. A sentiment_analysis job on the standard lane: one JSON call is the answer.
            calls = len(chats(fake))
            sentiment = await platform.answer(
                job(acme, "This is the worst", kind="sentiment_analysis")
            )
            assert sentiment["status"] == "completed"
            assert sentiment["sentiment"] == "negative"
            assert json.loads(sentiment["content"])["intent"] == "complaint"
            assert len(chats(fake)) == calls + 1 and "format" in chats(fake)[-1]

        # 5. Every job is in the ledger, the cache hit too, with its cost.
        connection = await asyncpg.connect(database)
        try:
            rows = await connection.fetch(
                "SELECT tenant_id, job_type, lane, cache_hit, total_cost, status,"
                " input_tokens, output_tokens FROM ai_usage_logs ORDER BY id"
            )
        finally:
            await connection.close()
        assert [(r["tenant_id"], r["lane"], r["cache_hit"]) for r in rows] == [
            (acme, "high", False),
            (acme, "high", True),
            (globex, "high", False),
            (acme, "standard", False),
        ]
        assert rows[0]["total_cost"] == pytest.approx(expected)
        assert rows[1]["total_cost"] == 0
        assert {r["status"] for r in rows} == {"completed"}

        # 6. `chatprocessor usage` reports it by tenant, model and day.
        env = {"DATABASE_URL": database, "DATA_DIR": str(tmp_path), "LOG_FILE": ""}
        report = await asyncio.to_thread(
            CliRunner().invoke, cli_app, ["usage", "--tenant", acme, "--json"], env=env
        )
        assert report.exit_code == 0, report.output
        [line] = json.loads(report.output)
        assert line["requests"] == 3 and line["cache_hits"] == 1


async def test_budget_alerts_then_refusal_and_rate_limit(database: str, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:10]
    tight, slow = f"tight-{tag}", f"slow-{tag}"
    tenants = {tight: {"daily_budget": 10.0}, slow: {"requests_per_minute": 2}}
    async with FakeOllama(models=["llama2"]) as fake:
        fake.json_answer = dict(ANALYSIS)
        settings = make_settings(
            fake, database, tmp_path, tag, tenants=tenants, classify_replies=False
        )
        async with pipeline_service(settings), Platform(settings) as platform:
            # 85 % spent already: the next job's spend raises the 80 % warning.
            await _seed_spend(tight, 8.5)
            ok = await platform.answer(job(tight, "first"))
            assert ok["status"] == "completed"
            # 96 %: the critical alert.
            await _seed_spend(tight, 9.6)
            assert (await platform.answer(job(tight, "second")))["status"] == "completed"
            # All of it spent: refused before any model call, with a clear error reply.
            await _seed_spend(tight, 10.0)
            calls = len(chats(fake))
            refused = await platform.answer(job(tight, "third"))
            assert refused["status"] == "over_budget"
            assert "daily budget" in refused["error"]["message"]
            assert len(chats(fake)) == calls
            assert sample("ai_budget_refused_total", tenant_id=tight, period="daily") == 1
            alerts = await _alerts(settings)
            assert [(a["level"], a["period"], a["tenantId"]) for a in alerts] == [
                ("warning", "daily", tight),
                ("critical", "daily", tight),
            ]
            assert (
                sample("ai_budget_alerts_total", tenant_id=tight, period="daily", level="critical")
                == 1
            )

            # The refused job is parked with its reason, replayable when the budget allows.
            connection = await aio_pika.connect(RABBITMQ_URL)
            async with connection:
                channel = await connection.channel()
                dlq = await channel.declare_queue(
                    f"{settings.lane_standard_queue}.dlq", passive=True
                )
                parked = await dlq.get(no_ack=True)
                assert parked.headers["x-dead-letter-reason"] == "over_budget"

            # Rate limit: 2 per minute; the third job waits in a delay queue, not failed.
            first = [job(slow, f"question {i}") for i in range(3)]
            for request in first:
                await platform.send(request)
            for request in first[:2]:
                assert (await platform.wait(request["id"]))["status"] == "completed"
            await asyncio.sleep(1.0)
            assert first[2]["id"] not in platform.responses
            assert sample("ai_rate_limited_total", tenant_id=slow) >= 1


async def test_high_priority_overtakes_a_batch_flood(database: str, tmp_path: Path) -> None:
    """One model call at a time: a high job sent after 30 batch jobs is answered long before
    the flood is done (it waits only for the call in progress)."""
    tag = uuid.uuid4().hex[:10]
    tenant = f"t-{tag}"
    async with FakeOllama(models=["llama2"], latency=0.03, max_concurrency=1) as fake:
        settings = make_settings(
            fake,
            database,
            tmp_path,
            tag,
            classify_replies=False,
            cache_enabled="off",
            usage_ledger="off",
            model_concurrency=1,
        )
        async with pipeline_service(settings), Platform(settings) as platform:
            flood = [
                job(tenant, f"row {i}", kind="batch_processing", priority=3) for i in range(30)
            ]
            for request in flood:
                await platform.send(request)
            await asyncio.sleep(0.1)  # the flood is being worked on
            urgent = job(tenant, "help now", priority=9)
            answered_before = len(platform.order)
            await platform.answer(urgent)
            overtaken_by = platform.order.index(urgent["id"]) - answered_before
            # Only the batch job holding the model (the batch lane has one slot) goes first.
            assert overtaken_by <= 2, (answered_before, platform.order)  # one more in transit
            assert answered_before < len(flood) - 5  # the flood was still waiting
            for request in flood:
                await platform.wait(request["id"], timeout=30)
