"""The usage ledger (ai_usage_logs): migration, idempotent batched writes, reports, spend
totals for budgets, and outages that never reach the job.

Each test runs on SQLite (a file in tmp_path) and on the real Postgres (a schema of its
own, dropped afterwards).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from prometheus_client import REGISTRY
from sqlalchemy import func, inspect, select
from sqlalchemy.ext.asyncio import AsyncEngine

from chatprocessor.core.errors import StoreUnavailable
from chatprocessor.stores.database import (
    create_engine,
    current_revision,
    database_url,
    head_revision,
    migrate,
)
from chatprocessor.stores.job_metrics import metadata
from chatprocessor.stores.usage_ledger import UsageLedger, UsageRecord, UsageRow, ai_usage_logs

pytestmark = pytest.mark.timeout(60)

EngineFactory = Callable[[], AsyncEngine]
DAY1 = datetime(2025, 3, 10, 9, 30, tzinfo=UTC)
DAY2 = datetime(2025, 3, 11, 23, 59, 59, tzinfo=UTC)


@pytest.fixture
async def ledger(make_engine: EngineFactory) -> AsyncIterator[UsageLedger]:
    store = UsageLedger(make_engine(), batch_interval=0.01)
    await store.start()
    yield store
    await store.close()


def writes(outcome: str) -> float:
    value = REGISTRY.get_sample_value("ai_usage_ledger_writes_total", {"outcome": outcome})
    return value or 0.0


def usage(job_id: str, **fields: Any) -> UsageRecord:
    values: dict[str, Any] = {
        "tenant_id": "acme",
        "provider": "openai",
        "model": "gpt-4",
        "job_type": "chat_response",
        "lane": "standard",
        "input_tokens": 100,
        "output_tokens": 50,
        "total_cost": 0.006,
        "currency": "USD",
        "cache_hit": False,
        "status": "completed",
        "latency_ms": 420,
        "timestamp": DAY1,
    }
    values.update(fields)
    return UsageRecord(job_id=job_id, **values)


async def count_rows(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        return int(await connection.scalar(select(func.count()).select_from(ai_usage_logs)) or 0)


# The schema


async def test_migration_creates_the_table_the_code_writes(make_engine: EngineFactory) -> None:
    engine = make_engine()
    await migrate(engine)
    assert await current_revision(engine) == head_revision() == "0002"

    def diff(sync: Any) -> list[Any]:
        return list(compare_metadata(MigrationContext.configure(sync), metadata))

    def indexes(sync: Any) -> dict[str, list[str | None]]:
        found = inspect(sync).get_indexes("ai_usage_logs")
        return {str(index["name"]): list(index["column_names"]) for index in found}

    async with engine.connect() as connection:
        assert await connection.run_sync(diff) == []
        assert (await connection.run_sync(indexes))["ix_ai_usage_logs_tenant_id_timestamp"] == [
            "tenant_id",
            "timestamp",
        ]


async def test_downgrade_drops_the_table(make_engine: EngineFactory) -> None:
    from alembic import command
    from alembic.config import Config

    from chatprocessor.stores.database import MIGRATIONS

    engine = make_engine()
    await migrate(engine)

    def downgrade(sync: Any) -> set[str]:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = sync
        command.downgrade(config, "0001")
        return set(inspect(sync).get_table_names())

    async with engine.begin() as connection:
        tables = await connection.run_sync(downgrade)
    assert "ai_usage_logs" not in tables
    assert "llm_jobs" in tables
    assert await current_revision(engine) == "0001"


# Recording


async def test_a_record_is_written_with_every_field(
    ledger: UsageLedger, make_engine: EngineFactory
) -> None:
    ledger.record(usage("j1", cache_hit=True, latency_ms=None, provider=None))
    await ledger.flush()

    async with make_engine().connect() as connection:
        row = (await connection.execute(select(ai_usage_logs))).mappings().one()
    assert (row["job_id"], row["tenant_id"], row["provider"], row["model"]) == (
        "j1",
        "acme",
        None,
        "gpt-4",
    )
    assert (row["job_type"], row["lane"], row["status"], row["currency"]) == (
        "chat_response",
        "standard",
        "completed",
        "USD",
    )
    assert (row["input_tokens"], row["output_tokens"], row["latency_ms"]) == (100, 50, None)
    assert row["total_cost"] == pytest.approx(0.006)
    assert row["cache_hit"] is True
    stamp = row["timestamp"]
    assert (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)) == DAY1


async def test_a_job_recorded_twice_is_written_once(
    ledger: UsageLedger, make_engine: EngineFactory
) -> None:
    failed, dropped = writes("failed"), writes("dropped")
    ledger.record(usage("dup", total_cost=1.0))
    ledger.record(usage("dup", total_cost=2.0))  # the same batch
    await ledger.flush()
    ledger.record(usage("dup", total_cost=3.0))  # a later batch (a redelivery)
    ledger.record(usage("other"))
    await ledger.flush()

    assert await count_rows(make_engine()) == 2
    assert (writes("failed"), writes("dropped")) == (failed, dropped)  # skipped, not refused
    [row] = await ledger.report(tenant="acme", group_by=["model"], since=DAY1.date())
    assert row.requests == 2
    assert row.cost == pytest.approx(1.006)


async def test_close_writes_what_is_queued(make_engine: EngineFactory) -> None:
    store = UsageLedger(make_engine(), batch_interval=5.0)  # would wait 5 s for a batch
    await store.start()
    for n in range(3):
        store.record(usage(f"c{n}"))
    await store.close()
    assert await count_rows(make_engine()) == 3


async def test_records_from_other_time_zones_land_on_their_utc_day(
    ledger: UsageLedger,
) -> None:
    evening_in_sao_paulo = datetime(2025, 3, 10, 23, 30, tzinfo=timezone(timedelta(hours=-3)))
    ledger.record(usage("tz", timestamp=evening_in_sao_paulo))  # 2025-03-11 02:30 UTC
    ledger.record(usage("naive", timestamp=datetime(2025, 3, 10, 23, 0)))  # taken as UTC
    await ledger.flush()
    rows = await ledger.report(group_by=["day"])
    assert [(r.day, r.requests) for r in rows] == [(date(2025, 3, 10), 1), (date(2025, 3, 11), 1)]


# Reports


async def seed(ledger: UsageLedger) -> None:
    ledger.record(usage("a1", tenant_id="acme", model="gpt-4", total_cost=0.5))
    ledger.record(
        usage("a2", tenant_id="acme", model="gpt-4", total_cost=0.0, cache_hit=True, timestamp=DAY2)
    )
    ledger.record(
        usage(
            "a3",
            tenant_id="acme",
            model="gpt-4o-mini",
            input_tokens=10,
            output_tokens=5,
            total_cost=0.25,
            timestamp=DAY2,
        )
    )
    ledger.record(usage("b1", tenant_id="beta", model="gpt-4", total_cost=1.0))
    ledger.record(
        usage("old", tenant_id="beta", model="gpt-4", timestamp=DAY1 - timedelta(days=30))
    )
    await ledger.flush()


def summary(rows: list[UsageRow]) -> list[tuple[Any, ...]]:
    return [
        (r.tenant_id, r.model, r.day, r.requests, r.cache_hits, r.input_tokens, round(r.cost, 6))
        for r in rows
    ]


async def test_report_groups_by_tenant_model_and_day(ledger: UsageLedger) -> None:
    await seed(ledger)
    rows = await ledger.report(since=DAY1.date())
    d1, d2 = DAY1.date(), DAY2.date()
    assert summary(rows) == [
        ("acme", "gpt-4", d1, 1, 0, 100, 0.5),
        ("beta", "gpt-4", d1, 1, 0, 100, 1.0),
        ("acme", "gpt-4", d2, 1, 1, 100, 0.0),
        ("acme", "gpt-4o-mini", d2, 1, 0, 10, 0.25),
    ]
    assert {r.currency for r in rows} == {"USD"}
    assert rows[-1].output_tokens == 5


@pytest.mark.parametrize(
    ("group_by", "expected"),
    [
        (["tenant"], [("acme", "", None, 3, 1, 210, 0.75), ("beta", "", None, 1, 0, 100, 1.0)]),
        (
            ["model"],
            [("", "gpt-4", None, 3, 1, 300, 1.5), ("", "gpt-4o-mini", None, 1, 0, 10, 0.25)],
        ),
        (
            ["day"],
            [
                ("", "", date(2025, 3, 10), 2, 0, 200, 1.5),
                ("", "", date(2025, 3, 11), 2, 1, 110, 0.25),
            ],
        ),
        (
            ["tenant", "model"],
            [
                ("acme", "gpt-4", None, 2, 1, 200, 0.5),
                ("acme", "gpt-4o-mini", None, 1, 0, 10, 0.25),
                ("beta", "gpt-4", None, 1, 0, 100, 1.0),
            ],
        ),
        (
            ["day", "tenant"],
            [
                ("acme", "", date(2025, 3, 10), 1, 0, 100, 0.5),
                ("beta", "", date(2025, 3, 10), 1, 0, 100, 1.0),
                ("acme", "", date(2025, 3, 11), 2, 1, 110, 0.25),
            ],
        ),
        (
            ["model", "day"],
            [
                ("", "gpt-4", date(2025, 3, 10), 2, 0, 200, 1.5),
                ("", "gpt-4", date(2025, 3, 11), 1, 1, 100, 0.0),
                ("", "gpt-4o-mini", date(2025, 3, 11), 1, 0, 10, 0.25),
            ],
        ),
        ([], [("", "", None, 4, 1, 310, 1.75)]),
    ],
)
async def test_report_groups_by_any_combination(
    ledger: UsageLedger, group_by: list[str], expected: list[tuple[Any, ...]]
) -> None:
    await seed(ledger)
    assert summary(await ledger.report(since=DAY1.date(), group_by=group_by)) == expected


async def test_report_filters_by_dates_inclusive_and_by_tenant(ledger: UsageLedger) -> None:
    await seed(ledger)
    everything = await ledger.report(group_by=["tenant"])
    assert [(r.tenant_id, r.requests) for r in everything] == [("acme", 3), ("beta", 2)]

    first_day = await ledger.report(since=DAY1.date(), until=DAY1.date(), group_by=["tenant"])
    assert [(r.tenant_id, r.requests) for r in first_day] == [("acme", 1), ("beta", 1)]
    # 23:59:59 on the last day counts: until is inclusive.
    second_day = await ledger.report(since=DAY2.date(), until=DAY2.date(), group_by=["day"])
    assert [(r.day, r.requests) for r in second_day] == [(DAY2.date(), 2)]
    before = await ledger.report(until=DAY1.date() - timedelta(days=1), group_by=["tenant"])
    assert [(r.tenant_id, r.requests) for r in before] == [("beta", 1)]

    beta = await ledger.report(tenant="beta", since=DAY1.date())
    assert summary(beta) == [("beta", "gpt-4", DAY1.date(), 1, 0, 100, 1.0)]
    assert await ledger.report(tenant="nobody") == []


async def test_report_refuses_unknown_groups(ledger: UsageLedger) -> None:
    with pytest.raises(ValueError, match="cannot group by week"):
        await ledger.report(group_by=["tenant", "week"])


async def test_spend_totals_split_today_from_the_month(ledger: UsageLedger) -> None:
    now = datetime(2025, 4, 15, 12, 0, tzinfo=UTC)
    ledger.record(usage("t1", tenant_id="acme", total_cost=1.0, timestamp=now - timedelta(hours=1)))
    ledger.record(
        usage("t2", tenant_id="acme", total_cost=2.0, timestamp=datetime(2025, 4, 15, tzinfo=UTC))
    )
    ledger.record(
        usage("e1", tenant_id="acme", total_cost=4.0, timestamp=datetime(2025, 4, 1, tzinfo=UTC))
    )
    ledger.record(usage("e2", tenant_id="acme", total_cost=8.0, timestamp=now - timedelta(days=1)))
    ledger.record(
        usage(
            "l1",
            tenant_id="acme",
            total_cost=16.0,
            timestamp=datetime(2025, 3, 31, 23, 59, tzinfo=UTC),
        )
    )
    ledger.record(
        usage("n1", tenant_id="acme", total_cost=32.0, timestamp=datetime(2025, 5, 1, tzinfo=UTC))
    )
    ledger.record(usage("b1", tenant_id="beta", total_cost=0.5, timestamp=now - timedelta(days=3)))
    ledger.record(
        usage("g1", tenant_id="gone", total_cost=9.0, timestamp=datetime(2025, 2, 1, tzinfo=UTC))
    )
    await ledger.flush()

    totals = await ledger.spend_totals(now)
    assert set(totals) == {"acme", "beta"}
    assert totals["acme"] == pytest.approx((3.0, 15.0))
    assert totals["beta"] == pytest.approx((0.0, 0.5))
    # A time given in another zone is the same moment.
    tokyo = now.astimezone(timezone(timedelta(hours=9)))
    assert await ledger.spend_totals(tokyo) == totals


async def test_spend_totals_on_an_empty_ledger(ledger: UsageLedger) -> None:
    assert await ledger.spend_totals(datetime.now(UTC)) == {}


# Failures never reach the job


async def test_a_database_that_is_down_never_fails_the_job() -> None:
    engine = create_engine("postgresql+asyncpg://postgres@127.0.0.1:1/test")
    store = UsageLedger(engine, batch_interval=0.01, retry_delays=(0.01, 0.01))
    failed, dropped = writes("failed"), writes("dropped")

    await store.start()  # logs, does not raise
    store.record(usage("down-1"))
    store.record(usage("down-2"))
    await store.flush()

    assert writes("failed") >= failed + 3  # the first try and two retries
    assert writes("dropped") == dropped + 2
    with pytest.raises(StoreUnavailable, match="usage ledger"):
        await store.report()
    with pytest.raises(StoreUnavailable):
        await store.spend_totals(datetime.now(UTC))
    await store.close()


async def test_a_full_queue_drops_the_oldest_records(tmp_path: Path) -> None:
    engine = create_engine(database_url(None, tmp_path))
    store = UsageLedger(engine, max_queue=3)
    dropped, written = writes("dropped"), writes("written")
    for n in range(5):
        store.record(usage(f"q{n}", timestamp=DAY1 + timedelta(minutes=n)))  # before the writer
    await store.start()
    await store.flush()

    async with engine.connect() as connection:
        ids = (await connection.execute(select(ai_usage_logs.c.job_id))).scalars().all()
    await store.close()
    assert sorted(ids) == ["q2", "q3", "q4"]
    assert writes("dropped") == dropped + 2
    assert writes("written") == written + 3


async def test_over_long_values_are_cut_to_their_column(ledger: UsageLedger) -> None:
    ledger.record(usage("long", lane="x" * 50, currency="DOLLARS-US", model="m" * 300))
    await ledger.flush()
    [row] = await ledger.report(group_by=["model"])
    assert row.model == "m" * 200
    assert row.currency == "DOLLARS-"
