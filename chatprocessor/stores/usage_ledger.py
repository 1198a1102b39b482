"""The usage ledger (seed 004, "Cost Management"): one ``ai_usage_logs`` row per job with
its tenant, model, tokens and cost, in the DATABASE_URL database (SQLite in DATA_DIR by
default, Postgres for several machines).

It is what ``chatprocessor usage`` reports from and what seeds the in-process budgets at
start-up. Like the job metrics, recording must never slow or fail a job: :meth:`record`
only queues, and the background task of
:class:`~chatprocessor.stores.batch_writer.BatchWriter` writes in batches. A job already
in the ledger (a redelivery) is not written twice.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Float,
    Index,
    Integer,
    String,
    Table,
    UniqueConstraint,
    and_,
    case,
    cast,
    false,
    func,
    literal_column,
    select,
    text,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from chatprocessor.core.errors import StoreUnavailable
from chatprocessor.ops.metrics import AI_USAGE_WRITES
from chatprocessor.stores.batch_writer import MAX_QUEUE, RETRY_DELAYS, BatchWriter, insert_for
from chatprocessor.stores.database import DATABASE_ERRORS

# One migration history, so one MetaData.
from chatprocessor.stores.job_metrics import metadata

log = logging.getLogger(__name__)

#: What ``report`` may group by.
GROUPS = ("tenant", "model", "day")
#: Longest value of each text column; longer values are cut (Postgres would refuse the row).
LENGTHS = {
    "job_id": 200,
    "tenant_id": 200,
    "provider": 200,
    "model": 200,
    "job_type": 64,
    "lane": 16,
    "currency": 8,
    "status": 32,
}

# Keep identical to migration 0002 (tests compare them with alembic's compare_metadata).
ai_usage_logs = Table(
    "ai_usage_logs",
    metadata,
    # SQLite numbers rows by itself only for an INTEGER primary key.
    Column(
        "id",
        BigInteger().with_variant(Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    Column("job_id", String(200), nullable=False),
    Column("tenant_id", String(200), nullable=False),
    Column("provider", String(200)),
    Column("model", String(200)),
    Column("job_type", String(64)),
    Column("lane", String(16)),
    Column("input_tokens", Integer, nullable=False, server_default=text("0")),
    Column("output_tokens", Integer, nullable=False, server_default=text("0")),
    Column("total_cost", Float, nullable=False, server_default=text("0")),
    Column("currency", String(8)),
    Column("cache_hit", Boolean, nullable=False, server_default=false()),
    Column("status", String(32)),
    Column("latency_ms", Integer),
    #: The seed's column name; always UTC.
    Column("timestamp", DateTime(timezone=True), nullable=False),
    UniqueConstraint("job_id"),
    Index("ix_ai_usage_logs_tenant_id_timestamp", "tenant_id", "timestamp"),
)


@dataclass(slots=True)
class UsageRecord:
    """One job's use of a model: what it cost and how it went."""

    job_id: str
    tenant_id: str
    provider: str | None
    model: str
    job_type: str
    lane: str
    input_tokens: int
    output_tokens: int
    total_cost: float
    currency: str
    cache_hit: bool
    status: str
    latency_ms: int | None
    timestamp: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass(slots=True)
class UsageRow:
    """One line of a usage report; the fields not grouped on are ``""`` (or None for day)."""

    tenant_id: str
    model: str
    day: date | None
    requests: int
    cache_hits: int
    input_tokens: int
    output_tokens: int
    cost: float
    currency: str


class UsageLedger(BatchWriter[UsageRecord]):
    """Writes usage records from a background task and reports on them (see the module
    docstring)."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        batch_interval: float = 0.2,
        max_queue: int = MAX_QUEUE,
        retry_delays: Sequence[float] = RETRY_DELAYS,
    ) -> None:
        super().__init__(
            engine,
            label="usage ledger",
            writes=AI_USAGE_WRITES,
            logger=log,
            batch_interval=batch_interval,
            max_queue=max_queue,
            retry_delays=retry_delays,
        )

    def record(self, record: UsageRecord) -> None:
        """Queue ``record`` for writing; never raises, never blocks."""
        try:
            normalized = _normalized(record)
        except Exception:  # a bad record must not fail its job
            log.exception("usage ledger: record of job %r not queued", record.job_id)
            self._count("dropped")
            return
        self._enqueue(normalized)

    async def report(
        self,
        *,
        since: date | None = None,
        until: date | None = None,
        tenant: str | None = None,
        group_by: Sequence[str] = GROUPS,
    ) -> list[UsageRow]:
        """Requests, cache hits, tokens and cost summed per group (any of tenant, model,
        day: the UTC date) and currency, from ``since`` to ``until`` inclusive, ordered by
        day, tenant and model. No group gives the grand total per currency."""
        unknown = sorted(set(group_by) - set(GROUPS))
        if unknown:
            raise ValueError(
                f"cannot group by {', '.join(unknown)}; expected any of {', '.join(GROUPS)}"
            )
        table = ai_usage_logs.c
        keys: list[Any] = []
        if "day" in group_by:
            keys.append(self._utc_day(table.timestamp).label("day"))
        if "tenant" in group_by:
            keys.append(table.tenant_id.label("tenant_id"))
        if "model" in group_by:
            keys.append(func.coalesce(table.model, "").label("model"))
        currency = func.coalesce(table.currency, "").label("currency")
        keys.append(currency)
        query = select(
            *keys,
            func.count().label("requests"),
            func.coalesce(func.sum(case((table.cache_hit, 1), else_=0)), 0).label("cache_hits"),
            func.coalesce(func.sum(table.input_tokens), 0).label("input_tokens"),
            func.coalesce(func.sum(table.output_tokens), 0).label("output_tokens"),
            func.coalesce(func.sum(table.total_cost), 0.0).label("cost"),
        ).group_by(*(key.element for key in keys))
        query = query.order_by(*(key.element for key in keys))
        if since is not None:
            query = query.where(table.timestamp >= _midnight(since))
        if until is not None:
            query = query.where(table.timestamp < _midnight(until + timedelta(days=1)))
        if tenant is not None:
            query = query.where(table.tenant_id == tenant)
        rows = await self._fetch(query)
        return [
            UsageRow(
                tenant_id=row.get("tenant_id") or "",
                model=row.get("model") or "",
                day=_as_date(row.get("day")),
                requests=int(row["requests"]),
                cache_hits=int(row["cache_hits"]),
                input_tokens=int(row["input_tokens"]),
                output_tokens=int(row["output_tokens"]),
                cost=float(row["cost"]),
                currency=row["currency"],
            )
            for row in rows
        ]

    async def spend_totals(self, now: datetime) -> dict[str, tuple[float, float]]:
        """Per tenant: what it spent on the UTC day of ``now`` and in its UTC month, to seed
        the in-process budgets at start-up."""
        now = _utc(now)
        day_start = _midnight(now.date())
        month_start = _midnight(now.date().replace(day=1))
        next_month = _midnight((month_start + timedelta(days=32)).date().replace(day=1))
        table = ai_usage_logs.c
        today = and_(table.timestamp >= day_start, table.timestamp < day_start + timedelta(days=1))
        query = (
            select(
                table.tenant_id,
                func.coalesce(func.sum(case((today, table.total_cost), else_=0.0)), 0.0).label(
                    "day"
                ),
                func.coalesce(func.sum(table.total_cost), 0.0).label("month"),
            )
            .where(table.timestamp >= month_start, table.timestamp < next_month)
            .group_by(table.tenant_id)
        )
        rows = await self._fetch(query)
        return {row["tenant_id"]: (float(row["day"]), float(row["month"])) for row in rows}

    def _utc_day(self, column: Any) -> Any:
        """The UTC date of a timestamp: SQLite stores UTC text, Postgres converts to its
        session time zone unless told (a literal, so GROUP BY repeats the same expression)."""
        if self._engine.dialect.name == "postgresql":
            return cast(func.timezone(literal_column("'UTC'"), column), Date)
        return func.date(column, type_=Date)

    async def _fetch(self, query: Any) -> list[dict[str, Any]]:
        try:
            async with self._engine.connect() as connection:
                result = await connection.execute(query)
                return [dict(row) for row in result.mappings()]
        except DATABASE_ERRORS as exc:
            raise StoreUnavailable(f"cannot read the usage ledger: {exc}") from exc

    async def _write(self, connection: AsyncConnection, batch: list[UsageRecord]) -> None:
        rows: dict[str, dict[str, Any]] = {}
        for record in batch:  # a job twice in one batch: the first record counts, as in the table
            rows.setdefault(record.job_id, _row(record))
        insert = insert_for(connection.dialect.name)
        stmt = insert(ai_usage_logs).on_conflict_do_nothing(index_elements=["job_id"])
        await connection.execute(stmt, list(rows.values()))


def _normalized(record: UsageRecord) -> UsageRecord:
    """A copy the caller cannot change, with text cut to its column and the time in UTC."""
    copy = replace(record, timestamp=_utc(record.timestamp))
    for name, length in LENGTHS.items():
        value = getattr(copy, name)
        if isinstance(value, str) and len(value) > length:
            setattr(copy, name, value[:length])
    return copy


def _row(record: UsageRecord) -> dict[str, Any]:
    return {
        "job_id": record.job_id,
        "tenant_id": record.tenant_id,
        "provider": record.provider,
        "model": record.model,
        "job_type": record.job_type,
        "lane": record.lane,
        "input_tokens": max(0, int(record.input_tokens)),
        "output_tokens": max(0, int(record.output_tokens)),
        "total_cost": float(record.total_cost),
        "currency": record.currency,
        "cache_hit": bool(record.cache_hit),
        "status": record.status,
        "latency_ms": record.latency_ms,
        "timestamp": record.timestamp,
    }


def _utc(moment: datetime) -> datetime:
    """SQLite keeps the clock time only: store UTC (a naive time is taken as UTC)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(), tzinfo=UTC)


def _as_date(value: Any) -> date | None:
    if value is None or isinstance(value, date):
        return value
    return date.fromisoformat(str(value))
