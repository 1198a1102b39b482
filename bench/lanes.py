"""lanes: does a high-priority chat stay fast while a batch flood waits for the same model?

Seed 004 puts chat jobs (priority >= 8) in a high lane and CSV imports in a batch lane. The
model is the scarce thing: here a fake Ollama answering after 40 ms, one call at a time (like
one GPU), and chatprocessor (CONTRACT=pipeline, in this process) with MODEL_CONCURRENCY=1.

Three cases, side by side, each on fresh lane queues and a fresh worker:

1. baseline: N high jobs (chat_response, priority 9, high lane), one every 50 ms, on an idle
   worker;
2. flood: M batch jobs (batch_processing, priority 3, batch lane) published first, then the
   same high jobs: a high job should wait at most for the one batch call in progress, so
   flood p95 / baseline p95 <= 3;
3. naive: what one FIFO queue does: a (smaller) flood and then the high jobs, all in the
   batch lane's queue without an AMQP priority, so each high job waits behind the flood
   (expect p95 ~ flood x latency; for reading only).

Latency is from publishing a job (persistent, confirmed) to its AIResponse arriving on the
reply queue. Batch jobs answered while the high jobs ran show that the batch lane still moves.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench.common import (
    Broker,
    FakeBackend,
    Options,
    Outcome,
    QueueSet,
    Table,
    Target,
    percentile,
    pyplot,
    rate,
    run_in_process_worker,
    save_chart,
    scratch_dir,
    start_fake_ollama,
    worker_env,
)
from chatprocessor.contracts.pipeline import ai_job

LATENCY = 0.040
SMOKE_LATENCY = 0.010
#: High jobs per case and the gap between two of them.
HIGH_JOBS = 60
SMOKE_HIGH_JOBS = 10
INTERVAL = 0.050
#: Batch jobs published before the high jobs (flood), and in the naive single queue.
FLOOD = 1_000
SMOKE_FLOOD = 50
NAIVE_FLOOD = 200
SMOKE_NAIVE_FLOOD = 50
HIGH_PRIORITY = 9
BATCH_PRIORITY = 3
TENANT = "bench"
#: flood p95 / baseline p95: a high job waits for at most one batch call in progress.
GOAL = 3.0

BASELINE = "baseline (idle worker)"
FLOODED = "flood (lanes + priorities)"
NAIVE = "naive (one FIFO queue, info)"


@dataclass(frozen=True, slots=True)
class LaneQueues:
    """One case's queues: the three lanes and the reply queue, unique to this run."""

    high: str
    standard: str
    batch: str
    replies: str

    @classmethod
    def new(cls, tag: str) -> LaneQueues:
        base = f"bench.lanes.{tag}.{uuid.uuid4().hex[:8]}"
        return cls(f"{base}.high", f"{base}.standard", f"{base}.batch", f"{base}.responses")

    @property
    def lanes(self) -> tuple[str, str, str]:
        return (self.high, self.standard, self.batch)

    def all_names(self) -> list[str]:
        """Every queue the case used or the worker derived (``.dlq``, retry tiers)."""
        names = [self.replies]
        for lane in self.lanes:
            names += QueueSet(lane, self.replies).all_names()[2:]
            names.append(lane)
        return names


@dataclass(slots=True)
class Replies:
    """AIResponses on the reply queue: arrival time per job id, errors counted."""

    high: set[str]
    arrived: dict[str, float] = field(default_factory=dict)
    batch_arrivals: list[float] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    first_batch: asyncio.Event = field(default_factory=asyncio.Event)
    all_high: asyncio.Event = field(default_factory=asyncio.Event)

    def on_message(self, message: Any) -> None:
        now = time.perf_counter()
        try:
            body = orjson.loads(message.body)
        except orjson.JSONDecodeError:
            body = {}
        key = str(body.get("jobId") or message.correlation_id)
        if body.get("status") != "completed":
            self.failed[key] = str(body.get("error") or body.get("status"))
        if key in self.high:
            self.arrived.setdefault(key, now)
            if len(self.arrived) == len(self.high):
                self.all_high.set()
        else:
            self.batch_arrivals.append(now)
            self.first_batch.set()


@dataclass(slots=True)
class Case:
    """What one case measured."""

    label: str
    latencies: list[float]
    flood: int = 0
    batch_answered: int = 0
    seconds: float = math.nan
    llm_calls: int = 0
    max_in_flight: int = 0

    def p(self, q: float) -> float:
        return percentile(self.latencies, q)

    @property
    def batch_rate(self) -> float:
        return rate(self.batch_answered, self.seconds)


def job_body(job_id: str, job_type: str, priority: int) -> bytes:
    return orjson.dumps(
        ai_job(
            id=job_id,
            tenant_id=TENANT,
            conversation_id=job_id,
            message_id=f"{job_id}-m",
            type=job_type,
            content=f"Hello, can you help me with my order? ({job_id})",
            priority=priority,
        )
    )


async def publish(
    broker: Broker,
    queue: str,
    bodies: Iterable[tuple[str, bytes]],
    *,
    reply_to: str,
    priority: int | None,
    window: int = 500,
) -> dict[str, float]:
    """AIJobs to a lane, answers to ``reply_to`` (see Broker.publish)."""
    return await broker.publish(queue, bodies, reply_to=reply_to, priority=priority, window=window)


async def paced(
    broker: Broker,
    queue: str,
    ids: Sequence[str],
    *,
    reply_to: str,
    priority: int | None,
) -> dict[str, float]:
    """One high job every INTERVAL seconds (a fixed schedule, so a slow confirm does not
    push the next job back); publish times by job id."""
    sent: dict[str, float] = {}
    tasks = []
    start = time.perf_counter()
    for index, job_id in enumerate(ids):
        delay = start + index * INTERVAL - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        body = [(job_id, job_body(job_id, "chat_response", HIGH_PRIORITY))]
        tasks.append(
            asyncio.create_task(publish(broker, queue, body, reply_to=reply_to, priority=priority))
        )
    for done in await asyncio.gather(*tasks):
        sent.update(done)
    return sent


async def wait_lanes(broker: Broker, queues: LaneQueues, worker: asyncio.Task[None]) -> None:
    """Until the worker consumes every lane (it declares them, with x-max-priority)."""
    deadline = time.monotonic() + 60
    while True:
        if worker.done():
            worker.result()  # its exception, if it failed
            raise RuntimeError("the worker stopped before consuming its lanes")
        with contextlib.suppress(Exception):  # not declared yet: the passive declare fails
            counts = [await broker.consumers(lane) for lane in queues.lanes]
            if all(counts):
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"no consumer on the lanes {queues.lanes} after 60 s")
        await asyncio.sleep(0.05)


async def run_case(
    broker: Broker,
    fake: FakeBackend,
    *,
    label: str,
    tag: str,
    high: int,
    flood: int,
    single_queue: bool,
    latency: float,
    scratch: Path,
) -> Case:
    """Start a worker on fresh lanes, publish the flood (if any) then the paced high jobs;
    the high jobs' latencies and the batch jobs answered meanwhile."""
    queues = LaneQueues.new(tag)
    case_tag = f"{tag}-{uuid.uuid4().hex[:4]}"
    high_ids = [f"{case_tag}-high-{i}" for i in range(high)]
    replies = Replies(set(high_ids))
    channel = await broker.connection.channel()
    reply_queue = await channel.declare_queue(queues.replies, durable=True)
    await reply_queue.consume(replies.on_message, no_ack=True)
    env = worker_env(
        QueueSet(queues.standard, queues.replies),
        scratch / "data",
        ollama_url=fake.url,
        CONTRACT="pipeline",
        LANE_HIGH_QUEUE=queues.high,
        LANE_STANDARD_QUEUE=queues.standard,
        LANE_BATCH_QUEUE=queues.batch,
        AI_RESPONSE_QUEUE=queues.replies,
        MODEL_CONCURRENCY="1",
        CACHE_ENABLED="off",  # every job reaches the model
        USAGE_LEDGER="off",
        CLASSIFY_REPLIES="false",  # one model call per job
        IDEMPOTENCY_TTL="0",  # the scheduling is measured, not the duplicate store
    )
    try:
        async with run_in_process_worker(env) as worker:
            await wait_lanes(broker, queues, worker)
            await fake.reset()  # idle now: no call in flight to miscount
            if flood:
                bodies = (
                    (job_id, job_body(job_id, "batch_processing", BATCH_PRIORITY))
                    for job_id in (f"{case_tag}-batch-{i}" for i in range(flood))
                )
                await publish(
                    broker,
                    queues.batch,
                    bodies,
                    reply_to=queues.replies,
                    # One FIFO queue: no AMQP priorities at all, arrival order only.
                    priority=None if single_queue else BATCH_PRIORITY,
                )
                # The flood is under way: the model is busy with batch work.
                await asyncio.wait_for(replies.first_batch.wait(), 60)
            calls_before = (await fake.stats()).chat_requests
            batch_before = len(replies.batch_arrivals)
            started = time.perf_counter()
            sent = await paced(
                broker,
                queues.batch if single_queue else queues.high,
                high_ids,
                reply_to=queues.replies,
                # One FIFO queue has no priorities: the high jobs go in line behind the flood.
                priority=None if single_queue else HIGH_PRIORITY,
            )
            timeout = 60 + (flood * latency * 3 if single_queue else 0)
            try:
                await asyncio.wait_for(replies.all_high.wait(), timeout)
            except TimeoutError:
                raise RuntimeError(
                    f"{label}: {len(replies.arrived)} of {high} high replies in {timeout:g} s"
                ) from None
            seconds = time.perf_counter() - started
            batch_answered = len(replies.batch_arrivals) - batch_before
            stats = await fake.stats()
    finally:
        with contextlib.suppress(Exception):
            await channel.close()
        await delete_queues(broker, queues)
    failed = {key: why for key, why in replies.failed.items() if key in replies.high}
    if failed:
        raise RuntimeError(
            f"{label}: {len(failed)} high jobs failed, e.g. {next(iter(failed.items()))}"
        )
    return Case(
        label,
        [replies.arrived[key] - sent[key] for key in high_ids],
        flood=flood,
        batch_answered=batch_answered,
        seconds=seconds,
        llm_calls=stats.chat_requests - calls_before,
        max_in_flight=stats.max_in_flight,
    )


async def delete_queues(broker: Broker, queues: LaneQueues) -> None:
    channel = await broker.connection.channel()
    try:
        for name in queues.all_names():
            with contextlib.suppress(Exception):
                await channel.queue_delete(name)
    finally:
        with contextlib.suppress(Exception):
            await channel.close()


def _chart(path: Path, cases: Sequence[Case], goal: float) -> Path:
    """p50 and p95 per case, log scale (the naive queue is orders of magnitude slower)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = [case.label.replace(" (", "\n(") for case in cases]
    width = 0.38
    xs = range(len(cases))
    for offset, q, color in ((-width / 2, 50, "#9ab8d8"), (width / 2, 95, "#4878a8")):
        values = [1000 * case.p(q) for case in cases]
        bars = ax.bar([x + offset for x in xs], values, width, label=f"p{q}", color=color)
        ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], padding=2, fontsize=8)
    ax.axhline(1000 * goal, color="#c0392b", linestyle="--", label="target: 3 x baseline p95")
    ax.set_yscale("log")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("high-priority job latency, ms (log)")
    ax.set_title("lanes: a chat job under a batch flood, one model slot")
    ax.legend(loc="upper left")
    return save_chart(fig, path)


async def run(options: Options) -> Outcome:
    latency = SMOKE_LATENCY if options.smoke else LATENCY
    high = SMOKE_HIGH_JOBS if options.smoke else HIGH_JOBS
    flood = SMOKE_FLOOD if options.smoke else FLOOD
    naive_flood = SMOKE_NAIVE_FLOOD if options.smoke else NAIVE_FLOOD
    outcome = Outcome("lanes")
    plans = [
        (BASELINE, 0, False),
        (FLOODED, flood, False),
        (NAIVE, naive_flood, True),
    ]
    cases: list[Case] = []
    with scratch_dir("lanes") as scratch:
        async with (
            start_fake_ollama(latency=latency, max_concurrency=1) as fake,
            Broker() as broker,
        ):
            for label, size, single_queue in plans:
                case = await run_case(
                    broker,
                    fake,
                    label=label,
                    tag=options.tag,
                    high=high,
                    flood=size,
                    single_queue=single_queue,
                    latency=latency,
                    scratch=scratch,
                )
                print(f"  {label}: p95 {1000 * case.p(95):,.0f} ms", flush=True)
                cases.append(case)

    baseline, flooded, naive = cases
    table = Table(
        f"lanes: {high} high jobs (priority {HIGH_PRIORITY}, one every {1000 * INTERVAL:g} ms), "
        f"fake Ollama {1000 * latency:g} ms x 1 slot, MODEL_CONCURRENCY=1; latency from publish "
        "to AIResponse",
        [
            "case",
            "batch jobs ahead",
            "p50 ms",
            "p95 ms",
            "max ms",
            "p95 x baseline",
            "batch answered",
            "batch jobs/s",
            "LLM calls meanwhile",
            "max calls at once",
        ],
    )
    for case in cases:
        table.add(
            case.label,
            case.flood,
            1000 * case.p(50),
            1000 * case.p(95),
            1000 * max(case.latencies),
            case.p(95) / baseline.p(95),
            case.batch_answered,
            case.batch_rate if case.flood else "",
            case.llm_calls,
            case.max_in_flight,
        )
    outcome.tables.append(table)
    ratio = flooded.p(95) / baseline.p(95)
    outcome.targets.append(Target("flood p95 / baseline p95", ratio, GOAL, higher_is_better=False))
    outcome.notes.append(
        f"naive p95 / flood p95 = {naive.p(95) / flooded.p(95):,.1f} (info): one FIFO queue "
        f"makes a chat wait for the {naive.flood} batch jobs ahead of it, about "
        f"{naive.flood * latency:,.1f} s of model time"
    )
    outcome.notes.append(
        f"batch lane during the flood: {flooded.batch_answered} jobs answered in "
        f"{flooded.seconds:.1f} s ({flooded.batch_rate:.1f} jobs/s; the model alone does "
        f"{1 / latency:.0f}/s, the high jobs take {rate(high, flooded.seconds):.1f}/s of it)"
    )
    outcome.charts.append(_chart(options.out / "lanes.png", cases, GOAL * baseline.p(95)))
    return outcome
