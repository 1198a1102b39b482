"""OllamaProvider against the fake Ollama server: answers, option mapping, error translation."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from chatprocessor.core.errors import (
    BadRequest,
    BrokerUnavailable,
    ChatProcessorError,
    ConfigError,
    MalformedMessage,
    MessageRejected,
    MessageTooLarge,
    ModelNotFound,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    PublishFailed,
    RateLimited,
    TransportError,
)
from chatprocessor.core.job import ChatMessage
from chatprocessor.providers.base import ChatRequest, Chunk
from chatprocessor.providers.ollama import OllamaProvider
from tests.fakes.ollama import FakeOllama

pytestmark = pytest.mark.timeout(30)

PROMPT = "What is the capital of France?"
ANSWER = f"Echo: {PROMPT}"


def request(
    model: str | None = None, temperature: float | None = None, max_tokens: int | None = None
) -> ChatRequest:
    return ChatRequest([ChatMessage("user", PROMPT)], model, temperature, max_tokens)


@pytest.fixture
async def provider(fake_ollama: FakeOllama) -> AsyncIterator[OllamaProvider]:
    p = OllamaProvider(fake_ollama.url, model="llama2", timeout=5, connect_timeout=1)
    yield p
    await p.close()


async def collect(provider: OllamaProvider, req: ChatRequest, *, stream: bool) -> list[Chunk]:
    return [chunk async for chunk in provider.chat(req, stream=stream)]


async def closed_url() -> str:
    fake = FakeOllama()
    await fake.start()
    url = fake.url
    await fake.stop()
    return url


# ------------------------------------------------------------------------- answers


async def test_non_stream_is_one_done_chunk_with_counts(
    provider: OllamaProvider, fake_ollama: FakeOllama
) -> None:
    [chunk] = await collect(provider, request(), stream=False)
    assert chunk.done is True
    assert chunk.delta == ANSWER
    assert chunk.model == "llama2"
    assert chunk.prompt_tokens == len(PROMPT.split())
    assert chunk.completion_tokens == len(ANSWER.split())
    sent = fake_ollama.requests[-1]
    assert sent["path"] == "/api/chat"
    assert sent["body"]["stream"] is False
    assert sent["body"]["model"] == "llama2"
    assert sent["body"]["messages"] == [{"role": "user", "content": PROMPT}]


async def test_stream_yields_pieces_and_a_final_done(
    provider: OllamaProvider, fake_ollama: FakeOllama
) -> None:
    chunks = await collect(provider, request(), stream=True)
    assert len(chunks) == len(ANSWER.split()) + 1
    assert "".join(c.delta for c in chunks) == ANSWER
    assert [c.done for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert all(c.prompt_tokens is None for c in chunks[:-1])
    assert chunks[-1].prompt_tokens == len(PROMPT.split())
    assert chunks[-1].completion_tokens == len(ANSWER.split())
    assert fake_ollama.requests[-1]["body"]["stream"] is True


async def test_system_message_is_sent_in_order(
    provider: OllamaProvider, fake_ollama: FakeOllama
) -> None:
    req = ChatRequest([ChatMessage("system", "Be brief."), ChatMessage("user", "hi")])
    [chunk] = await collect(provider, req, stream=False)
    assert chunk.delta == "Echo: hi"
    assert fake_ollama.requests[-1]["body"]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]


async def test_request_model_overrides_default(
    provider: OllamaProvider, fake_ollama: FakeOllama
) -> None:
    fake_ollama.add_model("mistral")
    [chunk] = await collect(provider, request(model="mistral"), stream=False)
    assert fake_ollama.requests[-1]["body"]["model"] == "mistral"
    assert chunk.model == "mistral"


async def test_temperature_and_max_tokens_map_to_ollama_options(
    provider: OllamaProvider, fake_ollama: FakeOllama
) -> None:
    [chunk] = await collect(provider, request(temperature=0.2, max_tokens=3), stream=False)
    assert fake_ollama.requests[-1]["body"]["options"] == {"temperature": 0.2, "num_predict": 3}
    assert chunk.completion_tokens == 3
    assert chunk.delta == "Echo: What is "


async def test_no_options_when_none_are_set(
    provider: OllamaProvider, fake_ollama: FakeOllama
) -> None:
    await collect(provider, request(), stream=False)
    options = fake_ollama.requests[-1]["body"].get("options") or {}
    assert "temperature" not in options
    assert "num_predict" not in options


# -------------------------------------------------------------------------- errors


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("status", "error"),
    [
        (500, ProviderUnavailable),
        (502, ProviderUnavailable),
        (503, ProviderUnavailable),
        (429, RateLimited),
        (400, BadRequest),
    ],
)
async def test_http_errors_are_translated(
    provider: OllamaProvider,
    fake_ollama: FakeOllama,
    status: int,
    error: type[ProviderError],
    stream: bool,
) -> None:
    fake_ollama.fail_next(1, status=status)
    with pytest.raises(error) as info:
        await collect(provider, request(), stream=stream)
    assert type(info.value) is error
    assert info.value.transient is (status != 400)
    # Only the one request failed: the next one is answered.
    [chunk] = await collect(provider, request(), stream=False)
    assert chunk.delta == ANSWER


async def test_server_error_message_is_kept(
    provider: OllamaProvider, fake_ollama: FakeOllama
) -> None:
    fake_ollama.fail_next(1, status=500, body="out of memory")
    with pytest.raises(ProviderUnavailable, match=r"HTTP 500.*out of memory"):
        await collect(provider, request(), stream=False)


@pytest.mark.parametrize("stream", [False, True])
async def test_unknown_model_is_model_not_found(provider: OllamaProvider, stream: bool) -> None:
    with pytest.raises(ModelNotFound) as info:
        await collect(provider, request(model="nonexistent"), stream=stream)
    assert "nonexistent" in str(info.value)
    assert isinstance(info.value, BadRequest)
    assert info.value.transient is False


async def test_mid_stream_error_fails_instead_of_a_short_answer(
    provider: OllamaProvider, fake_ollama: FakeOllama
) -> None:
    fake_ollama.fail_mid_stream_next(1)
    seen: list[Chunk] = []
    with pytest.raises(ProviderUnavailable) as info:
        async for chunk in provider.chat(request(), stream=True):
            seen.append(chunk)
    assert seen, "the fake sends a chunk or two before the error"
    assert not any(c.done for c in seen)
    assert "".join(c.delta for c in seen) != ANSWER
    assert "error during generation" in str(info.value)


async def test_hang_times_out(fake_ollama: FakeOllama) -> None:
    provider = OllamaProvider(fake_ollama.url, model="llama2", timeout=0.3, connect_timeout=1)
    fake_ollama.hang_next(1)
    started = time.monotonic()
    try:
        with pytest.raises(ProviderTimeout):
            await collect(provider, request(), stream=False)
    finally:
        await provider.close()
    assert time.monotonic() - started < 3


async def test_hang_times_out_in_stream(fake_ollama: FakeOllama) -> None:
    provider = OllamaProvider(fake_ollama.url, model="llama2", timeout=0.3, connect_timeout=1)
    fake_ollama.hang_next(1)
    try:
        with pytest.raises(ProviderTimeout):
            await collect(provider, request(), stream=True)
    finally:
        await provider.close()


async def test_closed_port_is_unavailable_quickly() -> None:
    provider = OllamaProvider(await closed_url(), model="llama2", timeout=60, connect_timeout=1)
    started = time.monotonic()
    try:
        with pytest.raises(ProviderUnavailable) as info:
            await collect(provider, request(), stream=False)
    finally:
        await provider.close()
    assert time.monotonic() - started < 5
    assert info.value.transient is True


async def test_list_models_and_ping(provider: OllamaProvider) -> None:
    assert await provider.list_models() == ["llama2:latest"]
    assert await provider.ping() is True


async def test_ping_false_and_list_models_raises_on_closed_port() -> None:
    provider = OllamaProvider(await closed_url(), model="llama2", timeout=5, connect_timeout=1)
    try:
        assert await provider.ping() is False
        with pytest.raises(ProviderUnavailable):
            await provider.list_models()
    finally:
        await provider.close()


# ------------------------------------------------------------------ error classes


@pytest.mark.parametrize(
    ("cls", "transient"),
    [
        (ChatProcessorError, False),
        (ConfigError, False),
        (MessageRejected, False),
        (MessageTooLarge, False),
        (MalformedMessage, False),
        (ProviderError, True),
        (ProviderUnavailable, True),
        (ProviderTimeout, True),
        (RateLimited, True),
        (BadRequest, False),
        (ModelNotFound, False),
        (TransportError, True),
        (BrokerUnavailable, True),
        (PublishFailed, True),
    ],
)
def test_transient_flags(cls: type[ChatProcessorError], transient: bool) -> None:
    instance = cls("x") if cls is not RateLimited else RateLimited("x", retry_after=2.0)
    assert instance.transient is transient
    assert isinstance(instance, ChatProcessorError)


def test_rate_limited_carries_retry_after() -> None:
    assert RateLimited("slow down", retry_after=1.5).retry_after == 1.5
    assert RateLimited("slow down").retry_after is None


# -- a server that is not Ollama (a proxy's error page) --------------------------------------


@pytest.fixture
async def html_server() -> AsyncIterator[str]:
    from aiohttp import web

    async def page(_: web.Request) -> web.Response:
        return web.Response(text="<html>502 Bad Gateway</html>", content_type="text/html")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", page)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("stream", [False, True])
async def test_non_json_answer_is_provider_unavailable(html_server: str, stream: bool) -> None:
    provider = OllamaProvider(html_server, model="llama2", timeout=5, connect_timeout=1)
    try:
        with pytest.raises(ProviderUnavailable):
            async for _ in provider.chat(ChatRequest([ChatMessage("user", "hi")]), stream=stream):
                pass
        assert await provider.ping() is False
    finally:
        await provider.close()
