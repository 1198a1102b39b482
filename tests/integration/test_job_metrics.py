"""Job metrics in the database: migrations, upserts, batching, outages, and ``chatprocessor db``.

Each test runs on SQLite (a file in tmp_path) and on the real Postgres (a schema of its
own, dropped afterwards; alembic's version table goes there too).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from prometheus_client import REGISTRY
from sqlalchemy import event, func, inspect, select, text
from sqlalchemy.ext.asyncio import AsyncEngine
from typer.testing import CliRunner

from chatprocessor.core.errors import ConfigError, StoreUnavailable
from chatprocessor.stores.database import (
    create_engine,
    current_revision,
    database_url,
    head_revision,
    migrate,
)
from chatprocessor.stores.job_metrics import (
    JobMetrics,
    JobRecord,
    MessageRecord,
    llm_jobs,
    metadata,
)
from tests.conftest import POSTGRES_URL

pytestmark = pytest.mark.timeout(60)

EngineFactory = Callable[[], AsyncEngine]


@pytest.fixture
async def metrics(make_engine: EngineFactory) -> AsyncIterator[JobMetrics]:
    store = JobMetrics(make_engine(), batch_interval=0.01)
    await store.start()
    yield store
    await store.close()


def writes(outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "chatprocessor_job_metrics_writes_total", {"outcome": outcome}
    )
    return value or 0.0


def job(job_id: str, **fields: Any) -> JobRecord:
    return JobRecord(job_id=job_id, tenant_id="acme", user_id="u1", session_id="s1", **fields)


CONVERSATION = [
    MessageRecord("system", "be brief"),
    MessageRecord("user", "hello", tokens=3),
    MessageRecord("assistant", "hi there", tokens=4),
]


# Migrations


async def test_migrate_is_idempotent_and_safe_when_workers_start_together(
    make_engine: Any,
) -> None:
    first, second = make_engine(), make_engine()
    assert await current_revision(first) is None

    await asyncio.gather(migrate(first), migrate(second), migrate(make_engine()))
    await migrate(first)

    assert await current_revision(second) == head_revision() == "0002"
    async with first.connect() as connection:
        tables = await connection.run_sync(lambda sync: set(inspect(sync).get_table_names()))
        versions = await connection.scalar(text("SELECT count(*) FROM alembic_version"))
        if make_engine.backend == "postgres":  # everything in the test's schema
            in_schema = await connection.scalar(
                text("SELECT count(*) FROM information_schema.tables WHERE table_schema = :schema"),
                {"schema": make_engine.schema},
            )
            assert in_schema == 4
    assert {"llm_jobs", "llm_messages", "alembic_version"} <= tables
    assert versions == 1


async def test_databases_migrated_at_once_by_one_process_all_end_up_current(
    tmp_path: Path,
) -> None:
    # alembic keeps its context in module globals: interleaved upgrades would clash.
    urls = [database_url(f"sqlite:///{tmp_path / f'{n}.db'}", tmp_path) for n in range(3)]
    engines = [create_engine(url) for url in urls]
    try:
        await asyncio.gather(*(migrate(engine) for engine in engines))
        assert [await current_revision(engine) for engine in engines] == [head_revision()] * 3
    finally:
        for engine in engines:
            await engine.dispose()


async def test_migrations_match_the_tables_the_code_queries(make_engine: EngineFactory) -> None:
    engine = make_engine()
    await migrate(engine)

    def diff(sync: Any) -> list[Any]:
        return list(compare_metadata(MigrationContext.configure(sync), metadata))

    async with engine.connect() as connection:
        assert await connection.run_sync(diff) == []


# Recording jobs


async def test_a_job_is_recorded_when_it_starts_and_completed_when_it_ends(
    metrics: JobMetrics,
) -> None:
    before = datetime.now(UTC)
    metrics.started(job("j1", mode="rag", model="llama3", provider="ollama"))
    await metrics.flush()

    running = await metrics.get("j1")
    assert running is not None
    assert running["status"] == "running"
    assert running["finished_at"] is None
    assert running["created_at"] >= before

    metrics.finished(
        job(
            "j1",
            mode="rag",
            model="llama3",
            provider="ollama",
            status="completed",
            prompt_tokens=12,
            completion_tokens=34,
            latency_ms=560,
            time_to_first_token_ms=78,
        ),
        CONVERSATION,
    )
    await metrics.flush()

    row = await metrics.get("j1")
    assert row is not None
    assert {k: row[k] for k in ("tenant_id", "user_id", "session_id", "mode")} == {
        "tenant_id": "acme",
        "user_id": "u1",
        "session_id": "s1",
        "mode": "rag",
    }
    assert (row["model"], row["provider"], row["status"], row["error"]) == (
        "llama3",
        "ollama",
        "completed",
        None,
    )
    assert (row["prompt_tokens"], row["completion_tokens"]) == (12, 34)
    assert (row["latency_ms"], row["time_to_first_token_ms"], row["attempts"]) == (560, 78, 1)
    assert row["created_at"] == running["created_at"]
    assert row["finished_at"] is not None
    assert row["updated_at"] == row["finished_at"] >= row["created_at"]
    messages = await metrics.messages("j1")
    assert [(m["seq"], m["role"], m["content"], m["tokens"]) for m in messages] == [
        (0, "system", "be brief", None),
        (1, "user", "hello", 3),
        (2, "assistant", "hi there", 4),
    ]
    assert {(m["tenant_id"], m["user_id"], m["session_id"]) for m in messages} == {
        ("acme", "u1", "s1")
    }
    assert await metrics.get("unknown") is None


async def test_finished_queued_right_after_started_ends_final(metrics: JobMetrics) -> None:
    metrics.started(job("j2"))
    metrics.finished(job("j2", status="failed", error="provider down"), CONVERSATION[:2])
    await metrics.flush()

    row = await metrics.get("j2")
    assert row is not None
    assert (row["status"], row["error"]) == ("failed", "provider down")


async def test_a_redelivered_job_does_not_duplicate_its_messages(metrics: JobMetrics) -> None:
    metrics.started(job("j3"))
    metrics.finished(job("j3", status="completed", completion_tokens=4), CONVERSATION)
    await metrics.flush()
    metrics.finished(job("j3", status="completed", completion_tokens=5), CONVERSATION)
    await metrics.flush()

    assert len(await metrics.messages("j3")) == 3
    row = await metrics.get("j3")
    assert row is not None
    assert row["completion_tokens"] == 5


async def test_a_late_start_does_not_undo_a_final_status(metrics: JobMetrics) -> None:
    metrics.started(job("j4"))
    metrics.finished(job("j4", status="cancelled", completion_tokens=2), CONVERSATION[:2])
    metrics.started(job("j4"))  # the same attempt redelivered after it ended
    await metrics.flush()

    row = await metrics.get("j4")
    assert row is not None
    assert (row["status"], row["completion_tokens"], row["attempts"]) == ("cancelled", 2, 1)
    assert row["finished_at"] is not None


async def test_a_real_new_attempt_runs_again(metrics: JobMetrics) -> None:
    metrics.started(job("j5"))
    metrics.finished(job("j5", status="timeout", error="deadline"), CONVERSATION[:2])
    metrics.started(job("j5", attempts=2))
    await metrics.flush()

    row = await metrics.get("j5")
    assert row is not None
    assert (row["status"], row["error"], row["finished_at"], row["attempts"]) == (
        "running",
        None,
        None,
        2,
    )
    metrics.finished(job("j5", status="timeout", attempts=1), [])  # stale: from attempt 1
    await metrics.flush()
    row = await metrics.get("j5")
    assert row is not None
    assert (row["status"], row["attempts"]) == ("running", 2)


async def test_records_are_written_in_a_few_transactions(make_engine: EngineFactory) -> None:
    engine = make_engine()
    store = JobMetrics(engine, batch_interval=0.05)
    await store.start()
    commits = 0

    @event.listens_for(engine.sync_engine, "commit")
    def count(_connection: Any) -> None:
        nonlocal commits
        commits += 1

    try:
        for n in range(200):
            store.started(job(f"b{n}"))
            store.finished(job(f"b{n}", status="completed"), CONVERSATION)
        await store.flush()
        async with engine.connect() as connection:
            rows = await connection.scalar(select(func.count()).select_from(llm_jobs))
            done = await connection.scalar(
                select(func.count()).select_from(llm_jobs).where(llm_jobs.c.status == "completed")
            )
    finally:
        await store.close()
    assert rows == done == 200
    assert 1 <= commits <= 2


@pytest.mark.postgres
async def test_a_record_the_database_refuses_does_not_sink_its_batch(tmp_path: Path) -> None:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    import asyncpg

    admin = await asyncpg.connect(POSTGRES_URL)
    await admin.execute(f"CREATE SCHEMA {schema}")
    engine = create_engine(
        database_url(POSTGRES_URL, tmp_path),
        connect_args={"server_settings": {"search_path": schema}},
    )
    store = JobMetrics(engine, batch_interval=0.01, retry_delays=(0.01,))
    try:
        await store.start()
        dropped = writes("dropped")
        store.started(job("good-1"))
        store.finished(job("bad", status="failed", error="nul \x00 byte"), [])
        store.started(job("good-2"))
        await store.flush()
        assert await store.get("good-1") is not None
        assert await store.get("good-2") is not None
        assert await store.get("bad") is None
        assert writes("dropped") == dropped + 1
    finally:
        await store.close()
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()


# Failures never reach the job


async def test_a_database_that_is_down_never_fails_the_job(tmp_path: Path) -> None:
    engine = create_engine("postgresql+asyncpg://postgres@127.0.0.1:1/test")
    store = JobMetrics(engine, batch_interval=0.01, retry_delays=(0.01, 0.01))
    failed, dropped = writes("failed"), writes("dropped")

    await store.start()  # logs, does not raise
    store.started(job("down-1"))
    store.finished(job("down-1", status="completed"), CONVERSATION)
    await store.flush()

    assert writes("failed") >= failed + 3  # first try and two retries
    assert writes("dropped") == dropped + 2
    with pytest.raises(StoreUnavailable):
        await store.get("down-1")
    await store.close()


async def test_a_full_queue_drops_the_oldest_records(tmp_path: Path) -> None:
    engine = create_engine(database_url(None, tmp_path))
    store = JobMetrics(engine, max_queue=3)
    dropped = writes("dropped")
    for n in range(5):
        store.started(job(f"q{n}"))  # queued before the writer runs
    await store.start()
    await store.flush()

    present = [n for n in range(5) if await store.get(f"q{n}") is not None]
    await store.close()
    assert present == [2, 3, 4]
    assert writes("dropped") == dropped + 2


def test_records_with_unknown_values_are_refused_at_once(tmp_path: Path) -> None:
    store = JobMetrics(create_engine(database_url(None, tmp_path)))
    with pytest.raises(ValueError, match="status"):
        store.started(job("x", status="done"))
    with pytest.raises(ValueError, match="final status"):
        store.finished(job("x", status="running"), [])
    with pytest.raises(ValueError, match="role"):
        store.finished(job("x", status="completed"), [MessageRecord("tool", "...")])


# Configuration


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("postgresql://u:p@db:5432/app", "postgresql+asyncpg://u:p@db:5432/app"),
        ("postgres://u@db/app", "postgresql+asyncpg://u@db/app"),
        ("postgresql+asyncpg://u@db/app", "postgresql+asyncpg://u@db/app"),
        ("sqlite:///var/lib/x.db", "sqlite+aiosqlite:///var/lib/x.db"),
        ("sqlite+aiosqlite:///x.db", "sqlite+aiosqlite:///x.db"),
    ],
)
def test_database_url_picks_the_async_driver(raw: str, expected: str) -> None:
    assert database_url(raw, Path("/data")) == expected


def test_database_url_defaults_to_sqlite_in_data_dir() -> None:
    assert database_url(None, Path("/data")) == "sqlite+aiosqlite:////data/chatprocessor.db"
    assert database_url("", Path("/data")) == "sqlite+aiosqlite:////data/chatprocessor.db"


@pytest.mark.parametrize("raw", ["mysql://u@db/app", "postgresql+psycopg://u@db/app", "db"])
def test_database_url_refuses_other_databases(raw: str) -> None:
    with pytest.raises(ConfigError, match="DATABASE_URL"):
        database_url(raw, Path("/data"))


# chatprocessor db


def test_cli_upgrades_and_lists_jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from chatprocessor.cli import app

    db = tmp_path / "cli" / "metrics.db"
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{db}")
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("COLUMNS", "250")
    runner = CliRunner()

    result = runner.invoke(app, ["db", "current"])
    assert result.exit_code == 0, result.output
    assert "none" in result.output
    result = runner.invoke(app, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    assert head_revision() in result.output
    result = runner.invoke(app, ["db", "current"])
    assert result.output.strip() == f"{head_revision()} (head)"

    async def record() -> None:
        store = JobMetrics(create_engine(database_url(f"sqlite:///{db}", tmp_path)))
        await store.start()
        store.finished(job("cli-job-1", status="completed", model="gemma"), CONVERSATION)
        other = JobRecord("cli-job-2", "acme", "u2", "s2", status="failed", error="boom")
        store.finished(other, [])
        await store.close()

    asyncio.run(record())
    result = runner.invoke(app, ["db", "jobs", "--session", "s1"])
    assert result.exit_code == 0, result.output
    assert "cli-job-1" in result.output
    assert "gemma" in result.output
    assert "cli-job-2" not in result.output
    result = runner.invoke(app, ["db", "jobs", "--limit", "5"])
    assert "cli-job-1" in result.output
    assert "cli-job-2" in result.output
    assert "boom" in result.output


def test_cli_reports_an_unreachable_database(monkeypatch: pytest.MonkeyPatch) -> None:
    from chatprocessor.cli import app

    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres@127.0.0.1:1/test")
    result = CliRunner().invoke(app, ["db", "upgrade"])
    assert result.exit_code == 1
    assert "cannot migrate" in result.output
