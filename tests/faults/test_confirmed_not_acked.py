"""The worst moment to die: the reply is confirmed by the broker, the input is not acked yet.

An in-process Worker runs with its deliveries' ack replaced, for chosen jobs, by a cut:
on RabbitMQ the worker's TCP connection is reset (through a proxy), so the broker
redelivers everything it held; on the local queue the claim is abandoned, as a dead
process would leave it, and comes back after the visibility timeout. Then the worker
is stopped and a new one, on the same reply store (SQLite file, or Redis), takes over.
The redelivered jobs must be answered from the store: the same message_id, the same
bytes, and no second LLM call.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import REGISTRY

from chatprocessor.contracts.chat import ChatCodec
from chatprocessor.core.errors import BrokerUnavailable
from chatprocessor.core.worker import Worker, WorkerConfig
from chatprocessor.providers.ollama import OllamaProvider
from chatprocessor.stores.replies import KEY_PREFIX, RedisReplyStore, SQLiteReplyStore
from chatprocessor.transports.base import Delivery
from chatprocessor.transports.local import LocalTransport
from chatprocessor.transports.rabbitmq import RabbitMQTransport
from tests.conftest import REDIS_URL
from tests.faults.helpers import (
    FAST_RETRY,
    Lab,
    Side,
    TcpProxy,
    llm_calls_per_request,
    make_jobs,
    wait_for,
)

pytestmark = [pytest.mark.faults, pytest.mark.timeout(90)]

JOBS = 30
CUT_AT = (3, 13, 23)  # these jobs' acks are replaced by a cut, one worker each


class CuttingWorkers:
    """Builds in-process workers on one side and one reply store; the ack of each chosen
    job is replaced, once, by a cut that leaves the worker for dead."""

    def __init__(
        self, lab: Lab, side: Side, store_kind: str, chosen: set[str], proxy: TcpProxy | None
    ) -> None:
        self.lab = lab
        self.side = side
        self.store_kind = store_kind
        self.pending = set(chosen)
        self.triggered: list[str] = []
        self.proxy = proxy
        self.cut_happened = asyncio.Event()
        self._transport: Any = None

    def build(self) -> Worker:
        transport: Any
        if self.proxy is not None:
            transport = RabbitMQTransport(
                f"amqp://guest:guest@127.0.0.1:{self.proxy.port}/",
                retry_tiers=FAST_RETRY.tiers(),
                connection_name=f"faults-{uuid.uuid4().hex[:8]}",
            )
        else:
            transport = LocalTransport(
                self.lab.tmp_path / "data" / "queue.sqlite3", visibility_timeout=1
            )
        self._transport = transport
        self._wrap(transport)
        store: Any = (
            RedisReplyStore(REDIS_URL, ttl=600)
            if self.store_kind == "redis"
            else SQLiteReplyStore(self.lab.tmp_path / "data" / "replies.sqlite3", ttl=600)
        )
        return Worker(
            transport,
            OllamaProvider(self.lab.fake.url, model="llama2", timeout=5, connect_timeout=1),
            ChatCodec(max_bytes=65536),
            WorkerConfig(
                input_queue=self.side.input,
                output_queue=self.side.output,
                prefetch=4,
                graceful_timeout=5,
                retry=FAST_RETRY,
                job_timeout=5,
            ),
            store=store,
        )

    def _wrap(self, transport: Any) -> None:
        consume = transport.consume

        async def consuming(queue: str, prefetch: int) -> AsyncIterator[Delivery]:
            async for delivery in consume(queue, prefetch):
                if delivery.message_id in self.pending:
                    self._replace_ack(delivery)
                yield delivery

        transport.consume = consuming

    def _replace_ack(self, delivery: Delivery) -> None:
        async def cut_instead_of_ack() -> None:
            if delivery.message_id not in self.pending:
                return
            self.pending.discard(delivery.message_id)
            self.triggered.append(str(delivery.message_id))
            if self.proxy is not None:
                self.proxy.cut()  # the broker sees the connection drop and requeues all unacked
            else:
                # A dead process stops renewing its claim: the row reappears after the timeout.
                self._transport._held.pop(delivery.row_id, None)  # type: ignore[attr-defined]
            self.cut_happened.set()

        delivery._ack = cut_instead_of_ack  # type: ignore[method-assign]

    async def run_round(self) -> bool:
        """One worker, until it is cut or every job is settled; True when it was cut."""
        worker = self.build()
        await worker.start()
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        self.cut_happened.clear()

        async def over() -> bool:
            if self.cut_happened.is_set() or running.done():
                return True
            # Every job answered, none waiting, none in the worker's hands.
            return (
                self.lab.ledger.all_answered()
                and not worker._tasks
                and await self.side.backlog() == 0
            )

        await wait_for(over, 30, "a cut or every job settled", details=self.lab.ledger.summary)
        cut = self.cut_happened.is_set()
        if cut:
            worker.config.graceful_timeout = 0  # dead: it settles nothing more
        stop.set()
        try:
            try:
                await asyncio.wait_for(running, 15)
            except BrokerUnavailable:
                # Stopping as the connection drops can raise out of run() without draining
                # (see test_stop_as_the_connection_drops_still_drains): finish it off here.
                if not cut:
                    raise
                for task in list(worker._tasks):
                    task.cancel()
                await asyncio.gather(*worker._tasks, return_exceptions=True)
        finally:
            await worker.transport.close()
            await worker.provider.close()
            await worker.store.close()
        return cut


def duplicates_answered() -> float:
    return REGISTRY.get_sample_value("chatprocessor_duplicates_total") or 0.0


async def delete_redis_keys(prefix: str) -> None:
    import redis.asyncio as redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


STORES = [
    pytest.param("rabbitmq", "sqlite", marks=pytest.mark.rabbitmq, id="rabbitmq-sqlite"),
    pytest.param(
        "rabbitmq", "redis", marks=[pytest.mark.rabbitmq, pytest.mark.redis], id="rabbitmq-redis"
    ),
    pytest.param("local", "sqlite", id="local-sqlite"),
]


@pytest.mark.parametrize(("kind", "store_kind"), STORES)
async def test_redelivery_after_confirmed_reply_is_answered_from_the_store(
    kind: str, store_kind: str, lab: Lab
) -> None:
    fake, ledger = lab.fake, lab.ledger
    side = await lab.side(kind)
    jobs = make_jobs(side.tag, JOBS)
    await side.publish_jobs(jobs)
    chosen = {jobs[i].id for i in CUT_AT}
    duplicates_before = duplicates_answered()

    async with contextlib.AsyncExitStack() as stack:
        proxy = await stack.enter_async_context(TcpProxy()) if kind == "rabbitmq" else None
        if store_kind == "redis":
            stack.push_async_callback(delete_redis_keys, f"{KEY_PREFIX}{side.input}:")
        workers = CuttingWorkers(lab, side, store_kind, chosen, proxy)
        for _ in range(len(CUT_AT) + 2):
            if not await workers.run_round():
                break
        else:
            raise AssertionError(f"still cutting after {len(CUT_AT) + 2} workers")
        report = await lab.report(side, f"cut after confirm, before ack ({store_kind} store)")
    report.assert_ok()

    assert sorted(workers.triggered) == sorted(chosen)
    per_request = ledger.by_request()
    calls = llm_calls_per_request(ledger, fake)
    for job_id in workers.triggered:
        copies = per_request[job_id]
        assert len(copies) >= 2, f"{job_id}: the redelivery was not answered again"
        assert len({(c.message_id, c.body) for c in copies}) == 1, copies
        assert calls[job_id] == 1, f"{job_id}: LLM asked {calls[job_id]} times"
    assert duplicates_answered() - duplicates_before >= len(chosen)
    assert report.figures["answered"] == JOBS


@pytest.mark.rabbitmq
async def test_same_request_twice_at_once_gets_one_reply_body(lab: Lab) -> None:
    fake, ledger = lab.fake, lab.ledger
    answers = iter(range(1, 100))
    fake.reply = lambda prompt: f"Echo: {prompt} (answer #{next(answers)})"
    fake.latency = 0.3
    side = await lab.side("rabbitmq")
    [job] = make_jobs(side.tag, 1)
    ledger.add_job(job)
    for _ in range(2):
        await side.publish(job.body, message_id=job.id)
    worker = await lab.worker(side, PREFETCH_COUNT="2").start()
    await wait_for(lambda: len(ledger.replies) >= 2, 20, "two replies", details=worker.console)
    assert await worker.terminate() == 0
    bodies = {reply.body for reply in ledger.replies}
    assert {reply.message_id for reply in ledger.replies} == {ledger.replies[0].message_id}
    assert len(bodies) == 1, f"LLM calls: {len(fake.chat_calls())}; bodies: {bodies}"
