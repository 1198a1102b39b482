"""Machinery shared by the benchmark scenarios (``python -m bench <scenario>``).

Stable API (other scenario modules import these names; keep them):

Scenario contract
    ``async def run(options: Options) -> Outcome`` in ``bench/<name>.py``; ``SCENARIOS`` lists
    the names in the order ``all`` runs them. ``Options(out, smoke, tag)``; ``Outcome(name,
    tables, targets, charts, notes, seconds)`` with ``Outcome.render()``.
Reporting
    ``Table(title, columns)`` with ``.add(*cells)`` and ``.render()``; ``Target(name, value,
    goal, higher_is_better=True, unit="")`` with ``.met``; ``percentile(values, q)``;
    ``rate(count, seconds)``; ``bar_chart(...)``, ``line_chart(...)`` and ``pyplot()``
    (matplotlib on the Agg backend) write PNGs.
Fake LLM
    ``start_fake_ollama(latency=0.0, max_concurrency=None, in_process=False)``: an async
    context manager yielding a ``FakeBackend`` with ``.url``, ``await .stats()`` ->
    ``FakeStats(chat_requests, max_in_flight, max_open)`` and ``await .reset()``. By default
    the fake (``tests.fakes.ollama.FakeOllama``) runs in a child process so it does not share
    the benchmark driver's event loop.
Broker side
    ``RABBITMQ_URL``; ``QueueSet.new(prefix)`` (``.input``, ``.output``, ``.all_names()``:
    input, output, ``.dlq`` and every ``.retry.<ms>ms`` tier); ``Broker`` (``connect``,
    ``close``, ``declare(queues)``, ``delete(queues)``, ``depth(queue)``, ``consumers(queue)``,
    ``wait_consumers(queue, n)``, ``publish(queue, jobs)``, ``collect(queue, ids)``);
    ``make_jobs(tag, n)`` -> ``list[Job]`` (published with message_id = correlation_id =
    ``job.id``); ``Collector`` (``.replies`` {correlation_id: arrival}, ``await
    .wait(timeout)``, ``.first``, ``.last``, ``.throughput()``, ``.on_reply`` hook,
    ``await .close()``).
Processes
    ``worker_env(queues, data_dir, ollama_url=None, prefetch=1, **overrides)``: the
    environment of ``python -m chatprocessor run`` (TRANSPORT=rabbitmq, PROVIDERS=ollama,
    OPS_PORT=0, LOG_LEVEL=WARNING, LOG_FILE='', IDEMPOTENCY_TTL left at its default);
    ``BenchProcess(args, env, name, log_dir)`` (``start``, ``stop``, ``pid``, ``running``,
    ``cpu_seconds()``, ``rss_bytes()``, ``console()``); ``chatprocessor_process(env, name,
    log_dir)``; ``run_in_process_worker(env)`` (the worker in this process, as a task);
    ``scratch_dir(prefix)`` (a temporary directory, context manager); ``run_loop(coro)``
    (asyncio.run on uvloop when installed); ``child_env(**overrides)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from chatprocessor.settings import is_setting_variable

ROOT = Path(__file__).resolve().parents[1]
RABBITMQ_URL = os.environ.get("BENCH_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
#: Scenario names, in the order ``python -m bench all`` runs them.
SCENARIOS = ("overhead", "saturation", "embedded", "memory", "scale", "lanes", "mix")
DEFAULT_OUT = ROOT / "bench" / "out"
QUEUE_PREFIX = "bench."

# -- scenario contract -------------------------------------------------------------------------


@dataclass(slots=True)
class Options:
    """What every scenario gets: where to write, and whether this is the tiny CI run."""

    out: Path = DEFAULT_OUT
    smoke: bool = False
    #: Unique part of this run's queue names.
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])


@dataclass(slots=True)
class Target:
    """One goal of the issue, measured: ``value`` against ``goal``."""

    name: str
    value: float
    goal: float
    higher_is_better: bool = True
    unit: str = ""

    @property
    def met(self) -> bool:
        if math.isnan(self.value):
            return False
        return self.value >= self.goal if self.higher_is_better else self.value <= self.goal

    def render(self) -> str:
        op = ">=" if self.higher_is_better else "<="
        verdict = "MET" if self.met else "MISSED"
        value, goal = f"{fmt(self.value)}{self.unit}", f"{fmt(self.goal)}{self.unit}"
        return f"{verdict:6}  {self.name}: {value} (target {op} {goal})"


@dataclass(slots=True)
class Outcome:
    """What a scenario measured: tables, targets, charts written and notes."""

    name: str
    tables: list[Table] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    charts: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    smoke: bool = False

    def render(self) -> str:
        lines = [table.render() for table in self.tables]
        if self.targets:
            title = (
                "targets (smoke: sizes too small for timing claims)" if self.smoke else "targets"
            )
            lines.append(title + ":\n" + "\n".join("  " + t.render() for t in self.targets))
        lines.extend(f"note: {note}" for note in self.notes)
        lines.extend(f"chart: {chart}" for chart in self.charts)
        lines.append(f"[{self.name}] finished in {self.seconds:.1f}s")
        return "\n\n".join(lines)


# -- tables and numbers ------------------------------------------------------------------------


def fmt(value: object) -> str:
    """Numbers as a table shows them: 3 significant digits, thousands without decimals."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if math.isnan(value):
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.1f}"
    if abs(value) >= 10:
        return f"{value:.2f}"
    return f"{value:.3f}"


class Table:
    """A plain-text table: first column left-aligned, the others right-aligned."""

    def __init__(self, title: str, columns: Sequence[str]) -> None:
        self.title = title
        self.columns = list(columns)
        self.rows: list[list[str]] = []

    def add(self, *cells: object) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{len(cells)} cells for {len(self.columns)} columns")
        self.rows.append([fmt(cell) for cell in cells])

    def render(self) -> str:
        grid = [self.columns, *self.rows]
        widths = [max(len(row[i]) for row in grid) for i in range(len(self.columns))]

        def line(row: Sequence[str]) -> str:
            cells = [
                cell.ljust(width) if i == 0 else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(row, widths, strict=True))
            ]
            return "  ".join(cells).rstrip()

        out = [self.title, line(self.columns), "  ".join("-" * w for w in widths)]
        out.extend(line(row) for row in self.rows)
        return "\n".join(out)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear between closest ranks; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def rate(count: int, seconds: float) -> float:
    """Events per second; NaN when no time passed."""
    return count / seconds if seconds > 0 else math.nan


# -- charts ------------------------------------------------------------------------------------


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_chart(
    path: Path,
    title: str,
    labels: Sequence[str],
    values: Sequence[float],
    *,
    ylabel: str,
    reference: float | None = None,
    reference_label: str = "",
) -> Path:
    """One bar per label, with an optional horizontal reference line (a limit or a target)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(list(labels), [0.0 if math.isnan(v) else v for v in values], color="#4878a8")
    ax.bar_label(bars, labels=[fmt(v) for v in values], padding=2)
    if reference is not None:
        ax.axhline(reference, color="#c0392b", linestyle="--", label=reference_label or None)
        if reference_label:
            ax.legend(loc="lower left")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.margins(y=0.15)
    return save_chart(fig, path)


def line_chart(
    path: Path,
    title: str,
    xs: Sequence[float],
    series: Mapping[str, Sequence[float]],
    *,
    xlabel: str,
    ylabel: str,
) -> Path:
    """One line per series over ``xs``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, ys in series.items():
        ax.plot(list(xs), list(ys), marker="o", label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xticks(list(xs))
    ax.grid(alpha=0.3)
    ax.legend()
    return save_chart(fig, path)


def save_chart(fig: Any, path: Path) -> Path:
    """Lay out, write as a PNG (creating its folder), and free the figure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return path


# -- the fake LLM ------------------------------------------------------------------------------


@dataclass(slots=True)
class FakeStats:
    #: ``/api/chat`` requests received.
    chat_requests: int
    #: Most requests served at once (bounded by ``max_concurrency``).
    max_in_flight: int
    #: Most requests open at once: served plus waiting in the fake's own queue.
    max_open: int = 0


class _Counters:
    """Counts a FakeOllama's chat requests without keeping their bodies (thousands of them)."""

    def __init__(self, fake: Any) -> None:
        self.fake = fake
        self.chats = self.open = self.max_open = 0
        record, handle = fake._record, fake._handle_chat

        async def counting_record(request: Any) -> Any:
            if request.path == "/api/chat":
                self.chats += 1
            body = await record(request)
            fake.requests.clear()
            return body

        async def counting_chat(request: Any) -> Any:
            self.open += 1
            self.max_open = max(self.max_open, self.open)
            try:
                return await handle(request)
            finally:
                self.open -= 1

        # Instance attributes win over the methods; start() routes to them.
        fake._record = counting_record
        fake._handle_chat = counting_chat

    def stats(self) -> FakeStats:
        return FakeStats(self.chats, self.fake.max_in_flight, self.max_open)

    def reset(self) -> None:
        self.fake.reset()
        self.chats = 0
        self.max_open = self.open


class FakeBackend:
    """A running fake Ollama, in this process or in a child; see ``start_fake_ollama``."""

    url: str

    async def stats(self) -> FakeStats:
        raise NotImplementedError

    async def reset(self) -> None:
        raise NotImplementedError


class _LocalFake(FakeBackend):
    def __init__(self, counters: _Counters) -> None:
        self.counters = counters
        self.url = counters.fake.url

    async def stats(self) -> FakeStats:
        return self.counters.stats()

    async def reset(self) -> None:
        self.counters.reset()


class _ChildFake(FakeBackend):
    """The fake in ``python -m bench.common fake``: one JSON command per line on stdin."""

    def __init__(self, process: asyncio.subprocess.Process, url: str) -> None:
        self.process = process
        self.url = url
        self._lock = asyncio.Lock()

    async def _ask(self, command: str) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        async with self._lock:
            self.process.stdin.write(command.encode() + b"\n")
            await self.process.stdin.drain()
            line = await asyncio.wait_for(self.process.stdout.readline(), 30)
        if not line:
            raise RuntimeError("the fake Ollama process exited")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def stats(self) -> FakeStats:
        return FakeStats(**await self._ask("stats"))

    async def reset(self) -> None:
        await self._ask("reset")


@contextlib.asynccontextmanager
async def start_fake_ollama(
    *,
    latency: float = 0.0,
    max_concurrency: int | None = None,
    in_process: bool = False,
) -> AsyncIterator[FakeBackend]:
    """A fake Ollama answering ``/api/chat`` after ``latency`` seconds, ``max_concurrency``
    requests at a time (the rest wait in its queue, as Ollama's do)."""
    if in_process:
        from tests.fakes.ollama import FakeOllama

        fake = FakeOllama(models=["llama2"], latency=latency, max_concurrency=max_concurrency)
        counters = _Counters(fake)
        async with fake:
            yield _LocalFake(counters)
        return
    args = [sys.executable, "-m", "bench.common", "fake", "--latency", str(latency)]
    if max_concurrency is not None:
        args += ["--max-concurrency", str(max_concurrency)]
    process = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=child_env(),
        cwd=ROOT,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        if not line:
            raise RuntimeError("the fake Ollama process did not start")
        yield _ChildFake(process, json.loads(line)["url"])
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError, BrokenPipeError, ConnectionResetError):
                assert process.stdin is not None
                process.stdin.close()
            try:
                await asyncio.wait_for(process.wait(), 5)
            except TimeoutError:
                process.kill()
                await process.wait()


async def _serve_fake(latency: float, max_concurrency: int | None) -> None:
    """Child side of ``start_fake_ollama``: answer commands until stdin closes."""
    from tests.fakes.ollama import FakeOllama

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    fake = FakeOllama(models=["llama2"], latency=latency, max_concurrency=max_concurrency)
    counters = _Counters(fake)
    async with fake:
        sys.stdout.write(json.dumps({"url": fake.url}) + "\n")
        sys.stdout.flush()
        while line := await reader.readline():
            if line.decode().strip() == "reset":
                counters.reset()
            sys.stdout.write(json.dumps(dataclasses.asdict(counters.stats())) + "\n")
            sys.stdout.flush()


# -- queues, jobs and the broker ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QueueSet:
    """One contestant's queues: unique names, so runs never see each other's messages."""

    input: str
    output: str

    @classmethod
    def new(cls, prefix: str) -> QueueSet:
        tag = f"{QUEUE_PREFIX}{prefix}.{uuid.uuid4().hex[:8]}"
        return cls(f"{tag}.UserPromptReceived", f"{tag}.BotResponseCreated")

    def all_names(self) -> list[str]:
        """Input, output, and what a worker derives from the input: ``.dlq``, retry tiers."""
        from chatprocessor.core.retry import RetryPolicy, tier_name

        tiers = [tier_name(self.input, tier) for tier in RetryPolicy().tiers()]
        return [self.input, self.output, f"{self.input}.dlq", *tiers]


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    conversation_id: int
    body: bytes


def make_jobs(tag: str, n: int) -> list[Job]:
    """``n`` seed-shaped UserPromptReceived messages with unique ids."""
    return [
        Job(
            f"{tag}-{i}",
            i,
            orjson.dumps(
                {
                    "conversation_id": i,
                    "message": f"What is the capital of France? ({tag}-{i})",
                    "user_id": 456,
                    "timestamp": "2025-12-16T10:30:00Z",
                }
            ),
        )
        for i in range(n)
    ]


class Collector:
    """Replies arriving on a queue: arrival time (``time.perf_counter()``) per correlation id."""

    def __init__(self, expected: Iterable[str]) -> None:
        self.expected = set(expected)
        self.replies: dict[str, float] = {}
        self.duplicates = 0
        self.unexpected = 0
        self.tag: str | None = None
        self.channel: Any = None
        #: Called with the correlation id of each new expected reply (e.g. to send more work).
        self.on_reply: Callable[[str], None] | None = None
        self._done = asyncio.Event()
        if not self.expected:
            self._done.set()

    def on_message(self, message: Any) -> None:
        key = message.correlation_id
        now = time.perf_counter()
        if key not in self.expected:
            self.unexpected += 1
        elif key in self.replies:
            self.duplicates += 1
        else:
            self.replies[key] = now
            if self.on_reply is not None:
                self.on_reply(key)
            if len(self.replies) == len(self.expected):
                self._done.set()

    async def wait(self, timeout: float) -> bool:
        """True when every expected reply arrived within ``timeout`` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._done.wait(), timeout)
        return self._done.is_set()

    @property
    def first(self) -> float:
        return min(self.replies.values()) if self.replies else math.nan

    @property
    def last(self) -> float:
        return max(self.replies.values()) if self.replies else math.nan

    def throughput(self) -> float:
        """Replies per second from the first reply to the last one."""
        return rate(len(self.replies) - 1, self.last - self.first)

    async def close(self) -> None:
        """Stop reading (the channel closes)."""
        if self.channel is not None:
            with contextlib.suppress(Exception):
                await self.channel.close()
            self.channel = None


class Broker:
    """The chat platform's side of RabbitMQ: declares, publishes jobs, collects replies."""

    def __init__(self, url: str = RABBITMQ_URL) -> None:
        self.url = url
        self.connection: Any = None
        self.channel: Any = None

    async def connect(self) -> Broker:
        import aio_pika

        self.connection = await aio_pika.connect(self.url)
        self.channel = await self.connection.channel(publisher_confirms=True)
        return self

    async def close(self) -> None:
        if self.connection is not None:
            with contextlib.suppress(Exception):
                await self.connection.close()
            self.connection = None

    async def __aenter__(self) -> Broker:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def declare(self, queues: QueueSet) -> None:
        """Input and output, durable, as chatprocessor declares them."""
        await self.channel.declare_queue(queues.input, durable=True)
        await self.channel.declare_queue(queues.output, durable=True)

    async def delete(self, queues: QueueSet) -> None:
        """Delete the queues and every queue a worker derived from them."""
        channel = await self.connection.channel()
        try:
            for name in queues.all_names():
                with contextlib.suppress(Exception):
                    await channel.queue_delete(name)
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    async def _declared(self, queue: str) -> Any:
        channel = await self.connection.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
            return declared.declaration_result
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    async def depth(self, queue: str) -> int:
        """Messages ready in ``queue`` (unacked ones excluded)."""
        return int((await self._declared(queue)).message_count or 0)

    async def consumers(self, queue: str) -> int:
        return int((await self._declared(queue)).consumer_count or 0)

    async def wait_consumers(
        self, queue: str, n: int, timeout: float = 60, processes: Sequence[BenchProcess] = ()
    ) -> None:
        """Wait until ``n`` consumers read ``queue`` (how a worker with OPS_PORT=0 is ready)."""
        deadline = time.monotonic() + timeout
        while await self.consumers(queue) < n:
            for process in processes:
                if not process.running:
                    raise RuntimeError(f"{process.name} exited early:\n{process.console()}")
            if time.monotonic() > deadline:
                consoles = "\n".join(p.console() for p in processes)
                raise RuntimeError(f"no {n} consumer(s) on {queue} after {timeout:g}s\n{consoles}")
            await asyncio.sleep(0.05)

    async def publish(
        self,
        queue: str,
        jobs: Sequence[Job] | Iterable[tuple[str, bytes]],
        *,
        reply_to: str | None = None,
        priority: int | None = None,
        window: int = 500,
    ) -> dict[str, float]:
        """Publish persistent messages (jobs, or ``(id, body)`` pairs), ``window`` confirms
        outstanding at a time; return the ``time.perf_counter()`` at which each was handed to
        the client, by job id."""
        import aio_pika

        sent: dict[str, float] = {}
        exchange = self.channel.default_exchange
        pending: set[asyncio.Future[Any]] = set()
        for job in jobs:
            job_id, body = (job.id, job.body) if isinstance(job, Job) else job
            message = aio_pika.Message(
                body,
                message_id=job_id,
                correlation_id=job_id,
                reply_to=reply_to,
                priority=priority,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            sent[job_id] = time.perf_counter()
            pending.add(asyncio.ensure_future(exchange.publish(message, queue)))
            if len(pending) >= window:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    future.result()
        if pending:
            await asyncio.gather(*pending)
        return sent

    async def collect(self, queue: str, ids: Iterable[str]) -> Collector:
        """Start reading replies from ``queue`` (no ack); ``await collector.wait(...)``."""
        collector = Collector(ids)
        collector.channel = await self.connection.channel()
        amqp_queue = await collector.channel.declare_queue(queue, durable=True)
        collector.tag = await amqp_queue.consume(collector.on_message, no_ack=True)
        return collector


# -- processes ---------------------------------------------------------------------------------


def child_env(**overrides: str) -> dict[str, str]:
    """This environment without chatprocessor settings, the repository importable."""
    env = {name: value for name, value in os.environ.items() if not is_setting_variable(name)}
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides)
    return env


def worker_env(
    queues: QueueSet,
    data_dir: Path,
    *,
    ollama_url: str | None = None,
    prefetch: int = 1,
    **overrides: str,
) -> dict[str, str]:
    """Settings of a chatprocessor worker on RabbitMQ asking the fake Ollama; everything not
    named here keeps its default (IDEMPOTENCY_TTL included: the store is part of the cost)."""
    from urllib.parse import urlsplit

    broker = urlsplit(RABBITMQ_URL)
    env = {
        "TRANSPORT": "rabbitmq",
        "PROVIDERS": "ollama",
        "RABBITMQ_HOST": broker.hostname or "127.0.0.1",
        "RABBITMQ_PORT": str(broker.port or 5672),
        "RABBITMQ_USERNAME": broker.username or "guest",
        "RABBITMQ_PASSWORD": broker.password or "guest",
        "RABBITMQ_QUEUE_INPUT": queues.input,
        "RABBITMQ_QUEUE_OUTPUT": queues.output,
        "PREFETCH_COUNT": str(prefetch),
        "OPS_PORT": "0",
        "LOG_LEVEL": "WARNING",
        "LOG_FILE": "",
        "DATA_DIR": str(data_dir),
    }
    if ollama_url is not None:
        env["OLLAMA_BASE_URL"] = ollama_url
    env.update(overrides)
    return env


class BenchProcess:
    """A child process of the benchmark; its output goes to ``log_dir/<name>.out``."""

    def __init__(
        self, args: Sequence[str], env: Mapping[str, str], name: str, log_dir: Path
    ) -> None:
        self.args = list(args)
        self.env = child_env(**env)
        self.name = name
        self.log_dir = log_dir
        self.output = log_dir / f"{name}.out"
        self.process: asyncio.subprocess.Process | None = None
        self._psutil: Any = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> BenchProcess:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with self.output.open("ab") as sink:
            self.process = await asyncio.create_subprocess_exec(
                *self.args,
                env=self.env,
                cwd=self.log_dir,  # no stray .env, files land beside the log
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        return self

    def _ps(self) -> Any:
        if self._psutil is None:
            import psutil

            self._psutil = psutil.Process(self.pid)
        return self._psutil

    def cpu_seconds(self) -> float:
        """User + system CPU time the process has used so far."""
        times = self._ps().cpu_times()
        return float(times.user + times.system)

    def rss_bytes(self) -> int:
        return int(self._ps().memory_info().rss)

    async def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM (a worker drains), then SIGKILL after ``timeout``; the exit status."""
        if self.process is None:
            return None
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        return self.process.returncode

    def console(self, lines: int = 40) -> str:
        try:
            text = self.output.read_text(errors="replace")
        except FileNotFoundError:
            return f"({self.name}: no output)"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- {self.name} ({self.output}) ---\n{tail}"


def chatprocessor_process(env: Mapping[str, str], name: str, log_dir: Path) -> BenchProcess:
    """``python -m chatprocessor run`` with ``env`` (see ``worker_env``)."""
    return BenchProcess([sys.executable, "-m", "chatprocessor", "run"], env, name, log_dir)


@contextlib.asynccontextmanager
async def run_in_process_worker(env: Mapping[str, str]) -> AsyncIterator[asyncio.Task[None]]:
    """chatprocessor in this process (same settings as the subprocess), stopped on exit."""
    from chatprocessor.app import run_service
    from chatprocessor.settings import Settings

    names: dict[str, Any] = {name.lower(): value for name, value in env.items()}
    settings = Settings(_env_file=None, **names)
    stop = asyncio.Event()
    task = asyncio.create_task(run_service(settings, stop))
    try:
        yield task
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Any:
    """A temporary directory for DATA_DIR and process logs, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{prefix}-") as path:
        yield Path(path)


def run_loop(coro: Any) -> Any:
    """asyncio.run, on uvloop when installed (as chatprocessor runs itself)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.common")
    sub = parser.add_subparsers(dest="command", required=True)
    fake = sub.add_parser("fake", help="serve a fake Ollama; commands on stdin")
    fake.add_argument("--latency", type=float, default=0.0)
    fake.add_argument("--max-concurrency", type=int, default=None)
    args = parser.parse_args(argv)
    if args.command == "fake":
        with contextlib.suppress(KeyboardInterrupt):
            run_loop(_serve_fake(args.latency, args.max_concurrency))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
