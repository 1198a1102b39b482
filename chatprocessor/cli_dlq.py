"""``chatprocessor dlq list|replay|purge``: inspect and replay dead letters of the input queue."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar, cast

import typer
from rich.console import Console
from rich.table import Table

from chatprocessor.core.errors import ChatProcessorError
from chatprocessor.transports.base import DeadLetter, DeadLetterAdmin, dead_letter_name

T = TypeVar("T")
app = typer.Typer(help="Inspect, replay and purge dead letters (<input queue>.dlq).")

QueueOption = Annotated[
    str | None,
    typer.Option("--queue", help="Input queue whose dead letters to use [RABBITMQ_QUEUE_INPUT]."),
]


def _with_admin(queue: str | None, action: Callable[[DeadLetterAdmin, str], Awaitable[T]]) -> T:
    from chatprocessor.cli import _fail, _run, _settings
    from chatprocessor.transports import build_transport

    settings = _settings()
    name = queue or settings.input_queue

    async def main() -> T:
        transport = build_transport(settings)
        try:
            await asyncio.wait_for(transport.connect(attempts=1), 15)
            return await action(cast(DeadLetterAdmin, transport), name)
        finally:
            await transport.close()

    try:
        return _run(main())
    except TimeoutError:
        _fail(f"cannot reach the {settings.transport} transport", 1)
    except ChatProcessorError as exc:
        _fail(exc, 1)


def _as_json(letter: DeadLetter) -> dict[str, Any]:
    return {
        "id": letter.id,
        "message_id": letter.message_id,
        "reason": letter.reason,
        "error": letter.error,
        "attempts": letter.attempts,
        "failed_at": letter.failed_at,
        "body": letter.body.decode("utf-8", "replace"),
        "headers": {
            k: v if isinstance(v, str | int | float | bool) else str(v)
            for k, v in letter.headers.items()
        },
    }


@app.command("list")
def list_(
    queue: QueueOption = None,
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many.")] = 50,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
) -> None:
    """Show dead letters, oldest first, with why they failed. They stay in place."""
    import orjson

    used: list[str] = []

    async def fetch(admin: DeadLetterAdmin, name: str) -> list[DeadLetter]:
        used.append(name)
        return await admin.list_dead_letters(name, limit)

    letters = _with_admin(queue, fetch)
    if json_output:
        for letter in letters:
            typer.echo(orjson.dumps(_as_json(letter)).decode())
        return
    out = Console()
    title = f"{dead_letter_name(used[0])}: {len(letters)} shown"
    columns = ("id", "message_id", "reason", "attempts", "failed_at", "error", "body")
    table = Table(*columns, title=title)
    for letter in letters:
        body = letter.body.decode("utf-8", "replace")
        table.add_row(
            letter.id,
            letter.message_id or "",
            letter.reason,
            str(letter.attempts),
            letter.failed_at,
            letter.error[:80],
            body[:60] + ("…" if len(body) > 60 else ""),
        )
    out.print(table)


@app.command()
def replay(
    queue: QueueOption = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Replay at most this many.")] = None,
    message_id: Annotated[
        str | None, typer.Option(help="Replay only the dead letter with this message id.")
    ] = None,
) -> None:
    """Put dead letters back on their queue with a fresh retry budget (after fixing the cause)."""
    count = _with_admin(
        queue,
        lambda admin, name: admin.replay_dead_letters(name, limit=limit, message_id=message_id),
    )
    typer.echo(f"replayed {count} dead letter(s)")


@app.command()
def purge(
    queue: QueueOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete every dead letter of the queue for good."""
    if not yes:
        typer.confirm("Delete every dead letter for good?", abort=True)
    count = _with_admin(queue, lambda admin, name: admin.purge_dead_letters(name))
    typer.echo(f"purged {count} dead letter(s)")
