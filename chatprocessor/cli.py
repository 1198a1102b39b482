"""The ``chatprocessor`` command: run, send, check, chat, cancel, ingest, dlq, db, rag."""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import signal
import sys
from collections.abc import Coroutine
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from chatprocessor import __version__
from chatprocessor.core.errors import ChatProcessorError, ConfigError
from chatprocessor.settings import Settings

T = TypeVar("T")
app = typer.Typer(
    help="chatprocessor: answers chat prompts from a message broker with an LLM.",
    no_args_is_help=True,
    add_completion=False,
)
err = Console(stderr=True)


def _fail(message: object, status: int) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``status`` (2: bad configuration)."""
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(status)


def _settings() -> Settings:
    try:
        return Settings.load()
    except ConfigError as exc:
        _fail(exc, 2)


def _mask_userinfo(text: str) -> str:
    """``http://user:secret@host`` -> ``http://***@host``: URLs may carry credentials."""
    return re.sub(r"(?<=://)[^/\s]+@", "***@", text)  # up to the last @: passwords may hold one


def _url_passwords(url: str | None) -> list[str]:
    from urllib.parse import urlsplit

    password = urlsplit(url).password if url else None
    return [password] if password else []


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


@app.command()
def run() -> None:
    """Run the worker until SIGTERM or Ctrl-C (in-flight jobs finish first)."""
    from chatprocessor.app import run_service
    from chatprocessor.ops.logging import setup_logging

    settings = _settings()
    try:  # paths are only truly known to work once used (root passes every access check)
        if settings.uses_data_dir:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _fail(f"invalid configuration: DATA_DIR: {exc}", 2)
    try:
        setup_logging(
            level=settings.log_level,
            log_file=settings.log_file,
            fmt=settings.log_format,
            secrets=[
                settings.rabbitmq_password.get_secret_value(),
                settings.openai_api_key.get_secret_value(),
                settings.oauth2_client_secret.get_secret_value(),
                *_url_passwords(settings.redis_url),
                *_url_passwords(settings.database_url),
            ],
        )
    except OSError as exc:
        _fail(f"invalid configuration: LOG_FILE: {exc}", 2)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_service(settings, stop)

    try:
        _run(main())
    except ConfigError as exc:  # found while building the service (e.g. a content filter)
        _fail(exc, 2)
    except ChatProcessorError as exc:
        _fail(exc, 1)


@app.command()
def send(
    text: Annotated[str, typer.Argument(help="The prompt to send.")],
    conversation_id: Annotated[
        int | None, typer.Option(help="Conversation id (random when not given).")
    ] = None,
    stream: Annotated[bool, typer.Option(help="Print tokens as they are generated.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.")] = 120.0,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the whole BotResponseCreated JSON.")
    ] = False,
) -> None:
    """Send a prompt through the worker's input queue and print the answer."""
    import orjson

    from chatprocessor.client import send_prompt
    from chatprocessor.transports import build_transport

    settings = _settings()
    if settings.uses_stream_contract:
        _fail("with CONTRACT=stream (seed 003's chat.request) use `chatprocessor chat`", 2)
    if settings.uses_models_contract:
        _fail(
            "`send` speaks the chat contract (UserPromptReceived); with the models contract "
            "(TRANSPORT=kafka, CONTRACT=models) produce {user_email, prompt, photo} records "
            "to LOCAL_MODEL_KAFKA_TOPIC and read the response topics",
            2,
        )
    conv = conversation_id if conversation_id is not None else random.randint(1, 10**9)

    printed = False

    def show(delta: str) -> None:
        nonlocal printed
        if not printed:  # models often open with a space or newline
            delta = delta.lstrip()
            printed = bool(delta)
        sys.stdout.write(delta)
        sys.stdout.flush()

    async def main() -> dict[str, Any]:
        transport = build_transport(settings)
        try:
            await asyncio.wait_for(transport.connect(attempts=1), min(timeout, 15))
            return await send_prompt(
                transport,
                settings.rabbitmq_queue_input,
                text,
                conversation_id=conv,
                stream=stream,
                timeout=timeout,
                on_delta=show if stream else None,
            )
        finally:
            await transport.close()

    try:
        reply = _run(main())
    except TimeoutError:
        _fail(
            f"no answer within {timeout:.0f}s: is the worker running "
            f"(chatprocessor run) with TRANSPORT={settings.transport}?",
            1,
        )
    except ChatProcessorError as exc:
        _fail(exc, 1)
    lowered = {k.lower().replace("_", ""): v for k, v in reply.items()}
    if json_output:
        if stream:
            sys.stdout.write("\n")
        sys.stdout.write(orjson.dumps(reply, option=orjson.OPT_INDENT_2).decode() + "\n")
    elif stream:
        sys.stdout.write("\n")
    else:
        sys.stdout.write(f"{lowered.get('message', '')}\n")
    if lowered.get("error"):
        _fail(lowered["error"], 1)


@app.command()
def check() -> None:
    """Show the settings and check broker, provider and model; exit 1 when unhealthy."""
    from chatprocessor.providers import build_providers
    from chatprocessor.providers.base import same_model
    from chatprocessor.transports import build_transport

    settings = _settings()
    out = Console()
    table = Table("setting", "value", title=f"chatprocessor {__version__}")
    for name, value in settings.model_dump().items():
        shown = "***" if "password" in name or "key" in name else _mask_userinfo(str(value))
        table.add_row(name.upper(), shown)
    out.print(table)

    async def main() -> list[tuple[str, bool, str]]:
        results: list[tuple[str, bool, str]] = []
        transport = build_transport(settings)
        try:
            await asyncio.wait_for(transport.connect(attempts=1), 10)
            results.append(("broker", await transport.ping(), settings.transport))
        except (ChatProcessorError, TimeoutError, OSError) as exc:
            results.append(("broker", False, f"{settings.transport}: {str(exc) or 'timed out'}"))
        finally:
            with contextlib.suppress(Exception):
                await transport.close()
        provider = build_providers(settings)
        try:
            reachable = await provider.ping()
            results.append(("provider", reachable, provider.name))
            if reachable:
                models = await provider.list_models()
                present = any(same_model(provider.default_model, m) for m in models)
                results.append(
                    (
                        "model",
                        present,
                        f"{provider.default_model} "
                        f"({'present' if present else 'missing; has: ' + ', '.join(models)})",
                    )
                )
        except ChatProcessorError as exc:
            results.append(("provider", False, str(exc)))
        finally:
            await provider.close()
        return results

    results = _run(main())
    for name, ok, detail in results:
        mark = "[green]ok[/]" if ok else "[red]FAIL[/]"
        out.print(f"{mark:>18} {name}: {detail}", highlight=False)
    if not all(ok for _, ok, _ in results):
        raise typer.Exit(1)


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def _add_subcommands() -> None:
    from chatprocessor.cli_batch import batch
    from chatprocessor.cli_db import app as db_app
    from chatprocessor.cli_dlq import app as dlq_app
    from chatprocessor.cli_rag import ingest, rag_app
    from chatprocessor.cli_stream import cancel, chat
    from chatprocessor.cli_usage import usage

    app.add_typer(dlq_app, name="dlq")
    app.add_typer(db_app, name="db")
    app.add_typer(rag_app, name="rag")
    app.command("ingest")(ingest)
    app.command("chat")(chat)
    app.command("cancel")(cancel)
    app.command("usage")(usage)
    app.command("batch")(batch)


_add_subcommands()


def main() -> None:
    app()
