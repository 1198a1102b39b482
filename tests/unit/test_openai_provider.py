"""OpenAIProvider through the official client against FakeOllama's ``/v1``: answers, errors."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest
from aiohttp import web

from chatprocessor.core.errors import (
    BadRequest,
    ModelNotFound,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from chatprocessor.core.job import ChatMessage
from chatprocessor.providers import build_provider
from chatprocessor.providers.base import ChatRequest, Chunk
from chatprocessor.providers.openai import OpenAIProvider, retry_after
from chatprocessor.settings import Settings
from tests.fakes.ollama import FakeOllama, split_chunks

pytestmark = pytest.mark.timeout(30)

PROMPT = "What is the capital of France?"
ANSWER = f"Echo: {PROMPT}"


def request(
    model: str | None = None, temperature: float | None = None, max_tokens: int | None = None
) -> ChatRequest:
    return ChatRequest([ChatMessage("user", PROMPT)], model, temperature, max_tokens)


def make(url: str, **kwargs: float) -> OpenAIProvider:
    options: dict[str, float] = {"timeout": 5, "connect_timeout": 1, **kwargs}
    return OpenAIProvider(f"{url}/v1", api_key="", model="llama2", **options)


@pytest.fixture
async def provider(fake_ollama: FakeOllama) -> AsyncIterator[OpenAIProvider]:
    p = make(fake_ollama.url)
    yield p
    await p.close()


async def collect(provider: OpenAIProvider, req: ChatRequest, *, stream: bool) -> list[Chunk]:
    return [chunk async for chunk in provider.chat(req, stream=stream)]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# ------------------------------------------------------------------------- answers


async def test_non_stream_is_one_done_chunk_with_counts(
    provider: OpenAIProvider, fake_ollama: FakeOllama
) -> None:
    [chunk] = await collect(provider, request(temperature=0.5), stream=False)
    assert chunk.done is True
    assert chunk.delta == ANSWER
    assert chunk.model == "llama2"
    assert chunk.prompt_tokens == len(PROMPT.split())
    assert chunk.completion_tokens == len(split_chunks(ANSWER))
    [sent] = fake_ollama.requests
    assert (sent["method"], sent["path"]) == ("POST", "/v1/chat/completions")
    assert sent["body"]["model"] == "llama2"
    assert sent["body"]["messages"] == [{"role": "user", "content": PROMPT}]
    assert sent["body"]["temperature"] == 0.5
    assert "max_tokens" not in sent["body"]
    assert sent["body"].get("stream") in (None, False)


async def test_stream_yields_deltas_then_done_with_usage(
    provider: OpenAIProvider, fake_ollama: FakeOllama
) -> None:
    chunks = await collect(provider, request(), stream=True)
    assert [c.delta for c in chunks[:-1]] == split_chunks(ANSWER)
    assert not any(c.done for c in chunks[:-1])
    final = chunks[-1]
    assert final.done is True
    assert final.delta == ""
    assert final.model == "llama2"
    assert final.prompt_tokens == len(PROMPT.split())
    assert final.completion_tokens == len(split_chunks(ANSWER))
    body = fake_ollama.requests[-1]["body"]
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}


async def test_model_and_max_tokens_are_forwarded(fake_ollama: FakeOllama) -> None:
    fake_ollama.add_model("qwen2:0.5b")
    provider = make(fake_ollama.url)
    try:
        [chunk] = await collect(provider, request("qwen2:0.5b", max_tokens=2), stream=False)
        assert chunk.model == "qwen2:0.5b"
        assert chunk.delta == "Echo: What "
        assert chunk.completion_tokens == 2
        assert fake_ollama.requests[-1]["body"]["max_tokens"] == 2
        streamed = await collect(provider, request("qwen2:0.5b", max_tokens=1), stream=True)
        assert [c.delta for c in streamed] == ["Echo: ", ""]
        assert streamed[-1].completion_tokens == 1
    finally:
        await provider.close()


async def test_list_models_and_ping(provider: OpenAIProvider, fake_ollama: FakeOllama) -> None:
    assert await provider.list_models() == ["llama2:latest"]
    assert await provider.ping() is True
    assert [r["path"] for r in fake_ollama.requests] == ["/v1/models", "/v1/models"]
    down = make(f"http://127.0.0.1:{closed_port()}")
    try:
        assert await down.ping() is False
        with pytest.raises(ProviderUnavailable):
            await down.list_models()
    finally:
        await down.close()


async def test_build_provider_wires_the_settings(fake_ollama: FakeOllama) -> None:
    settings = Settings(
        providers=["openai"],
        openai_base_url=f"{fake_ollama.url}/v1",
        openai_model="llama2",
        openai_timeout=7,
        openai_connect_timeout=2,
    )
    provider = build_provider("openai", settings)
    try:
        assert isinstance(provider, OpenAIProvider)
        assert provider.name == "openai"
        assert provider.default_model == "llama2"
        [chunk] = await collect(provider, request(), stream=False)
        assert chunk.delta == ANSWER
    finally:
        await provider.close()


async def test_fake_v1_shares_the_ollama_pipeline() -> None:
    """Queueing and latency apply to /v1 as to /api; errors there have OpenAI's shape."""
    async with FakeOllama(max_concurrency=1, latency=0.2) as fake:
        provider = make(fake.url)
        try:
            start = time.perf_counter()
            answers = await asyncio.gather(
                collect(provider, request(), stream=False),
                collect(provider, request(), stream=True),
            )
            assert time.perf_counter() - start >= 0.35  # the second waited for the slot
            assert fake.max_in_flight == 1
            assert answers[0][0].delta == "".join(c.delta for c in answers[1]) == ANSWER
        finally:
            await provider.close()
        async with httpx.AsyncClient(base_url=fake.url) as http:
            r = await http.post("/v1/chat/completions", json={"model": "nope", "messages": []})
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "model_not_found"
        assert "nope" in r.json()["error"]["message"]


# -------------------------------------------------------------------------- errors


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_server_errors_are_unavailable(
    provider: OpenAIProvider, fake_ollama: FakeOllama, status: int
) -> None:
    fake_ollama.fail_next(1, status)
    with pytest.raises(ProviderUnavailable, match=f"HTTP {status}") as info:
        await collect(provider, request(), stream=False)
    assert info.value.transient is True
    assert info.value.__cause__ is not None


async def test_client_does_not_retry(provider: OpenAIProvider, fake_ollama: FakeOllama) -> None:
    fake_ollama.fail_next(3, 500)
    with pytest.raises(ProviderUnavailable):
        await collect(provider, request(), stream=False)
    assert len(fake_ollama.requests) == 1
    fake_ollama.fail_next(3, 429)
    with pytest.raises(RateLimited):
        await collect(provider, request(), stream=True)
    assert len(fake_ollama.requests) == 2


async def test_429_carries_retry_after_seconds() -> None:
    async with FakeOllama(retry_after=7) as fake:
        provider = make(fake.url)
        try:
            fake.fail_next(1, 429)
            with pytest.raises(RateLimited) as info:
                await collect(provider, request(), stream=False)
            assert info.value.retry_after == 7.0
            assert info.value.transient is True
        finally:
            await provider.close()


async def test_429_prefers_retry_after_ms(
    provider: OpenAIProvider, fake_ollama: FakeOllama
) -> None:
    fake_ollama.fail_next(1, 429, headers={"retry-after-ms": "1500", "Retry-After": "9"})
    with pytest.raises(RateLimited) as info:
        await collect(provider, request(), stream=True)
    assert info.value.retry_after == 1.5


async def test_429_without_header_has_no_retry_after(
    provider: OpenAIProvider, fake_ollama: FakeOllama
) -> None:
    fake_ollama.fail_next(1, 429)
    with pytest.raises(RateLimited) as info:
        await collect(provider, request(), stream=False)
    assert info.value.retry_after is None


def test_retry_after_parsing_rules() -> None:
    def parse(**headers: str) -> float | None:
        return retry_after(httpx.Headers({k.replace("_", "-"): v for k, v in headers.items()}))

    assert parse() is None
    assert parse(retry_after="3") == 3.0
    assert parse(retry_after="0.25") == 0.25
    assert parse(retry_after_ms="250") == 0.25
    assert parse(retry_after_ms="junk", retry_after="4") == 4.0  # bad ms: fall back
    assert parse(retry_after="soon") is None
    assert parse(retry_after="-1") is None
    assert parse(retry_after="nan") is None
    assert parse(retry_after="inf") is None
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    seconds = parse(retry_after=later)
    assert seconds is not None and 25 <= seconds <= 30
    earlier = format_datetime(datetime.now(UTC) - timedelta(hours=1), usegmt=True)
    assert parse(retry_after=earlier) == 0.0


async def test_unknown_model_is_model_not_found(provider: OpenAIProvider) -> None:
    for stream in (False, True):
        with pytest.raises(ModelNotFound, match="nope") as info:
            await collect(provider, request("nope"), stream=stream)
        assert info.value.transient is False


@pytest.mark.parametrize("status", [400, 401, 403, 422])
async def test_refusals_are_bad_request(
    provider: OpenAIProvider, fake_ollama: FakeOllama, status: int
) -> None:
    fake_ollama.fail_next(1, status, body="no you don't")
    with pytest.raises(BadRequest, match="no you don't") as info:
        await collect(provider, request(), stream=False)
    assert not isinstance(info.value, ModelNotFound)
    assert info.value.transient is False


async def test_connection_refused_is_unavailable() -> None:
    provider = make(f"http://127.0.0.1:{closed_port()}")
    try:
        start = time.perf_counter()
        for stream in (False, True):
            with pytest.raises(ProviderUnavailable, match="cannot reach"):
                await collect(provider, request(), stream=stream)
        assert time.perf_counter() - start < 3  # no retries, no back-off
    finally:
        await provider.close()


async def test_hung_server_is_a_timeout(fake_ollama: FakeOllama) -> None:
    provider = make(fake_ollama.url, timeout=0.3)
    try:
        for stream in (False, True):
            fake_ollama.hang_next(1)
            start = time.perf_counter()
            with pytest.raises(ProviderTimeout):
                await collect(provider, request(), stream=stream)
            assert time.perf_counter() - start < 3
        assert len(fake_ollama.requests) == 2
    finally:
        await provider.close()


async def test_stalled_stream_is_a_timeout() -> None:
    """A read timeout between SSE events surfaces from httpx, not the client: still mapped."""
    async with FakeOllama(token_delay=1.0) as fake:
        provider = make(fake.url, timeout=0.3)
        try:
            received: list[Chunk] = []
            with pytest.raises(ProviderTimeout):
                async for chunk in provider.chat(request(), stream=True):
                    received.append(chunk)
            assert [c.delta for c in received] == ["Echo: "]
        finally:
            await provider.close()


async def test_mid_stream_failure_is_unavailable(
    provider: OpenAIProvider, fake_ollama: FakeOllama
) -> None:
    fake_ollama.fail_mid_stream_next(1)
    received: list[Chunk] = []
    with pytest.raises(ProviderUnavailable, match="unexpected EOF"):
        async for chunk in provider.chat(request(), stream=True):
            received.append(chunk)
    assert 1 <= len(received) <= 2
    assert not any(c.done for c in received)
    chunks = await collect(provider, request(), stream=True)  # the next one is healthy
    assert chunks[-1].done is True


# --------------------------------------------- odd servers (a raw aiohttp stand-in)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def odd_server() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    """Serve one handler at /v1/chat/completions; returns the base URL."""
    runners: list[web.AppRunner] = []

    async def serve(handler: Handler) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield serve
    for runner in runners:
        await runner.cleanup()


def sse_handler(*events: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for data in events:
            await response.write(f"data: {data}\n\n".encode())
        await response.write_eof()
        return response

    return handler


def chunk_event(content: str | None, finish: str | None = None) -> str:
    delta = "{}" if content is None else f'{{"content": "{content}"}}'
    reason = "null" if finish is None else f'"{finish}"'
    return (
        '{"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", '
        f'"choices": [{{"index": 0, "delta": {delta}, "finish_reason": {reason}}}]}}'
    )


async def test_stream_without_usage_still_ends(
    odd_server: Callable[[Handler], Awaitable[str]],
) -> None:
    """A server that ignores stream_options: the answer is whole, the counts unknown."""
    url = await odd_server(
        sse_handler(chunk_event("Hi "), chunk_event("there"), chunk_event(None, "stop"), "[DONE]")
    )
    provider = make(url)
    try:
        chunks = await collect(provider, request(), stream=True)
    finally:
        await provider.close()
    assert [c.delta for c in chunks] == ["Hi ", "there", ""]
    assert chunks[-1].done is True
    assert chunks[-1].model == "m"
    assert (chunks[-1].prompt_tokens, chunks[-1].completion_tokens) == (None, None)


@pytest.mark.parametrize("tail", [[], ["[DONE]"]])
async def test_stream_cut_before_finish_reason_is_unavailable(
    odd_server: Callable[[Handler], Awaitable[str]], tail: list[str]
) -> None:
    url = await odd_server(sse_handler(chunk_event("Hi "), *tail))
    provider = make(url)
    try:
        with pytest.raises(ProviderUnavailable, match="finish_reason"):
            await collect(provider, request(), stream=True)
    finally:
        await provider.close()


@pytest.mark.parametrize(
    "choices", ["[]", '[{"index": 0, "message": {"role": "assistant", "content": null}}]']
)
async def test_no_choices_or_null_content_is_empty_text(
    odd_server: Callable[[Handler], Awaitable[str]], choices: str
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(
            text=f'{{"id": "c1", "object": "chat.completion", "created": 1, "model": "m", '
            f'"choices": {choices}}}',
            content_type="application/json",
        )

    provider = make(await odd_server(handler))
    try:
        [chunk] = await collect(provider, request(), stream=False)
    finally:
        await provider.close()
    assert (chunk.delta, chunk.done, chunk.model) == ("", True, "m")
    assert (chunk.prompt_tokens, chunk.completion_tokens) == (None, None)


async def test_html_error_page_is_unavailable(
    odd_server: Callable[[Handler], Awaitable[str]],
) -> None:
    """A proxy's 502 page is not JSON: still the project's error, not the client's."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=502, text="<html>Bad Gateway</html>", content_type="text/html")

    provider = make(await odd_server(handler))
    try:
        with pytest.raises(ProviderUnavailable, match="HTTP 502"):
            await collect(provider, request(), stream=False)
    finally:
        await provider.close()
