"""mix: seed 004's governance under a mixed load of tenants, job types and lanes.

Issue 8 is done when a mixed load runs with limits, budgets, cache and costs all visible in
the usage ledger and in the metrics. This scenario sends that load through the whole service
(CONTRACT=pipeline, in this process) on the real RabbitMQ (three lanes with priorities),
Redis (rate-limit windows, spend, response cache) and a fresh Postgres database (the ledger),
with the fake Ollama as the model (it counts words as tokens, so costs are predictable):

- three tenants: ``acme`` (plenty of everything), ``globex`` (a requests-per-minute limit
  about 10 below its job count, so ~10 of its jobs wait in delay queues until the window
  lets them through, up to a minute later; not in the smoke run, which stays short) and
  ``initech`` (a daily budget about half of what its jobs would cost, so it crosses the
  80 % and 95 % alerts and then gets ``over_budget`` answers);
- N jobs of the four types (chat_response ~50 %, sentiment_analysis ~25 %,
  intent_classification ~5 %, batch_processing ~20 %) with priorities 1-10, so all three
  lanes carry work; ~30 % of each tenant's jobs repeat one of its earlier questions (sent
  once that one is answered, so they are cache hits) and a few of acme's questions are
  sent again, identical, by globex (its first one must be a cache miss: tenants never
  share entries).

The smoke run (48 jobs, 5 ms) has no rate-limited tenant, so that it takes seconds, and gives
initech half of the jobs so that its budget is still spent in small steps.

Every job must get its AIResponse; then the worker stops (the ledger writes what it queued)
and the figures are read back three ways: from the responses, from the ledger
(``UsageLedger.report``, as ``chatprocessor usage`` shows it) and from the Prometheus
metrics (``ai_cost_total``, ``ai_cache_hits_total``, ``ai_rate_limited_total`` deltas).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from bench.common import (
    RABBITMQ_URL,
    Broker,
    Options,
    Outcome,
    Table,
    Target,
    percentile,
    pyplot,
    save_chart,
    scratch_dir,
)
from bench.lanes import LaneQueues, delete_queues, publish, wait_lanes
from chatprocessor.contracts.pipeline import ai_job, lane_for
from chatprocessor.stores.usage_ledger import UsageRow

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")
#: An existing database to connect to while creating (and dropping) this run's own.
POSTGRES_URL = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")

JOBS = 300
SMOKE_JOBS = 48
LATENCY = 0.020
SMOKE_LATENCY = 0.005
#: The fake answers this many model calls at once (one small GPU).
FAKE_SLOTS = 2
#: Jobs of the rate-limited tenant held back by its requests-per-minute limit (full run).
RATE_LIMITED = 10
#: Share of a tenant's jobs that repeat one of its earlier questions (cache hits).
REPEAT_SHARE = 0.3
#: acme questions asked again, identically, by globex (each must be a cache miss).
PROBES = 5
SMOKE_PROBES = 2
#: Per 1,000 tokens; the fake counts words, so a job costs a few tenths of a unit.
PRICES = {"llama2": {"input": 1.0, "output": 2.0}}
#: What one job costs on average with these prices and the fake's echo (measured: a model
#: answer costs 0.14-0.22, a cache hit or an over_budget answer nothing). Sizes initech's budget.
COST_PER_JOB = 0.13
#: The most one job costs (measured 0.22): initech's budget is at least MIN_STEPS of them, so
#: no single job jumps from under 80 % past 95 % (that sends only the critical alert).
MAX_JOB_COST = 0.25
MIN_STEPS = 8
#: initech's daily budget as a share of what all its jobs would cost: about half of them run.
BUDGET_SHARE = 0.5
#: Job types and their share of the load (seed 004's AIJob.type).
TYPES = (
    ("chat_response", 50),
    ("sentiment_analysis", 25),
    ("intent_classification", 5),
    ("batch_processing", 20),
)
#: One chatbot configuration for every tenant: only the tenant tells two identical jobs apart.
CONFIG = {
    "model": "llama2",
    "temperature": 0.3,
    "maxTokens": 300,
    "systemPrompt": "You are the support assistant of an online shop.",
    "personality": "friendly",
}
CONTEXT = [
    {"sender": "visitor", "content": "Hello"},
    {"sender": "bot", "content": "Hi! How can I help?"},
]
QUESTIONS = (
    "My order arrived broken, what can I do?",
    "Where is my parcel? It was due yesterday.",
    "Can I change the delivery address of my order?",
    "I love the new colours, thank you!",
    "How do I return a pair of shoes that are too small?",
    "Your website keeps logging me out, this is annoying.",
    "Do you ship to Canada and how long does it take?",
    "I was charged twice for the same order.",
    "Is the blue jacket available in size M?",
    "Can I pay with a gift card and a credit card together?",
    "The discount code SPRING does not work.",
    "Please cancel my subscription.",
)
LANES = ("high", "standard", "batch")
#: A response later than this after its publication waited for the rate limit.
LATE = 10.0


# -- the load ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tenant:
    """A tenant of the run: its name (unique per run), short label and TENANTS entry."""

    name: str
    label: str
    requests_per_minute: int
    daily_budget: float

    def policy(self) -> dict[str, float]:
        return {"requests_per_minute": self.requests_per_minute, "daily_budget": self.daily_budget}


@dataclass(slots=True)
class PlannedJob:
    """One AIJob to send; ``after`` names the job whose answer triggers it (repeats, probes)."""

    id: str
    tenant: Tenant
    type: str
    priority: int
    content: str
    context: list[dict[str, str]] | None
    after: str | None = None
    probe: bool = False

    @property
    def lane(self) -> str:
        return lane_for(self.priority, self.type)

    def body(self) -> bytes:
        return orjson.dumps(
            ai_job(
                id=self.id,
                tenant_id=self.tenant.name,
                conversation_id=f"conv-{self.id}",
                message_id=f"{self.id}-m",
                type=self.type,
                content=self.content,
                priority=self.priority,
                context=self.context,
                chatbot_config=CONFIG,
            )
        )

    def copy(self, job_id: str, tenant: Tenant, *, probe: bool = False) -> PlannedJob:
        """The same question (content, type, context, config), sent once this one is answered."""
        return PlannedJob(
            job_id,
            tenant,
            self.type,
            self.priority,
            self.content,
            self.context,
            after=self.id,
            probe=probe,
        )


def tenants(tag: str, jobs: int, *, smoke: bool) -> tuple[list[Tenant], list[int]]:
    """The three tenants with their limits, and how many jobs each gets (in the smoke run
    initech gets half of them: enough to spend a budget of MIN_STEPS jobs and be refused)."""
    if smoke:
        shares = [jobs // 4, jobs // 4, jobs - 2 * (jobs // 4)]
    else:
        shares = [jobs - 2 * (jobs // 3), jobs // 3, jobs // 3]
    globex_rpm = 600 if smoke else shares[1] - RATE_LIMITED
    budget = round(max(BUDGET_SHARE * shares[2] * COST_PER_JOB, MIN_STEPS * MAX_JOB_COST), 2)
    return [
        Tenant(f"acme-{tag}", "acme", 600, 100.0),
        Tenant(f"globex-{tag}", "globex", globex_rpm, 100.0),
        Tenant(f"initech-{tag}", "initech", 600, budget),
    ], shares


def type_deck(rng: random.Random) -> Iterator[str]:
    """Job types in blocks of 20 holding exactly TYPES' shares, each block shuffled."""
    block = [kind for kind, share in TYPES for _ in range(share // 5)]
    while True:
        rng.shuffle(block)
        yield from block


def plan(
    tag: str, people: Sequence[Tenant], shares: Sequence[int], probes: int
) -> list[PlannedJob]:
    """Every job of the run: originals in a shuffled order, then the repeats and probes that
    wait for an answer. Seeded: every run sends the same mix."""
    rng = random.Random(8)
    deck = type_deck(rng)
    originals: dict[str, list[PlannedJob]] = {}
    later: list[PlannedJob] = []
    counter = 0

    def new_id() -> str:
        nonlocal counter
        counter += 1
        return f"mix-{tag}-{counter}"

    acme, globex = people[0], people[1]
    for tenant, share in zip(people, shares, strict=True):
        repeats = round(REPEAT_SHARE * share)
        fresh = share - repeats - (probes if tenant is globex else 0)
        mine = []
        for _ in range(fresh):
            job_id = new_id()
            question = QUESTIONS[rng.randrange(len(QUESTIONS))]
            mine.append(
                PlannedJob(
                    job_id,
                    tenant,
                    next(deck),
                    rng.randint(1, 10),
                    f"{question} (ticket {job_id})",
                    list(CONTEXT) if rng.random() < 0.4 else None,
                )
            )
        originals[tenant.name] = mine
        later += [rng.choice(mine).copy(new_id(), tenant) for _ in range(repeats)]
    chats = [job for job in originals[acme.name] if job.type == "chat_response"]
    later += [job.copy(new_id(), globex, probe=True) for job in rng.sample(chats, probes)]
    first = [job for mine in originals.values() for job in mine]
    rng.shuffle(first)
    return first + later


# -- the platform's side -----------------------------------------------------------------------


@dataclass(slots=True)
class Response:
    body: dict[str, Any]
    latency: float

    @property
    def status(self) -> str:
        return str(self.body.get("status"))

    @property
    def cached(self) -> bool:
        return bool((self.body.get("metadata") or {}).get("cached"))

    @property
    def cost(self) -> float:
        return float((self.body.get("metadata") or {}).get("cost") or 0.0)


@dataclass(slots=True)
class Platform:
    """Publishes the plan (each follow-up once its original is answered), reads AIResponses."""

    broker: Broker
    queues: LaneQueues
    jobs: list[PlannedJob]
    lanes: dict[str, str]
    sent: dict[str, float] = field(default_factory=dict)
    #: Arrival time and body per job id (a reply may beat its publisher confirm).
    arrived: dict[str, tuple[float, dict[str, Any]]] = field(default_factory=dict)
    duplicates: int = 0
    unexpected: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    _ids: set[str] = field(default_factory=set)
    _followers: dict[str, list[PlannedJob]] = field(default_factory=lambda: defaultdict(list))
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _channel: Any = None

    def __post_init__(self) -> None:
        self._ids = {job.id for job in self.jobs}
        for job in self.jobs:
            if job.after is not None:
                self._followers[job.after].append(job)

    async def start(self) -> None:
        self._channel = await self.broker.connection.channel()
        queue = await self._channel.declare_queue(self.queues.replies, durable=True)
        await queue.consume(self._on_message, no_ack=True)
        await self._send([job for job in self.jobs if job.after is None])

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._channel is not None:
            with contextlib.suppress(Exception):
                await self._channel.close()

    async def _send(self, jobs: Iterable[PlannedJob]) -> None:
        results = await asyncio.gather(
            *(
                publish(
                    self.broker,
                    self.lanes[job.lane],
                    [(job.id, job.body())],
                    reply_to=self.queues.replies,
                    priority=job.priority,
                )
                for job in jobs
            )
        )
        for sent in results:
            self.sent.update(sent)

    def _on_message(self, message: Any) -> None:
        now = time.perf_counter()
        key = message.correlation_id
        if key not in self._ids:
            self.unexpected += 1
            return
        if key in self.arrived:
            self.duplicates += 1
            return
        self.arrived[key] = (now, orjson.loads(message.body))
        followers = self._followers.pop(key, [])
        if followers:
            task = asyncio.create_task(self._send(followers))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if len(self.arrived) == len(self.jobs):
            self.done.set()

    async def wait(self, timeout: float) -> bool:
        """True when every job was answered within ``timeout`` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.done.wait(), timeout)
        if self._tasks:  # the last follow-ups' confirms (their publication times)
            await asyncio.gather(*self._tasks)
        return self.done.is_set()

    def responses(self) -> dict[str, Response]:
        """Every AIResponse received, with its latency from publication."""
        return {
            key: Response(body, arrival - self.sent[key])
            for key, (arrival, body) in self.arrived.items()
            if key in self.sent
        }


# -- the service -------------------------------------------------------------------------------


def worker_settings(
    queues: LaneQueues,
    alerts: str,
    people: Sequence[Tenant],
    *,
    ollama_url: str,
    database_url: str,
    data_dir: Path,
) -> Any:
    """The pipeline worker's settings (Settings objects: TENANTS and MODEL_PRICES are dicts)."""
    from chatprocessor.settings import Settings

    broker = urlsplit(RABBITMQ_URL)
    return Settings(
        _env_file=None,
        transport="rabbitmq",
        contract="pipeline",
        providers=["ollama"],
        ollama_base_url=ollama_url,
        ollama_model="llama2",
        rabbitmq_host=broker.hostname or "127.0.0.1",
        rabbitmq_port=broker.port or 5672,
        rabbitmq_username=broker.username or "guest",
        rabbitmq_password=broker.password or "guest",
        lane_high_queue=queues.high,
        lane_standard_queue=queues.standard,
        lane_batch_queue=queues.batch,
        ai_response_queue=queues.replies,
        alerts_queue=alerts,
        tenants={tenant.name: tenant.policy() for tenant in people},
        model_prices=PRICES,
        classify_replies=True,
        cache_enabled="auto",
        redis_url=REDIS_URL,
        database_url=database_url,
        data_dir=data_dir,
        log_file="",
        ops_port=0,
    )


@contextlib.asynccontextmanager
async def pipeline_worker(settings: Any) -> AsyncIterator[asyncio.Task[None]]:
    """chatprocessor in this process; on exit it stops and its ledger writes what it queued."""
    from chatprocessor.app import run_service

    stop = asyncio.Event()
    task = asyncio.create_task(run_service(settings, stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


@contextlib.asynccontextmanager
async def fresh_database() -> AsyncIterator[str]:
    """A new, empty Postgres database for this run's ledger; dropped afterwards."""
    from sqlalchemy import text

    from chatprocessor.stores.database import create_engine, database_url

    name = f"bench_mix_{uuid.uuid4().hex[:10]}"
    admin = create_engine(database_url(POSTGRES_URL, Path(".")))

    async def execute(statement: str) -> None:
        async with admin.connect() as connection:  # CREATE DATABASE refuses a transaction
            autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
            await autocommit.execute(text(statement))

    try:
        await execute(f'CREATE DATABASE "{name}"')
        try:
            yield POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
        finally:
            await execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.dispose()


@contextlib.asynccontextmanager
async def worker_log(path: Path) -> AsyncIterator[Path]:
    """The worker's warnings and errors (alerts, refusals) in a file, not on the console."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="w")
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("chatprocessor")
    logger.addHandler(handler)
    try:
        yield path
    finally:
        logger.removeHandler(handler)
        handler.close()


async def drain_alerts(broker: Broker, queue: str) -> list[dict[str, Any]]:
    """Every alert event published so far (the worker confirmed them before it stopped)."""
    channel = await broker.connection.channel()
    try:
        alerts = await channel.declare_queue(queue, durable=True)
        found = []
        while (message := await alerts.get(no_ack=True, fail=False)) is not None:
            found.append(orjson.loads(message.body))
        return found
    finally:
        with contextlib.suppress(Exception):
            await channel.close()


async def delete_redis_keys(tag: str) -> int:
    """Remove every Redis key this run created (each names a tenant, queue or job with
    ``tag``); how many there were."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(REDIS_URL)
    async with client:
        keys = [key async for key in client.scan_iter(match=f"*{tag}*", count=1000)]
        if keys:
            await client.delete(*keys)
    return len(keys)


# -- metrics and the ledger --------------------------------------------------------------------


def metric_sums(name: str, tenants: Iterable[str]) -> dict[str, float]:
    """The sum of ``name``'s samples per tenant_id (every other label summed over)."""
    from prometheus_client import REGISTRY

    wanted = set(tenants)
    sums = dict.fromkeys(wanted, 0.0)
    for metric in REGISTRY.collect():
        for sample in metric.samples:
            tenant = sample.labels.get("tenant_id")
            if sample.name == name and tenant in wanted:
                sums[tenant] += sample.value
    return sums


METRICS = ("ai_cost_total", "ai_cache_hits_total", "ai_rate_limited_total")


def metric_snapshot(tenants: Sequence[str]) -> dict[str, dict[str, float]]:
    return {name: metric_sums(name, tenants) for name in METRICS}


@dataclass(slots=True)
class Ledger:
    """What the usage ledger says, read after the worker stopped."""

    by_tenant: dict[str, UsageRow]
    by_tenant_model: list[UsageRow]
    by_type: dict[str, dict[str, float]]
    by_lane: dict[str, int]

    def row(self, tenant: str) -> UsageRow:
        """The tenant's totals (zeros when it has no row)."""
        empty = UsageRow(tenant, "", None, 0, 0, 0, 0, 0.0, "")
        return self.by_tenant.get(tenant, empty)


async def read_ledger(database_url: str, tenants: Sequence[str]) -> Ledger:
    from sqlalchemy import func, select

    from chatprocessor.stores.database import create_engine
    from chatprocessor.stores.database import database_url as async_url
    from chatprocessor.stores.usage_ledger import UsageLedger, ai_usage_logs

    engine = create_engine(async_url(database_url, Path(".")))
    try:
        ledger = UsageLedger(engine)
        by_tenant = {row.tenant_id: row for row in await ledger.report(group_by=("tenant",))}
        by_tenant_model = await ledger.report(group_by=("tenant", "model"))
        table = ai_usage_logs.c
        async with engine.connect() as connection:
            types = await connection.execute(
                select(
                    table.job_type,
                    func.count(),
                    func.sum(table.input_tokens),
                    func.sum(table.output_tokens),
                    func.sum(table.total_cost),
                )
                .where(table.tenant_id.in_(tenants))
                .group_by(table.job_type)
            )
            by_type = {
                str(kind): {"rows": n, "input": i or 0, "output": o or 0, "cost": c or 0.0}
                for kind, n, i, o, c in types
            }
            lanes = await connection.execute(
                select(table.lane, func.count())
                .where(table.tenant_id.in_(tenants))
                .group_by(table.lane)
            )
            by_lane = {str(lane): int(n) for lane, n in lanes}
    finally:
        await engine.dispose()
    return Ledger(by_tenant, by_tenant_model, by_type, by_lane)


# -- the run -----------------------------------------------------------------------------------


@dataclass(slots=True)
class Measured:
    people: list[Tenant]
    jobs: list[PlannedJob]
    responses: dict[str, Response]
    metrics: dict[str, dict[str, float]]
    alerts: list[dict[str, Any]]
    ledger: Ledger
    seconds: float
    duplicates: int
    unexpected: int
    redis_keys: int
    log: Path

    def jobs_of(self, tenant: Tenant) -> list[PlannedJob]:
        return [job for job in self.jobs if job.tenant is tenant]


async def measure(options: Options) -> Measured:
    smoke = options.smoke
    total = SMOKE_JOBS if smoke else JOBS
    people, shares = tenants(options.tag, total, smoke=smoke)
    jobs = plan(options.tag, people, shares, SMOKE_PROBES if smoke else PROBES)
    base = f"bench.mix.{options.tag}"
    queues = LaneQueues(f"{base}.high", f"{base}.standard", f"{base}.batch", f"{base}.responses")
    alerts_queue = f"{base}.alerts"
    names = [tenant.name for tenant in people]
    from tests.fakes.ollama import FakeOllama

    with scratch_dir("mix") as scratch:
        async with (
            fresh_database() as database,
            FakeOllama(
                models=["llama2"],
                latency=SMOKE_LATENCY if smoke else LATENCY,
                max_concurrency=FAKE_SLOTS,
            ) as fake,
            Broker() as broker,
        ):
            fake.json_answer = {
                "sentiment": "negative",
                "intent": "complaint",
                "confidence": 0.87,
                "suggested_actions": ["Offer a refund"],
            }
            settings = worker_settings(
                queues,
                alerts_queue,
                people,
                ollama_url=fake.url,
                database_url=database,
                data_dir=scratch / "data",
            )
            platform = Platform(broker, queues, jobs, settings.lanes)
            try:
                await broker.channel.declare_queue(alerts_queue, durable=True)
                async with worker_log(options.out / "mix.worker.log") as log_path:
                    async with pipeline_worker(settings) as worker:
                        await wait_lanes(broker, queues, worker)
                        before = metric_snapshot(names)
                        started = time.perf_counter()
                        await platform.start()
                        answered = await platform.wait(60 if smoke else 240)
                        seconds = time.perf_counter() - started
                    # The worker stopped: its ledger rows and alerts are all written.
                    after = metric_snapshot(names)
                    if not answered:
                        print(
                            f"  only {len(platform.arrived)} of {len(jobs)} jobs answered",
                            flush=True,
                        )
                    alerts = await drain_alerts(broker, alerts_queue)
                    ledger = await read_ledger(database, names)
            finally:
                await platform.close()
                await delete_queues(broker, queues)
                with contextlib.suppress(Exception):
                    await broker.channel.queue_delete(alerts_queue)
                redis_keys = await delete_redis_keys(options.tag)
    deltas = {name: {t: after[name][t] - before[name][t] for t in names} for name in METRICS}
    return Measured(
        people,
        jobs,
        platform.responses(),
        deltas,
        alerts,
        ledger,
        seconds,
        platform.duplicates,
        platform.unexpected,
        redis_keys,
        log_path,
    )


def _cost(value: float) -> str:
    return f"{value:.6f}"


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


async def run(options: Options) -> Outcome:
    m = await measure(options)
    outcome = Outcome("mix")
    outcome.tables += tenant_tables(m, options.smoke)
    outcome.tables += [lane_table(m), type_table(m), usage_table(m)]
    outcome.targets += targets(m, options.smoke)
    outcome.notes.append(
        f"{len(m.responses)} jobs answered in {m.seconds:.1f} s; duplicate responses: "
        f"{m.duplicates}, unexpected ones: {m.unexpected}; "
        f"Redis keys created and deleted: {m.redis_keys}"
    )
    if not options.smoke:
        outcome.notes.append(
            f"globex's jobs past its {m.people[1].requests_per_minute} requests/min wait in a "
            "delay queue until the window has room (about a minute after its first jobs) and "
            f"are then answered: 'late (> {LATE:g} s)' counts them; ai_rate_limited_total "
            "counts each time a job was held back (one back just before a slot frees is held "
            "again); they make the lanes' p95 and max"
        )
    outcome.notes.append(f"worker warnings and errors (alerts, refusals): {m.log}")
    outcome.charts.append(_chart(options.out / "mix.png", m))
    return outcome


def _answers(m: Measured, jobs: Iterable[PlannedJob]) -> list[Response]:
    return [m.responses[job.id] for job in jobs if job.id in m.responses]


def tenant_tables(m: Measured, smoke: bool) -> list[Table]:
    """Jobs and governance per tenant; tokens and cost per tenant from the three sources."""
    alerts_of: dict[str, list[str]] = defaultdict(list)
    for alert in m.alerts:
        level, share = alert.get("level"), alert.get("percentage")
        alerts_of[str(alert.get("tenantId"))].append(f"{level} at {share}%")
    latency = SMOKE_LATENCY if smoke else LATENCY
    governance = Table(
        f"mix: {len(m.jobs)} AIJobs of 3 tenants, 4 types, 3 lanes; fake Ollama "
        f"{1000 * latency:g} ms x {FAKE_SLOTS} slots; cache hits from the responses / the "
        "ledger / ai_cache_hits_total",
        [
            "tenant",
            "rpm",
            "budget/day",
            "sent",
            "answered",
            "completed",
            "over_budget",
            "other",
            "cache hits",
            "rate-limit delays",
            f"late (> {LATE:g} s)",
            "alerts on ALERTS_QUEUE",
        ],
    )
    money = Table(
        "mix: tokens (ledger) and cost per tenant, from the responses, the ledger and "
        "ai_cost_total",
        [
            "tenant",
            "responses",
            "ledger rows",
            "input tokens",
            "output tokens",
            "cost (responses)",
            "cost (ledger)",
            "cost (metrics)",
            "ledger / metrics",
        ],
    )
    for tenant in m.people:
        answers = _answers(m, m.jobs_of(tenant))
        statuses = Counter(answer.status for answer in answers)
        row = m.ledger.row(tenant.name)
        metric_hits = m.metrics["ai_cache_hits_total"][tenant.name]
        metric_cost = m.metrics["ai_cost_total"][tenant.name]
        governance.add(
            tenant.label,
            tenant.requests_per_minute,
            tenant.daily_budget,
            len(m.jobs_of(tenant)),
            len(answers),
            statuses["completed"],
            statuses["over_budget"],
            len(answers) - statuses["completed"] - statuses["over_budget"],
            f"{sum(a.cached for a in answers)} / {row.cache_hits} / {metric_hits:.0f}",
            int(m.metrics["ai_rate_limited_total"][tenant.name]),
            sum(answer.latency > LATE for answer in answers),
            ", ".join(alerts_of.get(tenant.name, [])) or "-",
        )
        money.add(
            tenant.label,
            len(answers),
            row.requests,
            row.input_tokens,
            row.output_tokens,
            _cost(sum(answer.cost for answer in answers)),
            _cost(row.cost),
            _cost(metric_cost),
            f"{_ratio(row.cost, metric_cost):.12f}",
        )
    return [governance, money]


def lane_table(m: Measured) -> Table:
    table = Table(
        "mix: per lane; latency from publishing the AIJob to its AIResponse",
        ["lane", "jobs", "ledger rows", "completed", "cache hits", "p50 ms", "p95 ms", "max ms"],
    )
    for lane in LANES:
        answers = _answers(m, (job for job in m.jobs if job.lane == lane))
        latencies = [answer.latency for answer in answers]
        table.add(
            lane,
            len(answers),
            m.ledger.by_lane.get(lane, 0),
            sum(answer.status == "completed" for answer in answers),
            sum(answer.cached for answer in answers),
            1000 * percentile(latencies, 50),
            1000 * percentile(latencies, 95),
            1000 * max(latencies) if latencies else math.nan,
        )
    return table


def type_table(m: Measured) -> Table:
    table = Table(
        "mix: per job type; tokens and cost from the ledger",
        [
            "type",
            "jobs",
            "ledger rows",
            "completed",
            "cache hits",
            "input tokens",
            "output tokens",
            "cost",
            "cost per model answer",
        ],
    )
    for kind, _ in TYPES:
        answers = _answers(m, (job for job in m.jobs if job.type == kind))
        figures = m.ledger.by_type.get(kind, {})
        paid = sum(a.status == "completed" and not a.cached for a in answers)
        cost = float(figures.get("cost", 0.0))
        table.add(
            kind,
            len(answers),
            int(figures.get("rows", 0)),
            sum(answer.status == "completed" for answer in answers),
            sum(answer.cached for answer in answers),
            int(figures.get("input", 0)),
            int(figures.get("output", 0)),
            _cost(cost),
            _cost(cost / paid) if paid else "-",
        )
    return table


def usage_table(m: Measured) -> Table:
    """The ledger grouped by tenant and model, with the columns of ``chatprocessor usage``."""
    table = Table(
        "mix: the ledger as `chatprocessor usage --by tenant,model` shows it (UsageLedger.report)",
        [
            "Tenant",
            "Model",
            "Requests",
            "Cache hits",
            "Input tokens",
            "Output tokens",
            "Cost (USD)",
        ],
    )
    rows = m.ledger.by_tenant_model
    for row in rows:
        table.add(
            row.tenant_id,
            row.model,
            row.requests,
            row.cache_hits,
            row.input_tokens,
            row.output_tokens,
            _cost(row.cost),
        )
    table.add(
        "Total",
        "",
        sum(row.requests for row in rows),
        sum(row.cache_hits for row in rows),
        sum(row.input_tokens for row in rows),
        sum(row.output_tokens for row in rows),
        _cost(sum(row.cost for row in rows)),
    )
    return table


def targets(m: Measured, smoke: bool) -> list[Target]:
    answered = sum(job.id in m.responses for job in m.jobs)
    found = [Target("answered / sent", answered / len(m.jobs), 1.0)]
    for tenant in m.people:
        row = m.ledger.row(tenant.name)
        metric_cost = m.metrics["ai_cost_total"][tenant.name]
        found.append(
            Target(
                f"{tenant.label}: |ledger cost / ai_cost_total - 1| x 1e9",
                abs(_ratio(row.cost, metric_cost) - 1) * 1e9,
                1.0,
                higher_is_better=False,
            )
        )
        found.append(
            Target(
                f"{tenant.label}: |ledger rows - responses|",
                abs(row.requests - len(_answers(m, m.jobs_of(tenant)))),
                0,
                higher_is_better=False,
            )
        )
    hits = sum(response.cached for response in m.responses.values())
    found.append(Target("cache hits (from responses)", hits, 1))
    initech = m.people[2]
    levels = {a.get("level") for a in m.alerts if a.get("tenantId") == initech.name}
    found.append(Target("initech: alert levels received (warning, critical)", len(levels), 2))
    refused = sum(a.status == "over_budget" for a in _answers(m, m.jobs_of(initech)))
    found.append(Target("initech: jobs answered over_budget", refused, 1))
    probes = _answers(m, (job for job in m.jobs if job.probe))
    found.append(
        Target(
            f"cache hits across tenants ({len(probes)} acme questions asked again by globex)",
            sum(answer.cached for answer in probes),
            0,
            higher_is_better=False,
        )
    )
    if not smoke:
        globex = m.people[1]
        found.append(
            Target(
                "globex: rate-limit delays (ai_rate_limited_total)",
                int(m.metrics["ai_rate_limited_total"][globex.name]),
                1,
            )
        )
    return found


def _chart(path: Path, m: Measured) -> Path:
    """Left: each tenant's answers by outcome; right: p50 and p95 latency per lane."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    labels = [tenant.label for tenant in m.people]
    parts: dict[str, list[int]] = {"model": [], "cache hit": [], "over_budget": [], "other": []}
    for tenant in m.people:
        answers = _answers(m, m.jobs_of(tenant))
        parts["model"].append(sum(a.status == "completed" and not a.cached for a in answers))
        parts["cache hit"].append(sum(a.status == "completed" and a.cached for a in answers))
        parts["over_budget"].append(sum(a.status == "over_budget" for a in answers))
        parts["other"].append(sum(a.status not in ("completed", "over_budget") for a in answers))
    colors = {"model": "#4878a8", "cache hit": "#9ab8d8", "over_budget": "#c0392b"}
    bottom = [0] * len(labels)
    for name, values in parts.items():
        left.bar(labels, values, bottom=bottom, label=name, color=colors.get(name, "#888888"))
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    left.set_title("answers per tenant")
    left.set_ylabel("jobs")
    left.set_ylim(0, 1.3 * max(bottom, default=1))  # room for the legend above the bars
    left.legend(loc="upper center", ncol=4, fontsize=8)
    width = 0.38
    for offset, q, color in ((-width / 2, 50, "#9ab8d8"), (width / 2, 95, "#4878a8")):
        heights: list[float] = []
        for lane in LANES:
            latencies = [a.latency for a in _answers(m, (j for j in m.jobs if j.lane == lane))]
            height = 1000 * percentile(latencies, q)
            heights.append(0.0 if math.isnan(height) else height)
        xs = [i + offset for i in range(len(LANES))]
        bars = right.bar(xs, heights, width, label=f"p{q}", color=color)
        right.bar_label(bars, labels=[f"{v:,.0f}" for v in heights], padding=2, fontsize=8)
    right.set_xticks(range(len(LANES)), LANES)
    right.set_yscale("log")  # the rate-limited jobs wait a minute, the others a second
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda value, _position: f"{value:,.0f}")
    right.yaxis.set_major_formatter(plain)
    right.yaxis.set_minor_formatter(plain)
    right.set_ylabel("publish -> AIResponse, ms (log)")
    right.set_title("latency per lane")
    right.legend()
    return save_chart(fig, path)
