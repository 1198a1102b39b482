"""CSV batch import: mapping, batch ids, rows to AIJobs, results files, resume and reports.

The submitter is a fake answering from the job itself (sentiment from the words, tokens
from the length), failing the rows it is told to, sleeping a little so rows overlap.
"""

from __future__ import annotations

import asyncio
import csv
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import orjson
import pytest
import typer
from typer.testing import CliRunner

from chatprocessor.batch import (
    DEFAULT_PRIORITY,
    RESULT_FIELDS,
    BatchReport,
    Mapping,
    ResultsFile,
    batch_id,
    parse_mapping,
    read_csv,
    result_record,
    rows_to_jobs,
    run_batch,
)
from chatprocessor.cli_batch import batch
from chatprocessor.contracts.pipeline import PipelineCodec
from chatprocessor.core.errors import BrokerUnavailable, ConfigError

pytestmark = pytest.mark.timeout(30)

HEADER = ["Chat ID", "Message", "Msg Id"]
MESSAGES = [
    "good service, thanks",
    "terrible wait",
    "where is my order?",
    "good and fast",
    "please call me",
    "bad bad bad",
    "all good",
    "ok",
]
MAPPING = "content=Message,conversationId=Chat ID,messageId=Msg Id"
#: The fake's price: a thousandth per input token.
PRICE = 0.001


def write_csv(path: Path, messages: list[str] = MESSAGES) -> Path:
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(HEADER)
        for number, message in enumerate(messages, start=1):
            writer.writerow([f"chat-{number % 3}", message, f"m{number}"])
    return path


def response(job: dict[str, Any]) -> dict[str, Any]:
    """An AIResponse as the pipeline worker writes it, made up from the job."""
    content = job["payload"]["content"]
    words = len(content.split())
    return {
        "jobId": job["id"],
        "tenantId": job["tenantId"],
        "conversationId": job["conversationId"],
        "messageId": f"{job['id']}:response",
        "inReplyTo": job["messageId"],
        "type": job["type"],
        "status": "completed",
        "content": f'{{"sentiment": "{sentiment(content)}"}}',
        "intent": "question" if "?" in content else "statement",
        "sentiment": sentiment(content),
        "confidence": 0.75,
        "suggestedActions": ["reply", "tag"] if "call" in content else [],
        "metadata": {
            "model": "fake",
            "provider": "fake",
            "processingTime": 1,
            "cached": "all" in content,
            "tokenUsage": {
                "promptTokens": words,
                "completionTokens": 2,
                "totalTokens": words + 2,
            },
            "cost": words * PRICE,
            "currency": "USD",
        },
        "error": None,
    }


def sentiment(content: str) -> str:
    if "good" in content:
        return "positive"
    return "negative" if "bad" in content or "terrible" in content else "neutral"


def failure(job: dict[str, Any]) -> dict[str, Any]:
    answer = response(job)
    answer.update(
        status="over_budget",
        content="",
        error={"code": "over_budget", "message": "daily budget spent"},
    )
    answer["metadata"]["cost"] = None
    answer["metadata"]["tokenUsage"] = {
        "promptTokens": 0,
        "completionTokens": 0,
        "totalTokens": 0,
    }
    return answer


class FakeSubmitter:
    """Answers every job after ``delay`` seconds; fails those whose content is in ``fail``."""

    def __init__(
        self,
        *,
        fail: Collection[str] = (),
        delay: float = 0.01,
        hang_after: int | None = None,
        raise_after: tuple[int, BaseException] | None = None,
    ) -> None:
        self.fail = set(fail)
        self.delay = delay
        self.hang_after = hang_after
        self.raise_after = raise_after
        self.jobs: list[dict[str, Any]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.answered = 0

    async def submit(self, job: dict[str, Any], timeout: float) -> dict[str, Any]:
        self.jobs.append(job)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.raise_after is not None and len(self.jobs) > self.raise_after[0]:
                raise self.raise_after[1]
            if self.hang_after is not None and len(self.jobs) > self.hang_after:
                await asyncio.Event().wait()  # never answered
            await asyncio.sleep(self.delay)
            self.answered += 1
            if job["payload"]["content"] in self.fail:
                return failure(job)
            return response(job)
        finally:
            self.in_flight -= 1

    @property
    def contents(self) -> list[str]:
        return [job["payload"]["content"] for job in self.jobs]


Run = Callable[..., Any]


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "chats.csv")


@pytest.fixture
def run(source: Path, tmp_path: Path) -> Run:
    """run_batch on ``source`` with defaults a test overrides by keyword."""

    async def go(submitter: Any, **options: Any) -> BatchReport:
        settings: dict[str, Any] = {
            "mapping": MAPPING,
            "job_type": "sentiment_analysis",
            "tenant": "acme",
            "priority": DEFAULT_PRIORITY,
            "concurrency": 4,
            "timeout": 5.0,
            "results": tmp_path / "chats.results.jsonl",
            "report": tmp_path / "chats.report.json",
            "restart": False,
            "retry_failed": False,
            "progress": False,
            "currency": "USD",
        }
        settings.update(options)
        path = settings.pop("path", source)
        return await run_batch(path, submitter=submitter, **settings)

    return go


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_text().splitlines()]


# -- mapping -------------------------------------------------------------------------------------


def test_mapping_names_columns_with_spaces_and_accepts_snake_case() -> None:
    mapping = parse_mapping(" content = Message , conversation_id=Chat ID,messageId=Msg Id", HEADER)
    assert mapping == {"content": "Message", "conversationId": "Chat ID", "messageId": "Msg Id"}


def test_mapping_spelling_does_not_change_its_canonical_form() -> None:
    one = Mapping.parse("messageId=Msg Id,content=Message", HEADER)
    two = Mapping.parse(" content=Message , message_id=Msg Id ", HEADER)
    assert one.canonical == two.canonical == "content=Message,messageId=Msg Id"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("content=Body", "no column 'Body'"),
        ("content=Message,colour=Chat ID", "unknown field 'colour'"),
        ("conversationId=Chat ID", "must name the content column"),
        ("content=Message,content=Msg Id", "content is given twice"),
        ("content", "'content' is not FIELD=COLUMN"),
        ("content=", "is not FIELD=COLUMN"),
        ("", "must name the content column"),
    ],
)
def test_mapping_errors_say_what_is_wrong(text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason.replace("?", r"\?")):
        parse_mapping(text, HEADER)


def test_mapping_error_lists_the_columns_the_csv_has() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_mapping("content=message", HEADER)
    assert "'Chat ID', 'Message', 'Msg Id'" in str(caught.value)


def test_mapping_refuses_a_column_the_header_has_twice() -> None:
    with pytest.raises(ConfigError, match="more than one column 'Message'"):
        parse_mapping("content=Message", ["Message", "Message"])


# -- batch ids and jobs --------------------------------------------------------------------------


def test_batch_id_is_stable_and_changes_with_each_input() -> None:
    base = batch_id(b"a,b\n1,2\n", "content=a", "sentiment_analysis", "acme")
    assert base == batch_id(b"a,b\n1,2\n", "content=a", "sentiment_analysis", "acme")
    assert len(base) == 12 and int(base, 16) >= 0
    others = {
        batch_id(b"a,b\n1,3\n", "content=a", "sentiment_analysis", "acme"),
        batch_id(b"a,b\n1,2\n", "content=b", "sentiment_analysis", "acme"),
        batch_id(b"a,b\n1,2\n", "content=a", "chat_response", "acme"),
        batch_id(b"a,b\n1,2\n", "content=a", "sentiment_analysis", "other"),
    }
    assert base not in others and len(others) == 4
    # parts are delimited: moving a character from one part to the next is another batch
    assert batch_id(b"x", "ab", "c", "t") != batch_id(b"x", "a", "bc", "t")


def test_rows_to_jobs_defaults() -> None:
    header, rows = read_csv(b"Message,Other\nhello,1\nworld,2\n")
    jobs = list(
        rows_to_jobs(
            header,
            rows,
            {"content": "Message"},
            batch="b1",
            job_type="intent_classification",
            tenant="acme",
            priority=3,
        )
    )
    assert [(row, error) for row, _, error in jobs] == [(1, None), (2, None)]
    first = jobs[0][1]
    assert first == {
        "id": "b1-1",
        "tenantId": "acme",
        "conversationId": "b1-1",
        "messageId": "row-1",
        "type": "intent_classification",
        "priority": 3,
        "payload": {"content": "hello", "chatbotConfig": {}},
        "metadata": {"retryCount": 0},
    }
    # what the worker's codec reads back
    decoded = PipelineCodec(max_bytes=10_000).decode(orjson.dumps(jobs[1][1]))
    assert (decoded.id, decoded.tenant, decoded.prompt) == ("b1-2", "acme", "world")
    assert (decoded.priority, decoded.kind, decoded.meta["message_id"]) == (
        3,
        "intent_classification",
        "row-2",
    )


def test_rows_to_jobs_takes_mapped_columns_and_flags_rows_it_cannot_send() -> None:
    data = (
        b"Text,Who,Conv,Msg,Id,Prio\n"
        b"hi,t1,c1,m1,job-1,9\n"  # every field from the row
        b"   ,t1,c1,m2,job-2,9\n"  # blank content
        b"yo,,,,,\n"  # empty cells: the defaults
        b"yo,t1,c1,m4,job-4,eleven\n"  # bad priority
        b"yo,t1,c1,m5,job-1,2\n"  # an id already used
        b"short\n"  # cells missing at the end: defaults
    )
    header, rows = read_csv(data)
    columns = parse_mapping(
        "content=Text,tenantId=Who,conversationId=Conv,messageId=Msg,id=Id,priority=Prio", header
    )
    out = list(
        rows_to_jobs(
            header, rows, columns, batch="b", job_type="chat_response", tenant="d", priority=3
        )
    )
    assert [(row, error) for row, _, error in out] == [
        (1, None),
        (2, "empty content"),
        (3, None),
        (4, "priority 'eleven' is not a whole number 1-10"),
        (5, "id 'job-1' is already row 1's"),
        (6, None),
    ]
    first, third, sixth = out[0][1], out[2][1], out[5][1]
    assert first is not None and third is not None and sixth is not None
    assert (first["id"], first["tenantId"], first["conversationId"], first["messageId"]) == (
        "job-1",
        "t1",
        "c1",
        "m1",
    )
    assert first["priority"] == 9
    assert (third["id"], third["tenantId"], third["conversationId"], third["priority"]) == (
        "b-3",
        "d",
        "b-3",
        3,
    )
    assert sixth["payload"]["content"] == "short" and sixth["id"] == "b-6"


def test_read_csv_takes_a_bom_and_skips_blank_lines() -> None:
    header, rows = read_csv("\ufeffMessage\n\nhello\n,\nworld\n".encode())
    assert header == ["Message"] and rows == [["hello"], ["world"]]


@pytest.mark.parametrize(
    ("data", "reason"), [(b"", "empty"), (b"\xff\xfe\x00", "not UTF-8"), (b"\n\n", "empty")]
)
def test_read_csv_errors(data: bytes, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        read_csv(data)


def test_result_record_of_a_failed_answer() -> None:
    job = {"id": "j", "payload": {"content": "x"}, "tenantId": "t", "conversationId": "c"}
    job |= {"messageId": "m", "type": "chat_response"}
    record = result_record("b", 4, "j", failure(job))
    assert record["status"] == "failed"
    assert record["error"] == "over_budget: daily budget spent"
    assert record["cost"] is None and record["inputTokens"] == 0


# -- running -------------------------------------------------------------------------------------


async def test_results_jsonl_and_report_sum_tokens_and_cost(run: Run, tmp_path: Path) -> None:
    fake = FakeSubmitter(fail={"ok"})
    report = await run(fake)

    assert sorted(fake.contents) == sorted(MESSAGES)
    records = jsonl(tmp_path / "chats.results.jsonl")
    assert [r["row"] for r in records] == list(range(1, 9))
    assert all(list(r) == list(RESULT_FIELDS) for r in records)
    first = records[0]
    bid = report.batch_id
    assert first == {
        "batchId": bid,
        "row": 1,
        "jobId": f"{bid}-1",
        "status": "completed",
        "content": '{"sentiment": "positive"}',
        "sentiment": "positive",
        "intent": "statement",
        "confidence": 0.75,
        "suggestedActions": [],
        "inputTokens": 3,
        "outputTokens": 2,
        "cost": pytest.approx(3 * PRICE),
        "cached": False,
        "error": None,
    }
    assert records[4]["suggestedActions"] == ["reply", "tag"]
    assert records[6]["cached"] is True
    assert records[7]["status"] == "failed" and records[7]["error"].startswith("over_budget")
    job = next(j for j in fake.jobs if j["id"] == f"{bid}-2")
    assert (job["conversationId"], job["messageId"], job["tenantId"]) == ("chat-2", "m2", "acme")
    assert (job["type"], job["priority"]) == ("sentiment_analysis", DEFAULT_PRIORITY)

    words = sum(len(m.split()) for m in MESSAGES[:7])
    assert (report.rows, report.processed, report.failed, report.skipped) == (8, 7, 1, 0)
    assert (report.input_tokens, report.output_tokens) == (words, 14)
    assert report.cost == pytest.approx(words * PRICE)
    assert not report.complete and not report.interrupted
    assert report.failures == [(8, "over_budget: daily budget spent")]
    saved = orjson.loads((tmp_path / "chats.report.json").read_bytes())
    assert saved == {
        "file": str(tmp_path / "chats.csv"),
        "batchId": bid,
        "tenant": "acme",
        "type": "sentiment_analysis",
        "rows": 8,
        "processed": 7,
        "failed": 1,
        "skipped": 0,
        "inputTokens": words,
        "outputTokens": 14,
        "cost": pytest.approx(words * PRICE),
        "currency": "USD",
        "seconds": saved["seconds"],
        "rowsPerSecond": saved["rowsPerSecond"],
        "results": str(tmp_path / "chats.results.jsonl"),
        "doneNow": 8,
        "interrupted": False,
    }
    assert saved["seconds"] > 0 and saved["rowsPerSecond"] > 0


async def test_results_csv(run: Run, tmp_path: Path) -> None:
    out = tmp_path / "out" / "results.csv"
    report = await run(FakeSubmitter(fail={"ok"}), results=out)
    with out.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == RESULT_FIELDS
    assert [row["row"] for row in rows] == [str(n) for n in range(1, 9)]
    assert rows[4]["suggestedActions"] == "reply; tag"
    assert rows[0]["content"] == '{"sentiment": "positive"}'
    assert (rows[0]["cached"], rows[6]["cached"]) == ("false", "true")
    assert rows[7]["status"] == "failed" and rows[7]["cost"] == ""
    assert report.processed == 7
    # a CSV results file is read back for resuming like a JSONL one
    loaded = ResultsFile(out, report.batch_id).load()
    assert loaded[5]["suggestedActions"] == ["reply", "tag"]
    assert loaded[1]["cost"] == pytest.approx(3 * PRICE) and loaded[1]["inputTokens"] == 3
    again = FakeSubmitter()
    assert (await run(again, results=out)).skipped == 8 and again.jobs == []


async def test_empty_content_fails_without_being_sent(run: Run, tmp_path: Path) -> None:
    source = write_csv(tmp_path / "gaps.csv", ["hello", "  ", "world"])
    fake = FakeSubmitter()
    report = await run(fake, path=source)
    assert fake.contents == ["hello", "world"]
    records = jsonl(tmp_path / "chats.results.jsonl")
    assert records[1]["status"] == "failed" and records[1]["error"] == "empty content"
    assert records[1]["jobId"] is None
    assert (report.processed, report.failed) == (2, 1)


async def test_concurrency_bound_respected(run: Run) -> None:
    fake = FakeSubmitter(delay=0.05)
    await run(fake, concurrency=3)
    assert fake.most_in_flight == 3 and len(fake.jobs) == 8
    one = FakeSubmitter(delay=0.01)
    await run(one, concurrency=1, restart=True)
    assert one.most_in_flight == 1


async def test_a_row_without_answer_fails_after_the_timeout(run: Run, tmp_path: Path) -> None:
    report = await run(FakeSubmitter(hang_after=6), timeout=0.2)
    records = jsonl(tmp_path / "chats.results.jsonl")
    assert [r["error"] for r in records if r["status"] == "failed"] == ["no answer within 0.2s"] * 2
    assert (report.processed, report.failed) == (6, 2)


async def test_resume_after_cancel_sends_only_the_remaining_rows(run: Run, tmp_path: Path) -> None:
    results = tmp_path / "chats.results.jsonl"
    stuck = FakeSubmitter(hang_after=5)
    task = asyncio.create_task(run(stuck, concurrency=2))
    while stuck.answered < 5 or len(stuck.jobs) < 7:  # five answered, two hanging
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    done = jsonl(results)
    assert len(done) == 5 and all(r["status"] == "completed" for r in done)
    halfway = orjson.loads((tmp_path / "chats.report.json").read_bytes())
    assert (halfway["processed"], halfway["interrupted"]) == (5, True)

    rest = FakeSubmitter()
    report = await run(rest)
    finished = {r["row"] for r in done}
    assert sorted(j["messageId"] for j in rest.jobs) == sorted(
        f"m{n}" for n in range(1, 9) if n not in finished
    )
    # the unanswered rows go again with the ids they had (the worker's idempotency store
    # answers any it did answer without a second model call)
    resent = {j["id"] for j in rest.jobs}
    assert resent == {f"{report.batch_id}-{n}" for n in range(1, 9) if n not in finished}
    assert {j["id"] for j in stuck.jobs[5:]} <= resent
    assert (report.rows, report.processed, report.failed, report.skipped) == (8, 8, 0, 5)
    assert report.done_now == 3 and report.complete
    words = sum(len(m.split()) for m in MESSAGES)
    assert report.input_tokens == words and report.cost == pytest.approx(words * PRICE)
    assert [r["row"] for r in jsonl(results)] == list(range(1, 9))


def test_resume_after_keyboard_interrupt(run: Run, tmp_path: Path) -> None:
    """A KeyboardInterrupt raised inside the run (not only a cancel) keeps the answered rows."""
    fake = FakeSubmitter(raise_after=(4, KeyboardInterrupt()), delay=0.0)
    with pytest.raises(KeyboardInterrupt):
        asyncio.run(run(fake, concurrency=1))
    done = jsonl(tmp_path / "chats.results.jsonl")
    assert [r["row"] for r in done] == [1, 2, 3, 4]
    rest = FakeSubmitter()
    report = asyncio.run(run(rest))
    assert sorted(j["messageId"] for j in rest.jobs) == ["m5", "m6", "m7", "m8"]
    assert report.complete and report.skipped == 4


async def test_a_broker_failure_stops_the_run_keeping_what_is_done(
    run: Run, tmp_path: Path
) -> None:
    fake = FakeSubmitter(raise_after=(3, BrokerUnavailable("connection lost")), delay=0.0)
    with pytest.raises(BrokerUnavailable):
        await run(fake, concurrency=1)
    assert len(jsonl(tmp_path / "chats.results.jsonl")) == 3
    assert orjson.loads((tmp_path / "chats.report.json").read_bytes())["interrupted"] is True


async def test_a_torn_last_line_is_done_again(run: Run, tmp_path: Path) -> None:
    results = tmp_path / "chats.results.jsonl"
    first = await run(FakeSubmitter())
    lines = results.read_text().splitlines(keepends=True)
    results.write_text("".join(lines[:3]) + lines[3][:20])  # killed while writing row 4
    again = FakeSubmitter()
    report = await run(again)
    assert [j["id"] for j in again.jobs] == [f"{first.batch_id}-{n}" for n in range(4, 9)]
    assert report.complete and report.skipped == 3
    assert [r["row"] for r in jsonl(results)] == list(range(1, 9))


async def test_restart_sends_every_row_again(run: Run, tmp_path: Path) -> None:
    await run(FakeSubmitter())
    fake = FakeSubmitter()
    report = await run(fake, restart=True)
    assert len(fake.jobs) == 8 and report.skipped == 0 and report.complete
    assert [r["row"] for r in jsonl(tmp_path / "chats.results.jsonl")] == list(range(1, 9))


async def test_retry_failed(run: Run, tmp_path: Path) -> None:
    results = tmp_path / "chats.results.jsonl"
    await run(FakeSubmitter(fail={"ok", "bad bad bad"}))
    plain = FakeSubmitter()
    kept = await run(plain)  # failed rows stay failed without --retry-failed
    assert plain.jobs == [] and (kept.failed, kept.skipped) == (2, 8)

    retry = FakeSubmitter()
    report = await run(retry, retry_failed=True)
    assert sorted(retry.contents) == ["bad bad bad", "ok"]
    assert (report.processed, report.failed, report.skipped) == (8, 0, 6)
    records = jsonl(results)
    assert [r["row"] for r in records] == list(range(1, 9))  # one record per row
    assert all(r["status"] == "completed" for r in records)


async def test_a_changed_file_is_refused_unless_restarted(
    run: Run, source: Path, tmp_path: Path
) -> None:
    await run(FakeSubmitter())
    write_csv(source, [*MESSAGES, "one more"])
    fake = FakeSubmitter()
    with pytest.raises(ConfigError, match=r"another batch|not of this one"):
        await run(fake)
    assert fake.jobs == []
    with pytest.raises(ConfigError, match="not of this one"):
        await run(fake, job_type="chat_response")  # another type is another batch too
    report = await run(fake, restart=True)
    assert report.rows == 9 and report.complete and len(fake.jobs) == 9


async def test_usage_errors_come_before_anything_is_sent(run: Run, tmp_path: Path) -> None:
    fake = FakeSubmitter()
    with pytest.raises(ConfigError, match="no column 'Body'"):
        await run(fake, mapping="content=Body")
    with pytest.raises(ConfigError, match="--type"):
        await run(fake, job_type="summarize")
    with pytest.raises(ConfigError, match="different files"):
        await run(fake, results=tmp_path / "chats.csv")
    (tmp_path / "chats.results.jsonl").write_text("not json\n")
    with pytest.raises(ConfigError, match="not a results file"):
        await run(fake)
    assert fake.jobs == []
    assert not (tmp_path / "chats.report.json").exists()


# -- the command ---------------------------------------------------------------------------------


@pytest.fixture
def cli() -> typer.Typer:
    app = typer.Typer()
    app.command("batch")(batch)
    app.command("other")(lambda: None)  # keeps "batch" a subcommand, as in chatprocessor's app
    return app


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        ({}, ["--mapping", "content=Body"], "no column 'Body'"),
        ({}, ["--mapping", "content=Message", "--type", "poem"], "--type must be one of"),
        ({"TRANSPORT": "kafka"}, ["--mapping", "content=Message"], "TRANSPORT=kafka"),
        ({"TRANSPORT": "nope"}, ["--mapping", "content=Message"], "TRANSPORT"),
    ],
)
def test_command_usage_errors_exit_2(  # noqa: PLR0917 - pytest fixtures
    cli: typer.Typer,
    source: Path,
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    args: list[str],
    message: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(cli, ["batch", str(source), *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_command_refuses_a_missing_file(cli: typer.Typer, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["batch", str(tmp_path / "missing.csv"), "--mapping", "content=x"]
    )
    assert result.exit_code == 2


def test_command_exit_status_and_report(
    cli: typer.Typer, source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """0 when every row completed, 1 when some failed, 130 when interrupted (the broker is
    replaced by the fake submitter)."""
    from chatprocessor import cli_batch

    fake = FakeSubmitter(fail={"ok"})

    async def with_fake(settings: Any, direct: bool, work: Any) -> Any:
        return await work(fake)

    monkeypatch.setattr(cli_batch, "_with_submitter", with_fake)
    args = ["batch", str(source), "--mapping", MAPPING, "--tenant", "acme", "--concurrency", "1"]

    failed = CliRunner().invoke(cli, args)
    assert failed.exit_code == 1, failed.output
    output = " ".join(failed.output.split())
    assert "row 8 failed: over_budget: daily budget spent" in output
    assert "--retry-failed" in output and "processed │ 7" in output
    assert jsonl(tmp_path / "chats.results.jsonl")[0]["jobId"].endswith("-1")

    fake = FakeSubmitter()
    done = CliRunner().invoke(cli, [*args, "--retry-failed"])
    assert done.exit_code == 0, done.output
    assert [j["payload"]["content"] for j in fake.jobs] == ["ok"]

    fake = FakeSubmitter(raise_after=(3, KeyboardInterrupt()), delay=0.0)
    stopped = CliRunner().invoke(cli, [*args, "--restart"])
    assert stopped.exit_code == 130, stopped.output
    assert "interrupted: 3 of 8 rows done" in " ".join(stopped.output.split())
    assert len(jsonl(tmp_path / "chats.results.jsonl")) == 3


def test_a_torn_csv_record_is_done_again(tmp_path: Path) -> None:
    """A CSV record cut inside a quoted multi-line answer is dropped, not misread."""
    path = tmp_path / "results.csv"
    store = ResultsFile(path, "b")
    records = [result_record("b", n, f"b-{n}", response(job_for(n))) for n in (1, 2)]
    records[1]["content"] = "line one\nline two"
    store.rewrite(records)
    text = path.read_text()
    path.write_text(text[: text.index("line two")])  # killed inside row 2's answer
    assert list(store.load()) == [1]
    path.write_text(text + "garbage without a newline")
    assert list(store.load()) == [1, 2]
    path.write_text(text.replace("line one", '"broken"quote', 1))
    with pytest.raises(ConfigError, match="not a results file"):
        store.load()


def job_for(row: int) -> dict[str, Any]:
    return {
        "id": f"b-{row}",
        "tenantId": "t",
        "conversationId": "c",
        "messageId": f"m{row}",
        "type": "sentiment_analysis",
        "payload": {"content": "good"},
    }
