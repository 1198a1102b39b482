"""CSV batch import (seed 004 section 5): one AIJob per CSV row, answered, saved, reported.

``chatprocessor batch FILE.csv --mapping "content=Message,conversationId=Chat ID"`` turns
each data row into an AIJob, publishes it to the batch lane queue and reads the AIResponse
from a private reply queue (:class:`QueueSubmitter`). Each answered row is appended to the
results file at once, so an interrupted run loses nothing; running the same command again
sends only the rows not answered yet.

Job ids are derived from the *batch id*, a hash of the file, the mapping, the job type and
the tenant: a re-run publishes the same ids, and the worker's idempotency store answers a
row it already answered without a second model call.

The results file (JSON Lines, or CSV when its name ends in ``.csv``) holds one record per
row with the fields of :data:`RESULT_FIELDS`. Every record carries the ``batchId``, so a
results file is self-describing: a run finds in it which rows are done and refuses a file
written for another batch (the CSV changed) unless told to ``restart``. Records are
appended while the run goes and the file is rewritten once at the start and at the end,
one record per row in row order (a row retried with ``retry_failed`` keeps its last record).

Hand-written: csv and rich do the parsing and the progress bar; what is left (resume,
matching replies by correlation id) is specific to this command.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import hashlib
import io
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import orjson

from chatprocessor.contracts.pipeline import JOB_TYPES, MAX_ID_LENGTH, ai_job
from chatprocessor.core.errors import (
    BrokerUnavailable,
    ChatProcessorError,
    ConfigError,
    MalformedMessage,
    Unroutable,
)
from chatprocessor.transports.base import Outgoing, ReplyQueue, Transport

log = logging.getLogger(__name__)

#: AIJob fields a CSV column may fill; ``content`` is required.
MAPPING_KEYS: Final = ("content", "conversationId", "messageId", "id", "tenantId", "priority")
DEFAULT_TYPE: Final = "sentiment_analysis"
#: The seed's CSV import queues its jobs with priority 3 ("low priority for batch").
DEFAULT_PRIORITY: Final = 3
#: Columns of the results file, in order.
RESULT_FIELDS: Final = (
    "batchId",
    "row",
    "jobId",
    "status",
    "content",
    "sentiment",
    "intent",
    "confidence",
    "suggestedActions",
    "inputTokens",
    "outputTokens",
    "cost",
    "cached",
    "error",
)
COMPLETED: Final = "completed"
FAILED: Final = "failed"
EMPTY_CONTENT: Final = "empty content"
#: Errors that stop the whole run (every further row would fail the same way); the rows
#: answered so far are kept and a re-run finishes the rest.
FATAL_ERRORS: Final = (BrokerUnavailable, Unroutable, ConfigError)

Record = dict[str, Any]
RowJob = tuple[int, dict[str, Any] | None, str | None]


# -- mapping and rows ---------------------------------------------------------------------


def _key(name: str) -> str | None:
    """The mapping key ``name`` means (``conversation_id`` and ``ConversationID`` too)."""
    folded = name.replace("_", "").replace("-", "").lower()
    return next((key for key in MAPPING_KEYS if key.lower() == folded), None)


@dataclass(frozen=True, slots=True)
class Mapping:
    """Which CSV column fills which AIJob field (``content`` always among them)."""

    columns: dict[str, str]

    @classmethod
    def parse(cls, text: str, header: Sequence[str]) -> Mapping:
        """``"content=Message,conversationId=Chat ID"`` checked against the CSV's header.

        Raises ConfigError naming the bad part: an unknown key, a key given twice, a column
        the header lacks (or has twice), or no ``content``.
        """
        columns: dict[str, str] = {}
        names = [name.strip() for name in header]
        for part in text.split(","):
            if not part.strip():
                continue
            name, sep, column = part.partition("=")
            key, column = _key(name.strip()), column.strip()
            if not sep or not name.strip() or not column:
                raise ConfigError(f"--mapping: {part.strip()!r} is not FIELD=COLUMN")
            if key is None:
                raise ConfigError(
                    f"--mapping: unknown field {name.strip()!r} (fields: {', '.join(MAPPING_KEYS)})"
                )
            if key in columns:
                raise ConfigError(f"--mapping: {key} is given twice")
            if column not in names:
                raise ConfigError(
                    f"--mapping: the CSV has no column {column!r} "
                    f"(its columns: {', '.join(repr(n) for n in names) or 'none'})"
                )
            if names.count(column) > 1:
                raise ConfigError(f"--mapping: the CSV has more than one column {column!r}")
            columns[key] = column
        if "content" not in columns:
            raise ConfigError("--mapping must name the content column: content=COLUMN")
        return cls(columns)

    @property
    def canonical(self) -> str:
        """The mapping in one spelling (what the batch id hashes)."""
        return ",".join(f"{key}={self.columns[key]}" for key in MAPPING_KEYS if key in self.columns)


def parse_mapping(text: str, header: Sequence[str]) -> dict[str, str]:
    """AIJob field -> CSV column, as :meth:`Mapping.parse` checks it."""
    return dict(Mapping.parse(text, header).columns)


def batch_id(data: bytes, mapping: str, job_type: str, tenant: str) -> str:
    """12 hex characters naming this import: same file, mapping, type and tenant, same id."""
    digest = hashlib.sha256()
    for part in (data, mapping.encode(), job_type.encode(), tenant.encode()):
        digest.update(len(part).to_bytes(8, "big"))  # unambiguous: ("ab","c") != ("a","bc")
        digest.update(part)
    return digest.hexdigest()[:12]


def read_csv(data: bytes) -> tuple[list[str], list[list[str]]]:
    """The header and the data rows (blank lines dropped); UTF-8, with or without a BOM."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"the CSV is not UTF-8 text ({exc})") from exc
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        rows = [row for row in reader if any(cell.strip() for cell in row)]
    except csv.Error as exc:
        raise ConfigError(f"the CSV is not readable at line {reader.line_num}: {exc}") from exc
    if not rows:
        raise ConfigError("the CSV is empty: it needs a header row naming its columns")
    return [name.strip() for name in rows[0]], rows[1:]


def _priority(text: str) -> int | None:
    try:
        value = int(text.strip())
    except ValueError:
        return None
    return value if 1 <= value <= 10 else None


def rows_to_jobs(
    header: Sequence[str],
    rows: Iterable[Sequence[str]],
    columns: dict[str, str],
    *,
    batch: str,
    job_type: str,
    tenant: str,
    priority: int,
) -> Iterator[RowJob]:
    """``(row, AIJob, None)`` per data row (1-based), or ``(row, None, why)`` for a row that
    cannot be sent: empty content, a bad priority, an id too long or used by an earlier row.
    An empty mapped cell takes the default, as an unmapped field does."""
    index = {name.strip(): position for position, name in enumerate(header)}
    seen: dict[str, int] = {}
    for row, cells in enumerate(rows, start=1):

        def cell(key: str, cells: Sequence[str] = cells) -> str:
            column = columns.get(key)
            if column is None or index[column] >= len(cells):
                return ""
            return cells[index[column]].strip()

        content = cell("content")
        if not content:
            yield row, None, EMPTY_CONTENT
            continue
        values = {
            "id": cell("id") or f"{batch}-{row}",
            "tenantId": cell("tenantId") or tenant,
            "conversationId": cell("conversationId") or f"{batch}-{row}",
            "messageId": cell("messageId") or f"row-{row}",
        }
        too_long = [key for key, value in values.items() if len(value) > MAX_ID_LENGTH]
        if too_long:
            yield row, None, f"{too_long[0]} longer than {MAX_ID_LENGTH} characters"
            continue
        wanted = priority
        if cell("priority"):
            parsed = _priority(cell("priority"))
            if parsed is None:
                yield row, None, f"priority {cell('priority')!r} is not a whole number 1-10"
                continue
            wanted = parsed
        if values["id"] in seen:
            yield row, None, f"id {values['id']!r} is already row {seen[values['id']]}'s"
            continue
        seen[values["id"]] = row
        job = ai_job(
            id=values["id"],
            tenant_id=values["tenantId"],
            conversation_id=values["conversationId"],
            message_id=values["messageId"],
            type=job_type,
            content=content,
            priority=wanted,
        )
        yield row, job, None


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """A CSV read and checked: its batch id and one entry per data row."""

    path: Path
    batch_id: str
    job_type: str
    tenant: str
    mapping: Mapping
    rows: list[RowJob]


def plan_batch(path: Path, *, mapping: str, job_type: str, tenant: str, priority: int) -> BatchPlan:
    """Read ``path`` and build its jobs; ConfigError for anything wrong before sending."""
    if job_type not in JOB_TYPES:
        raise ConfigError(f"--type must be one of {', '.join(JOB_TYPES)} (got {job_type!r})")
    if not 1 <= priority <= 10:
        raise ConfigError(f"--priority must be 1-10 (got {priority})")
    if not tenant or len(tenant) > MAX_ID_LENGTH:
        raise ConfigError(f"--tenant must be 1-{MAX_ID_LENGTH} characters")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    header, rows = read_csv(data)
    parsed = Mapping.parse(mapping, header)
    batch = batch_id(data, parsed.canonical, job_type, tenant)
    jobs = list(
        rows_to_jobs(
            header,
            rows,
            parsed.columns,
            batch=batch,
            job_type=job_type,
            tenant=tenant,
            priority=priority,
        )
    )
    return BatchPlan(path, batch, job_type, tenant, parsed, jobs)


# -- answers to records --------------------------------------------------------------------


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def failed_record(batch: str, row: int, job_id: str | None, error: str) -> Record:
    """The record of a row that got no answer (or could not be sent)."""
    record: Record = dict.fromkeys(RESULT_FIELDS)
    record.update(
        batchId=batch,
        row=row,
        jobId=job_id,
        status=FAILED,
        suggestedActions=[],
        cached=False,
        error=error,
    )
    return record


def result_record(batch: str, row: int, job_id: str, response: dict[str, Any]) -> Record:
    """The record of an answered row, from its AIResponse (a failed one when it says so)."""
    metadata = response.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    usage = metadata.get("tokenUsage")
    usage = usage if isinstance(usage, dict) else {}
    error = response.get("error")
    status = response.get("status")
    failed = status != COMPLETED or bool(error)
    why: str | None = None
    if failed:
        code = error.get("code") if isinstance(error, dict) else None
        message = error.get("message") if isinstance(error, dict) else error
        code = code or status or FAILED
        why = f"{code}: {message}" if message else str(code)
    actions = response.get("suggestedActions")
    return {
        "batchId": batch,
        "row": row,
        "jobId": job_id,
        "status": FAILED if failed else COMPLETED,
        "content": response.get("content") if isinstance(response.get("content"), str) else None,
        "sentiment": response.get("sentiment"),
        "intent": response.get("intent"),
        "confidence": _float(response.get("confidence")),
        "suggestedActions": [str(a) for a in actions] if isinstance(actions, list) else [],
        "inputTokens": _int(usage.get("promptTokens")),
        "outputTokens": _int(usage.get("completionTokens")),
        "cost": _float(metadata.get("cost")),
        "cached": metadata.get("cached") is True,
        "error": why,
    }


# -- the results file -----------------------------------------------------------------------


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "; ".join(str(item) for item in value)
    return str(value)


def _csv_record(cells: dict[str, str]) -> Record:
    """A CSV results row back to a record (raises ValueError when it is not one)."""

    def number(name: str, kind: Callable[[str], Any]) -> Any:
        return kind(cells[name]) if cells[name] else None

    return {
        "batchId": cells["batchId"],
        "row": int(cells["row"]),
        "jobId": cells["jobId"] or None,
        "status": cells["status"],
        "content": cells["content"] or None,
        "sentiment": cells["sentiment"] or None,
        "intent": cells["intent"] or None,
        "confidence": number("confidence", float),
        "suggestedActions": [a for a in cells["suggestedActions"].split("; ") if a],
        "inputTokens": number("inputTokens", int),
        "outputTokens": number("outputTokens", int),
        "cost": number("cost", float),
        "cached": cells["cached"] == "true",
        "error": cells["error"] or None,
    }


class ResultsFile:
    """The per-row results of one batch: JSON Lines, or CSV when the name ends in ``.csv``."""

    def __init__(self, path: Path, batch: str) -> None:
        self.path = path
        self.batch = batch
        self.is_csv = path.suffix.lower() == ".csv"

    def _refuse(self, why: str) -> ConfigError:
        return ConfigError(
            f"{self.path} {why}: pass --restart to start over (its results are dropped) "
            "or --results to write elsewhere"
        )

    def load(self) -> dict[int, Record]:
        """Rows already recorded, the last record of each row; a half-written last line
        (the process was killed while writing it) is dropped: that row is done again."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as exc:
            raise self._refuse(f"cannot be read ({exc})") from exc
        records = self._parse_csv(text) if self.is_csv else self._parse_jsonl(text)
        found: dict[int, Record] = {}
        for record in records:
            if record.get("batchId") != self.batch:
                raise self._refuse(
                    f"holds results of batch {record.get('batchId')!r}, not of this one "
                    f"({self.batch}): the CSV, the mapping, the type or the tenant changed"
                )
            if record.get("status") not in (COMPLETED, FAILED) or _int(record.get("row")) is None:
                raise self._refuse("is not a results file of `chatprocessor batch`")
            found[record["row"]] = record
        return found

    def _parse_jsonl(self, text: str) -> list[Record]:
        lines = text.split("\n")
        if lines and not text.endswith("\n"):
            lines.pop()  # cut short by a crash
        records: list[Record] = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise self._refuse(f"is not a results file (line {number}: {exc})") from exc
            if not isinstance(record, dict):
                raise self._refuse(f"is not a results file (line {number} is not an object)")
            records.append(record)
        return records

    def _parse_csv(self, text: str) -> list[Record]:
        if not text:
            return []
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)
        rows: list[list[str]] = []
        try:
            rows.extend(reader)
        except csv.Error:
            lines = text.count("\n") + (0 if text.endswith("\n") else 1)
            if reader.line_num < lines:  # not at the end: not a crash
                raise self._refuse(f"is not a results file (line {reader.line_num})") from None
        else:
            if not text.endswith("\n") and rows:
                rows.pop()  # cut short by a crash
        if not rows or tuple(rows[0]) != RESULT_FIELDS:
            raise self._refuse("is not a results file (its header is not the results columns)")
        records = []
        for number, cells in enumerate(rows[1:], start=2):
            try:
                if len(cells) != len(RESULT_FIELDS):
                    raise ValueError(f"{len(cells)} columns")
                records.append(_csv_record(dict(zip(RESULT_FIELDS, cells, strict=True))))
            except ValueError as exc:
                raise self._refuse(f"is not a results file (record {number}: {exc})") from exc
        return records

    def rewrite(self, records: Iterable[Record]) -> None:
        """Replace the file with ``records`` in row order (atomically: a crash keeps the old)."""
        ordered = sorted(records, key=lambda record: int(record["row"]))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with temporary.open("w", encoding="utf-8", newline="") as out:
                if self.is_csv:
                    writer = csv.writer(out, lineterminator="\n")
                    writer.writerow(RESULT_FIELDS)
                    writer.writerows([_text(r.get(f)) for f in RESULT_FIELDS] for r in ordered)
                else:
                    out.writelines(orjson.dumps(r).decode() + "\n" for r in ordered)
            os.replace(temporary, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()

    @contextlib.contextmanager
    def appender(self) -> Iterator[Callable[[Record], None]]:
        """A function appending one record and flushing it to the operating system."""
        with self.path.open("a", encoding="utf-8", newline="") as out:
            writer = csv.writer(out, lineterminator="\n")

            def append(record: Record) -> None:
                if self.is_csv:
                    writer.writerow([_text(record.get(name)) for name in RESULT_FIELDS])
                else:
                    out.write(orjson.dumps(record).decode() + "\n")
                out.flush()

            yield append


# -- the report --------------------------------------------------------------------------------


@dataclass(slots=True)
class BatchReport:
    """What a run did; totals cover the whole results file (earlier runs too), ``seconds``
    and ``rows_per_second`` this run only."""

    file: str
    batch_id: str
    tenant: str
    type: str
    rows: int
    processed: int
    failed: int
    skipped: int
    input_tokens: int
    output_tokens: int
    cost: float
    currency: str
    seconds: float
    rows_per_second: float
    results: str
    #: Rows finished (answered or failed) by this run.
    done_now: int = 0
    #: The run was stopped (Ctrl-C, SIGTERM, a broker failure) before every row was done.
    interrupted: bool = False
    failures: list[tuple[int, str]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Every row answered successfully."""
        return self.processed == self.rows

    def to_dict(self) -> dict[str, Any]:
        """The report file's JSON (camelCase, as the rest of seed 004)."""
        data = asdict(self)
        data.pop("failures")
        names = {
            "batch_id": "batchId",
            "input_tokens": "inputTokens",
            "output_tokens": "outputTokens",
            "rows_per_second": "rowsPerSecond",
            "done_now": "doneNow",
        }
        return {names.get(key, key): value for key, value in data.items()}


def summarize(
    plan: BatchPlan,
    records: dict[int, Record],
    *,
    skipped: int,
    done_now: int,
    seconds: float,
    results: Path,
    currency: str,
    interrupted: bool,
) -> BatchReport:
    """The report of ``plan`` given every row's latest record."""
    completed = [r for r in records.values() if r["status"] == COMPLETED]
    failures = sorted(
        (int(r["row"]), str(r.get("error") or FAILED))
        for r in records.values()
        if r["status"] != COMPLETED
    )
    return BatchReport(
        file=str(plan.path),
        batch_id=plan.batch_id,
        tenant=plan.tenant,
        type=plan.job_type,
        rows=len(plan.rows),
        processed=len(completed),
        failed=len(failures),
        skipped=skipped,
        input_tokens=sum(_int(r.get("inputTokens")) or 0 for r in records.values()),
        output_tokens=sum(_int(r.get("outputTokens")) or 0 for r in records.values()),
        cost=round(sum((_float(r.get("cost")) or 0.0 for r in records.values()), 0.0), 10),
        currency=currency,
        seconds=round(seconds, 3),
        rows_per_second=round(done_now / seconds, 3) if seconds > 0 else 0.0,
        results=str(results),
        done_now=done_now,
        interrupted=interrupted,
        failures=failures,
    )


def write_report(path: Path, report: BatchReport) -> None:
    """Write the report JSON (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2) + b"\n")
    os.replace(temporary, path)


# -- submitting ----------------------------------------------------------------------------------


class Submitter(Protocol):
    """Something that answers AIJobs: the batch lane queue, or a fake in tests."""

    async def submit(self, job: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send ``job`` and return its AIResponse; TimeoutError after ``timeout`` seconds."""
        ...


class QueueSubmitter:
    """Publishes AIJobs to a queue with ``reply_to`` = a private reply queue, and matches
    the AIResponses arriving there to their jobs by correlation id (= the job id).

    One reader task takes every reply; a reply to a job no longer waited for (it timed out,
    or an earlier run published it) is dropped. ``wait_for_queue`` seconds after opening, a
    publish to a queue that does not exist yet is tried again (a worker started in the
    same process is still declaring it); later it is an error.
    """

    def __init__(
        self, transport: Transport, queue: str, replies: ReplyQueue, *, wait_for_queue: float
    ) -> None:
        self.transport = transport
        self.queue = queue
        self._replies = replies
        self._wait_until = time.monotonic() + wait_for_queue
        self._pending: dict[str, asyncio.Future[bytes]] = {}
        self._closed: str | None = None
        self._reader = asyncio.create_task(self._read(), name=f"batch-replies-{replies.name}")

    @classmethod
    async def open(
        cls, transport: Transport, queue: str, *, wait_for_queue: float = 0.0
    ) -> QueueSubmitter:
        """Open the reply queue on a connected ``transport`` and start reading it."""
        return cls(
            transport, queue, await transport.open_reply_queue(), wait_for_queue=wait_for_queue
        )

    async def _read(self) -> None:
        why = "the reply queue closed"
        try:
            async for message in self._replies.messages():
                waiting = self._pending.get(message.correlation_id or "")
                if waiting is not None and not waiting.done():
                    waiting.set_result(message.body)
        except asyncio.CancelledError:
            why = "the batch was closed"
            raise
        except Exception as exc:  # the broker library's own errors: the connection is gone
            why = f"reading replies failed: {exc}"
        finally:
            self._closed = why
            for waiting in self._pending.values():
                if not waiting.done():
                    waiting.set_exception(BrokerUnavailable(why))

    async def submit(self, job: dict[str, Any], timeout: float) -> dict[str, Any]:
        if self._closed is not None:
            raise BrokerUnavailable(self._closed)
        job_id = str(job["id"])
        answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[job_id] = answer
        message = Outgoing(
            orjson.dumps(job),
            message_id=job_id,
            correlation_id=job_id,
            reply_to=self._replies.name,
            type="AIJob",
            priority=int(job.get("priority") or DEFAULT_PRIORITY),
        )
        try:
            async with asyncio.timeout(timeout):
                await self._publish(message)
                body = await answer
        finally:
            self._pending.pop(job_id, None)
        try:
            response = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise MalformedMessage(f"the answer is not JSON: {exc}") from exc
        if not isinstance(response, dict):
            raise MalformedMessage("the answer is not a JSON object")
        return response

    async def _publish(self, message: Outgoing) -> None:
        while True:
            try:
                await self.transport.publish(self.queue, message)
                return
            except Unroutable as exc:
                if time.monotonic() >= self._wait_until:
                    raise Unroutable(
                        f"queue {self.queue!r} does not exist: start a pipeline worker "
                        "(CONTRACT=pipeline chatprocessor run) or pass --direct"
                    ) from exc
                await asyncio.sleep(0.2)

    async def close(self) -> None:
        """Stop reading and delete the reply queue."""
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self._replies.close()


# -- running -------------------------------------------------------------------------------------


class _Progress:
    """A rich progress bar on stderr, or nothing."""

    def __init__(self, enabled: bool, *, total: int, done: int, currency: str) -> None:
        self._bar: Any = None
        self._task: Any = None
        self.currency = currency
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("[red]{task.fields[failed]} failed"),
            TextColumn("{task.fields[cost]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self._task = self._bar.add_task(
            "rows", total=total, completed=done, failed=0, cost=f"0 {currency}"
        )

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def update(self, *, failed: int, cost: float) -> None:
        if self._bar is not None:
            self._bar.update(
                self._task, advance=1, failed=failed, cost=f"{cost:.4f} {self.currency}"
            )


def prepare(
    path: Path,
    *,
    mapping: str,
    job_type: str,
    tenant: str,
    priority: int,
    results: Path,
    report: Path,
    restart: bool,
) -> tuple[BatchPlan, ResultsFile, dict[int, Record]]:
    """Every check made before sending: the CSV, the mapping, the options, the results file
    (ConfigError when it belongs to another batch). Returns the plan, the results file and
    the rows it already holds (none with ``restart``)."""
    csv_file = path.resolve()
    if results.resolve() == csv_file or report.resolve() in (csv_file, results.resolve()):
        raise ConfigError("--results and --report must be different files from the CSV")
    plan = plan_batch(path, mapping=mapping, job_type=job_type, tenant=tenant, priority=priority)
    store = ResultsFile(results, plan.batch_id)
    return plan, store, {} if restart else store.load()


async def run_batch(
    path: Path,
    *,
    mapping: str,
    job_type: str,
    tenant: str,
    priority: int,
    submitter: Submitter,
    concurrency: int,
    timeout: float,
    results: Path,
    report: Path,
    restart: bool,
    retry_failed: bool,
    progress: bool,
    currency: str,
) -> BatchReport:
    """Send every row of ``path`` not answered yet, at most ``concurrency`` at a time, record
    each answer in ``results`` as it comes, and write ``report``.

    Raises ConfigError (before anything is sent) for a bad file, mapping or results file.
    When cancelled (Ctrl-C) or stopped by a broker failure, the results file and the report
    (``interrupted: true``) still describe every finished row before the error propagates.
    """
    if concurrency < 1:
        raise ConfigError(f"--concurrency must be at least 1 (got {concurrency})")
    if not timeout > 0:
        raise ConfigError(f"--timeout must be above 0 (got {timeout})")
    plan, store, records = prepare(
        path,
        mapping=mapping,
        job_type=job_type,
        tenant=tenant,
        priority=priority,
        results=results,
        report=report,
        restart=restart,
    )
    todo = [
        (row, job, error)
        for row, job, error in plan.rows
        if row not in records or (retry_failed and records[row]["status"] != COMPLETED)
    ]
    skipped = len(plan.rows) - len(todo)
    store.rewrite(records.values())  # one record per row, a torn last line gone
    if records:
        log.info("batch %s: %d rows done in an earlier run", plan.batch_id, skipped)

    tally = _Tally(records)
    started = time.monotonic()
    interrupted = True
    try:
        with (
            _Progress(progress, total=len(plan.rows), done=skipped, currency=currency) as bar,
            store.appender() as append,
        ):

            async def finish(row: int, job: dict[str, Any] | None, error: str | None) -> None:
                if job is None:
                    record = failed_record(plan.batch_id, row, None, error or FAILED)
                else:
                    record = await _answer(submitter, plan.batch_id, row, job, timeout)
                append(record)
                tally.add(record)
                bar.update(failed=tally.failed, cost=tally.cost)

            await _each(todo, concurrency, finish)
        interrupted = False
    finally:
        seconds = time.monotonic() - started
        try:
            store.rewrite(records.values())
        except OSError as exc:  # the appended records are still there
            log.warning("could not tidy %s: %s", results, exc)
        summary = summarize(
            plan,
            records,
            skipped=skipped,
            done_now=tally.done_now,
            seconds=seconds,
            results=results,
            currency=currency,
            interrupted=interrupted,
        )
        write_report(report, summary)
    return summary


class _Tally:
    """Every row's latest record, and the running numbers the progress bar shows."""

    def __init__(self, records: dict[int, Record]) -> None:
        self.records = records
        self.failed = sum(1 for r in records.values() if r["status"] != COMPLETED)
        self.cost = sum(_float(r.get("cost")) or 0.0 for r in records.values())
        self.done_now = 0

    def add(self, record: Record) -> None:
        previous = self.records.get(record["row"])
        if previous is not None and previous["status"] != COMPLETED:
            self.failed -= 1  # retried
        self.failed += record["status"] != COMPLETED
        self.cost += _float(record.get("cost")) or 0.0
        self.records[record["row"]] = record
        self.done_now += 1


async def _answer(
    submitter: Submitter, batch: str, row: int, job: dict[str, Any], timeout: float
) -> Record:
    """The row's record: its answer, or why it has none (FATAL_ERRORS propagate)."""
    job_id = str(job["id"])
    try:
        async with asyncio.timeout(timeout):
            response = await submitter.submit(job, timeout)
    except TimeoutError:
        return failed_record(batch, row, job_id, f"no answer within {timeout:g}s")
    except FATAL_ERRORS:
        raise
    except ChatProcessorError as exc:
        return failed_record(batch, row, job_id, str(exc) or type(exc).__name__)
    return result_record(batch, row, job_id, response)


async def _each(
    todo: list[RowJob], concurrency: int, finish: Callable[..., Awaitable[None]]
) -> None:
    """``finish(*entry)`` for every entry, ``concurrency`` at a time; the first error stops
    (and cancels) the others."""
    pending = iter(todo)

    async def worker() -> None:
        for entry in pending:  # shared: each entry goes to one worker
            await finish(*entry)

    workers = [asyncio.create_task(worker()) for _ in range(min(concurrency, len(todo)))]
    try:
        await asyncio.gather(*workers)
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)


def default_paths(path: Path) -> tuple[Path, Path]:
    """``<stem>.results.jsonl`` and ``<stem>.report.json`` beside the CSV."""
    return path.with_name(f"{path.stem}.results.jsonl"), path.with_name(f"{path.stem}.report.json")


def read_report(path: Path) -> dict[str, Any]:
    """A report file written by :func:`run_batch`."""
    data: dict[str, Any] = orjson.loads(path.read_bytes())
    return data
