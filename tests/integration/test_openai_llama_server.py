"""OpenAIProvider against a real OpenAI-compatible server: llama_cpp.server with the bundled
Gemma 3 270M (offline). Proves the adapter speaks what real servers speak, not just the fake."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from chatprocessor.core.job import ChatMessage
from chatprocessor.providers.base import ChatRequest
from chatprocessor.providers.embedded import bundled_model_path
from chatprocessor.providers.openai import OpenAIProvider

pytestmark = [pytest.mark.embedded, pytest.mark.timeout(180)]

START_TIMEOUT = 90.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def wait_until_listing(process: subprocess.Popen[bytes], url: str, log_path: Path) -> str:
    """Poll GET /v1/models until it answers; return the first model's name."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            pytest.fail(f"llama_cpp.server exited {process.returncode}: {tail}")
        try:
            listing = httpx.get(f"{url}/models", timeout=2)
            if listing.status_code == 200:
                return str(listing.json()["data"][0]["id"])
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"llama_cpp.server did not answer on {url} in {START_TIMEOUT} s")


@contextlib.contextmanager
def llama_server(log_dir: Path, *options: str) -> Iterator[tuple[str, str]]:
    """``python -m llama_cpp.server`` with the bundled model and ``options`` on a free port;
    once /v1/models answers, yields its /v1 URL and the model name it lists."""
    port = free_port()
    # llama.cpp logs >100 KB while loading: a pipe nobody reads would block the server.
    log_path = log_dir / "server.log"
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(bundled_model_path())]
    command += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", "512", *options]
    url = f"http://127.0.0.1:{port}/v1"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield url, wait_until_listing(process, url, log_path)
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    # The GGUF carries no chat template; with the llama-2 fallback this base model
    # answers nothing at all.
    with llama_server(tmp_path_factory.mktemp("llama_server"), "--chat_format", "gemma") as s:
        yield s


@pytest.fixture
async def provider(server: tuple[str, str]) -> AsyncIterator[OpenAIProvider]:
    url, model = server
    p = OpenAIProvider(url, api_key="", model=model, timeout=60)
    yield p
    await p.close()


def question() -> ChatRequest:
    return ChatRequest(
        [ChatMessage("user", "What is the capital of France?")], temperature=0, max_tokens=8
    )


async def test_list_models_and_ping(provider: OpenAIProvider) -> None:
    assert await provider.list_models() == [provider.default_model]
    assert await provider.ping() is True


async def test_non_stream_answer(provider: OpenAIProvider) -> None:
    [chunk] = [c async for c in provider.chat(question())]
    assert chunk.done is True
    assert chunk.delta.strip()
    assert chunk.model == provider.default_model
    assert chunk.prompt_tokens is not None and chunk.prompt_tokens > 5
    assert chunk.completion_tokens is not None and 0 < chunk.completion_tokens <= 8


async def test_stream_answer(provider: OpenAIProvider) -> None:
    chunks = [c async for c in provider.chat(question(), stream=True)]
    *pieces, final = chunks
    assert "".join(c.delta for c in pieces).strip()
    assert 0 < len(pieces) <= 8  # one chunk per token: max_tokens reached the server
    assert not any(c.done for c in pieces)
    assert all(c.model == provider.default_model for c in chunks)
    assert final.done is True and final.delta == ""
    # llama_cpp.server (0.3.x) ignores stream_options.include_usage: the counts are then
    # unknown (None), never made up. A server that reports them must report them right.
    if final.completion_tokens is not None:
        assert 0 < final.completion_tokens <= 8
        assert final.prompt_tokens is not None and final.prompt_tokens > 5
