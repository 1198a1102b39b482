"""The job metrics database (DATABASE_URL): one schema on SQLite or Postgres, through
SQLAlchemy's asyncio engine, kept up to date by Alembic migrations shipped in the package.

SQLite in DATA_DIR is the default so one machine needs nothing else; Postgres is for
several machines and dashboards. Library errors leave this module as StoreUnavailable.
"""

from __future__ import annotations

import asyncio
import time
import weakref
import zlib
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from chatprocessor.core.errors import ConfigError, StoreUnavailable

#: The Alembic scripts, shipped as package data (no alembic.ini needed at run time).
MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
#: How long a SQLite writer waits for another process's lock (seconds).
SQLITE_BUSY_TIMEOUT = 30.0
#: Seconds to wait for a Postgres connection (asyncpg waits 60 by default), so an
#: unreachable server costs the metrics writer a short wait, not a minute per try.
POSTGRES_CONNECT_TIMEOUT = 10.0
#: Postgres advisory lock key held while migrating, so workers starting together upgrade once.
MIGRATION_LOCK_KEY = zlib.crc32(b"chatprocessor.migrations")

_DRIVERS = {
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
    "sqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
}
#: One migration at a time per event loop: alembic keeps its running context in module
#: globals, which two migrations interleaving on one loop would overwrite.
_MIGRATING: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)
#: What may go wrong talking to a database: the driver's errors reach us wrapped by
#: SQLAlchemy, except connection failures (OSError) raised while connecting.
DATABASE_ERRORS = (SQLAlchemyError, OSError)


def database_url(raw: str | None, data_dir: Path) -> str:
    """The async SQLAlchemy URL for DATABASE_URL (``postgresql://``, ``sqlite:///path``),
    or a SQLite file in ``data_dir`` when it is unset."""
    if not raw:
        return f"sqlite+aiosqlite:///{data_dir.expanduser() / 'chatprocessor.db'}"
    scheme, sep, rest = raw.partition("://")
    driver = _DRIVERS.get(scheme.lower()) if sep else None
    if driver is None:
        raise ConfigError(
            f"invalid configuration: DATABASE_URL: unsupported scheme {scheme!r} "
            "(expected postgresql://user@host/db or sqlite:///path/to/file.db)"
        )
    url = f"{driver}://{rest}"
    try:
        make_url(url)
    except ArgumentError as exc:  # its message repeats the URL, password included
        raise ConfigError("invalid configuration: DATABASE_URL: not a valid URL") from exc
    return url


def create_engine(url: str, *, connect_args: dict[str, Any] | None = None) -> AsyncEngine:
    """An engine for ``url`` (from :func:`database_url`).

    SQLite gets WAL (readers never wait for the writer), a busy timeout (several worker
    processes share the file) and foreign keys; every transaction starts with
    ``BEGIN IMMEDIATE`` so two writers queue on the lock instead of failing at once when
    a read transaction turns into a write. Postgres connections are pinged before use,
    as a server restart leaves dead ones in the pool, and time out after 10 s.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(parsed, connect_args or {})
    options = {"timeout": POSTGRES_CONNECT_TIMEOUT, **(connect_args or {})}
    return create_async_engine(url, pool_pre_ping=True, connect_args=options)


def _sqlite_engine(url: URL, connect_args: dict[str, Any]) -> AsyncEngine:
    if url.database and url.database != ":memory:" and not url.database.startswith("file:"):
        Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(url, connect_args=connect_args)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself, below
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT * 1000)}")
            cursor.execute("PRAGMA foreign_keys = ON")
            _enable_wal(cursor)
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _enable_wal(cursor: Any) -> None:
    """Switch to WAL, retrying while another process opening the fresh file holds it:
    that deadlock answers "locked" at once instead of waiting for the busy timeout."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.fetchall()
            return
        except Exception as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.05)  # only while two processes create the file together


def _alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str | None:
    """The newest migration shipped with this version of chatprocessor."""
    return ScriptDirectory.from_config(_alembic_config()).get_current_head()


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema to the newest revision (``alembic upgrade head``); idempotent.

    Workers starting together take turns: a Postgres advisory lock held for the
    transaction, or SQLite's write lock (``BEGIN IMMEDIATE``). Both databases run DDL
    in the transaction, so the next one in sees the finished schema and does nothing.
    Within a process, migrations also wait for each other (see ``_MIGRATING``).
    """
    loop = asyncio.get_running_loop()
    lock = _MIGRATING.setdefault(loop, asyncio.Lock())
    try:
        async with lock, engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                await connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
                )
            await connection.run_sync(_upgrade)
    except DATABASE_ERRORS as exc:
        raise StoreUnavailable(f"cannot migrate the job metrics database: {exc}") from exc


def _upgrade(connection: Connection) -> None:
    command.upgrade(_alembic_config(connection), "head")


async def current_revision(engine: AsyncEngine) -> str | None:
    """The revision the database is at; None before the first migration."""
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(
                lambda sync: MigrationContext.configure(sync).get_current_revision()
            )
    except DATABASE_ERRORS as exc:
        raise StoreUnavailable(f"cannot read the job metrics database: {exc}") from exc
