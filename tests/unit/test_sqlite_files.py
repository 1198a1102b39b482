"""The shared SQLite files: several openers of a fresh file at once all get WAL mode."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from chatprocessor.stores.sqlite import enable_wal


def open_together(path: Path, openers: int) -> tuple[list[str], list[BaseException]]:
    """``openers`` threads open the fresh file ``path`` at once and switch it to WAL."""
    start = threading.Barrier(openers)
    errors: list[BaseException] = []
    modes: list[str] = []

    def open_it() -> None:
        db = sqlite3.connect(path, timeout=5, isolation_level=None)
        try:
            db.execute("CREATE TABLE IF NOT EXISTS t (x)")  # a shared lock, then a write
            start.wait()
            enable_wal(db, 5)
            modes.append(db.execute("PRAGMA journal_mode").fetchone()[0])
        except BaseException as exc:
            errors.append(exc)
        finally:
            db.close()

    threads = [threading.Thread(target=open_it) for _ in range(openers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return modes, errors


def test_openers_of_a_fresh_file_at_once_all_switch_it_to_wal(tmp_path: Path) -> None:
    for attempt in range(20):  # the deadlock is a race: try it many times
        modes, errors = open_together(tmp_path / f"shared-{attempt}.sqlite3", 6)
        assert errors == []
        assert modes == ["wal"] * 6
