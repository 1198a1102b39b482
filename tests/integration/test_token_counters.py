"""The providers' token counters: the embedded model's tokenizer, llama_cpp.server's route."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from chatprocessor.core.job import ChatMessage
from chatprocessor.features.context import CachedCounter, fit
from chatprocessor.providers.embedded import EmbeddedProvider
from chatprocessor.providers.openai import OpenAIProvider
from tests.integration.test_openai_llama_server import llama_server

SENTENCE = "The capital of France is Paris, a city on the Seine."


class TokenizeServer:
    """A server with llama_cpp.server's count route (or, ``refuse``, without it)."""

    def __init__(self, *, refuse: bool = False) -> None:
        self.refuse = refuse
        self.inputs: list[str] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _count(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.inputs.append(body["input"])
        if self.refuse:
            return web.json_response({"detail": "Not Found"}, status=404)
        return web.json_response({"count": len(body["input"].split()) + 1})  # + BOS

    async def __aenter__(self) -> TokenizeServer:
        app = web.Application()
        app.router.add_post("/extras/tokenize/count", self._count)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


async def test_openai_counter_minus_the_servers_bos() -> None:
    async with TokenizeServer() as server:
        provider = OpenAIProvider(server.url, api_key="", model="m")
        counter = await provider.token_counter()
        assert counter is not None and counter.exact is True
        assert await counter.count(["one two three", "", "four"]) == [3, 0, 1]
        assert server.inputs == ["", "one two three", "four"]  # "" once: the calibration
        assert await provider.token_counter() is counter  # probed once per model
        await provider.close()


async def test_openai_counter_absent_on_servers_without_the_route() -> None:
    async with TokenizeServer(refuse=True) as server:
        provider = OpenAIProvider(server.url, api_key="", model="m")
        assert await provider.token_counter() is None
        assert await provider.token_counter("other") is None
        assert len(server.inputs) == 1  # a refusal is remembered
        await provider.close()


async def test_openai_counter_absent_while_unreachable() -> None:
    provider = OpenAIProvider("http://127.0.0.1:1/v1", api_key="", model="m")
    assert await provider.token_counter() is None
    await provider.close()


async def test_embedded_counter_absent_when_the_model_cannot_load(tmp_path: Path) -> None:
    provider = EmbeddedProvider(model_path=tmp_path / "missing.gguf")
    assert await provider.token_counter() is None
    assert await provider.token_counter("llama2") is None
    await provider.close()


@pytest.fixture(scope="module")
def embedded() -> Iterator[EmbeddedProvider]:
    yield EmbeddedProvider()


@pytest.mark.embedded
@pytest.mark.timeout(120)
async def test_embedded_counter_uses_the_models_tokenizer(embedded: EmbeddedProvider) -> None:
    counter = await embedded.token_counter()
    assert counter is not None and counter.exact is True
    sentence, hello, hello10, empty = await counter.count([SENTENCE, "hello", "hello " * 10, ""])
    assert 5 < sentence < len(SENTENCE)
    assert hello == 1  # a common word is one token, and no BOS is added
    assert hello10 > hello
    assert empty == 0
    fitted = await fit(
        system=None,
        history=[],
        new=ChatMessage("user", SENTENCE),
        budget=100,
        counter=CachedCounter(counter),
    )
    assert fitted.exact is True and fitted.prompt_tokens > sentence


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    with llama_server(tmp_path_factory.mktemp("llama_server")) as s:
        yield s


@pytest.fixture
async def provider(server: tuple[str, str]) -> AsyncIterator[OpenAIProvider]:
    url, model = server
    p = OpenAIProvider(url, api_key="", model=model, timeout=60)
    yield p
    await p.close()


@pytest.mark.embedded
@pytest.mark.timeout(180)
async def test_llama_server_counts_as_the_embedded_tokenizer(
    provider: OpenAIProvider, embedded: EmbeddedProvider
) -> None:
    """Same model, same tokenizer: the server's counts (its BOS taken off) match ours."""
    remote = await provider.token_counter()
    local = await embedded.token_counter()
    assert remote is not None and local is not None
    texts = [SENTENCE, "hello " * 10, "<start_of_turn>user", "Grüße aus Köln 日本語"]
    counts = await remote.count(texts)
    assert counts == await local.count(texts)
    assert all(n > 0 for n in counts)
