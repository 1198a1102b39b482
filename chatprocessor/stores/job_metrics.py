"""Job metrics (seed 003): one ``llm_jobs`` row per job and its ``llm_messages``, for
observability and dashboards, in the DATABASE_URL database.

Recording must never slow or fail a job, so :class:`JobMetrics` only queues: it is a
:class:`~chatprocessor.stores.batch_writer.BatchWriter`, whose background task writes
batches of upserts. A redelivered job updates its row instead of adding one, and its
messages are not written twice.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
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
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from chatprocessor.core.errors import StoreUnavailable
from chatprocessor.ops.metrics import JOB_METRICS_WRITES
from chatprocessor.stores.batch_writer import MAX_QUEUE, RETRY_DELAYS, BatchWriter, insert_for
from chatprocessor.stores.database import DATABASE_ERRORS

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
    record: JobRecord
    at: datetime
    #: None for started(); the job's messages for finished().
    messages: list[MessageRecord] | None


class JobMetrics(BatchWriter[_Op]):
    """Records jobs in the database from a background task (see the module docstring)."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        batch_interval: float = 0.05,
        max_queue: int = MAX_QUEUE,
        retry_delays: Sequence[float] = RETRY_DELAYS,
    ) -> None:
        super().__init__(
            engine,
            label="job metrics",
            writes=JOB_METRICS_WRITES,
            logger=log,
            batch_interval=batch_interval,
            max_queue=max_queue,
            retry_delays=retry_delays,
        )

    def started(self, record: JobRecord) -> None:
        """The job began (status ``running`` unless given): queued, returns at once."""
        _check(record)
        self._enqueue(_Op(_copy(record), datetime.now(UTC), None))

    def finished(self, record: JobRecord, messages: list[MessageRecord]) -> None:
        """The job ended with ``record.status``; ``messages`` are its conversation."""
        _check(record)
        if record.status in ACTIVE_STATUSES:
            raise ValueError(f"finished() needs a final status, not {record.status!r}")
        for message in messages:
            if message.role not in ROLES:
                raise ValueError(f"unknown message role {message.role!r}; expected one of {ROLES}")
        copied = [MessageRecord(m.role, m.content, m.tokens) for m in messages]
        self._enqueue(_Op(_copy(record), datetime.now(UTC), copied))

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

    async def _write(self, connection: AsyncConnection, batch: list[_Op]) -> None:
        for op in batch:
            await _write_op(connection, op)


async def _write_op(connection: AsyncConnection, op: _Op) -> None:
    insert = insert_for(connection.dialect.name)
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
