"""``chatprocessor usage``: requests, tokens and cost per tenant, model and day, from the
usage ledger (ai_usage_logs in DATABASE_URL, else DATA_DIR/chatprocessor.db)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from datetime import date, datetime
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncEngine

from chatprocessor.stores.usage_ledger import GROUPS, UsageRow

#: Column titles of the groups, in the order the report sorts by.
TITLES = {"day": "Day", "tenant": "Tenant", "model": "Model"}


def usage(
    since: Annotated[str | None, typer.Option(help="YYYY-MM-DD (UTC), inclusive.")] = None,
    until: Annotated[str | None, typer.Option(help="YYYY-MM-DD (UTC), inclusive.")] = None,
    tenant: Annotated[str | None, typer.Option(help="Only this tenant.")] = None,
    by: Annotated[
        str, typer.Option(help="Group by: any of tenant, model, day (comma-separated).")
    ] = "tenant,model,day",
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
) -> None:
    """Show requests, cache hits, tokens and cost from the usage ledger."""
    from chatprocessor.cli_db import _with_engine
    from chatprocessor.stores.database import migrate
    from chatprocessor.stores.usage_ledger import UsageLedger

    first, last = _day(since, "--since"), _day(until, "--until")
    if first and last and first > last:
        raise typer.BadParameter(f"--since {first} is after --until {last}", param_hint="--since")
    groups = _groups(by)

    async def action(engine: AsyncEngine) -> list[UsageRow]:
        await migrate(engine)
        ledger = UsageLedger(engine)
        return await ledger.report(since=first, until=last, tenant=tenant, group_by=groups)

    rows = _with_engine(action)
    if as_json:
        typer.echo(json.dumps([_json(row) for row in rows], indent=2))
    else:
        Console().print(_table(rows, groups))


def _day(value: str | None, option: str) -> date | None:
    if value is None:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%d").date()
    except ValueError:
        raise typer.BadParameter(
            f"expected a date as YYYY-MM-DD (UTC), not {value!r}", param_hint=option
        ) from None


def _groups(value: str) -> list[str]:
    names = [name.strip().lower() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in GROUPS]
    if unknown:
        raise typer.BadParameter(
            f"cannot group by {', '.join(map(repr, unknown))}; use any of {', '.join(GROUPS)}",
            param_hint="--by",
        )
    return [name for name in GROUPS if name in names]


def _json(row: UsageRow) -> dict[str, object]:
    data = asdict(row)
    data["day"] = row.day.isoformat() if row.day else None
    return data


def _table(rows: Sequence[UsageRow], groups: Sequence[str]) -> Table:
    currencies = sorted({row.currency for row in rows})
    one_currency = len(currencies) == 1
    cost_title = f"Cost ({currencies[0]})" if one_currency and currencies[0] else "Cost"
    shown = [name for name in ("tenant", "model", "day") if name in groups]
    table = Table(title=f"Usage: {len(rows)} row(s)")
    for name in shown:
        table.add_column(TITLES[name])
    for title in ("Requests", "Cache hits", "Input tokens", "Output tokens", cost_title):
        table.add_column(title, justify="right")

    def cells(row: UsageRow) -> list[str]:
        values = {"tenant": row.tenant_id, "model": row.model, "day": _text(row.day)}
        return [values[name] for name in shown]

    for row in rows:
        table.add_row(*cells(row), *_numbers(row, show_currency=not one_currency))
    if not rows:
        table.caption = "no usage recorded in this period"
    elif shown:  # with no group the rows are the totals already
        table.add_section()
        for currency in currencies:  # a total per currency: amounts in two cannot be added
            mine = [row for row in rows if row.currency == currency]
            total = UsageRow(
                tenant_id="",
                model="",
                day=None,
                requests=sum(row.requests for row in mine),
                cache_hits=sum(row.cache_hits for row in mine),
                input_tokens=sum(row.input_tokens for row in mine),
                output_tokens=sum(row.output_tokens for row in mine),
                cost=sum(row.cost for row in mine),
                currency=currency,
            )
            label = ["Total", *[""] * (len(shown) - 1)]
            numbers = _numbers(total, show_currency=not one_currency)
            table.add_row(*label, *numbers, style="bold")
    return table


def _numbers(row: UsageRow, *, show_currency: bool) -> list[str]:
    cost = f"{row.cost:,.6f}" + (f" {row.currency}" if show_currency and row.currency else "")
    return [
        f"{row.requests:,}",
        f"{row.cache_hits:,}",
        f"{row.input_tokens:,}",
        f"{row.output_tokens:,}",
        cost,
    ]


def _text(day: date | None) -> str:
    return day.isoformat() if day else ""
