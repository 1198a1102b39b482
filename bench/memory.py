"""Scenario 4, memory: a worker's resident memory idle, then under a backlog of waiting jobs.

For each transport (RabbitMQ, then the local SQLite queue) a ``python -m chatprocessor run``
worker (PREFETCH_COUNT=16, PROVIDERS=ollama against the fake Ollama answering after
``LATENCY`` seconds, so the worker stays busy and the queue stays full) starts, answers one
warm-up job, and is sampled (psutil RSS, every ``SAMPLE_EVERY`` s) while idle; then
``JOBS`` jobs land in its input queue at once and sampling goes on while it works through
them. Prefetch bounds what the worker holds, so its memory must stay flat however many jobs
wait: the table compares the largest RSS under the backlog with the idle RSS, and the RSS
late in the backlog with the RSS early in it (growth per job processed would show a leak).

The RabbitMQ jobs are published by the benchmark with confirms; the local ones are inserted
into the worker's SQLite queue file in one transaction (rows exactly as
``LocalTransport.publish`` writes them), since publishing 10,000 rows one commit at a time
would measure the disk, not the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import statistics
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import (
    BenchProcess,
    Broker,
    Job,
    Options,
    Outcome,
    QueueSet,
    Table,
    Target,
    chatprocessor_process,
    make_jobs,
    pyplot,
    save_chart,
    scratch_dir,
    start_fake_ollama,
    worker_env,
)

PREFETCH = 16
#: Seconds the fake Ollama takes per answer: 16 / 0.1 = at most 160 jobs/s, so 10,000 wait.
LATENCY = 0.1
SAMPLE_EVERY = 0.1
MB = 1024 * 1024
#: RSS under the backlog may exceed the idle RSS by this factor at most ("flat").
MAX_RATIO = 1.10
#: RSS in the last quarter of the backlog over RSS in its first quarter (leak check).
MAX_GROWTH = 1.05


@dataclass(slots=True)
class Sizes:
    jobs: int
    idle: float  # seconds sampled idle
    backlog: float  # seconds sampled after the jobs were queued


FULL = Sizes(jobs=10_000, idle=4.0, backlog=18.0)
SMOKE = Sizes(jobs=200, idle=1.0, backlog=1.5)


@dataclass(slots=True)
class Trace:
    """RSS samples of one worker: (seconds since sampling began, bytes)."""

    transport: str
    samples: list[tuple[float, int]] = field(default_factory=list)
    backlog_at: float = 0.0  # when the jobs started landing
    queued_at: float = 0.0  # when all of them were in the queue
    ended_at: float = 0.0
    waiting_at_end: int = 0
    jobs: int = 0

    def between(self, start: float, end: float) -> list[int]:
        return [rss for t, rss in self.samples if start <= t < end]

    @property
    def idle(self) -> float:
        return statistics.median(self.between(0.0, self.backlog_at))

    @property
    def backlog(self) -> list[int]:
        return self.between(self.backlog_at, self.ended_at + 1)

    @property
    def growth(self) -> float:
        """Median RSS of the last quarter of the backlog over that of its first quarter."""
        quarter = (self.ended_at - self.backlog_at) / 4
        early = self.between(self.backlog_at, self.backlog_at + quarter)
        late = self.between(self.ended_at - quarter, self.ended_at + 1)
        return statistics.median(late) / statistics.median(early)


class Sampler:
    """Samples a process's RSS in the background until stopped."""

    def __init__(self, process: BenchProcess, trace: Trace) -> None:
        self.process = process
        self.trace = trace
        self.started = time.perf_counter()
        self._task: asyncio.Task[None] | None = None

    def now(self) -> float:
        return time.perf_counter() - self.started

    def __enter__(self) -> Sampler:
        self._task = asyncio.create_task(self._sample())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _sample(self) -> None:
        while self.process.running:
            self.trace.samples.append((self.now(), self.process.rss_bytes()))
            await asyncio.sleep(SAMPLE_EVERY)


# -- the two transports ----------------------------------------------------------------------


class RabbitSide:
    """Jobs in a RabbitMQ queue, published by the benchmark with confirms."""

    name = "rabbitmq"

    def __init__(self, broker: Broker, queues: QueueSet) -> None:
        self.broker = broker
        self.queues = queues

    async def ready(self, process: BenchProcess) -> None:
        await self.broker.wait_consumers(self.queues.input, 1, processes=[process])

    async def put(self, jobs: Sequence[Job]) -> None:
        await self.broker.publish(self.queues.input, jobs)

    async def waiting(self) -> int:
        return await self.broker.depth(self.queues.input)

    async def replies(self) -> int:
        return await self.broker.depth(self.queues.output)


class LocalSide:
    """Jobs in the worker's SQLite queue file."""

    name = "local"

    def __init__(self, path: Path, queues: QueueSet) -> None:
        self.path = path
        self.queues = queues

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30, isolation_level=None)

    async def ready(self, process: BenchProcess) -> None:
        """The worker created its queue file and tables (LocalTransport.connect)."""
        deadline = time.monotonic() + 60
        while not await asyncio.to_thread(self._has_schema):
            if not process.running:
                raise RuntimeError(f"{process.name} exited early:\n{process.console()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no local queue after 60s\n{process.console()}")
            await asyncio.sleep(0.05)

    def _has_schema(self) -> bool:
        if not self.path.exists():
            return False
        db = self._db()
        try:
            found = db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'reply_queues'"
            ).fetchone()
            return found is not None
        except sqlite3.Error:
            return False
        finally:
            db.close()

    async def put(self, jobs: Sequence[Job]) -> None:
        def insert() -> None:
            now = time.time()
            db = self._db()
            try:
                db.execute("BEGIN IMMEDIATE")
                db.executemany(
                    "INSERT INTO messages (queue, body, message_id, correlation_id, reply_to,"
                    " type, headers, visible_at, created_at)"
                    " VALUES (?, ?, ?, NULL, NULL, NULL, NULL, ?, ?)",
                    [(self.queues.input, job.body, job.id, now, now) for job in jobs],
                )
                db.execute("COMMIT")
            finally:
                db.close()

        await asyncio.to_thread(insert)

    def _count(self, queue: str) -> int:
        db = self._db()
        try:
            return int(
                db.execute("SELECT COUNT(*) FROM messages WHERE queue = ?", (queue,)).fetchone()[0]
            )
        finally:
            db.close()

    async def waiting(self) -> int:
        return await asyncio.to_thread(self._count, self.queues.input)

    async def replies(self) -> int:
        return await asyncio.to_thread(self._count, self.queues.output)


Side = RabbitSide | LocalSide


@contextlib.asynccontextmanager
async def _side(transport: str, data_dir: Path, queues: QueueSet) -> AsyncIterator[Side]:
    if transport == "local":
        yield LocalSide(data_dir / "queue.sqlite3", queues)
        return
    async with Broker() as broker:
        await broker.declare(queues)
        try:
            yield RabbitSide(broker, queues)
        finally:
            await broker.delete(queues)


async def _wait_replies(side: Side, process: BenchProcess, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while await side.replies() < n:
        if not process.running:
            raise RuntimeError(f"{process.name} exited early:\n{process.console()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no warm-up reply after {timeout:g}s\n{process.console()}")
        await asyncio.sleep(0.05)


async def measure(transport: str, sizes: Sizes, fake_url: str, scratch: Path, tag: str) -> Trace:
    """One worker on ``transport``: idle samples, then the backlog's."""
    queues = QueueSet.new(f"memory-{transport}")
    data_dir = scratch / transport
    env = worker_env(queues, data_dir, ollama_url=fake_url, prefetch=PREFETCH, TRANSPORT=transport)
    trace = Trace(transport, jobs=sizes.jobs)
    async with _side(transport, data_dir, queues) as side:
        process = await chatprocessor_process(env, f"memory-{transport}", scratch).start()
        try:
            await side.ready(process)
            await side.put(make_jobs(f"{tag}-{transport}-warmup", 1))
            await _wait_replies(side, process, 1)
            with Sampler(process, trace) as sampler:
                await asyncio.sleep(sizes.idle)
                trace.backlog_at = sampler.now()
                await side.put(make_jobs(f"{tag}-{transport}", sizes.jobs))
                trace.queued_at = sampler.now()
                await asyncio.sleep(max(0.0, sizes.backlog - (trace.queued_at - trace.backlog_at)))
                trace.ended_at = sampler.now()
                trace.waiting_at_end = await side.waiting()
            if not process.running:
                raise RuntimeError(f"{process.name} exited:\n{process.console()}")
        finally:
            await process.stop()
    return trace


async def run(options: Options) -> Outcome:
    sizes = SMOKE if options.smoke else FULL
    traces: list[Trace] = []
    with scratch_dir("memory") as scratch:
        async with start_fake_ollama(latency=LATENCY) as fake:
            for transport in ("rabbitmq", "local"):
                traces.append(await measure(transport, sizes, fake.url, scratch, options.tag))
    return _outcome(options, sizes, traces)


def _outcome(options: Options, sizes: Sizes, traces: Sequence[Trace]) -> Outcome:
    table = Table(
        f"memory: worker RSS idle and with {sizes.jobs:,} jobs queued at once "
        f"(PREFETCH_COUNT={PREFETCH}, fake Ollama {LATENCY * 1000:.0f} ms per answer)",
        [
            "transport",
            "idle MB",
            "max under backlog MB",
            "max / idle",
            "late / early",
            "jobs done",
            "still waiting",
            "seconds",
        ],
    )
    outcome = Outcome("memory", tables=[table])
    for trace in traces:
        idle = trace.idle
        peak = max(trace.backlog)
        done = trace.jobs - trace.waiting_at_end
        table.add(
            trace.transport,
            idle / MB,
            peak / MB,
            peak / idle,
            trace.growth,
            done,
            trace.waiting_at_end,
            trace.ended_at - trace.backlog_at,
        )
        outcome.targets += [
            Target(
                f"{trace.transport} max RSS under backlog / idle",
                peak / idle,
                MAX_RATIO,
                higher_is_better=False,
            ),
            Target(
                f"{trace.transport} RSS late / early in the backlog",
                trace.growth,
                MAX_GROWTH,
                higher_is_better=False,
            ),
        ]
        if trace.waiting_at_end == 0:
            outcome.notes.append(
                f"{trace.transport}: the queue emptied before sampling ended, so part of the "
                "window was not under backlog"
            )
    outcome.notes.append(
        f"RSS sampled every {SAMPLE_EVERY:g}s with psutil; idle = median of {sizes.idle:g}s "
        "after one warm-up job; late / early = median RSS of the last quarter of the backlog "
        "window over its first quarter"
    )
    outcome.charts.append(_chart(options.out / "memory.png", traces))
    return outcome


def _chart(path: Path, traces: Sequence[Trace]) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    colors = {"rabbitmq": "#4878a8", "local": "#d98c2b"}
    for trace in traces:
        color = colors.get(trace.transport, "#555555")
        ax.plot(
            [t for t, _ in trace.samples],
            [rss / MB for _, rss in trace.samples],
            label=f"{trace.transport} ({trace.jobs:,} jobs queued at the dashed line)",
            color=color,
        )
        ax.axvline(trace.backlog_at, color=color, linestyle="--", alpha=0.6)
    ax.set_title(f"worker RSS, idle then under a backlog (prefetch {PREFETCH})")
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS (MB)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return save_chart(fig, path)
