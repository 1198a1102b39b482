"""Job metrics (seed 003): one ``llm_jobs`` row per job and its ``llm_messages``, for
observability and dashboards, in the DATABASE_URL database.

Recording must never slow or fail a job, so :class:`JobMetrics` only queues: a
background task writes what arrived within ``batch_interval`` in one transaction
of upserts, retries a failed batch a few times and then drops it with an error
log. A redelivered job updates its row instead of adding one, and its messages
are not written twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    case,
    func,
    or_,
    select,
)
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
from chatprocessor.ops.metrics import JOB_METRICS_WRITES, labelled
from chatprocessor.stores.database import DATABASE_ERRORS, migrate

log = logging.getLogger(__name__)

MODES = ("gen", "rag")
STATUSES = (
    "queued",
    "running",
    "completed",
    "cancelled",
    "timeout",
    "failed",
    "forbidden",
    "rejected",
    "over_budget",
)
#: A job in one of these may still change; the others are final.
ACTIVE_STATUSES = ("queued", "running")
ROLES = ("system", "user", "assistant")
#: Length of identifier columns; longer values are cut (Postgres would refuse the row).
ID_LENGTH = 200
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

metadata = MetaData(
    naming_convention={
        "pk": "pk_%(table_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    }
)

# Keep identical to the migrations (tests compare them with alembic's compare_metadata).
llm_jobs = Table(
    "llm_jobs",
    metadata,
    Column("job_id", String(ID_LENGTH), primary_key=True),
    Column("tenant_id", String(ID_LENGTH), nullable=False),
    Column("user_id", String(ID_LENGTH), nullable=False),
    Column("session_id", String(ID_LENGTH), nullable=False),
    Column("mode", String(16), nullable=False),
    Column("model", String(ID_LENGTH)),
    Column("provider", String(ID_LENGTH)),
    Column("status", String(16), nullable=False),
    Column("error", Text),
    Column("prompt_tokens", Integer),
    Column("completion_tokens", Integer),
    Column("latency_ms", Integer),
    Column("time_to_first_token_ms", Integer),
    Column("attempts", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
    Index("ix_llm_jobs_tenant_id_session_id", "tenant_id", "session_id"),
    Index("ix_llm_jobs_created_at", "created_at"),
)

llm_messages = Table(
    "llm_messages",
    metadata,
    # SQLite numbers rows by itself only for an INTEGER primary key.
    Column(
        "id",
        BigInteger().with_variant(Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    Column(
        "job_id",
        String(ID_LENGTH),
        ForeignKey("llm_jobs.job_id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("tenant_id", String(ID_LENGTH), nullable=False),
    Column("user_id", String(ID_LENGTH), nullable=False),
    Column("session_id", String(ID_LENGTH), nullable=False),
    #: Position in the job's conversation: a redelivered job's messages collide and are skipped.
    Column("seq", Integer, nullable=False),
    Column("role", String(16), nullable=False),
    Column("content", Text, nullable=False),
    Column("tokens", Integer),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("job_id", "role", "seq"),
)


@dataclass(slots=True)
class JobRecord:
    """What is known about a job when it starts or ends."""

    job_id: str
    tenant_id: str
    user_id: str
    session_id: str
    mode: str = "gen"
    model: str | None = None
    provider: str | None = None
    status: str = "running"
    error: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_ms: int | None = None
    time_to_first_token_ms: int | None = None
    attempts: int = 1


@dataclass(slots=True)
class MessageRecord:
    """One turn of the conversation a job sent to the model, or the model's answer."""

    role: str
    content: str
    tokens: int | None = None


@dataclass(slots=True)
class _Op:
    seq: int
    record: JobRecord
    at: datetime
    #: None for started(); the job's messages for finished().
    messages: list[MessageRecord] | None


class JobMetrics:
    """Records jobs in the database from a background task (see the module docstring)."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        batch_interval: float = 0.05,
        max_queue: int = MAX_QUEUE,
        retry_delays: Sequence[float] = RETRY_DELAYS,
    ) -> None:
        self._engine = engine
        self._batch_interval = batch_interval
        self._max_queue = max_queue
        self._retry_delays = tuple(retry_delays)
        self._queue: deque[_Op] = deque()
        self._enqueued = 0  # seq of the newest queued record
        self._done = 0  # every record up to this seq is written or dropped
        self._wake = asyncio.Event()
        self._progress = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._migrated = False
        self._log = _RateLimitedLog(LOG_EVERY)

    async def start(self) -> None:
        """Bring the schema up to date and start the writer.

        An unreachable database does not stop the service: the error is logged and
        the writer migrates before its first write instead.
        """
        if self._task is not None:
            return
        try:
            await migrate(self._engine)
            self._migrated = True
        except StoreUnavailable as exc:
            log.error("job metrics: %s (records are queued and retried)", exc)
        self._task = asyncio.create_task(self._run(), name="job-metrics-writer")

    def started(self, record: JobRecord) -> None:
        """The job began (status ``running`` unless given): queued, returns at once."""
        _check(record)
        self._enqueue(_Op(0, _copy(record), datetime.now(UTC), None))

    def finished(self, record: JobRecord, messages: list[MessageRecord]) -> None:
        """The job ended with ``record.status``; ``messages`` are its conversation."""
        _check(record)
        if record.status in ACTIVE_STATUSES:
            raise ValueError(f"finished() needs a final status, not {record.status!r}")
        for message in messages:
            if message.role not in ROLES:
                raise ValueError(f"unknown message role {message.role!r}; expected one of {ROLES}")
        copied = [MessageRecord(m.role, m.content, m.tokens) for m in messages]
        self._enqueue(_Op(0, _copy(record), datetime.now(UTC), copied))

    async def flush(self) -> None:
        """Wait until everything queued so far is written (or given up)."""
        target = self._enqueued
        if self._task is None or self._task.done():
            return
        async with self._progress:
            await self._progress.wait_for(lambda: self._done >= target)

    async def close(self, timeout: float = 30.0) -> None:
        """Write what is queued (waiting at most ``timeout`` seconds), then dispose the engine."""
        if self._task is not None:
            try:
                await asyncio.wait_for(self.flush(), timeout)
            except TimeoutError:
                log.error("job metrics: %d record(s) not written at shutdown", len(self._queue))
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._engine.dispose()

    async def get(self, job_id: str) -> dict[str, Any] | None:
        """The ``llm_jobs`` row of a job, or None."""
        query = select(llm_jobs).where(llm_jobs.c.job_id == job_id)
        rows = await _fetch(self._engine, query)
        return rows[0] if rows else None

    async def messages(self, job_id: str) -> list[dict[str, Any]]:
        """The ``llm_messages`` rows of a job, in conversation order."""
        query = (
            select(llm_messages)
            .where(llm_messages.c.job_id == job_id)
            .order_by(llm_messages.c.seq, llm_messages.c.id)
        )
        return await _fetch(self._engine, query)

    # The writer.

    def _enqueue(self, op: _Op) -> None:
        if len(self._queue) >= self._max_queue:
            self._queue.popleft()
            labelled(JOB_METRICS_WRITES, "dropped").inc()
            self._log.warning(
                "overflow", "job metrics: queue full (%d), oldest record dropped", self._max_queue
            )
        self._enqueued += 1
        op.seq = self._enqueued
        self._queue.append(op)
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._batch_interval > 0:
                await asyncio.sleep(self._batch_interval)  # let a batch gather
            while self._queue:
                size = min(len(self._queue), MAX_BATCH)
                batch = [self._queue.popleft() for _ in range(size)]
                try:
                    await self._write_batch(batch, retry=True)
                except Exception:  # a bug must not stop the writer (nor hang flush)
                    log.exception("job metrics: %d record(s) dropped", len(batch))
                    labelled(JOB_METRICS_WRITES, "dropped").inc(len(batch))
                async with self._progress:
                    self._done = batch[-1].seq
                    self._progress.notify_all()

    async def _write_batch(self, batch: list[_Op], *, retry: bool) -> None:
        delays = (0.0, *self._retry_delays) if retry else (0.0,)
        for delay in delays:
            if delay:
                await asyncio.sleep(delay)
            try:
                await self._write(batch)
            except (*DATABASE_ERRORS, StoreUnavailable) as exc:
                labelled(JOB_METRICS_WRITES, "failed").inc()
                self._log.warning("failed", "job metrics: write failed: %s", _short(exc))
                if not _permanent(exc):
                    continue
                if len(batch) > 1:  # one bad record must not sink the others
                    for op in batch:
                        await self._write_batch([op], retry=False)
                    return
                break
            else:
                labelled(JOB_METRICS_WRITES, "written").inc(len(batch))
                return
        labelled(JOB_METRICS_WRITES, "dropped").inc(len(batch))
        self._log.error("dropped", "job metrics: %d record(s) dropped after errors", len(batch))

    async def _write(self, batch: list[_Op]) -> None:
        if not self._migrated:
            await migrate(self._engine)
            self._migrated = True
        async with self._engine.begin() as connection:
            for op in batch:
                await _write_op(connection, op)


async def _write_op(connection: AsyncConnection, op: _Op) -> None:
    insert = _insert_for(connection.dialect.name)
    record = op.record
    finished = op.messages is not None
    row = asdict(record)
    for name in ("job_id", "tenant_id", "user_id", "session_id", "model", "provider"):
        row[name] = _clip(row[name])
    row.update(created_at=op.at, updated_at=op.at, finished_at=op.at if finished else None)
    stmt = insert(llm_jobs).values(row)
    new, old = stmt.excluded, llm_jobs.c
    if finished:  # unless a newer attempt has started since
        take: Any = new.attempts >= old.attempts
    else:  # a redelivered start must not undo a final status; a real retry may
        take = or_(old.status.in_(ACTIVE_STATUSES), new.attempts > old.attempts)
    changes: dict[str, Any] = {
        name: case((take, new[name]), else_=old[name])
        for name in (
            "mode",
            "status",
            "error",
            "prompt_tokens",
            "completion_tokens",
            "latency_ms",
            "time_to_first_token_ms",
            "updated_at",
            "finished_at",
        )
    }
    for name in ("model", "provider"):
        changes[name] = case((take, func.coalesce(new[name], old[name])), else_=old[name])
    changes["attempts"] = case((new.attempts > old.attempts, new.attempts), else_=old.attempts)
    await connection.execute(stmt.on_conflict_do_update(index_elements=["job_id"], set_=changes))
    if op.messages:
        rows = [
            {
                "job_id": row["job_id"],
                "tenant_id": row["tenant_id"],
                "user_id": row["user_id"],
                "session_id": row["session_id"],
                "seq": seq,
                "role": message.role,
                "content": message.content,
                "tokens": message.tokens,
                "created_at": op.at,
            }
            for seq, message in enumerate(op.messages)
        ]
        messages = insert(llm_messages).on_conflict_do_nothing(
            index_elements=["job_id", "role", "seq"]
        )
        await connection.execute(messages, rows)


def _insert_for(dialect: str) -> Callable[[Table], Any]:
    """The dialect's INSERT, which knows ON CONFLICT."""
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


async def recent_jobs(
    engine: AsyncEngine, *, session_id: str | None = None, limit: int = 20
) -> list[dict[str, Any]]:
    """The newest ``llm_jobs`` rows, optionally of one session (any tenant)."""
    query = select(llm_jobs).order_by(llm_jobs.c.created_at.desc()).limit(limit)
    if session_id is not None:
        query = query.where(llm_jobs.c.session_id == session_id)
    return await _fetch(engine, query)


async def _fetch(engine: AsyncEngine, query: Any) -> list[dict[str, Any]]:
    try:
        async with engine.connect() as connection:
            result = await connection.execute(query)
            return [_aware(dict(row)) for row in result.mappings()]
    except DATABASE_ERRORS as exc:
        raise StoreUnavailable(f"cannot read the job metrics database: {exc}") from exc


def _aware(row: dict[str, Any]) -> dict[str, Any]:
    """SQLite hands back naive datetimes; they were stored in UTC."""
    for name, value in row.items():
        if isinstance(value, datetime) and value.tzinfo is None:
            row[name] = value.replace(tzinfo=UTC)
    return row


def _check(record: JobRecord) -> None:
    if record.status not in STATUSES:
        raise ValueError(f"unknown job status {record.status!r}; expected one of {STATUSES}")
    if record.mode not in MODES:
        raise ValueError(f"unknown job mode {record.mode!r}; expected one of {MODES}")


def _copy(record: JobRecord) -> JobRecord:
    """The caller may reuse its record; the queue keeps what it was when recorded."""
    return JobRecord(**asdict(record))


def _clip(value: str | None) -> str | None:
    return value[:ID_LENGTH] if value is not None else None


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

    def __init__(self, every: float) -> None:
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
        log.log(level, message + suffix, *args)
