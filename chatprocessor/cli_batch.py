"""``chatprocessor batch FILE.csv --mapping ...``: a CSV import through the batch lane.

Registered in cli.py as ``app.command("batch")(batch)``. The logic is in
:mod:`chatprocessor.batch`; this module reads options and settings, opens the broker (and,
with ``--direct``, a pipeline worker in this process) and prints the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from chatprocessor.batch import DEFAULT_PRIORITY, DEFAULT_TYPE
from chatprocessor.core.errors import BrokerUnavailable, ChatProcessorError, ConfigError

if TYPE_CHECKING:
    from chatprocessor.batch import BatchReport, QueueSubmitter
    from chatprocessor.settings import Settings

#: The batch lane is a queue with private reply queues: these transports have neither.
QUEUE_TRANSPORTS = ("rabbitmq", "local")
#: Seconds a worker started with --direct may take to declare the lane queues.
DIRECT_START_SECONDS = 60.0
#: Failed rows listed under the report table.
SHOWN_FAILURES = 10


def batch(  # noqa: PLR0917 - typer maps each parameter to an option
    file: Annotated[
        Path,
        typer.Argument(
            help="The CSV file (UTF-8, a header row naming its columns).",
            exists=True,
            dir_okay=False,
            readable=True,
        ),
    ],
    mapping: Annotated[
        str,
        typer.Option(
            "--mapping",
            help="AIJob field=CSV column, comma separated: content (required), "
            "conversationId, messageId, id, tenantId, priority. "
            'Example: "content=Message,conversationId=Chat ID".',
        ),
    ],
    job_type: Annotated[
        str,
        typer.Option(
            "--type",
            help="sentiment_analysis, intent_classification, chat_response or batch_processing.",
        ),
    ] = DEFAULT_TYPE,
    tenant: Annotated[
        str | None, typer.Option("--tenant", help="The jobs' tenant [TENANT_ID].")
    ] = None,
    priority: Annotated[
        int, typer.Option("--priority", min=1, max=10, help="Priority of rows without one.")
    ] = DEFAULT_PRIORITY,
    concurrency: Annotated[
        int, typer.Option("--concurrency", min=1, help="Rows in flight at most.")
    ] = 16,
    timeout: Annotated[
        float,
        typer.Option("--timeout", min=0.001, help="Seconds to wait for a row's answer."),
    ] = 600.0,
    results: Annotated[
        Path | None,
        typer.Option(
            "--results",
            dir_okay=False,
            help="Per-row results: JSON Lines, or CSV when it ends in .csv "
            "(default: beside FILE, named FILE's stem + .results.jsonl).",
        ),
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(
            "--report",
            dir_okay=False,
            help="The report JSON (default: beside FILE, named FILE's stem + .report.json).",
        ),
    ] = None,
    direct: Annotated[
        bool,
        typer.Option(
            "--direct", help="Run a pipeline worker in this process (no separate worker needed)."
        ),
    ] = False,
    restart: Annotated[
        bool, typer.Option("--restart", help="Drop earlier results and send every row again.")
    ] = False,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Send again the rows that failed before.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Send each CSV row as an AIJob through the batch lane; save the answers and a report.

    Rows answered by an earlier run of the same command are skipped, so after Ctrl-C the
    same command finishes the rest. Exit status: 0 every row completed, 1 some failed or the
    broker failed, 2 bad usage, 130 interrupted (Ctrl-C, SIGTERM).
    """
    from chatprocessor.batch import default_paths, prepare
    from chatprocessor.cli import _fail, _run, _settings

    settings = _settings()
    if settings.transport not in QUEUE_TRANSPORTS:
        _fail(
            f"batch needs a queue broker for the batch lane: TRANSPORT={settings.transport} "
            f"has none; use TRANSPORT=rabbitmq or TRANSPORT=local",
            2,
        )
    who = tenant if tenant is not None else settings.tenant_id
    default_results, default_report = default_paths(file)
    results_path = results or default_results
    report_path = report or default_report
    try:  # a bad file, mapping or results file fails before connecting to anything
        prepare(
            file,
            mapping=mapping,
            job_type=job_type,
            tenant=who,
            priority=priority,
            results=results_path,
            report=report_path,
            restart=restart,
        )
    except ConfigError as exc:
        _fail(exc, 2)
    show_progress = not quiet and sys.stderr.isatty()
    started = time.time()

    async def main() -> BatchReport:
        from chatprocessor.batch import run_batch

        return await _with_submitter(
            settings,
            direct,
            lambda submitter: run_batch(
                file,
                mapping=mapping,
                job_type=job_type,
                tenant=who,
                priority=priority,
                submitter=submitter,
                concurrency=concurrency,
                timeout=timeout,
                results=results_path,
                report=report_path,
                restart=restart,
                retry_failed=retry_failed,
                progress=show_progress,
                currency=settings.cost_currency,
            ),
        )

    try:
        outcome = _run(main())
    except (KeyboardInterrupt, asyncio.CancelledError):
        _print_stopped(report_path, started, "interrupted")
        raise typer.Exit(130) from None
    except ConfigError as exc:
        _fail(exc, 2)
    except ChatProcessorError as exc:
        _print_stopped(report_path, started, "stopped")
        _fail(exc, 1)
    _print_report(outcome)
    raise typer.Exit(0 if outcome.complete else 1)


async def _with_submitter(
    settings: Settings,
    direct: bool,
    work: Callable[[QueueSubmitter], Coroutine[Any, Any, BatchReport]],
) -> BatchReport:
    """Run ``work(submitter)`` on the batch lane; with ``direct``, a worker runs beside it.

    SIGTERM cancels the run as Ctrl-C does (the results so far are kept).
    """
    from chatprocessor.batch import QueueSubmitter
    from chatprocessor.transports import build_transport

    loop = asyncio.get_running_loop()
    current = asyncio.current_task()
    if current is not None:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, current.cancel)
    stop = asyncio.Event()
    service: asyncio.Task[None] | None = None
    if direct:
        from chatprocessor.app import run_service

        worker_settings = settings.model_copy(update={"contract": "pipeline", "ops_port": 0})
        service = asyncio.create_task(run_service(worker_settings, stop), name="batch-worker")
    transport = build_transport(settings)
    try:
        try:
            await asyncio.wait_for(transport.connect(attempts=1), 15)
        except TimeoutError as exc:
            raise BrokerUnavailable(
                f"cannot reach the broker (TRANSPORT={settings.transport})"
            ) from exc
        submitter = await QueueSubmitter.open(
            transport,
            settings.lane_batch_queue,
            wait_for_queue=DIRECT_START_SECONDS if direct else 0.0,
        )
        try:
            running: asyncio.Task[BatchReport] = asyncio.create_task(work(submitter))
            try:
                watched = {running} if service is None else {running, service}
                await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not running.done():  # interrupted, or the worker stopped under us
                    running.cancel()
                    with contextlib.suppress(asyncio.CancelledError, ChatProcessorError):
                        await running
            if not running.cancelled():
                return running.result()
            assert service is not None and service.done()
            error = service.exception() if not service.cancelled() else None
            if isinstance(error, ChatProcessorError):
                raise error
            raise ChatProcessorError(
                "the worker started by --direct stopped" + (f": {error}" if error else "")
            )
        finally:
            await submitter.close()
    finally:
        stop.set()
        if service is not None and not service.done():
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(service, settings.graceful_timeout + 10)
        await transport.close()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGTERM)


def _print_report(report: BatchReport) -> None:
    out = Console()
    table = Table("", "", show_header=False)
    table.title = f"batch {report.batch_id}: {escape(report.file)}"
    done_before = f" ({report.skipped} done before)" if report.skipped else ""
    for name, value in (
        ("type", report.type),
        ("tenant", escape(report.tenant)),
        ("rows", str(report.rows)),
        ("processed", f"[green]{report.processed}[/]{done_before}"),
        ("failed", f"[red]{report.failed}[/]" if report.failed else "0"),
        ("skipped", str(report.skipped)),
        ("tokens", f"{report.input_tokens} in, {report.output_tokens} out"),
        ("cost", f"{report.cost:.4f} {escape(report.currency)}"),
        ("seconds", f"{report.seconds:.1f} ({report.rows_per_second:.2f} rows/s)"),
    ):
        table.add_row(name, value)
    out.print(table)
    for row, why in report.failures[:SHOWN_FAILURES]:
        out.print(f"[red]row {row} failed:[/] {escape(why)}", highlight=False)
    if len(report.failures) > SHOWN_FAILURES:
        out.print(f"... and {len(report.failures) - SHOWN_FAILURES} more failed rows")
    out.print(f"results: {escape(report.results)}", highlight=False)
    if report.failed:
        out.print("send the failed rows again with --retry-failed", highlight=False)


def _print_stopped(report_path: Path, started: float, how: str) -> None:
    """After an interruption: how far it got, from the report run_batch wrote on its way out."""
    from chatprocessor.batch import read_report

    err = Console(stderr=True)
    try:
        if report_path.stat().st_mtime < started - 1:  # an earlier run's: this one sent nothing
            raise FileNotFoundError(report_path)
        data = read_report(report_path)
        done = int(data.get("processed", 0)) + int(data.get("failed", 0))
    except (OSError, ValueError, TypeError):
        done = 0
    if not done:
        if how == "interrupted":
            err.print(f"[yellow]{how}[/]: no row finished", highlight=False)
        return
    err.print(
        f"[yellow]{how}[/]: {done} of {data.get('rows')} rows done, saved in "
        f"{escape(str(data.get('results')))}; run the same command again to finish the rest",
        highlight=False,
    )
