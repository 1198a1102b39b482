"""Machinery shared by the fault tests: a timed fake Ollama, the broker sides, worker
processes, a TCP proxy that can cut connections, and the ledger that counts what was
sent, answered and dead-lettered.

The ledger's invariants are the delivery rules of DESIGN.md:
- nothing lost: every request has a reply or a dead letter (and nothing stays queued);
- no duplicate effect: every reply to a request carries ``reply_message_id(request)``
  (``error=True`` for an error reply),
  copies of a reply are byte-identical, and the LLM is never asked again about a job
  once a (successful) reply to it has been seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from chatprocessor.contracts.chat import reply_message_id
from chatprocessor.core.retry import RetryPolicy, tier_name
from chatprocessor.transports.base import DeadLetter, Outgoing, dead_letter_name
from tests.conftest import RABBITMQ_URL
from tests.fakes.ollama import FakeOllama

CHAT_PATH = "/api/chat"
#: Retries fast enough for tests: 0.05 s, 0.1 s, 0.2 s, 0.4 s delay tiers.
FAST_RETRY = RetryPolicy(max_retries=4, base=0.05, cap=0.4)
QUEUE_PREFIX = "faults."


# -- the fake LLM ------------------------------------------------------------------------------


class TimedFakeOllama(FakeOllama):
    """FakeOllama stamping each request with its arrival time (``time.monotonic()``)."""

    async def _record(self, request: web.Request) -> Any:
        body = await super()._record(request)
        # No await between the append in super() and here: requests[-1] is this request.
        self.requests[-1]["at"] = time.monotonic()
        return body

    def chat_calls(self) -> list[tuple[str, float]]:
        """``(prompt, arrival)`` of every /api/chat request, whatever its answer was."""
        calls = []
        for entry in self.requests:
            body = entry.get("body")
            if entry["path"] != CHAT_PATH or not isinstance(body, dict):
                continue
            messages = body.get("messages") or []
            prompt = str(messages[-1].get("content", "")) if messages else ""
            calls.append((prompt, float(entry.get("at", 0.0))))
        return calls


# -- jobs and the ledger -----------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    id: str
    conversation_id: int
    prompt: str
    body: bytes


def make_jobs(tag: str, n: int, start: int = 0) -> list[Job]:
    """``n`` seed-shaped prompts with unique ids and unique texts (to map LLM calls back)."""
    jobs = []
    for i in range(start, start + n):
        prompt = f"job {tag}-{i}"
        body = orjson.dumps(
            {
                "conversation_id": i,
                "message": prompt,
                "user_id": 456,
                "timestamp": "2025-12-16T10:30:00Z",
            }
        )
        jobs.append(Job(f"{tag}-{i}", i, prompt, body))
    return jobs


@dataclass
class Reply:
    message_id: str | None
    correlation_id: str | None
    type: str | None
    body: bytes
    at: float

    @property
    def data(self) -> dict[str, Any]:
        return dict(orjson.loads(self.body))

    @property
    def error(self) -> str | None:
        value = self.data.get("error")
        return str(value) if value else None


class Ledger:
    """What a test sent, what came back on the output queue, what was dead-lettered."""

    def __init__(self) -> None:
        self.sent: dict[str, bytes] = {}
        self.prompts: dict[str, str] = {}  # prompt text -> request id
        self.replies: list[Reply] = []
        self.dead: list[DeadLetter] = []
        #: Dead letters the test purged on purpose (they were dead-lettered, not lost).
        self.purged: set[str] = set()

    def add_job(self, job: Job) -> None:
        self.sent[job.id] = job.body
        self.prompts[job.prompt] = job.id

    def add_raw(self, message_id: str, body: bytes) -> None:
        self.sent[message_id] = body

    def record(self, reply: Reply) -> None:
        self.replies.append(reply)

    def by_request(self) -> dict[str, list[Reply]]:
        grouped: dict[str, list[Reply]] = defaultdict(list)
        for reply in self.replies:
            grouped[reply.correlation_id or "?"].append(reply)
        return grouped

    def answered(self) -> set[str]:
        """Requests with at least one reply (answer or error reply)."""
        return {r.correlation_id for r in self.replies if r.correlation_id in self.sent}

    def answered_ok(self) -> set[str]:
        """Requests with at least one successful reply (no ``error``)."""
        return {
            r.correlation_id
            for r in self.replies
            if r.correlation_id in self.sent and r.error is None
        }

    def all_answered(self, ids: set[str] | None = None) -> bool:
        return (ids or set(self.sent)) <= self.answered()

    def summary(self) -> str:
        missing = sorted(set(self.sent) - self.answered())
        return (
            f"sent={len(self.sent)} replies={len(self.replies)} "
            f"answered={len(self.answered())} missing={missing[:10]}"
            f"{'...' if len(missing) > 10 else ''} dead={len(self.dead)}"
        )


@dataclass
class Report:
    figures: dict[str, int]
    problems: list[str] = field(default_factory=list)

    def assert_ok(self) -> None:
        assert not self.problems, "\n".join(self.problems)


def analyse(
    ledger: Ledger,
    fake: TimedFakeOllama,
    *,
    leftover: int = 0,
    error_then_answer: bool = False,
) -> Report:
    """The figures of one scenario and every broken delivery rule.

    ``leftover``: messages still in the input (or its delay) queue at the end.
    ``error_then_answer``: an error reply may be followed by an answer (a replayed dead
    letter); copies are then compared among answers only.
    """
    problems: list[str] = []
    grouped = ledger.by_request()
    dead_ids = {d.message_id for d in ledger.dead if d.message_id} | ledger.purged
    unexpected = sorted(set(grouped) - set(ledger.sent))
    if unexpected:
        problems.append(f"replies to requests never sent (correlation ids): {unexpected[:5]}")
    lost = sorted(r for r in ledger.sent if r not in grouped and r not in dead_ids)
    if lost:
        problems.append(
            f"LOST {len(lost)} request(s), neither answered nor dead-lettered: {lost[:10]}"
        )
    if leftover:
        problems.append(f"{leftover} message(s) still queued at the end")

    calls: dict[str, list[float]] = defaultdict(list)
    for prompt, at in fake.chat_calls():
        calls[ledger.prompts.get(prompt, "?")].append(at)

    for request, replies in grouped.items():
        if request not in ledger.sent:
            continue
        for reply in replies:
            expected_id = reply_message_id(request, error=reply.error is not None)
            if reply.message_id != expected_id:
                problems.append(
                    f"{request}: reply message id {reply.message_id}, expected {expected_id}"
                )
        compared = [r for r in replies if r.error is None] if error_then_answer else replies
        if len({r.body for r in compared}) > 1:
            bodies = sorted({r.body.decode() for r in compared})
            problems.append(f"{request}: {len(bodies)} different bodies under one id: {bodies}")
        answers = [r for r in replies if r.error is None]
        if answers:
            first = min(r.at for r in answers)
            late = [at - first for at in calls.get(request, []) if at > first]
            if late:
                problems.append(
                    f"{request}: LLM asked {len(late)} more time(s) after its reply was seen"
                    f" (+{', +'.join(f'{d:.2f}s' for d in late)})"
                )
            expected_text = f"Echo: {_prompt_of(ledger.sent[request])}"
            if any(r.data.get("message") != expected_text for r in answers):
                problems.append(f"{request}: reply text is not the answer to its own prompt")

    figures = {
        "sent": len(ledger.sent),
        "answered": len(set(grouped) & set(ledger.sent)),
        "dead_lettered": len(dead_ids & set(ledger.sent)),
        "lost": len(lost),
        "duplicated": sum(len(r) - 1 for q, r in grouped.items() if q in ledger.sent),
        "llm_calls": len(fake.chat_calls()),
    }
    return Report(figures, problems)


def _prompt_of(body: bytes) -> str:
    try:
        return str(orjson.loads(body).get("message", ""))
    except (orjson.JSONDecodeError, AttributeError):
        return ""


def llm_calls_per_request(ledger: Ledger, fake: TimedFakeOllama) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for prompt, _ in fake.chat_calls():
        counts[ledger.prompts.get(prompt, "?")] += 1
    return counts


# -- waiting -----------------------------------------------------------------------------------


async def wait_for(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float,
    what: str,
    *,
    details: Callable[[], str] = lambda: "",
    interval: float = 0.05,
) -> None:
    """Poll ``predicate`` until true; fail after ``timeout`` seconds saying what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}\n{details()}")
        await asyncio.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- broker sides ------------------------------------------------------------------------------


class RabbitSide:
    """The chat platform on RabbitMQ: declares the queues, publishes, reads replies."""

    kind = "rabbitmq"

    def __init__(self, tag: str, ledger: Ledger, retry: RetryPolicy = FAST_RETRY) -> None:
        self.tag = tag
        self.ledger = ledger
        self.retry = retry
        self.input = f"{QUEUE_PREFIX}{tag}.UserPromptReceived"
        self.output = f"{QUEUE_PREFIX}{tag}.BotResponseCreated"
        self.connection: Any = None
        self.channel: Any = None
        self.admin: Any = None

    async def start(self) -> None:
        import aio_pika

        from chatprocessor.transports.rabbitmq import RabbitMQTransport

        self.connection = await aio_pika.connect(RABBITMQ_URL)
        self.channel = await self.connection.channel(publisher_confirms=True)
        # Declared as the worker declares them, so nothing is published into the void.
        await self.channel.declare_queue(self.input, durable=True)
        output = await self.channel.declare_queue(self.output, durable=True)
        await output.consume(self._on_reply, no_ack=True)
        self.admin = RabbitMQTransport(RABBITMQ_URL)
        await self.admin.connect(attempts=3)

    async def _on_reply(self, message: Any) -> None:
        self.ledger.record(
            Reply(
                message.message_id,
                message.correlation_id,
                message.type,
                message.body,
                time.monotonic(),
            )
        )

    async def publish(
        self,
        body: bytes,
        *,
        message_id: str | None,
        headers: dict[str, Any] | None = None,
        content_type: str = "application/json",
    ) -> None:
        import aio_pika

        await self.channel.default_exchange.publish(
            aio_pika.Message(
                body,
                message_id=message_id,
                headers=headers,
                content_type=content_type,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=self.input,
        )

    async def publish_jobs(self, jobs: list[Job]) -> None:
        for job in jobs:
            self.ledger.add_job(job)
            await self.publish(job.body, message_id=job.id)

    async def dead_letters(self) -> list[DeadLetter]:
        from chatprocessor.core.errors import TransportError

        try:
            letters: list[DeadLetter] = await self.admin.list_dead_letters(self.input, 10_000)
        except TransportError:  # no worker declared the .dlq yet
            letters = []
        self.ledger.dead = letters
        return letters

    def _queues(self) -> list[str]:
        tiers = [tier_name(self.input, tier) for tier in self.retry.tiers()]
        return [self.input, *tiers]

    async def _counts(self, queue: str) -> tuple[int, int]:
        """(messages ready, consumers) of ``queue``; (0, 0) when it does not exist."""
        import aiormq

        channel = await self.connection.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
            result = declared.declaration_result
            return int(result.message_count or 0), int(result.consumer_count or 0)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return 0, 0
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    async def backlog(self) -> int:
        """Messages waiting in the input queue and its delay queues (unacked ones excluded)."""
        return sum([(await self._counts(queue))[0] for queue in self._queues()])

    async def consumers(self) -> int:
        return (await self._counts(self.input))[1]

    async def output_backlog(self) -> int:
        return (await self._counts(self.output))[0]

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "TRANSPORT": "rabbitmq",
            "RABBITMQ_HOST": "127.0.0.1",
            "RABBITMQ_PORT": "5672",
            "RABBITMQ_QUEUE_INPUT": self.input,
            "RABBITMQ_QUEUE_OUTPUT": self.output,
            **retry_env(self.retry),
            **extra,
        }

    async def close(self) -> None:
        if self.admin is not None:
            await self.admin.close()
        if self.connection is None:
            return
        channel = await self.connection.channel()
        for queue in [*self._queues(), dead_letter_name(self.input), self.output]:
            with contextlib.suppress(Exception):
                await channel.queue_delete(queue)
        await self.connection.close()


class LocalSide:
    """The same on the local SQLite queue (``DATA_DIR/queue.sqlite3`` shared with the worker)."""

    kind = "local"

    def __init__(
        self, tag: str, ledger: Ledger, data_dir: Path, retry: RetryPolicy = FAST_RETRY
    ) -> None:
        self.tag = tag
        self.ledger = ledger
        self.retry = retry
        self.data_dir = data_dir
        self.input = f"{QUEUE_PREFIX}{tag}.UserPromptReceived"
        self.output = f"{QUEUE_PREFIX}{tag}.BotResponseCreated"
        self.transport: Any = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        from chatprocessor.transports.local import LocalTransport

        self.transport = LocalTransport(self.data_dir / "queue.sqlite3", visibility_timeout=1)
        await self.transport.connect()
        self._reader = asyncio.create_task(self._read_replies())

    async def _read_replies(self) -> None:
        async for delivery in self.transport.consume(self.output, prefetch=64):
            self.ledger.record(
                Reply(
                    delivery.message_id,
                    delivery.correlation_id,
                    delivery.type,
                    delivery.body,
                    time.monotonic(),
                )
            )
            await delivery.ack()

    async def publish(
        self,
        body: bytes,
        *,
        message_id: str | None,
        headers: dict[str, Any] | None = None,
        content_type: str = "application/json",
    ) -> None:
        await self.transport.publish(
            self.input,
            Outgoing(body, message_id=message_id, headers=headers or {}, content_type=content_type),
        )

    async def publish_jobs(self, jobs: list[Job]) -> None:
        for job in jobs:
            self.ledger.add_job(job)
            await self.publish(job.body, message_id=job.id)

    async def dead_letters(self) -> list[DeadLetter]:
        letters: list[DeadLetter] = await self.transport.list_dead_letters(self.input, 10_000)
        self.ledger.dead = letters
        return letters

    async def backlog(self) -> int:
        """Rows of the input queue: waiting, delayed (retries) or held by a worker."""
        return int(await self.transport.depth(self.input))

    async def output_backlog(self) -> int:
        return int(await self.transport.depth(self.output))

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "TRANSPORT": "local",
            "DATA_DIR": str(self.data_dir),
            "LOCAL_VISIBILITY_TIMEOUT": "1",
            "RABBITMQ_QUEUE_INPUT": self.input,
            "RABBITMQ_QUEUE_OUTPUT": self.output,
            **retry_env(self.retry),
            **extra,
        }

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self.transport is not None:
            await self.transport.close()


Side = RabbitSide | LocalSide


def retry_env(retry: RetryPolicy) -> dict[str, str]:
    return {
        "MAX_RETRIES": str(retry.max_retries),
        "RETRY_BACKOFF_BASE": str(retry.base),
        "RETRY_BACKOFF_CAP": str(retry.cap),
    }


async def finish(side: Side, ledger: Ledger, timeout: float = 10) -> int:
    """Wait until replies in transit reached the ledger; return what is left in the input."""
    await wait_for(
        lambda: _output_empty(side), timeout, "the output queue to be read", details=ledger.summary
    )
    await asyncio.sleep(0.1)  # the last deliveries on the wire
    await side.dead_letters()
    return await side.backlog()


async def _output_empty(side: Side) -> bool:
    return await side.output_backlog() == 0


# -- the worker as a process -------------------------------------------------------------------


class WorkerProcess:
    """``python -m chatprocessor run`` with the given settings; output kept in a file."""

    def __init__(self, env: dict[str, str], cwd: Path, name: str) -> None:
        self.env = env
        self.cwd = cwd
        self.name = name
        self.output = cwd / f"{name}.out"
        self.process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.env['OPS_PORT']}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self, *, ready: bool = True, timeout: float = 30) -> WorkerProcess:
        self.env["OPS_PORT"] = str(free_port())
        with self.output.open("ab") as sink:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "chatprocessor",
                "run",
                env=self.env,
                cwd=self.cwd,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        if ready:
            await self.wait_ready(timeout)
        return self

    async def wait_ready(self, timeout: float = 30) -> None:
        async with httpx.AsyncClient(timeout=2) as http:

            async def ready() -> bool:
                if not self.running:
                    raise AssertionError(f"{self.name} exited early:\n{self.console()}")
                with contextlib.suppress(httpx.HTTPError):
                    return (await http.get(self.base + "/ready")).status_code == 200
                return False

            await wait_for(ready, timeout, f"{self.name} /ready", details=self.console)

    async def metrics(self) -> str:
        async with httpx.AsyncClient(timeout=5) as http:
            response = await http.get(self.base + "/metrics")
            response.raise_for_status()
            return response.text

    def kill(self) -> None:
        """kill -9: no cleanup of any kind."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)

    async def wait_exit(self, timeout: float) -> int:
        assert self.process is not None
        try:
            return await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"{self.name} did not exit within {timeout:g}s:\n{self.console()}"
            ) from None

    async def terminate(self, timeout: float = 20) -> int:
        """SIGTERM and wait for the exit status."""
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await self.wait_exit(timeout)

    async def stop(self) -> None:
        """Teardown: make sure it is gone (SIGTERM, then SIGKILL)."""
        if not self.running:
            return
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), 10)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()

    def console(self, lines: int = 60) -> str:
        try:
            text = self.output.read_text(errors="replace")
        except FileNotFoundError:
            return f"({self.name}: no output)"
        return f"--- {self.name} (last {lines} lines) ---\n" + "\n".join(text.splitlines()[-lines:])


def worker_env(side: Side, fake: FakeOllama, tmp_path: Path, **extra: str) -> dict[str, str]:
    """The test's (cleaned) environment plus a worker on ``side`` asking ``fake``."""
    env = dict(os.environ)
    env.update(
        PROVIDERS="ollama",
        OLLAMA_BASE_URL=fake.url,
        OLLAMA_MODEL="llama2",
        OLLAMA_CONNECT_TIMEOUT="2",
        OLLAMA_TIMEOUT="10",
        PREFETCH_COUNT="8",
        GRACEFUL_TIMEOUT="10",
        OPS_HOST="127.0.0.1",
        DATA_DIR=str(tmp_path / "data"),
        LOG_FILE=str(tmp_path / "worker.log"),
        # The circuit breaker stays out of the way (its own test sets it): these tests are
        # about retries through the delay queues, which it would short-circuit.
        BREAKER_FAIL_MAX="1000",
        BREAKER_RESET_TIMEOUT="0.2",
        PYTHONUNBUFFERED="1",
    )
    env.update(side.env())
    env.update(extra)
    return env


# -- metrics -----------------------------------------------------------------------------------


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{(.*?)\}})? (\S+)$", re.M)
    for match in pattern.finditer(text):
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


# -- cutting connections -----------------------------------------------------------------------


class TcpProxy:
    """A TCP forwarder to RabbitMQ whose connections the test can cut at once (both sides reset)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 5672) -> None:
        self.target = (host, port)
        self.port = 0
        self.accepted = 0
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop listening (new connections are refused) and cut the open ones; idempotent."""
        assert self._server is not None
        self._server.close()
        self.cut()
        if self._tasks:  # the cut ends every link; its handler returns right after
            await asyncio.wait(set(self._tasks), timeout=5)
        await self._server.wait_closed()

    async def outage(self, seconds: float) -> None:
        """The broker is gone for ``seconds`` (a restart): connections cut and refused, then
        accepted again on the same port."""
        await self.close()
        await asyncio.sleep(seconds)
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                writer.transport.abort()
                return
            self.accepted += 1
            link = (writer, up_writer)
            self._links.add(link)
            try:
                await asyncio.gather(
                    _pipe(reader, up_writer), _pipe(up_reader, writer), return_exceptions=True
                )
            finally:
                self._links.discard(link)
                writer.transport.abort()
                up_writer.transport.abort()
        finally:
            self._tasks.discard(task)

    def cut(self) -> int:
        """Reset every open connection, client and broker side, as a network failure would."""
        links = list(self._links)
        for client, upstream in links:
            client.transport.abort()
            upstream.transport.abort()
        self.cuts += 1
        return len(links)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.transport.abort()


async def rabbitmqctl(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, f"rabbitmqctl {' '.join(args)}: {err.decode()}"
    return out.decode()


async def connection_pids(name: str) -> list[str]:
    """Broker-side ids of the connections whose client name is ``name``."""
    listing = await rabbitmqctl(
        "list_connections", "pid", "client_properties", "-q", "--no-table-headers"
    )
    return [line.split("\t")[0] for line in listing.splitlines() if f'"{name}"' in line]


async def close_connection(pid: str) -> None:
    """Have the broker force-close a connection (as a broker restart would)."""
    await rabbitmqctl("close_connection", pid, "faults test: forced close", "-q")


def worker_connection_name(pid: int) -> str:
    """The AMQP connection name a worker process announces (see RabbitMQTransport)."""
    return f"chatprocessor {socket.gethostname()}:{pid}"


# -- the lab: everything one test uses, cleaned up after it ------------------------------------

#: Transports a scenario runs on: RabbitMQ needs the broker, the local queue nothing.
KINDS = [pytest.param("rabbitmq", marks=pytest.mark.rabbitmq), "local"]


class Lab:
    """A test's fake LLM, ledger, broker sides and worker processes; ``aclose`` undoes it all
    (workers first, then the queues)."""

    def __init__(
        self,
        tag: str,
        fake: TimedFakeOllama,
        tmp_path: Path,
        record: Callable[[str, str, Report], None],
    ) -> None:
        self.tag = tag
        self.fake = fake
        self.tmp_path = tmp_path
        self.ledger = Ledger()
        self.record = record
        self.sides: list[Side] = []
        self.workers: list[WorkerProcess] = []

    async def side(self, kind: str, retry: RetryPolicy = FAST_RETRY) -> Side:
        side: Side
        if kind == "rabbitmq":
            side = RabbitSide(self.tag, self.ledger, retry)
        else:
            side = LocalSide(self.tag, self.ledger, self.tmp_path / "data", retry)
        self.sides.append(side)
        await side.start()
        return side

    def worker(self, side: Side, **extra: str) -> WorkerProcess:
        """A worker process on ``side`` (not started yet)."""
        process = WorkerProcess(
            worker_env(side, self.fake, self.tmp_path, **extra),
            self.tmp_path,
            f"worker-{len(self.workers) + 1}",
        )
        self.workers.append(process)
        return process

    async def report(self, side: Side, scenario: str, **options: Any) -> Report:
        """Wait for replies in transit, analyse, and add the figures to the run's table."""
        report = analyse(
            self.ledger, self.fake, leftover=await finish(side, self.ledger), **options
        )
        self.record(scenario, side.kind, report)
        return report

    async def aclose(self) -> None:
        for process in self.workers:
            await process.stop()
        for side in reversed(self.sides):
            await side.close()
