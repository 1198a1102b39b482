"""Shared fixtures. Tests marked ``rabbitmq`` need the broker on 127.0.0.1:5672:
locally they skip when it is absent; in CI (CI=true) an absent broker fails them."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.fakes.ollama import FakeOllama

RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
IN_CI = os.environ.get("CI", "").lower() == "true"


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("rabbitmq") and not _reachable("127.0.0.1", 5672):
        message = "RabbitMQ is not running on 127.0.0.1:5672 (start it: rabbitmq-server -detached)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Settings come from the environment: keep the developer's out of tests."""
    for name in list(os.environ):
        if name.startswith(("RABBITMQ_", "OLLAMA_", "EMBEDDED_", "LOCAL_")) or name in {
            "TRANSPORT",
            "PROVIDERS",
            "DATA_DIR",
            "OPS_PORT",
            "OPS_HOST",
            "LOG_FILE",
            "LOG_FORMAT",
            "LOG_LEVEL",
            "PREFETCH_COUNT",
            "MAX_MESSAGE_BYTES",
            "GRACEFUL_TIMEOUT",
            "OUTPUT_NAMING",
            "SYSTEM_PROMPT",
            "BOT_USER_ID",
        }:
            monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env, logs land in tmp
    yield


@pytest.fixture
async def fake_ollama() -> AsyncIterator[FakeOllama]:
    async with FakeOllama(models=["llama2"]) as fake:
        yield fake


@pytest.fixture
def queue_names() -> tuple[str, str]:
    """Unique input/output queue names so tests never see each other's messages."""
    tag = uuid.uuid4().hex[:10]
    return f"test.{tag}.UserPromptReceived", f"test.{tag}.BotResponseCreated"


@pytest.fixture
async def amqp() -> AsyncIterator[object]:
    """A plain aio-pika connection, the way the chat platform talks to the broker."""
    import aio_pika

    connection = await aio_pika.connect(RABBITMQ_URL)
    try:
        yield connection
    finally:
        await connection.close()
