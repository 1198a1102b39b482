"""Delivery edge cases found in review.

Each test once showed a bug (a refused copy looping through the LLM, unencodable
or truncated headers, a reused message_id, timeouts and breakers, a skipped drain, a
half-masked password) and now guards its fix.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from chatprocessor.cli import app as cli_app
from chatprocessor.contracts.chat import ChatCodec
from chatprocessor.core.errors import BrokerUnavailable, ProviderUnavailable
from chatprocessor.core.retry import RetryPolicy
from chatprocessor.core.worker import Worker, WorkerConfig
from chatprocessor.providers.base import ChatRequest, Chunk
from chatprocessor.providers.mock import MockProvider
from chatprocessor.providers.router import RouterProvider
from chatprocessor.stores.replies import SQLiteReplyStore
from chatprocessor.transports.base import Delivery
from tests.fakes.memory import MemoryDelivery, MemoryTransport

pytestmark = pytest.mark.timeout(30)

CODEC = ChatCodec(max_bytes=65536)


class Down:
    """A provider that is down (HTTP 503) on every call."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.default_model = "m"
        self.calls = 0

    async def chat(self, request: ChatRequest, *, stream: bool = False) -> AsyncIterator[Chunk]:
        self.calls += 1
        raise ProviderUnavailable(f"{self.name}: HTTP 503")
        yield Chunk("")  # pragma: no cover - makes this an async generator

    async def list_models(self) -> list[str]:
        return ["m"]

    async def ping(self) -> bool:
        return False

    async def close(self) -> None:
        return None


class Hangs(Down):
    """Accepts the request and never answers (fails fast on the first ``fail_first`` calls)."""

    def __init__(self, name: str, *, fail_first: int = 0) -> None:
        super().__init__(name)
        self.fail_first = fail_first

    async def chat(self, request: ChatRequest, *, stream: bool = False) -> AsyncIterator[Chunk]:
        self.calls += 1
        if self.calls <= self.fail_first:
            raise ProviderUnavailable(f"{self.name}: HTTP 503")
        await asyncio.sleep(3600)
        yield Chunk("never", done=True)


def prompt(conversation_id: int, message: str) -> bytes:
    return orjson.dumps({"conversation_id": conversation_id, "message": message})


def worker(provider: Any, transport: Any = None, **config: Any) -> Worker:
    return Worker(
        transport or MemoryTransport(),
        provider,
        CODEC,
        WorkerConfig("in", "out", **config),
    )


# -- idempotency store ------------------------------------------------------------------


async def test_reused_message_id_is_answered_with_another_conversations_reply(
    tmp_path: Path,
) -> None:
    transport = MemoryTransport()
    store = SQLiteReplyStore(tmp_path / "replies.sqlite3", ttl=3600)
    w = Worker(transport, MockProvider(), CODEC, WorkerConfig("in", "out"), store=store)
    try:
        # Two different jobs of two conversations (tenants) that happen to share a message_id.
        await w.handle(MemoryDelivery(prompt(1, "alpha secret of tenant one"), message_id="42"))
        await w.handle(MemoryDelivery(prompt(2, "beta"), message_id="42"))
    finally:
        await store.close()
    second = orjson.loads(transport.published[-1][1].body)
    # Today: {"conversation_id": 1, "message": "[mock] You said: alpha secret of tenant one"}.
    assert second["conversation_id"] == 2
    assert "alpha" not in second["message"]


# -- retries ------------------------------------------------------------------------------


async def test_retry_while_every_breaker_is_open_waits_for_the_cool_down() -> None:
    down = Down("review-open")
    router = RouterProvider([down], fail_max=1, reset_timeout=60)
    w = worker(router, retry=RetryPolicy(max_retries=5, base=1.0, cap=300.0))
    await w.handle(MemoryDelivery(prompt(1, "opens the breaker")))
    second = MemoryDelivery(prompt(2, "skipped"))
    await w.handle(second)
    assert down.calls == 1  # the second job never reached the provider
    kind, delay, _ = second.actions[0]
    assert kind == "retry"
    # Today the delay is RETRY_BACKOFF_BASE (1 s): five such retries dead-letter the job
    # (retries_exhausted) while the breaker is still open and no provider was ever asked.
    assert delay >= 59


async def test_refused_retry_copy_does_not_requeue_the_job_at_once() -> None:
    down = Down("review-refused")
    w = worker(down)
    delivery = MemoryDelivery(prompt(1, "hello"), refuse_retry=True)
    await w.handle(delivery)
    # Today: [("release",)], i.e. basic.nack(requeue=True): the broker hands it straight
    # back, the provider is asked again, the copy is refused again, ... (about 600 LLM
    # calls per second against the real broker).
    assert "release" not in delivery.kinds


# -- circuit breaker -----------------------------------------------------------------------


async def test_job_timeout_of_the_half_open_probe_does_not_close_the_breaker() -> None:
    hangs = Hangs("review-probe", fail_first=1)
    router = RouterProvider([hangs], fail_max=1, reset_timeout=0.05)
    w = worker(router, job_timeout=0.1)
    await w.handle(MemoryDelivery(prompt(1, "opens the breaker")))
    assert router.breaker_states()["review-probe"] == "open"
    await asyncio.sleep(0.12)  # cool-down over: the next job is the trial call
    probe = MemoryDelivery(prompt(2, "probe"))
    await w.handle(probe)
    assert probe.kinds == ["retry"]  # the probe failed (ProviderTimeout from JOB_TIMEOUT)
    assert router.breaker_states()["review-probe"] != "closed"


async def test_job_timeouts_on_a_hung_provider_open_its_breaker() -> None:
    hangs = Hangs("review-hung")
    router = RouterProvider([hangs], fail_max=2, reset_timeout=60)
    w = worker(router, job_timeout=0.05)
    for n in range(3):
        delivery = MemoryDelivery(prompt(n, "hello"))
        await w.handle(delivery)
        assert delivery.kinds == ["retry"]
    # Three consecutive transient failures (README: "JOB_TIMEOUT passed" is transient),
    # fail_max=2: the breaker should be open and the third job should not have waited.
    assert router.breaker_states()["review-hung"] == "open"
    assert hangs.calls == 2


# -- shutdown when the broker stops the consumer ----------------------------------------


class EndingTransport(MemoryTransport):
    """Hands out one delivery, then the broker cancels the consumer (queue deleted)."""

    def __init__(self, delivery: Delivery) -> None:
        super().__init__()
        self.delivery = delivery

    async def consume(self, queue: str, prefetch: int) -> AsyncIterator[Delivery]:
        yield self.delivery
        await asyncio.sleep(0.05)
        raise BrokerUnavailable(f"consuming {queue!r} failed: consumer cancelled")


class Slow(MockProvider):
    async def chat(self, request: ChatRequest, *, stream: bool = False) -> AsyncIterator[Chunk]:
        await asyncio.sleep(0.3)
        async for chunk in super().chat(request, stream=stream):
            yield chunk


async def test_jobs_in_flight_finish_when_the_broker_cancels_the_consumer() -> None:
    delivery = MemoryDelivery(prompt(1, "in flight"))
    w = worker(Slow(), EndingTransport(delivery), graceful_timeout=5)
    try:
        with pytest.raises(BrokerUnavailable):
            await w.run(asyncio.Event())
        # README: "the worker finishes what it holds and exits 1".
        assert delivery.kinds == ["ack"]
    finally:
        for task in list(w._tasks):
            task.cancel()
        await asyncio.gather(*w._tasks, return_exceptions=True)


# -- secrets ---------------------------------------------------------------------------------


def test_check_does_not_print_any_part_of_the_redis_password(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TRANSPORT", "local")
    monkeypatch.setenv("PROVIDERS", "mock")
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    # redis-py accepts it (urlsplit/urlparse take the last '@'): password "pa@ssword-secret-tail".
    monkeypatch.setenv("REDIS_URL", "redis://:pa@ssword-secret-tail@127.0.0.1:6379/0")
    monkeypatch.setenv("COLUMNS", "200")
    result = CliRunner().invoke(cli_app, ["check"])
    assert "REDIS_URL" in result.output
    assert "secret-tail" not in result.output
