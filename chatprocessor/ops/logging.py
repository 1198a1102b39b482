"""Console and file logging in seed 000's format, tagged with the job's conversation.

    2025-12-16 10:30:00,123 - chatprocessor.core.worker - INFO - [ConversationId: 123] Pro...

The conversation comes from a context variable set per job, so every log line
written while a job runs carries it, including lines from libraries.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from collections.abc import Iterable
from typing import IO

TEXT_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(conversation)s%(message)s"

conversation_id_var: contextvars.ContextVar[int | str | None] = contextvars.ContextVar(
    "conversation_id", default=None
)


class ConversationFilter(logging.Filter):
    """Adds ``conversation`` (the ``[ConversationId: N] `` prefix) and ``conversation_id``."""

    def filter(self, record: logging.LogRecord) -> bool:
        conversation_id = conversation_id_var.get()
        record.conversation_id = conversation_id
        record.conversation = (
            f"[ConversationId: {conversation_id}] " if conversation_id is not None else ""
        )
        return True


class RedactFilter(logging.Filter):
    """Last line of defence: a secret that reaches a log message is masked."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s and len(s) >= 4]

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            if any(secret in message for secret in self.secrets):
                record.msg, record.args = self._mask(message), None
            # ConversationFilter's tag comes from the message body too: mask it the same way.
            for name in ("conversation", "conversation_id"):
                value = getattr(record, name, None)
                if value is not None and any(secret in str(value) for secret in self.secrets):
                    setattr(record, name, self._mask(str(value)))
        return True

    def _mask(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


def _json_formatter() -> logging.Formatter:
    from pythonjsonlogger.json import JsonFormatter

    formatter: logging.Formatter = JsonFormatter(
        "%(asctime)s %(name)s %(levelname)s %(message)s %(conversation_id)s",
        rename_fields={"asctime": "timestamp", "levelname": "level", "name": "logger"},
    )
    return formatter


class TeeHandler(logging.Handler):
    """Writes each record to stdout and the log file: filtered and formatted once for
    both (two handlers would run the filters and the formatter twice per line)."""

    terminator = "\n"

    def __init__(self, stream: IO[str], log_file: str = "") -> None:
        super().__init__()
        self.streams: list[IO[str]] = [stream]
        self._file: IO[str] | None = None
        if log_file:
            self._file = open(log_file, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
            self.streams.append(self._file)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
            for stream in self.streams:
                stream.write(line)
                stream.flush()
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        super().close()


def setup_logging(
    *, level: str = "INFO", log_file: str = "", fmt: str = "text", secrets: Iterable[str] = ()
) -> None:
    """Log to stdout and, when LOG_FILE is set, to that file too."""
    formatter = _json_formatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)
    handler = TeeHandler(sys.stdout, log_file)
    handler.setFormatter(formatter)
    handler.addFilter(ConversationFilter())
    handler.addFilter(RedactFilter(secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    # aiormq narrates every frame at DEBUG; keep it at WARNING unless asked for.
    for noisy in ("aiormq", "aio_pika", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.getLevelName(level), logging.WARNING))
