"""overhead: what chatprocessor costs per job when the model costs nothing.

An instant backend (the fake Ollama, zero latency), the same jobs through the real RabbitMQ,
the same prefetch for every contestant, each a process of its own:

- limit: a minimal aio-pika loop written here (consume, POST to the fake's ``/api/chat``
  with one shared ``aiohttp.ClientSession``, the HTTP client chatprocessor uses for it,
  publish the reply with confirms, ack);
- chatprocessor: ``python -m chatprocessor run`` with default settings (idempotency store
  included);
- faststream: the same job as most users would write it with FastStream (a RabbitMQ
  subscriber calling the fake with httpx, its reply published by the subscriber's publisher),
  started with FastStream's own CLI.

Four rows more are for reading only (no target): the limit without the LLM call (the
broker's own ceiling), the limit with httpx instead of aiohttp (what that choice of client
is worth), chatprocessor with IDEMPOTENCY_TTL=0 (what the idempotency store costs) and
with HISTORY_ENABLED=true (what conversation history costs the seed 000 door).

Method: 4 rounds; in each, every contestant in turn (the order reversed every other round, so
drift in the machine's load hits all alike) gets its share of the jobs published first
(persistent, confirmed), then starts; its rate is counted from its first reply to its last.
Totals are jobs over the summed first-to-last times. CPU ms/job is the contestant process's
own CPU time, which other processes' load disturbs less than jobs/s.

Peers run as ``python -m bench.overhead limit [--client aiohttp|httpx|none]`` and
``python -m faststream run bench.overhead:faststream_app --factory``, configured by
BENCH_INPUT, BENCH_OUTPUT, OLLAMA_BASE_URL, PREFETCH_COUNT.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel

from bench.common import (
    RABBITMQ_URL,
    BenchProcess,
    Broker,
    FakeBackend,
    Options,
    Outcome,
    QueueSet,
    Table,
    Target,
    bar_chart,
    chatprocessor_process,
    make_jobs,
    rate,
    run_loop,
    scratch_dir,
    start_fake_ollama,
    worker_env,
)

PREFETCH = 32
#: Jobs per contestant, split into rounds that run the contestants in alternating order, so
#: a change in the machine's load (other processes) does not favour one of them.
JOBS = 5_000
INFO_JOBS = 2_000
ROUNDS = 4
SMOKE_JOBS = 40
MODEL = "llama2"

LIMIT = "limit (aio-pika loop)"
CHATPROCESSOR = "chatprocessor"
FASTSTREAM = "faststream"
BROKER_ONLY = "broker only, no LLM call (info)"
LIMIT_HTTPX = "limit with httpx (info)"
NO_STORE = "chatprocessor, IDEMPOTENCY_TTL=0 (info)"
WITH_HISTORY = "chatprocessor, HISTORY_ENABLED=true (info)"
MAIN = (LIMIT, CHATPROCESSOR, FASTSTREAM)
CHART_LABELS = {
    LIMIT: "limit\n(aio-pika loop)",
    CHATPROCESSOR: "chatprocessor",
    FASTSTREAM: "faststream",
    BROKER_ONLY: "broker only\n(info)",
    LIMIT_HTTPX: "limit, httpx\n(info)",
    NO_STORE: "chatprocessor\nTTL=0 (info)",
    WITH_HISTORY: "chatprocessor\nhistory (info)",
}


@dataclass(slots=True)
class Run:
    """One contestant over one round (or, added up, over all of them)."""

    label: str
    answered: int
    seconds: float
    cpu_seconds: float
    llm_calls: int
    rounds: list[float] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return rate(self.answered - len(self.rounds or [0]), self.seconds)

    def __add__(self, other: Run) -> Run:
        return Run(
            self.label,
            self.answered + other.answered,
            self.seconds + other.seconds,
            self.cpu_seconds + other.cpu_seconds,
            self.llm_calls + other.llm_calls,
            [*(self.rounds or [self.throughput]), *(other.rounds or [other.throughput])],
        )

    @property
    def cpu_ms_per_job(self) -> float:
        return 1000 * self.cpu_seconds / self.answered if self.answered else math.nan


def per_round(run: Run) -> list[float]:
    """jobs/s of each round, in order."""
    return run.rounds or [run.throughput]


Starter = Callable[[QueueSet, Path], BenchProcess]


def _peer_env(queues: QueueSet, url: str) -> dict[str, str]:
    return {
        "BENCH_INPUT": queues.input,
        "BENCH_OUTPUT": queues.output,
        "OLLAMA_BASE_URL": url,
        "PREFETCH_COUNT": str(PREFETCH),
    }


def contestants(fake: FakeBackend) -> dict[str, Starter]:
    def limit(queues: QueueSet, scratch: Path) -> BenchProcess:
        args = [sys.executable, "-m", "bench.overhead", "limit"]
        return BenchProcess(args, _peer_env(queues, fake.url), "limit", scratch)

    def limit_httpx(queues: QueueSet, scratch: Path) -> BenchProcess:
        args = [sys.executable, "-m", "bench.overhead", "limit", "--client", "httpx"]
        return BenchProcess(args, _peer_env(queues, fake.url), "limit-httpx", scratch)

    def broker_only(queues: QueueSet, scratch: Path) -> BenchProcess:
        args = [sys.executable, "-m", "bench.overhead", "limit", "--client", "none"]
        return BenchProcess(args, _peer_env(queues, fake.url), "broker-only", scratch)

    def faststream(queues: QueueSet, scratch: Path) -> BenchProcess:
        args = [sys.executable, "-m", "faststream", "run", "bench.overhead:faststream_app"]
        args += ["--factory", "--log-level", "warning"]
        return BenchProcess(args, _peer_env(queues, fake.url), "faststream", scratch)

    def chatprocessor(
        queues: QueueSet, scratch: Path, name: str = "chatprocessor", **extra: str
    ) -> BenchProcess:
        env = worker_env(queues, scratch / "data", ollama_url=fake.url, prefetch=PREFETCH, **extra)
        return chatprocessor_process(env, name, scratch)

    return {
        LIMIT: limit,
        CHATPROCESSOR: chatprocessor,
        FASTSTREAM: faststream,
        BROKER_ONLY: broker_only,
        LIMIT_HTTPX: limit_httpx,
        NO_STORE: lambda queues, scratch: chatprocessor(
            queues, scratch, "chatprocessor-nostore", IDEMPOTENCY_TTL="0"
        ),
        WITH_HISTORY: lambda queues, scratch: chatprocessor(
            queues, scratch, "chatprocessor-history", HISTORY_ENABLED="true"
        ),
    }


async def measure(
    broker: Broker,
    fake: FakeBackend,
    *,
    label: str,
    start: Starter,
    jobs_count: int,
    options: Options,
    scratch: Path,
) -> Run:
    queues = QueueSet.new(f"overhead.{options.tag}")
    await broker.declare(queues)
    process: BenchProcess | None = None
    try:
        jobs = make_jobs(options.tag, jobs_count)
        await broker.publish(queues.input, jobs)
        collector = await broker.collect(queues.output, [job.id for job in jobs])
        await fake.reset()
        process = await start(queues, scratch).start()
        await broker.wait_consumers(queues.input, 1, processes=[process])
        cpu_start = process.cpu_seconds()
        complete = await collector.wait(timeout=max(60.0, jobs_count / 50))
        cpu = process.cpu_seconds() - cpu_start
        await collector.close()
        if not complete:
            raise RuntimeError(
                f"{label}: {len(collector.replies)} of {jobs_count} replies\n{process.console()}"
            )
        stats = await fake.stats()
        return Run(
            label,
            len(collector.replies),
            collector.last - collector.first,
            cpu,
            stats.chat_requests,
        )
    finally:
        if process is not None:
            await process.stop()
        await broker.delete(queues)


async def run(options: Options) -> Outcome:
    jobs_count = SMOKE_JOBS if options.smoke else JOBS
    info_count = SMOKE_JOBS if options.smoke else INFO_JOBS
    rounds = 1 if options.smoke else ROUNDS
    outcome = Outcome("overhead")
    load = os.getloadavg()[0]
    runs: dict[str, Run] = {}
    with scratch_dir("overhead") as scratch:
        async with start_fake_ollama(latency=0.0) as fake, Broker() as broker:
            order = list(contestants(fake).items())
            for round_ in range(rounds):
                for label, start in order if round_ % 2 == 0 else order[::-1]:
                    size = (jobs_count if label in MAIN else info_count) // rounds
                    result = await measure(
                        broker,
                        fake,
                        label=label,
                        start=start,
                        jobs_count=size,
                        options=options,
                        scratch=scratch,
                    )
                    runs[label] = runs[label] + result if label in runs else result
                    print(f"  round {round_ + 1}: {label}: {result.throughput:,.0f} jobs/s")

    limit = runs[LIMIT].throughput
    peer = runs[FASTSTREAM].throughput
    table = Table(
        f"overhead: zero-latency fake Ollama, prefetch {PREFETCH}, {rounds} round(s) in "
        "alternating order; each round publishes all its jobs before the contestant starts "
        "and times its first to last reply",
        [
            "contestant",
            "jobs",
            "seconds",
            "jobs/s",
            "x limit",
            "x faststream",
            "CPU ms/job",
            "CPU x limit",
        ],
    )
    for label, result in runs.items():
        table.add(
            label,
            result.answered,
            result.seconds,
            result.throughput,
            result.throughput / limit,
            result.throughput / peer,
            result.cpu_ms_per_job,
            # A smoke run may be over before the process clock ticks (0 ms).
            result.cpu_ms_per_job / (runs[LIMIT].cpu_ms_per_job or math.nan),
        )
    outcome.tables.append(table)
    mine = runs[CHATPROCESSOR].throughput
    outcome.targets += [
        Target("chatprocessor / limit (jobs/s)", mine / limit, 0.8),
        Target("chatprocessor / faststream (jobs/s)", mine / peer, 1.0),
    ]
    calls = {label: result.llm_calls for label, result in runs.items()}
    outcome.notes.append(
        "jobs/s per round: "
        + "; ".join(
            f"{label}: " + ", ".join(f"{r:,.0f}" for r in per_round(result))
            for label, result in runs.items()
        )
    )
    paired = {
        other: [
            a / b
            for a, b in zip(per_round(runs[CHATPROCESSOR]), per_round(runs[other]), strict=True)
        ]
        for other in (LIMIT, FASTSTREAM)
    }
    outcome.notes.append(
        "chatprocessor's jobs/s over the other's in the same round (less sensitive to load "
        "from other processes than the totals): "
        + "; ".join(
            f"x {other}: "
            + ", ".join(f"{r:.3f}" for r in ratios)
            + f" (median {statistics.median(ratios):.3f})"
            for other, ratios in paired.items()
        )
    )
    broker_only = runs[BROKER_ONLY].throughput
    outcome.notes.append(
        f"the issue's literal limit has no LLM call (consume, publish with confirms, ack): "
        f"that is the broker-only row; chatprocessor / broker-only = {mine / broker_only:.3f}. "
        "The limit row adds the POST to the fake Ollama with aiohttp, as chatprocessor does"
    )
    outcome.notes.append(
        f"CPU ms/job: the contestant process only. 1-min load average {load:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end ({os.cpu_count()} CPUs)"
    )
    outcome.notes.append(
        "LLM calls per contestant (should equal jobs, broker-only 0): "
        + ", ".join(f"{label}={count}" for label, count in calls.items())
    )
    # The broker-only bar would dwarf the others: it stays in the table only.
    charted = [label for label in runs if label != BROKER_ONLY]
    outcome.charts.append(
        bar_chart(
            options.out / "overhead.png",
            f"overhead: jobs/s with an instant LLM (prefetch {PREFETCH})",
            [CHART_LABELS[label] for label in charted],
            [runs[label].throughput for label in charted],
            ylabel="jobs per second",
            reference=0.8 * limit,
            reference_label="target: 0.8 x limit",
        )
    )
    return outcome


# -- the limit: a minimal aio-pika loop ---------------------------------------------------------


async def limit_main(*, client: str = "aiohttp") -> None:
    """Consume, ask the fake Ollama, publish the reply (confirmed, persistent), ack.

    ``client``: ``aiohttp`` (the limit: one shared ``aiohttp.ClientSession``, the HTTP
    client chatprocessor's Ollama provider uses), ``httpx`` (what the other common client
    costs) or ``none`` (no LLM call: the broker's ceiling).
    """
    import aio_pika
    import aiohttp
    import httpx

    source, target = os.environ["BENCH_INPUT"], os.environ["BENCH_OUTPUT"]
    prefetch = int(os.environ.get("PREFETCH_COUNT", "1"))
    base_url = os.environ["OLLAMA_BASE_URL"]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    headers = {"content-type": "application/json"}

    async with contextlib.AsyncExitStack() as stack:
        if client == "httpx":
            http = await stack.enter_async_context(
                httpx.AsyncClient(base_url=base_url, timeout=300)
            )

            async def ask(request: bytes) -> bytes:
                response = await http.post("/api/chat", content=request, headers=headers)
                response.raise_for_status()
                return response.content

        elif client == "aiohttp":
            session = await stack.enter_async_context(aiohttp.ClientSession(base_url))

            async def ask(request: bytes) -> bytes:
                async with session.post("/api/chat", data=request, headers=headers) as response:
                    response.raise_for_status()
                    return await response.read()

        connection = await stack.enter_async_context(await aio_pika.connect(RABBITMQ_URL))
        consuming = await connection.channel()
        await consuming.set_qos(prefetch_count=prefetch)
        publishing = await connection.channel(publisher_confirms=True)
        exchange = publishing.default_exchange
        queue = await consuming.declare_queue(source, durable=True)

        async def handle(message: Any) -> None:
            prompt = orjson.loads(message.body)
            if client == "none":
                text, model = f"Echo: {prompt['message']}", MODEL
            else:
                request = {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": prompt["message"]}],
                    "stream": False,
                }
                answer = orjson.loads(await ask(orjson.dumps(request)))
                text, model = answer["message"]["content"], answer["model"]
            reply = {
                "conversation_id": prompt["conversation_id"],
                "message": text,
                "user_id": 0,
                "timestamp": datetime.now(UTC).isoformat(),
                "model_used": model,
            }
            await exchange.publish(
                aio_pika.Message(
                    orjson.dumps(reply),
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    correlation_id=message.correlation_id,
                    message_id=f"reply-{message.message_id}",
                ),
                routing_key=target,
            )
            await message.ack()

        await queue.consume(handle)
        await stop.wait()


# -- the peer: FastStream, as its users write it ----------------------------------------------


class UserPromptReceived(BaseModel):
    conversation_id: int | str
    message: str
    user_id: int | str | None = None
    timestamp: datetime | None = None


class BotResponseCreated(BaseModel):
    conversation_id: int | str
    message: str
    user_id: int | str
    timestamp: datetime
    model_used: str


def faststream_app() -> Any:
    """The FastStream application (a factory: ``faststream run ... --factory``)."""
    import httpx
    from faststream import FastStream
    from faststream.rabbit import Channel, RabbitBroker, RabbitQueue

    broker = RabbitBroker(RABBITMQ_URL)
    app = FastStream(broker)
    http = httpx.AsyncClient(base_url=os.environ["OLLAMA_BASE_URL"], timeout=300)
    app.after_shutdown(http.aclose)
    channel = Channel(prefetch_count=int(os.environ.get("PREFETCH_COUNT", "1")))

    @broker.subscriber(RabbitQueue(os.environ["BENCH_INPUT"], durable=True), channel=channel)
    @broker.publisher(os.environ["BENCH_OUTPUT"], persist=True)
    async def handle(prompt: UserPromptReceived) -> BotResponseCreated:
        response = await http.post(
            "/api/chat",
            json={
                "model": MODEL,
                "messages": [{"role": "user", "content": prompt.message}],
                "stream": False,
            },
        )
        response.raise_for_status()
        answer = response.json()
        return BotResponseCreated(
            conversation_id=prompt.conversation_id,
            message=answer["message"]["content"],
            user_id=0,
            timestamp=datetime.now(UTC),
            model_used=answer["model"],
        )

    return app


def _main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.overhead")
    parser.add_argument("role", choices=["limit"])
    parser.add_argument("--client", choices=["aiohttp", "httpx", "none"], default="aiohttp")
    parser.add_argument("--broker-only", action="store_true", help="same as --client none")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        run_loop(limit_main(client="none" if args.broker_only else args.client))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
