"""OllamaProvider against the fake Ollama server: answers, option mapping, error translation."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

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
from chatprocessor.providers.ollama import PULL_LOG_STEPS, OllamaProvider, _PullProgress
from tests.fakes.ollama import PULL_NOT_FOUND, FakeOllama

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


# -- Retry-After of a 429 ------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("header", "seconds"), [(7, 7.0), (1.5, 1.5), (0, 0.0)])
async def test_429_carries_retry_after_seconds(stream: bool, header: float, seconds: float) -> None:
    async with FakeOllama(models=["llama2"], retry_after=header) as fake:
        provider = OllamaProvider(fake.url, model="llama2", timeout=5, connect_timeout=1)
        try:
            fake.fail_next(1, status=429)
            with pytest.raises(RateLimited) as info:
                await collect(provider, request(), stream=stream)
            assert info.value.retry_after == seconds
        finally:
            await provider.close()


async def test_429_without_retry_after_is_none_even_after_one_with_it() -> None:
    async with FakeOllama(models=["llama2"], retry_after=9) as fake:
        provider = OllamaProvider(fake.url, model="llama2", timeout=5, connect_timeout=1)
        try:
            fake.fail_next(1, status=429)
            with pytest.raises(RateLimited) as first:
                await collect(provider, request(), stream=False)
            assert first.value.retry_after == 9.0
            fake.retry_after = None
            fake.fail_next(1, status=429)
            with pytest.raises(RateLimited) as second:
                await collect(provider, request(), stream=True)
            assert second.value.retry_after is None, "no stale value from the earlier 429"
        finally:
            await provider.close()


def _http_date(offset: float) -> str:
    from datetime import UTC, datetime, timedelta
    from email.utils import format_datetime

    return format_datetime(datetime.now(UTC) + timedelta(seconds=offset), usegmt=True)


@pytest.fixture
async def throttling_server() -> AsyncIterator[str]:
    """Answers every chat with 429 and the Retry-After named by the model (``ra=<value>``).
    With ``slowbody`` in the model name the headers come at once and the body 0.3 s later,
    so another request's 429 can arrive between this one's headers and its error."""
    import asyncio

    from aiohttp import web

    async def chat(request: web.Request) -> web.StreamResponse:
        model = str((await request.json())["model"])
        value = model.split("ra=", 1)[1] if "ra=" in model else None
        headers = {"Retry-After": value} if value is not None else {}
        if "slowbody" not in model:
            return web.json_response({"error": "too many requests"}, status=429, headers=headers)
        body = b'{"error": "too many requests"}'
        response = web.StreamResponse(
            status=429, headers={**headers, "Content-Type": "application/json"}
        )
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[:5])
        await asyncio.sleep(0.3)
        await response.write(body[5:])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/api/chat", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("seconds", "date_offset", "bounds"),
    [
        ("120", None, (120.0, 120.0)),
        (None, 60.0, (57.0, 60.0)),  # an HTTP-date (whole seconds): seconds from now
        (None, -3600.0, (0.0, 0.0)),  # a date gone by: no need to wait
    ],
    ids=["seconds", "http-date", "past-http-date"],
)
async def test_retry_after_seconds_or_http_date(
    throttling_server: str,
    seconds: str | None,
    date_offset: float | None,
    bounds: tuple[float, float],
    stream: bool,
) -> None:
    value = seconds if date_offset is None else _http_date(date_offset)
    provider = OllamaProvider(throttling_server, model="m", timeout=5, connect_timeout=1)
    try:
        with pytest.raises(RateLimited) as info:
            await collect(provider, request(model=f"m ra={value}"), stream=stream)
    finally:
        await provider.close()
    assert info.value.retry_after is not None
    assert bounds[0] <= info.value.retry_after <= bounds[1]


@pytest.mark.parametrize("model", ["m ra=soon", "m ra=-5", "m ra=nan", "m ra=inf", "m ra=", "m"])
async def test_garbage_or_absent_retry_after_is_none(throttling_server: str, model: str) -> None:
    provider = OllamaProvider(throttling_server, model="m", timeout=5, connect_timeout=1)
    try:
        with pytest.raises(RateLimited) as info:
            await collect(provider, request(model=model), stream=False)
    finally:
        await provider.close()
    assert info.value.retry_after is None


async def test_concurrent_429s_each_keep_their_own_retry_after(throttling_server: str) -> None:
    """The header travels in a context variable: one task never sees another's value."""
    import asyncio

    provider = OllamaProvider(throttling_server, model="m", timeout=5, connect_timeout=1)

    async def retry_after(model: str, stream: bool) -> float | None:
        try:
            await collect(provider, request(model=model), stream=stream)
        except RateLimited as exc:
            return exc.retry_after
        raise AssertionError("expected a 429")

    async def later(model: str, stream: bool) -> float | None:
        await asyncio.sleep(0.1)  # once the slow bodies' headers have arrived
        return await retry_after(model, stream)

    try:
        # With one shared variable the slow ones would read the fast one's value.
        results = await asyncio.gather(
            retry_after("slowbody ra=30", False),
            retry_after("slowbody ra=40", True),
            retry_after("slowbody", True),
            later("fast ra=5", False),
        )
    finally:
        await provider.close()
    assert list(results) == [30.0, 40.0, None, 5.0]


# -- images and structured output ------------------------------------------------------------

# A real 1x1 PNG, plus arbitrary bytes whose base64 uses "+", "/" and padding.
PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6"
    "kgAAAABJRU5ErkJggg=="
)
BLOB = bytes(range(256)) * 40 + b"\xfb\xff"
BLOB_B64 = base64.b64encode(BLOB).decode()


@pytest.mark.parametrize("stream", [False, True])
async def test_images_arrive_intact(
    provider: OllamaProvider, fake_ollama: FakeOllama, stream: bool
) -> None:
    req = ChatRequest(
        [
            ChatMessage("system", "Describe images."),
            ChatMessage("user", "What is in these?", images=(PNG_B64, BLOB_B64)),
        ]
    )
    chunks = await collect(provider, req, stream=stream)
    assert "".join(c.delta for c in chunks) == "Echo: What is in these?"
    assert fake_ollama.images == [PNG_B64, BLOB_B64]
    assert base64.b64decode(fake_ollama.images[1]) == BLOB
    assert fake_ollama.requests[-1]["body"]["messages"] == [
        {"role": "system", "content": "Describe images."},  # no "images" key without images
        {"role": "user", "content": "What is in these?", "images": [PNG_B64, BLOB_B64]},
    ]


async def test_images_of_several_turns_stay_with_their_message(
    provider: OllamaProvider, fake_ollama: FakeOllama
) -> None:
    req = ChatRequest(
        [
            ChatMessage("user", "first", images=(PNG_B64,)),
            ChatMessage("assistant", "a pixel"),
            ChatMessage("user", "second", images=(BLOB_B64,)),
        ]
    )
    await collect(provider, req, stream=False)
    sent = fake_ollama.requests[-1]["body"]["messages"]
    assert [m.get("images") for m in sent] == [[PNG_B64], None, [BLOB_B64]]


SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"capital": {"type": "string"}, "country": {"type": "string"}},
    "required": ["capital", "country"],
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("fmt", ["json", SCHEMA], ids=["json", "schema"])
async def test_format_is_passed_through_and_the_json_answer_comes_back(
    provider: OllamaProvider, fake_ollama: FakeOllama, fmt: str | dict[str, Any], stream: bool
) -> None:
    fake_ollama.json_answer = {"capital": "Paris", "country": "France"}
    req = ChatRequest([ChatMessage("user", PROMPT)], format=fmt)
    chunks = await collect(provider, req, stream=stream)
    assert json.loads("".join(c.delta for c in chunks)) == {"capital": "Paris", "country": "France"}
    assert chunks[-1].done is True
    assert fake_ollama.requests[-1]["body"]["format"] == fmt


async def test_no_format_key_without_format(
    provider: OllamaProvider, fake_ollama: FakeOllama
) -> None:
    await collect(provider, request(), stream=False)
    assert "format" not in fake_ollama.requests[-1]["body"]


# -- has_model ---------------------------------------------------------------------------------


async def test_has_model_normalises_latest(
    provider: OllamaProvider, fake_ollama: FakeOllama
) -> None:
    assert await provider.has_model() is True  # the configured "llama2"
    assert await provider.has_model("llama2") is True
    assert await provider.has_model("llama2:latest") is True
    assert await provider.has_model("llama2:7b") is False
    assert await provider.has_model("mistral") is False
    fake_ollama.add_model("mistral:7b")
    assert await provider.has_model("mistral:7b") is True
    assert await provider.has_model("mistral") is False, "mistral is mistral:latest"


async def test_has_model_default_is_the_configured_model(fake_ollama: FakeOllama) -> None:
    provider = OllamaProvider(fake_ollama.url, model="llava:latest", timeout=5, connect_timeout=1)
    try:
        assert await provider.has_model() is False
        fake_ollama.add_model("llava")
        assert await provider.has_model() is True
    finally:
        await provider.close()


async def test_has_model_raises_when_ollama_is_unreachable() -> None:
    provider = OllamaProvider(await closed_url(), model="llama2", timeout=5, connect_timeout=1)
    try:
        with pytest.raises(ProviderUnavailable):
            await provider.has_model()
    finally:
        await provider.close()


# -- pull_model --------------------------------------------------------------------------------

LOGGER = "chatprocessor.providers.ollama"


def pull_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.INFO
    ]


async def test_pull_model_adds_the_model_and_logs_progress(
    provider: OllamaProvider, fake_ollama: FakeOllama, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    fake_ollama.pullable = {"llava:latest"}
    assert await provider.has_model("llava") is False
    await provider.pull_model("llava")
    assert await provider.has_model("llava") is True
    assert fake_ollama.requests[-2]["path"] == "/api/pull"
    assert fake_ollama.requests[-2]["body"]["model"] == "llava"

    logs = pull_logs(caplog)
    assert all(line.startswith("ollama: pulling llava: ") for line in logs)
    for status in ["pulling manifest", "verifying sha256 digest", "writing manifest", "success"]:
        assert f"ollama: pulling llava: {status}" in logs
    # The weights come in 5 % steps (21 lines); the log keeps one per 10 %.
    weights = [line for line in logs if "GB" in line]
    percents = [int(m.group(1)) for line in weights if (m := re.search(r" (\d+)% of", line))]
    assert percents == list(range(0, 101, 10))
    assert weights[-1].endswith("100% of 3.8 GB")
    # Small layers: their first line (0 %) and their last (100 %).
    assert len(logs) == 4 + len(percents) + 3 * 2


async def test_pull_model_defaults_to_the_configured_model(fake_ollama: FakeOllama) -> None:
    provider = OllamaProvider(fake_ollama.url, model="phi3", timeout=5, connect_timeout=1)
    try:
        await provider.pull_model()
        assert fake_ollama.has_model("phi3:latest")
        assert await provider.has_model() is True
    finally:
        await provider.close()


async def test_pull_of_an_unknown_model_is_model_not_found(
    provider: OllamaProvider, fake_ollama: FakeOllama
) -> None:
    fake_ollama.pullable = {"llava:latest"}
    with pytest.raises(ModelNotFound) as info:
        await provider.pull_model("nosuchmodel")
    assert PULL_NOT_FOUND in str(info.value)
    assert "nosuchmodel" in str(info.value)
    assert info.value.transient is False
    assert await provider.has_model("nosuchmodel") is False


async def test_pull_against_a_closed_port_is_unavailable_quickly() -> None:
    provider = OllamaProvider(await closed_url(), model="llama2", timeout=60, connect_timeout=1)
    started = time.monotonic()
    try:
        with pytest.raises(ProviderUnavailable) as info:
            await provider.pull_model()
    finally:
        await provider.close()
    assert time.monotonic() - started < 5
    assert info.value.transient is True


async def test_pull_waits_the_read_timeout_per_line_not_in_total(fake_ollama: FakeOllama) -> None:
    """A pull lasting longer than the timeout succeeds while each line comes in time."""
    provider = OllamaProvider(fake_ollama.url, model="llava", timeout=0.5, connect_timeout=1)
    fake_ollama.pull_delay = 0.03  # ~30 lines: about 1 s in all
    started = time.monotonic()
    try:
        await provider.pull_model()
    finally:
        await provider.close()
    assert time.monotonic() - started > 0.5
    assert fake_ollama.has_model("llava")


async def test_pull_line_slower_than_the_timeout_is_provider_timeout(
    fake_ollama: FakeOllama,
) -> None:
    provider = OllamaProvider(fake_ollama.url, model="llava", timeout=0.3, connect_timeout=1)
    fake_ollama.pull_delay = 2.0
    started = time.monotonic()
    try:
        with pytest.raises(ProviderTimeout):
            await provider.pull_model()
    finally:
        await provider.close()
    assert time.monotonic() - started < 1.5
    assert not fake_ollama.has_model("llava")


@pytest.fixture
async def pull_server() -> AsyncIterator[str]:
    """``/api/pull`` answers what the model name asks: ``http=<status>``, or ``cut`` (a
    stream that ends without "success")."""
    from aiohttp import web

    async def pull(request: web.Request) -> web.StreamResponse:
        model = str((await request.json())["model"])
        if model.startswith("http="):
            status = int(model.removeprefix("http=").split(":", 1)[0])
            return web.json_response({"error": f"refused {status}"}, status=status)
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        await response.write(b'{"status":"pulling manifest"}\n')
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/api/pull", pull)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, ModelNotFound),
        (404, ModelNotFound),
        (429, RateLimited),
        (500, ProviderUnavailable),
        (503, ProviderUnavailable),
    ],
)
async def test_pull_http_errors_are_translated(
    pull_server: str, status: int, error: type[ProviderError]
) -> None:
    provider = OllamaProvider(pull_server, model="m", timeout=5, connect_timeout=1)
    try:
        with pytest.raises(error) as info:
            await provider.pull_model(f"http={status}")
    finally:
        await provider.close()
    assert type(info.value) is error
    assert f"refused {status}" in str(info.value)


async def test_pull_that_ends_before_success_is_unavailable(pull_server: str) -> None:
    provider = OllamaProvider(pull_server, model="m", timeout=5, connect_timeout=1)
    try:
        with pytest.raises(ProviderUnavailable, match="ended before success"):
            await provider.pull_model("cut")
    finally:
        await provider.close()


def test_pull_progress_of_interleaved_layers_is_throttled_per_layer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Should Ollama report two layers at once, each still logs once per step."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    progress = _PullProgress("m")
    total = 1_000
    for done in range(0, total + 1, 10):  # 1 % steps, alternating layers
        progress.update("pulling aaa", "sha256:aaa", done, total)
        progress.update("pulling bbb", "sha256:bbb", done, total)
    progress.update("success", None, None, None)
    logs = pull_logs(caplog)
    assert len(logs) == 2 * (PULL_LOG_STEPS + 1) + 1
    assert progress.succeeded is True


async def test_pull_does_not_disturb_concurrent_chats(
    provider: OllamaProvider, fake_ollama: FakeOllama
) -> None:
    fake_ollama.pull_delay = 0.01
    pulled, [chunk] = await asyncio.gather(
        provider.pull_model("llava"), collect(provider, request(), stream=False)
    )
    assert pulled is None
    assert chunk.delta == ANSWER
