"""Shared fixtures. Tests marked ``rabbitmq`` need the broker on 127.0.0.1:5672, tests
marked ``redis`` need Redis on 127.0.0.1:6379, tests marked ``postgres`` need PostgreSQL
on 127.0.0.1:5432 (database ``test``): locally they skip when the service is absent; in
CI (CI=true) an absent service fails them."""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from chatprocessor.settings import is_setting_variable
from tests.fakes.ollama import FakeOllama

RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
_SERVICES = {
    "rabbitmq": (5672, "RabbitMQ", "rabbitmq-server -detached"),
    "redis": (6379, "Redis", "redis-server --daemonize yes --port 6379 --save ''"),
    "postgres": (
        5432,
        "PostgreSQL",
        "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    ),
}
IN_CI = os.environ.get("CI", "").lower() == "true"


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker, (port, name, start) in _SERVICES.items():
        if item.get_closest_marker(marker) and not _reachable("127.0.0.1", port):
            message = f"{name} is not running on 127.0.0.1:{port} (start it: {start})"
            if IN_CI:
                pytest.fail(message)
            pytest.skip(message)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Settings come from the environment: keep the developer's out of tests."""
    for name in list(os.environ):
        if is_setting_variable(name):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env, logs land in tmp
    yield


@pytest.fixture
async def fake_ollama() -> AsyncIterator[FakeOllama]:
    async with FakeOllama(models=["llama2"]) as fake:
        yield fake


@pytest.fixture
async def queue_names(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, str]]:
    """Unique input/output queue names so tests never see each other's messages.

    On RabbitMQ the queues a worker derives from them (``.dlq``, ``.retry.<ms>ms``
    for the tiers tests use) are deleted afterwards too.
    """
    tag = uuid.uuid4().hex[:10]
    names = f"test.{tag}.UserPromptReceived", f"test.{tag}.BotResponseCreated"
    yield names
    if not request.node.get_closest_marker("rabbitmq") and "rabbitmq" not in request.node.name:
        return
    import aio_pika

    from chatprocessor.core.retry import tier_name

    derived = [f"{names[0]}.dlq", *(tier_name(names[0], t) for t in CLEANUP_TIERS)]
    with contextlib.suppress(Exception):
        connection = await aio_pika.connect(RABBITMQ_URL)
        async with connection:
            channel = await connection.channel()
            for name in (*names, *derived):
                await channel.queue_delete(name)


#: Delay-queue tiers used by tests (and the default of a bare RabbitMQTransport).
CLEANUP_TIERS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.6, 2.0)


@pytest.fixture
async def amqp() -> AsyncIterator[object]:
    """A plain aio-pika connection, the way the chat platform talks to the broker."""
    import aio_pika

    connection = await aio_pika.connect(RABBITMQ_URL)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def database() -> AsyncIterator[str]:
    """The URL of a fresh Postgres database (marker ``postgres``), dropped afterwards."""
    import asyncpg

    name = f"cp_test_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(POSTGRES_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def make_engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    """A factory of engines on one fresh database: a SQLite file, or a Postgres schema of this
    test whose sessions run in a time zone far from UTC (stored days must still be UTC days)."""
    from sqlalchemy.ext.asyncio import AsyncEngine

    from chatprocessor.stores.database import create_engine, database_url

    engines: list[AsyncEngine] = []
    schema = f"t_{uuid.uuid4().hex[:12]}"
    connect_args: dict[str, Any] = {}
    if request.param == "sqlite":
        url = database_url(f"sqlite:///{tmp_path / 'test.db'}", tmp_path)
    else:
        import asyncpg

        url = database_url(POSTGRES_URL, tmp_path)
        admin = await asyncpg.connect(POSTGRES_URL)
        await admin.execute(f"CREATE SCHEMA {schema}")
        connect_args = {"server_settings": {"search_path": schema, "TimeZone": "Asia/Tokyo"}}

    def factory() -> AsyncEngine:
        engines.append(create_engine(url, connect_args=connect_args))
        return engines[-1]

    factory.backend = request.param  # type: ignore[attr-defined]
    factory.schema = schema  # type: ignore[attr-defined]
    yield factory
    for engine in engines:
        await engine.dispose()
    if request.param == "postgres":
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()
