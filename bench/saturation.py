"""saturation: does chatprocessor keep a slow, bounded backend full, and never overfill it?

The fake Ollama answers after 0.2 s and serves 8 requests at a time (the rest wait in its own
queue, as Ollama's do): ideal = 8 / 0.2 s = 40 jobs/s. One chatprocessor worker with
PREFETCH_COUNT=16, 2,000 jobs.

Method: continuous, closed-loop publishing. The driver keeps WINDOW = 2 x prefetch jobs
outstanding (published, not yet answered) and publishes the next job when a reply arrives,
so the broker always holds jobs ready for the worker while latency stays meaningful. The
rate is counted from the first reply to the last; end-to-end latency is publish to reply as
the driver sees it. By Little's law, a system that keeps the backend full answers in about
WINDOW / ideal = 0.8 s: excess over that is overhead.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from pathlib import Path

from bench.common import (
    Broker,
    Collector,
    Job,
    Options,
    Outcome,
    QueueSet,
    Table,
    Target,
    chatprocessor_process,
    make_jobs,
    percentile,
    pyplot,
    save_chart,
    scratch_dir,
    start_fake_ollama,
    worker_env,
)

LATENCY = 0.2
SLOTS = 8
PREFETCH = 16
WINDOW = 2 * PREFETCH
JOBS = 2_000
SMOKE_JOBS = 40


async def closed_loop(
    broker: Broker, queues: QueueSet, jobs: list[Job], window: int, timeout: float
) -> tuple[dict[str, float], Collector]:
    """Keep ``window`` jobs outstanding until all are answered; (sent times, replies)."""
    sent: dict[str, float] = {}
    collector = await broker.collect(queues.output, [job.id for job in jobs])
    credits: asyncio.Queue[None] = asyncio.Queue()
    for _ in range(window):
        credits.put_nowait(None)
    collector.on_reply = lambda _: credits.put_nowait(None)

    async def feed() -> None:
        pending: set[asyncio.Task[dict[str, float]]] = set()
        for job in jobs:
            await credits.get()
            task = asyncio.create_task(broker.publish(queues.input, [job]))
            pending.add(task)
            task.add_done_callback(pending.discard)
            task.add_done_callback(lambda done: sent.update(done.result()))
        if pending:
            await asyncio.gather(*pending)

    feeder = asyncio.create_task(feed())
    try:
        if not await collector.wait(timeout):
            raise RuntimeError(f"only {len(collector.replies)} of {len(jobs)} replies")
        await feeder
    finally:
        feeder.cancel()
        await collector.close()
    return sent, collector


def _chart(path: Path, collector: Collector, latencies: list[float], ideal: float) -> Path:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    start = collector.first
    arrivals = sorted(at - start for at in collector.replies.values())
    seconds = max(1, math.floor(arrivals[-1]))  # whole seconds only: the last one is partial
    counts = [0] * seconds
    for at in arrivals:
        if int(at) < seconds:
            counts[int(at)] += 1
    left.plot(range(seconds), counts, drawstyle="steps-post", label="chatprocessor")
    left.axhline(ideal, color="#c0392b", linestyle="--", label=f"ideal {ideal:g} jobs/s")
    left.set_title("replies per second (whole seconds)")
    left.set_xlabel("seconds since the first reply")
    left.set_ylabel("jobs/s")
    left.legend(loc="lower right")
    right.hist(latencies, bins=40, color="#4878a8")
    for q, style in ((50, "-"), (99, "--")):
        right.axvline(percentile(latencies, q), color="#c0392b", linestyle=style, label=f"p{q}")
    right.set_title("end-to-end latency (publish to reply)")
    right.set_xlabel("seconds")
    right.legend()
    fig.suptitle(f"saturation: backend {SLOTS} slots x {LATENCY:g} s, prefetch {PREFETCH}")
    return save_chart(fig, path)


async def run(options: Options) -> Outcome:
    count = SMOKE_JOBS if options.smoke else JOBS
    ideal = SLOTS / LATENCY
    outcome = Outcome("saturation")
    load = os.getloadavg()[0]
    queues = QueueSet.new(f"saturation.{options.tag}")
    with scratch_dir("saturation") as scratch:
        async with (
            start_fake_ollama(latency=LATENCY, max_concurrency=SLOTS) as fake,
            Broker() as broker,
        ):
            await broker.declare(queues)
            env = worker_env(queues, scratch / "data", ollama_url=fake.url, prefetch=PREFETCH)
            worker = chatprocessor_process(env, "chatprocessor", scratch)
            try:
                await worker.start()
                await broker.wait_consumers(queues.input, 1, processes=[worker])
                await fake.reset()
                cpu_start = worker.cpu_seconds()
                started = time.perf_counter()
                sent, collector = await closed_loop(
                    broker, queues, make_jobs(options.tag, count), WINDOW, 60 + 3 * count / ideal
                )
                wall = time.perf_counter() - started
                cpu = worker.cpu_seconds() - cpu_start
                stats = await fake.stats()
            finally:
                await worker.stop()
                await broker.delete(queues)

    throughput = collector.throughput()
    latencies = [collector.replies[key] - sent[key] for key in collector.replies]
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    table = Table(
        f"saturation: {count:,} jobs, fake Ollama {SLOTS} slots x {LATENCY:g} s, prefetch "
        f"{PREFETCH}, closed loop keeping {WINDOW} jobs outstanding",
        ["measure", "chatprocessor", "reference", "ratio"],
    )
    table.add("jobs/s (first to last reply)", throughput, ideal, throughput / ideal)
    table.add("max requests served at once (backend)", stats.max_in_flight, SLOTS, "")
    table.add("max requests open at once (+ its queue)", stats.max_open, PREFETCH, "")
    table.add("p50 latency, s (ref: Little's law)", p50, WINDOW / ideal, p50 / (WINDOW / ideal))
    table.add("p99 latency, s", p99, "", "")
    table.add("max latency, s", max(latencies), "", "")
    table.add("LLM calls", stats.chat_requests, count, stats.chat_requests / count)
    table.add("worker CPU ms/job", 1000 * cpu / count, "", "")
    table.add("run time, s", wall, count / ideal, "")
    outcome.tables.append(table)
    outcome.targets += [
        Target("jobs/s / ideal", throughput / ideal, 0.95),
        Target("max requests at the backend at once", stats.max_in_flight, SLOTS, False),
    ]
    outcome.notes.append(
        f"1-min load average {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end "
        f"({os.cpu_count()} CPUs)"
    )
    outcome.charts.append(_chart(options.out / "saturation.png", collector, latencies, ideal))
    return outcome
