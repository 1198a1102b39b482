"""scale: throughput with 1, 2 and 4 worker processes on the same queues.

The backend is the saturation one with room for 16: the fake Ollama answers after 0.2 s and
serves 16 requests at a time. Each worker has PREFETCH_COUNT=P (4), so ``w`` workers can
keep ``w * P`` requests at the backend: linear = min(w * P, 16) / 0.2 s jobs/s (20, 40, 80),
which stops growing once the backend is full (w = 4 here). Target: >= 0.9 x linear.

Method: the workers start and consume first; then the jobs (about 12 s of work per worker
count) are published at full speed, faster than they are answered; the rate is counted
from the first reply to the last.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    BenchProcess,
    Broker,
    FakeBackend,
    Options,
    Outcome,
    QueueSet,
    Table,
    Target,
    chatprocessor_process,
    line_chart,
    make_jobs,
    scratch_dir,
    start_fake_ollama,
    worker_env,
)

LATENCY = 0.2
SLOTS = 16
PREFETCH = 4
WORKERS = (1, 2, 4)
SECONDS_PER_POINT = 12.0
SMOKE_JOBS_PER_WORKER = 8


def linear(workers: int) -> float:
    """jobs/s if every worker kept its prefetch at the backend, until the backend is full."""
    return min(workers * PREFETCH, SLOTS) / LATENCY


@dataclass(slots=True)
class Point:
    workers: int
    jobs: int
    throughput: float
    max_in_flight: int
    cpu_ms_per_job: float

    @property
    def ratio(self) -> float:
        return self.throughput / linear(self.workers)


def limit_process(queues: QueueSet, fake: FakeBackend, name: str, scratch: Path) -> BenchProcess:
    """The overhead scenario's minimal aio-pika loop, with this scenario's prefetch."""
    env = {
        "BENCH_INPUT": queues.input,
        "BENCH_OUTPUT": queues.output,
        "OLLAMA_BASE_URL": fake.url,
        "PREFETCH_COUNT": str(PREFETCH),
    }
    return BenchProcess([sys.executable, "-m", "bench.overhead", "limit"], env, name, scratch)


async def measure(
    broker: Broker,
    fake: FakeBackend,
    workers: int,
    *,
    jobs_count: int,
    tag: str,
    scratch: Path,
    limit: bool = False,
) -> Point:
    queues = QueueSet.new(f"scale.{tag}.w{workers}")
    await broker.declare(queues)
    processes: list[BenchProcess] = []
    try:
        for index in range(workers):
            name = f"{'limit' if limit else 'chatprocessor'}-w{workers}-{index + 1}"
            if limit:
                processes.append(limit_process(queues, fake, name, scratch))
                continue
            env = worker_env(queues, scratch / "data", ollama_url=fake.url, prefetch=PREFETCH)
            processes.append(chatprocessor_process(env, name, scratch))
        await asyncio.gather(*(process.start() for process in processes))
        await broker.wait_consumers(queues.input, workers, processes=processes)
        await fake.reset()
        jobs = make_jobs(f"{tag}-w{workers}", jobs_count)
        collector = await broker.collect(queues.output, [job.id for job in jobs])
        cpu_start = sum(process.cpu_seconds() for process in processes)
        await broker.publish(queues.input, jobs)
        complete = await collector.wait(timeout=60 + 3 * jobs_count / linear(workers))
        cpu = sum(process.cpu_seconds() for process in processes) - cpu_start
        await collector.close()
        if not complete:
            consoles = "\n".join(process.console() for process in processes)
            raise RuntimeError(f"{len(collector.replies)} of {jobs_count} replies\n{consoles}")
        stats = await fake.stats()
        return Point(
            workers,
            jobs_count,
            collector.throughput(),
            stats.max_in_flight,
            1000 * cpu / jobs_count,
        )
    finally:
        await asyncio.gather(*(process.stop() for process in processes))
        await broker.delete(queues)


async def run(options: Options) -> Outcome:
    outcome = Outcome("scale")
    load = os.getloadavg()[0]
    points: list[Point] = []
    started = time.perf_counter()
    with scratch_dir("scale") as scratch:
        async with (
            start_fake_ollama(latency=LATENCY, max_concurrency=SLOTS) as fake,
            Broker() as broker,
        ):
            for workers in WORKERS:
                count = (
                    SMOKE_JOBS_PER_WORKER * workers
                    if options.smoke
                    else round(SECONDS_PER_POINT * linear(workers))
                )
                point = await measure(
                    broker, fake, workers, jobs_count=count, tag=options.tag, scratch=scratch
                )
                points.append(point)
                print(f"  {workers} worker(s): {point.throughput:.1f} jobs/s", flush=True)
            count = SMOKE_JOBS_PER_WORKER if options.smoke else round(SECONDS_PER_POINT * linear(1))
            reference = await measure(
                broker, fake, 1, jobs_count=count, tag=options.tag, scratch=scratch, limit=True
            )

    table = Table(
        f"scale: fake Ollama {SLOTS} slots x {LATENCY:g} s, PREFETCH_COUNT={PREFETCH} per "
        f"worker; linear = min(workers x {PREFETCH}, {SLOTS}) / {LATENCY:g} s; jobs published "
        "while the workers run, rate from first to last reply",
        [
            "worker processes",
            "jobs",
            "jobs/s",
            "linear",
            "x linear",
            "x 1 worker",
            "max at backend",
            "CPU ms/job",
        ],
    )
    base = points[0].throughput
    for point in points:
        table.add(
            f"{point.workers} chatprocessor",
            point.jobs,
            point.throughput,
            linear(point.workers),
            point.ratio,
            point.throughput / base,
            point.max_in_flight,
            point.cpu_ms_per_job,
        )
    table.add(
        "1 limit loop (reference)",
        reference.jobs,
        reference.throughput,
        linear(1),
        reference.ratio,
        "",
        reference.max_in_flight,
        reference.cpu_ms_per_job,
    )
    outcome.tables.append(table)
    outcome.notes.append(
        "linear counts only the backend's 0.2 s; each job also spends time in HTTP, the "
        "broker and its confirms: the reference row is the overhead scenario's minimal "
        f"aio-pika loop with the same prefetch (1 process), {reference.ratio:.3f} x linear, "
        "so 1 chatprocessor worker is "
        f"{points[0].throughput / reference.throughput:.3f} x that loop"
    )
    outcome.targets += [
        Target(f"{point.workers} worker(s): jobs/s / linear", point.ratio, 0.9) for point in points
    ]
    outcome.notes.append(
        f"CPU ms/job: all workers together. 1-min load average {load:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end ({os.cpu_count()} CPUs); "
        f"{time.perf_counter() - started:.0f}s"
    )
    xs = [float(point.workers) for point in points]
    outcome.charts.append(
        line_chart(
            options.out / "scale.png",
            f"scale: backend {SLOTS} slots x {LATENCY:g} s, prefetch {PREFETCH} per worker",
            xs,
            {
                "chatprocessor": [point.throughput for point in points],
                "linear": [linear(point.workers) for point in points],
                "0.9 x linear (target)": [0.9 * linear(point.workers) for point in points],
            },
            xlabel="worker processes",
            ylabel="jobs per second",
        )
    )
    return outcome
