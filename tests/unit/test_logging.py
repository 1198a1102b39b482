"""setup_logging: seed 000's line format, the conversation tag, JSON lines and redaction."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatprocessor.ops.logging import RedactFilter, conversation_id_var, setup_logging

SEED_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} - \S+ - INFO - \[ConversationId: 42\] "
)
NOISY = ("aiormq", "aio_pika", "httpx", "httpcore")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """setup_logging replaces the root handlers: put everything back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    noisy = {name: logging.getLogger(name).level for name in NOISY}
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        if handler not in handlers:
            handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    for name, old in noisy.items():
        logging.getLogger(name).setLevel(old)


@pytest.fixture
def log_file(tmp_path: Path) -> Path:
    return tmp_path / "chatprocessor.log"


def emit_in_conversation(conversation_id: int | str, message: str, *args: object) -> None:
    token = conversation_id_var.set(conversation_id)
    try:
        logging.getLogger("chatprocessor.core.worker").info(message, *args)
    finally:
        conversation_id_var.reset(token)


def test_text_line_has_seed_format_on_stdout_and_in_file(
    log_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging(level="INFO", log_file=str(log_file), fmt="text")
    emit_in_conversation(42, "Processing message: %s", "What is the capital of France?")
    out_lines = capsys.readouterr().out.splitlines()
    file_lines = log_file.read_text("utf-8").splitlines()
    for lines in (out_lines, file_lines):
        [line] = [x for x in lines if "Processing message" in x]
        assert SEED_LINE.match(line), line
        assert " - chatprocessor.core.worker - " in line
        assert line.endswith(
            "[ConversationId: 42] Processing message: What is the capital of France?"
        )


def test_line_outside_a_job_has_no_conversation_tag(
    log_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging(level="INFO", log_file=str(log_file))
    logging.getLogger("chatprocessor.app").info("starting up")
    [line] = [x for x in capsys.readouterr().out.splitlines() if "starting up" in x]
    assert "ConversationId" not in line
    assert line.endswith(" - chatprocessor.app - INFO - starting up")


def test_string_conversation_ids_are_tagged(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(level="INFO")
    emit_in_conversation("3f2504e0-guid", "hello")
    assert "[ConversationId: 3f2504e0-guid] hello" in capsys.readouterr().out


def test_level_filters_lower_records(log_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(level="WARNING", log_file=str(log_file))
    log = logging.getLogger("chatprocessor.test")
    log.info("quiet info")
    log.warning("loud warning")
    out = capsys.readouterr().out
    assert "quiet info" not in out
    assert "loud warning" in out
    assert "quiet info" not in log_file.read_text("utf-8")


def test_no_log_file_means_stdout_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(level="INFO", log_file="")
    logging.getLogger("chatprocessor.test").info("only on stdout")
    assert "only on stdout" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
    assert len(logging.getLogger().handlers) == 1


def test_setup_twice_does_not_duplicate_lines(
    log_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging(level="INFO", log_file=str(log_file))
    setup_logging(level="INFO", log_file=str(log_file))
    logging.getLogger("chatprocessor.test").info("once")
    assert capsys.readouterr().out.count("once") == 1
    assert log_file.read_text("utf-8").count("once") == 1


def test_json_format_is_one_object_per_line(
    log_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging(level="INFO", log_file=str(log_file), fmt="json")
    emit_in_conversation(42, "answered in %d ms", 12)
    logging.getLogger("chatprocessor.app").warning("outside a job")
    for text in (capsys.readouterr().out, log_file.read_text("utf-8")):
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        assert len(records) == 2
        first, second = records
        assert first["level"] == "INFO"
        assert first["logger"] == "chatprocessor.core.worker"
        assert first["message"] == "answered in 12 ms"
        assert first["conversation_id"] == 42
        assert second["level"] == "WARNING"
        assert second["conversation_id"] is None


def test_password_in_a_message_is_masked(
    log_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging(level="INFO", log_file=str(log_file), secrets=["hunter2-secret"])
    logging.getLogger("chatprocessor.test").info(
        "connecting with amqp://bot:%s@mq:5672/", "hunter2-secret"
    )
    out = capsys.readouterr().out
    written = log_file.read_text("utf-8")
    for text in (out, written):
        assert "hunter2-secret" not in text
        assert "amqp://bot:***@mq:5672/" in text


def test_password_is_masked_in_json_too(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(level="INFO", fmt="json", secrets=["hunter2-secret"])
    logging.getLogger("chatprocessor.test").info("pw=hunter2-secret")
    [line] = capsys.readouterr().out.splitlines()
    assert json.loads(line)["message"] == "pw=***"


def test_redact_filter_directly() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "a %s b %s", ("s3cret!", 7), None)
    assert RedactFilter(["s3cret!", "", "ab"]).filter(record) is True
    assert record.getMessage() == "a *** b 7"


def test_redact_filter_leaves_other_messages_alone() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "n=%d", (5,), None)
    RedactFilter(["s3cret!"]).filter(record)
    assert record.msg == "n=%d"
    assert record.args == (5,)


def test_redact_filter_ignores_too_short_secrets() -> None:
    """Masking a 1-3 character secret would shred ordinary words."""
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "a cat sat", None, None)
    RedactFilter(["a", "at"]).filter(record)
    assert record.getMessage() == "a cat sat"


def test_noisy_libraries_stay_at_warning(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(level="DEBUG")
    for name in NOISY:
        assert logging.getLogger(name).getEffectiveLevel() == logging.WARNING
    logging.getLogger("aiormq.connection").debug("frame narration")
    logging.getLogger("chatprocessor.test").debug("our own debug")
    out = capsys.readouterr().out
    assert "frame narration" not in out
    assert "our own debug" in out
