"""``chatprocessor db upgrade|current|jobs``: the job metrics database (DATABASE_URL)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncEngine

from chatprocessor.core.errors import ChatProcessorError, ConfigError

T = TypeVar("T")
app = typer.Typer(
    help="Job metrics database (DATABASE_URL, else DATA_DIR/chatprocessor.db).",
    no_args_is_help=True,
)


def _with_engine(action: Callable[[AsyncEngine], Awaitable[T]]) -> T:
    from chatprocessor.cli import _fail, _run, _settings
    from chatprocessor.stores.database import create_engine

    settings = _settings()
    try:
        url = settings.database
    except ConfigError as exc:
        _fail(exc, 2)

    async def main() -> T:
        engine = create_engine(url)
        try:
            return await action(engine)
        finally:
            await engine.dispose()

    try:
        return _run(main())
    except ChatProcessorError as exc:
        _fail(exc, 1)


@app.command()
def upgrade() -> None:
    """Apply the database migrations (workers also do it when they start)."""
    from chatprocessor.stores.database import current_revision, migrate

    async def action(engine: AsyncEngine) -> str | None:
        await migrate(engine)
        return await current_revision(engine)

    typer.echo(f"database at revision {_with_engine(action)}")


@app.command()
def current() -> None:
    """Print the revision the database is at, and whether it is the newest."""
    from chatprocessor.stores.database import current_revision, head_revision

    revision = _with_engine(current_revision)
    head = head_revision()
    if revision is None:
        typer.echo(f"none (not migrated; run `chatprocessor db upgrade`, head is {head})")
    elif revision == head:
        typer.echo(f"{revision} (head)")
    else:
        typer.echo(f"{revision} (head is {head}: run `chatprocessor db upgrade`)")


@app.command()
def jobs(
    session: Annotated[str | None, typer.Option(help="Only the jobs of this session.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many.")] = 20,
) -> None:
    """Show the newest jobs: status, model, tokens, latency, error."""
    from chatprocessor.stores.job_metrics import recent_jobs

    rows = _with_engine(lambda engine: recent_jobs(engine, session_id=session, limit=limit))
    columns = (
        "job_id",
        "session",
        "mode",
        "status",
        "model",
        "tokens in/out",
        "latency ms",
        "first token ms",
        "attempts",
        "created",
        "error",
    )
    table = Table(*columns, title=f"llm_jobs: {len(rows)} shown, newest first")
    for row in rows:
        table.add_row(
            row["job_id"],
            row["session_id"],
            row["mode"],
            row["status"],
            row["model"] or "",
            f"{_text(row['prompt_tokens'])}/{_text(row['completion_tokens'])}",
            _text(row["latency_ms"]),
            _text(row["time_to_first_token_ms"]),
            str(row["attempts"]),
            _text(row["created_at"]),
            (row["error"] or "")[:60],
        )
    Console().print(table)


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.isoformat(sep=" ", timespec="seconds")
    return str(value)
