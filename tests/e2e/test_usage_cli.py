"""``chatprocessor usage`` as a user runs it, on the ledger a worker wrote: SQLite in
DATA_DIR by default, Postgres through DATABASE_URL."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from chatprocessor.cli_usage import usage
from chatprocessor.stores.database import create_engine, database_url
from chatprocessor.stores.usage_ledger import UsageLedger, UsageRecord
from tests.conftest import POSTGRES_URL

pytestmark = pytest.mark.timeout(60)

MARCH_1 = datetime(2025, 3, 1, 10, 0, tzinfo=UTC)
MARCH_2 = datetime(2025, 3, 2, 18, 0, tzinfo=UTC)


def record(
    job_id: str, tenant: str, model: str, cost: float, at: datetime, **extra: Any
) -> UsageRecord:
    fields: dict[str, Any] = {
        "provider": "openai",
        "job_type": "chat_response",
        "lane": "standard",
        "input_tokens": 1000,
        "output_tokens": 200,
        "currency": "USD",
        "cache_hit": False,
        "status": "completed",
        "latency_ms": 300,
    }
    fields.update(extra)
    return UsageRecord(job_id, tenant, model=model, total_cost=cost, timestamp=at, **fields)


ROWS = [
    record("j1", "acme", "gpt-4", 0.042, MARCH_1),
    record("j2", "acme", "gpt-4", 0.0, MARCH_1, cache_hit=True),
    record("j3", "acme", "gpt-4o-mini", 0.00027, MARCH_2),
    record("j4", "beta", "gpt-4", 0.042, MARCH_2),
]


def write(url: str, records: list[UsageRecord]) -> None:
    async def main() -> None:
        ledger = UsageLedger(create_engine(url), batch_interval=0)
        await ledger.start()
        for item in records:
            ledger.record(item)
        await ledger.close()

    asyncio.run(main())


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Runs ``usage`` the way cli.py registers it, with DATA_DIR in tmp_path."""
    app = typer.Typer()
    app.command()(usage)
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "250")
    runner = CliRunner()

    def invoke(*args: str) -> Any:
        return runner.invoke(app, list(args))

    yield invoke


def test_the_default_report_shows_each_tenant_model_and_day_with_a_total(
    cli: Any, tmp_path: Path
) -> None:
    write(database_url(None, tmp_path), ROWS)  # DATA_DIR/chatprocessor.db, as the worker does

    result = cli()
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(line for line in lines if "Tenant" in line)
    for title in ("Model", "Day", "Requests", "Cache hits", "Input tokens", "Output tokens"):
        assert title in header
    assert "Cost (USD)" in header

    rows = [cells(line) for line in lines if line.startswith("│")]
    assert rows == [
        ["acme", "gpt-4", "2025-03-01", "2", "1", "2,000", "400", "0.042000"],
        ["acme", "gpt-4o-mini", "2025-03-02", "1", "0", "1,000", "200", "0.000270"],
        ["beta", "gpt-4", "2025-03-02", "1", "0", "1,000", "200", "0.042000"],
        ["Total", "", "", "4", "1", "4,000", "800", "0.084270"],
    ]


def cells(line: str) -> list[str]:
    """The cells of one row of a rich table."""
    return [cell.strip() for cell in line.strip("│").split("│")]


def test_json_with_filters(cli: Any, tmp_path: Path) -> None:
    write(database_url(None, tmp_path), ROWS)

    result = cli("--json", "--since", "2025-03-02", "--until", "2025-03-02", "--by", "tenant")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == [
        {
            "tenant_id": "acme",
            "model": "",
            "day": None,
            "requests": 1,
            "cache_hits": 0,
            "input_tokens": 1000,
            "output_tokens": 200,
            "cost": pytest.approx(0.00027),
            "currency": "USD",
        },
        {
            "tenant_id": "beta",
            "model": "",
            "day": None,
            "requests": 1,
            "cache_hits": 0,
            "input_tokens": 1000,
            "output_tokens": 200,
            "cost": pytest.approx(0.042),
            "currency": "USD",
        },
    ]

    result = cli("--json", "--tenant", "acme", "--by", "day, model")
    assert result.exit_code == 0, result.output
    assert [(r["day"], r["model"], r["requests"]) for r in json.loads(result.output)] == [
        ("2025-03-01", "gpt-4", 2),
        ("2025-03-02", "gpt-4o-mini", 1),
    ]


def test_grouping_by_tenant_only_shows_no_model_or_day_column(cli: Any, tmp_path: Path) -> None:
    write(database_url(None, tmp_path), ROWS)
    result = cli("--by", "tenant", "--until", "2025-03-01")
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if "Tenant" in line)
    assert "Model" not in header
    assert "Day" not in header
    assert "beta" not in result.output  # beta's only job is on March 2
    assert "0.042000" in result.output


def test_amounts_in_two_currencies_get_a_total_each(cli: Any, tmp_path: Path) -> None:
    write(
        database_url(None, tmp_path),
        [
            record("e1", "acme", "gpt-4", 1.5, MARCH_1, currency="EUR"),
            record("u1", "acme", "gpt-4", 2.0, MARCH_1),
        ],
    )
    result = cli("--by", "tenant")
    assert result.exit_code == 0, result.output
    totals = [line for line in result.output.splitlines() if "Total" in line]
    assert len(totals) == 2
    assert any("1.500000 EUR" in line for line in totals)
    assert any("2.000000 USD" in line for line in totals)


def test_an_empty_ledger_says_so(cli: Any) -> None:
    result = cli()
    assert result.exit_code == 0, result.output
    assert "no usage recorded" in result.output
    result = cli("--json")
    assert json.loads(result.output) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "2025-13-01"], "YYYY-MM-DD"),
        (["--until", "yesterday"], "YYYY-MM-DD"),
        (["--since", "2025-03-02", "--until", "2025-03-01"], "after --until"),
        (["--by", "tenant,week"], "cannot group by 'week'"),
    ],
)
def test_bad_options_are_explained(cli: Any, args: list[str], message: str) -> None:
    result = cli(*args)
    assert result.exit_code == 2
    assert message in result.output


def test_an_unreachable_database_is_reported(cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres@127.0.0.1:1/test")
    result = cli()
    assert result.exit_code == 1
    assert "cannot" in result.output


@pytest.mark.postgres
def test_the_report_reads_postgres_from_database_url(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncpg

    name = f"usage_{uuid.uuid4().hex[:12]}"

    async def admin(statement: str) -> None:
        connection = await asyncpg.connect(POSTGRES_URL)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    asyncio.run(admin(f"CREATE DATABASE {name}"))
    try:
        raw = POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
        write(database_url(raw, tmp_path), ROWS)
        monkeypatch.setenv("DATABASE_URL", raw)
        result = cli("--json", "--by", "model")
        assert result.exit_code == 0, result.output
        assert [(r["model"], r["requests"]) for r in json.loads(result.output)] == [
            ("gpt-4", 3),
            ("gpt-4o-mini", 1),
        ]
        assert not (tmp_path / "chatprocessor.db").exists()
    finally:
        asyncio.run(admin(f"DROP DATABASE {name} WITH (FORCE)"))
