"""Opening the SQLite files several worker processes share (queue, replies, rate limits)."""

from __future__ import annotations

import sqlite3
import time

#: Between retries of a setup step that found the file locked by another process.
_RETRY_PAUSE = 0.05


def enable_wal(db: sqlite3.Connection, timeout: float) -> None:
    """``PRAGMA journal_mode=WAL``, waiting up to ``timeout`` for other processes.

    Two processes opening a fresh file at once can each hold a shared lock while asking
    for the exclusive one the switch needs; SQLite answers "database is locked" at once
    then (a deadlock, which skips the busy timeout), so the switch is tried again here.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL").fetchall()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(_RETRY_PAUSE)
