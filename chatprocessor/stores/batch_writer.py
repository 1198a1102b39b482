"""The queued, batched database writer behind the job metrics and the usage ledger.

Recording must never slow or fail a job, so a :class:`BatchWriter` only queues: a
background task writes what arrived within ``batch_interval`` in one transaction,
retries a failed batch a few times and then drops it with an error log. A batch the
database refuses is tried again record by record, so one bad record does not sink the
others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from prometheus_client import Counter
from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import (
    CompileError,
    DataError,
    DBAPIError,
    IntegrityError,
    ProgrammingError,
    StatementError,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from chatprocessor.core.errors import StoreUnavailable
from chatprocessor.ops.metrics import labelled
from chatprocessor.stores.database import DATABASE_ERRORS, migrate

#: Records waiting to be written at most; beyond, the oldest are dropped.
MAX_QUEUE = 10_000
#: Records written in one transaction at most.
MAX_BATCH = 500
#: Pauses before the retries of a batch that failed (seconds); then it is dropped.
RETRY_DELAYS = (0.5, 2.0, 5.0)
#: Postgres SQLSTATE classes that refuse the data or the statement, not the connection:
#: data exception, integrity violation, syntax or access, not supported, program limit.
REFUSED_SQLSTATE_CLASSES = frozenset({"22", "23", "42", "0A", "54"})
#: A repeated warning is logged at most once per this many seconds.
LOG_EVERY = 30.0

Op = TypeVar("Op")


class BatchWriter(ABC, Generic[Op]):
    """Queues records of type ``Op`` and writes them from a background task; a subclass
    says how a batch is written (:meth:`_write`) and what it is called in the logs."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        label: str,
        writes: Counter,
        logger: logging.Logger,
        batch_interval: float,
        max_queue: int,
        retry_delays: Sequence[float],
    ) -> None:
        self._engine = engine
        self._label = label  # names the store in log messages and the writer task
        self._writes = writes  # labelled by outcome: written, failed, dropped
        self._logger = logger  # the store's, so its records keep their logger name
        self._batch_interval = batch_interval
        self._max_queue = max_queue
        self._retry_delays = tuple(retry_delays)
        self._queue: deque[tuple[int, Op]] = deque()  # (seq, record)
        self._enqueued = 0  # seq of the newest queued record
        self._done = 0  # every record up to this seq is written or dropped
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        self._progress = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._migrated = False
        self._log = _RateLimitedLog(logger, LOG_EVERY)

    async def start(self) -> None:
        """Bring the schema up to date and start the writer.

        An unreachable database does not stop the service: the error is logged and the
        writer migrates before its first write instead.
        """
        if self._task is not None:
            return
        self._closing.clear()
        try:
            await migrate(self._engine)
            self._migrated = True
        except StoreUnavailable as exc:
            self._logger.error("%s: %s (records are queued and retried)", self._label, exc)
        name = f"{self._label.replace(' ', '-')}-writer"
        self._task = asyncio.create_task(self._run(), name=name)

    async def flush(self) -> None:
        """Wait until everything queued so far is written (or given up)."""
        target = self._enqueued
        if self._task is None or self._task.done():
            return
        async with self._progress:
            await self._progress.wait_for(lambda: self._done >= target)

    async def close(self, timeout: float = 30.0) -> None:
        """Write what is queued (waiting at most ``timeout`` seconds), stop the writer and
        dispose the engine."""
        if self._task is not None:
            self._closing.set()  # the last batch: no wait for more to gather
            try:
                await asyncio.wait_for(self.flush(), timeout)
            except TimeoutError:
                self._logger.error(
                    "%s: %d record(s) not written at shutdown", self._label, len(self._queue)
                )
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._engine.dispose()

    @abstractmethod
    async def _write(self, connection: AsyncConnection, batch: list[Op]) -> None:
        """Write ``batch`` in the transaction of ``connection``."""

    def _count(self, outcome: str, records: int = 1) -> None:
        labelled(self._writes, outcome).inc(records)

    def _enqueue(self, op: Op) -> None:
        """Queue ``op``; returns at once, dropping the oldest record if the queue is full."""
        if len(self._queue) >= self._max_queue:
            self._queue.popleft()
            self._count("dropped")
            self._log.warning(
                "overflow",
                "%s: queue full (%d), oldest record dropped",
                self._label,
                self._max_queue,
            )
        self._enqueued += 1
        self._queue.append((self._enqueued, op))
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._batch_interval > 0 and not self._closing.is_set():
                with contextlib.suppress(TimeoutError):  # let a batch gather
                    await asyncio.wait_for(self._closing.wait(), self._batch_interval)
            while self._queue:
                size = min(len(self._queue), MAX_BATCH)
                queued = [self._queue.popleft() for _ in range(size)]
                batch = [op for _, op in queued]
                try:
                    await self._write_batch(batch, retry=True)
                except Exception:  # a bug must not stop the writer (nor hang flush)
                    self._logger.exception("%s: %d record(s) dropped", self._label, len(batch))
                    self._count("dropped", len(batch))
                async with self._progress:
                    self._done = queued[-1][0]
                    self._progress.notify_all()

    async def _write_batch(self, batch: list[Op], *, retry: bool) -> None:
        delays = (0.0, *self._retry_delays) if retry else (0.0,)
        for delay in delays:
            if delay:
                await asyncio.sleep(delay)
            try:
                if not self._migrated:
                    await migrate(self._engine)
                    self._migrated = True
                async with self._engine.begin() as connection:
                    await self._write(connection, batch)
            except (*DATABASE_ERRORS, StoreUnavailable) as exc:
                self._count("failed")
                self._log.warning("failed", "%s: write failed: %s", self._label, _short(exc))
                if not _permanent(exc):
                    continue
                if len(batch) > 1:  # one bad record must not sink the others
                    for op in batch:
                        await self._write_batch([op], retry=False)
                    return
                break
            else:
                self._count("written", len(batch))
                return
        self._count("dropped", len(batch))
        self._log.error("dropped", "%s: %d record(s) dropped after errors", self._label, len(batch))


def insert_for(dialect: str) -> Callable[[Table], Any]:
    """The dialect's INSERT, which knows ON CONFLICT (both stores write upserts)."""
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


def _permanent(exc: BaseException) -> bool:
    """Whether the records themselves are refused, so trying them again cannot help."""
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return False
        sqlstate = getattr(exc.orig, "sqlstate", None)  # Postgres: the class says it all
        if isinstance(sqlstate, str):
            return sqlstate[:2] in REFUSED_SQLSTATE_CLASSES
        return isinstance(exc, DataError | IntegrityError | ProgrammingError)
    return isinstance(exc, StatementError | CompileError)


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


class _RateLimitedLog:
    """Logs each kind of message at most once per ``every`` seconds, saying how many
    were held back: a database outage must not flood the log once per job."""

    def __init__(self, logger: logging.Logger, every: float) -> None:
        self._logger = logger
        self._every = every
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, kind: str, message: str, *args: object) -> None:
        self._emit(logging.WARNING, kind, message, args)

    def error(self, kind: str, message: str, *args: object) -> None:
        self._emit(logging.ERROR, kind, message, args)

    def _emit(self, level: int, kind: str, message: str, args: tuple[object, ...]) -> None:
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self._every:
            self._held[kind] = self._held.get(kind, 0) + 1
            return
        self._last[kind] = now
        held = self._held.pop(kind, 0)
        suffix = f" ({held} more like this in the last {self._every:g} s)" if held else ""
        self._logger.log(level, message + suffix, *args)
