"""``chatprocessor chat`` and ``chatprocessor cancel``: the stream door (seed 003) by hand."""

from __future__ import annotations

import asyncio
import sys
import uuid
from typing import Annotated, Any

import typer

from chatprocessor.core.errors import ChatProcessorError


def chat(  # noqa: PLR0917 - typer maps each parameter to an option
    message: Annotated[str, typer.Argument(help="The message to send.")],
    session: Annotated[str, typer.Option(help="Conversation (session) id.")] = "cli",
    user: Annotated[str, typer.Option(help="The user sending it.")] = "cli-user",
    mode: Annotated[str, typer.Option(help="gen, or rag to answer from ingested documents.")] = (
        "gen"
    ),
    tenant: Annotated[str | None, typer.Option(help="Tenant (default: TENANT_ID).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.")] = 120.0,
) -> None:
    """Send a chat.request and print its events as they arrive (needs REDIS_URL)."""
    from chatprocessor.cli import _fail, _run, _settings
    from chatprocessor.stream_client import ask
    from chatprocessor.transports import build_transport

    settings = _settings()
    if not settings.redis_url or settings.events_sink != "redis":
        _fail(
            "`chat` reads the answer from the Redis Stream: set REDIS_URL and EVENTS_SINK=redis", 2
        )
    if mode not in ("gen", "rag"):
        _fail(f"--mode must be gen or rag, not {mode!r}", 2)
    job_id = uuid.uuid4().hex
    sys.stderr.write(f"job {job_id} (cancel: chatprocessor cancel {job_id} --user {user})\n")

    def show(event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "token":
            sys.stdout.write(str(event.get("delta", "")))
            sys.stdout.flush()
        elif kind == "final":
            sys.stdout.write("\n")
            for number, source in enumerate(event.get("sources") or (), start=1):
                sys.stdout.write(f"[{number}] {source.get('source')}\n")
            if event.get("status") != "completed":
                sys.stderr.write(f"({event.get('status')}: the answer above is partial)\n")
        elif kind == "error":
            sys.stderr.write(f"error: {event.get('error')}\n")

    async def main() -> list[dict[str, Any]]:
        assert settings.redis_url is not None
        transport = build_transport(settings)
        try:
            await asyncio.wait_for(transport.connect(attempts=1), min(timeout, 15))
            return await ask(
                transport,
                settings.redis_url,
                topic=settings.chat_request_topic,
                events_stream=settings.events_stream,
                message=message,
                user_id=user,
                session_id=session,
                mode=mode,
                tenant_id=tenant,
                job_id=job_id,
                timeout=timeout,
                on_event=show,
            )
        finally:
            await transport.close()

    try:
        events = _run(main())
    except TimeoutError:
        _fail(f"no answer within {timeout:.0f}s: is a worker running with CONTRACT=stream?", 1)
    except ChatProcessorError as exc:
        _fail(exc, 1)
    if events and events[-1].get("status") not in ("completed", "cancelled"):
        raise typer.Exit(1)


def cancel(
    job_id: Annotated[str, typer.Argument(help="The job to stop.")],
    user: Annotated[str, typer.Option(help="The job's owner (others are refused).")],
) -> None:
    """Ask the workers to stop generating a job (Redis CANCEL_STREAM, else RabbitMQ)."""
    from chatprocessor.cli import _fail, _run, _settings

    settings = _settings()

    async def main() -> None:
        if settings.redis_url:
            from chatprocessor.events.cancel import send_cancel_redis

            await send_cancel_redis(settings.redis_url, job_id, user, stream=settings.cancel_stream)
        else:
            from chatprocessor.events.cancel import send_cancel_rabbitmq

            await send_cancel_rabbitmq(
                settings.rabbitmq_url, job_id, user, exchange=settings.cancel_exchange
            )

    try:
        _run(main())
    except (ChatProcessorError, OSError) as exc:
        _fail(exc, 1)
    typer.echo(f"cancel requested for job {job_id}")
