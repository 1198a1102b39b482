"""The ``chatprocessor`` command as a user runs it: real processes, real ports, real files."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import RABBITMQ_URL
from tests.fakes.ollama import FakeOllama

pytestmark = pytest.mark.timeout(90)

PROMPT = "What is the capital of France?"
MOCK_ANSWER = f"[mock] You said: {PROMPT}"
SEED_PROMPT = {
    "conversation_id": 123,
    "message": PROMPT,
    "user_id": 456,
    "timestamp": "2025-12-16T10:30:00Z",
}


def cli() -> list[str]:
    """The installed console script next to this interpreter, else ``python -m chatprocessor``."""
    script = Path(sys.executable).parent / "chatprocessor"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "chatprocessor"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The test's (already cleaned) environment plus the worker's settings."""
    env = dict(os.environ)
    env.update(
        DATA_DIR=str(tmp_path),
        PROVIDERS="mock",
        TRANSPORT="local",
        OPS_HOST="127.0.0.1",
        OPS_PORT=str(free_port()),
        LOG_FILE=str(tmp_path / "cp.log"),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def run_cli(
    *args: str, env: dict[str, str], cwd: Path, timeout: float = 40
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*cli(), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@dataclass
class Service:
    process: subprocess.Popen[bytes]
    env: dict[str, str]
    cwd: Path
    output: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.env['OPS_PORT']}"

    @property
    def log_file(self) -> Path:
        return Path(self.env["LOG_FILE"])

    def send(self, *args: str, timeout: float = 40) -> subprocess.CompletedProcess[str]:
        return run_cli("send", *args, env=self.env, cwd=self.cwd, timeout=timeout)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.base + path, timeout=5)

    def console(self) -> str:
        return self.output.read_text(errors="replace")


def wait_for_health(service: Service, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise AssertionError(
                f"run exited with {service.process.returncode}:\n{service.console()}"
            )
        with contextlib.suppress(httpx.HTTPError):
            if service.get("/health").status_code == 200:
                return
        time.sleep(0.1)
    raise AssertionError(f"/health never answered:\n{service.console()}")


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    """``chatprocessor run`` with the mock provider on the local queue, /health answering."""
    env = make_env(tmp_path)
    output = tmp_path / "run.out"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [*cli(), "run"], env=env, cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT
        )
    running = Service(process, env, tmp_path, output)
    try:
        wait_for_health(running)
        yield running
    finally:
        stop_process(process)


def replied_count(metrics: str) -> float:
    match = re.search(r'^chatprocessor_messages_total\{outcome="replied"\} (\S+)$', metrics, re.M)
    return float(match.group(1)) if match else 0.0


# -- run + send ---------------------------------------------------------------------------------


def test_send_json_gets_the_reply(service: Service) -> None:
    result = service.send(PROMPT, "--conversation-id", "5", "--json", "--timeout", "30")
    assert result.returncode == 0, result.stderr + service.console()
    reply = json.loads(result.stdout)
    assert reply["conversation_id"] == 5
    assert reply["model_used"] == "mock"
    assert reply["message"] == MOCK_ANSWER
    assert "error" not in reply
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", reply["timestamp"])


def test_send_prints_just_the_answer(service: Service) -> None:
    result = service.send(PROMPT, "--timeout", "30")
    assert result.returncode == 0, result.stderr
    assert result.stdout == MOCK_ANSWER + "\n"


def test_send_stream_prints_the_answer_text(service: Service) -> None:
    result = service.send(PROMPT, "--conversation-id", "6", "--stream", "--timeout", "30")
    assert result.returncode == 0, result.stderr + service.console()
    assert result.stdout.strip() == MOCK_ANSWER


def test_ready_metrics_and_log_file(service: Service) -> None:
    before = replied_count(service.get("/metrics").text)
    for _ in range(2):
        result = service.send(PROMPT, "--conversation-id", "5", "--timeout", "30")
        assert result.returncode == 0, result.stderr

    ready = service.get("/ready")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "checks": {"broker": True, "provider": True, "model": True},
    }
    assert service.get("/health").json() == {"status": "ok"}

    metrics = service.get("/metrics")
    assert metrics.status_code == 200
    assert replied_count(metrics.text) == before + 2

    log = service.log_file.read_text()
    assert "[ConversationId: 5]" in log
    assert "Response published" in log


def test_sigterm_stops_run_with_status_zero(service: Service) -> None:
    result = service.send(PROMPT, "--conversation-id", "8", "--timeout", "30")
    assert result.returncode == 0, result.stderr
    service.process.send_signal(signal.SIGTERM)
    started = time.monotonic()
    try:
        code = service.process.wait(10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"run did not stop within 10 s of SIGTERM:\n{service.console()}")
    assert code == 0, service.console()
    assert time.monotonic() - started < 5
    assert "chatprocessor stopped" in service.log_file.read_text()


def test_send_without_a_worker_times_out(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    started = time.monotonic()
    result = run_cli("send", PROMPT, "--timeout", "1", env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert "worker" in result.stderr
    assert "chatprocessor run" in result.stderr
    assert result.stdout == ""
    assert time.monotonic() - started < 20


# -- check --------------------------------------------------------------------------------------


def test_check_passes_with_mock_and_local(tmp_path: Path) -> None:
    result = run_cli("check", env=make_env(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not re.search(r"\bFAIL\b", result.stdout)
    assert "broker" in result.stdout and "provider" in result.stdout


def test_check_fails_when_ollama_is_unreachable(tmp_path: Path) -> None:
    env = make_env(tmp_path, PROVIDERS="ollama", OLLAMA_BASE_URL=f"http://127.0.0.1:{free_port()}")
    result = run_cli("check", env=env, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(r"FAIL\s+provider", result.stdout), result.stdout


def test_check_never_shows_the_rabbitmq_password(tmp_path: Path) -> None:
    secret = f"pw-{uuid.uuid4().hex}"
    result = run_cli("check", env=make_env(tmp_path, RABBITMQ_PASSWORD=secret), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert secret not in result.stdout + result.stderr
    assert "RABBITMQ_PASSWORD" in result.stdout  # the setting is listed, masked


def test_check_unreachable_broker_never_shows_the_password(tmp_path: Path) -> None:
    secret = f"pw-{uuid.uuid4().hex}"
    env = make_env(
        tmp_path,
        TRANSPORT="rabbitmq",
        RABBITMQ_HOST="127.0.0.1",
        RABBITMQ_PORT=str(free_port()),
        RABBITMQ_PASSWORD=secret,
    )
    result = run_cli("check", env=env, cwd=tmp_path, timeout=60)
    assert result.returncode == 1
    assert re.search(r"FAIL\s+broker", result.stdout), result.stdout
    assert secret not in result.stdout + result.stderr


def test_check_says_why_the_broker_failed(tmp_path: Path) -> None:
    env = make_env(
        tmp_path, TRANSPORT="rabbitmq", RABBITMQ_HOST="127.0.0.1", RABBITMQ_PORT=str(free_port())
    )
    result = run_cli("check", env=env, cwd=tmp_path, timeout=60)
    assert result.returncode == 1
    [line] = [line for line in result.stdout.splitlines() if "broker:" in line]
    assert line.split("rabbitmq:", 1)[1].strip(), line


@pytest.mark.rabbitmq
def test_check_wrong_rabbitmq_password_is_never_shown(tmp_path: Path) -> None:
    secret = f"pw-{uuid.uuid4().hex}"
    env = make_env(
        tmp_path, TRANSPORT="rabbitmq", RABBITMQ_HOST="127.0.0.1", RABBITMQ_PASSWORD=secret
    )
    result = run_cli("check", env=env, cwd=tmp_path, timeout=60)
    assert result.returncode == 1
    assert re.search(r"FAIL\s+broker", result.stdout), result.stdout
    assert secret not in result.stdout + result.stderr


# -- run on RabbitMQ with Ollama ------------------------------------------------------------------


@pytest.mark.rabbitmq
async def test_run_on_rabbitmq_answers_the_seed_prompt(
    tmp_path: Path, fake_ollama: FakeOllama, queue_names: tuple[str, str]
) -> None:
    import aio_pika

    input_queue, output_queue = queue_names
    env = make_env(
        tmp_path,
        TRANSPORT="rabbitmq",
        RABBITMQ_HOST="127.0.0.1",
        RABBITMQ_PORT="5672",
        RABBITMQ_QUEUE_INPUT=input_queue,
        RABBITMQ_QUEUE_OUTPUT=output_queue,
        PROVIDERS="ollama",
        OLLAMA_BASE_URL=fake_ollama.url,
    )
    connection = await aio_pika.connect(RABBITMQ_URL)
    output = tmp_path / "run.out"
    process: asyncio.subprocess.Process | None = None
    try:
        channel = await connection.channel()
        # Declared as the worker does, so the prompt cannot be published before a queue exists.
        await channel.declare_queue(input_queue, durable=True)
        replies = await channel.declare_queue(output_queue, durable=True)
        with output.open("wb") as sink:
            process = await asyncio.create_subprocess_exec(
                *cli(), "run", env=env, cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT
            )
        base = f"http://127.0.0.1:{env['OPS_PORT']}"
        async with httpx.AsyncClient(timeout=5) as http, asyncio.timeout(30):
            while True:
                assert process.returncode is None, output.read_text()
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(base + "/ready")).status_code == 200:
                        break
                await asyncio.sleep(0.1)

        await channel.default_exchange.publish(
            aio_pika.Message(
                json.dumps(SEED_PROMPT).encode(),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                content_type="application/json",
            ),
            routing_key=input_queue,
        )
        message: Any = None
        async with asyncio.timeout(20):
            while message is None:
                message = await replies.get(no_ack=True, fail=False)
                if message is None:
                    await asyncio.sleep(0.05)
        reply = json.loads(message.body)
        assert reply["conversation_id"] == 123
        assert reply["model_used"] == "llama2"
        assert reply["message"] == f"Echo: {PROMPT}"
        assert message.type == "BotResponseCreated"
        assert fake_ollama.requests[-1]["path"] == "/api/chat"

        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), 15)
        assert code == 0, output.read_text()
        assert "[ConversationId: 123]" in (tmp_path / "cp.log").read_text()
    finally:
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()
        with contextlib.suppress(Exception):
            cleanup = await connection.channel()
            for queue in queue_names:
                await cleanup.queue_delete(queue)
        await connection.close()


def test_dlq_list_replay_purge_on_the_local_queue(tmp_path: Path) -> None:
    """An operator inspects dead letters, replays one after fixing the cause, purges the rest."""
    from chatprocessor.transports.base import Outgoing
    from chatprocessor.transports.local import LocalTransport

    env = make_env(tmp_path)

    async def park() -> None:
        transport = LocalTransport(tmp_path / "queue.sqlite3")
        await transport.connect()
        try:
            for message_id, body in (("bad-1", b"{not json"), ("bad-2", b'{"conversation_id": 7}')):
                await transport.publish("UserPromptReceived", Outgoing(body, message_id=message_id))
            async for delivery in transport.consume("UserPromptReceived", prefetch=2):
                await delivery.dead_letter(f"broken {delivery.message_id}")
                if delivery.message_id == "bad-2":
                    break
        finally:
            await transport.close()

    asyncio.run(park())

    listed = run_cli("dlq", "list", "--json", env=env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [r["message_id"] for r in rows] == ["bad-1", "bad-2"]
    assert rows[0]["reason"] == "rejected" and rows[0]["error"] == "broken bad-1"
    assert rows[0]["body"] == "{not json"
    assert rows[0]["failed_at"].endswith("+00:00")

    table = run_cli("dlq", "list", env=env, cwd=tmp_path)
    assert table.returncode == 0 and "bad-2" in table.stdout and "rejected" in table.stdout

    replayed = run_cli("dlq", "replay", "--message-id", "bad-2", env=env, cwd=tmp_path)
    assert replayed.returncode == 0 and "replayed 1 dead letter" in replayed.stdout

    async def back_on_the_queue() -> tuple[bytes, dict[str, Any]]:
        transport = LocalTransport(tmp_path / "queue.sqlite3")
        await transport.connect()
        try:
            async for delivery in transport.consume("UserPromptReceived", prefetch=1):
                await delivery.ack()
                return delivery.body, delivery.headers
        finally:
            await transport.close()
        raise AssertionError("unreachable")

    body, headers = asyncio.run(back_on_the_queue())
    assert body == b'{"conversation_id": 7}'
    assert "x-dead-letter-reason" not in headers and "x-attempt" not in headers

    refused = subprocess.run(
        [*cli(), "dlq", "purge"],
        env=env,
        cwd=tmp_path,
        input="n\n",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert refused.returncode != 0 and "Delete every dead letter" in refused.stdout
    purged = run_cli("dlq", "purge", "--yes", env=env, cwd=tmp_path)
    assert purged.returncode == 0 and "purged 1 dead letter" in purged.stdout
    empty = run_cli("dlq", "list", "--json", env=env, cwd=tmp_path)
    assert empty.returncode == 0 and empty.stdout.strip() == ""
