"""Embeddings on every provider: Ollama's /api/embed and the OpenAI API against the fake
Ollama, the mock's made-up vectors, the router's fallback and breakers, the real embedded
model (marked ``embedded``), and the vector checks every answer goes through."""

from __future__ import annotations

import asyncio
import itertools
import math
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from chatprocessor.core.errors import (
    BadRequest,
    CircuitOpen,
    ModelNotFound,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from chatprocessor.core.job import ChatMessage
from chatprocessor.providers.base import (
    ChatRequest,
    Chunk,
    Embeddings,
    as_vectors,
    mean_pool,
    unit,
)
from chatprocessor.providers.mock import MOCK_DIMENSIONS, MockProvider, mock_vector
from chatprocessor.providers.ollama import OllamaProvider
from chatprocessor.providers.openai import OpenAIProvider
from chatprocessor.providers.router import RouterProvider
from tests.fakes.ollama import FakeOllama, fake_embedding

pytestmark = pytest.mark.timeout(30)

TEXTS = ["The sky is blue.", "Grass is green."]
EMBED_MODEL = "nomic-embed-text"
#: Short cool-down: the breaker's clock is real time (pybreaker reads datetime.now).
RESET = 0.05
AFTER_RESET = 0.12
_ids = itertools.count()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(x * x for x in vector))


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / (norm(a) * norm(b))


def unique(name: str) -> str:
    """Metrics live in the process-wide registry: give each test its own label values."""
    return f"{name}-{next(_ids)}"


@pytest.fixture
async def fake() -> AsyncIterator[FakeOllama]:
    async with FakeOllama(models=["llama2", EMBED_MODEL]) as server:
        yield server


@pytest.fixture
async def ollama(fake: FakeOllama) -> AsyncIterator[OllamaProvider]:
    provider = OllamaProvider(fake.url, model="llama2", timeout=5, connect_timeout=1)
    yield provider
    await provider.close()


@pytest.fixture
async def openai(fake: FakeOllama) -> AsyncIterator[OpenAIProvider]:
    provider = OpenAIProvider(
        f"{fake.url}/v1",
        api_key="",
        model="llama2",
        embedding_model=EMBED_MODEL,
        timeout=5,
        connect_timeout=1,
    )
    yield provider
    await provider.close()


async def serve(body: Any) -> tuple[web.AppRunner, str]:
    """A one-route server answering every POST with ``body`` as JSON: answers the fake
    would never give."""
    app = web.Application()

    async def answer(request: web.Request) -> web.Response:
        return web.json_response(body)

    app.router.add_post("/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = int(runner.addresses[0][1])
    return runner, f"http://127.0.0.1:{port}"


# --------------------------------------------------------------------------- vectors


def test_as_vectors_scales_to_unit_length_and_keeps_unit_vectors_as_they_are() -> None:
    already = fake_embedding("x")
    [scaled, kept] = as_vectors([[3, 4], already], 2)
    assert scaled == [0.6, 0.8]
    assert kept == already  # not rescaled: no rounding of what a server sent
    assert unit([0.0, 0.0]) == [0.0, 0.0]  # a zero vector stays (no division by zero)


def test_as_vectors_mean_pools_per_token_vectors() -> None:
    assert mean_pool([[1.0, 2.0], [3.0, 6.0]]) == [2.0, 4.0]
    [pooled] = as_vectors([[[1.0, 2.0], [3.0, 6.0]]], 1)
    assert pooled == pytest.approx(unit([2.0, 4.0]))


@pytest.mark.parametrize(
    "raw",
    [
        None,
        [[1.0]],  # one vector for two texts
        [[1.0], []],
        [[1.0], ["a"]],
        [[1.0], [True]],
        [[1.0], [[1.0], [1.0, 2.0]]],  # tokens of unequal length
        [[1.0], [[1.0], "x"]],
    ],
)
def test_as_vectors_refuses_what_is_not_one_vector_per_text(raw: Any) -> None:
    with pytest.raises(ValueError):
        as_vectors(raw, 2)


# ---------------------------------------------------------------------------- ollama


async def test_ollama_embeds_through_api_embed(ollama: OllamaProvider, fake: FakeOllama) -> None:
    result = await ollama.embed(TEXTS)
    assert result.vectors == [fake_embedding(t) for t in TEXTS]
    assert (result.model, result.provider, result.mock) == (EMBED_MODEL, "ollama", False)
    assert result.prompt_tokens == 7  # the fake counts words
    [sent] = fake.requests
    assert (sent["path"], sent["body"]) == ("/api/embed", {"model": EMBED_MODEL, "input": TEXTS})


async def test_ollama_default_and_named_embedding_model(fake: FakeOllama) -> None:
    provider = OllamaProvider(fake.url, model="llama2", embedding_model="llama2")
    try:
        assert provider.default_embedding_model == "llama2"
        assert (await provider.embed(["a"])).model == "llama2"
        assert (await provider.embed(["a"], model=EMBED_MODEL)).model == EMBED_MODEL
    finally:
        await provider.close()
    assert OllamaProvider(fake.url, model="llama2").default_embedding_model == EMBED_MODEL


async def test_ollama_no_texts_is_no_request(ollama: OllamaProvider, fake: FakeOllama) -> None:
    assert await ollama.embed([]) == Embeddings([], EMBED_MODEL, "ollama", 0)
    assert fake.requests == []


async def test_ollama_unknown_model_is_model_not_found(ollama: OllamaProvider) -> None:
    with pytest.raises(ModelNotFound, match="all-minilm"):
        await ollama.embed(TEXTS, model="all-minilm")


async def test_ollama_closed_port_is_unavailable() -> None:
    provider = OllamaProvider(f"http://127.0.0.1:{closed_port()}", model="llama2")
    try:
        with pytest.raises(ProviderUnavailable):
            await provider.embed(TEXTS)
    finally:
        await provider.close()


@pytest.mark.parametrize(
    ("status", "error"),
    [(503, ProviderUnavailable), (500, ProviderUnavailable), (400, BadRequest)],
)
async def test_ollama_error_statuses(
    ollama: OllamaProvider, fake: FakeOllama, status: int, error: type[ProviderError]
) -> None:
    fake.fail_next(1, status)
    with pytest.raises(error) as raised:
        await ollama.embed(TEXTS)
    assert raised.type is error
    assert (await ollama.embed(TEXTS)).vectors  # the next call answers


async def test_ollama_429_is_rate_limited_with_retry_after() -> None:
    async with FakeOllama(models=[EMBED_MODEL], retry_after=7) as fake:
        provider = OllamaProvider(fake.url, model="llama2")
        fake.fail_next(1, 429)
        try:
            with pytest.raises(RateLimited) as raised:
                await provider.embed(TEXTS)
        finally:
            await provider.close()
    assert raised.value.retry_after == 7


async def test_ollama_hung_server_is_a_timeout(fake: FakeOllama) -> None:
    provider = OllamaProvider(fake.url, model="llama2", timeout=0.2, connect_timeout=1)
    fake.hang_next(1)
    try:
        with pytest.raises(ProviderTimeout):
            await provider.embed(TEXTS)
    finally:
        await provider.close()


@pytest.mark.parametrize(
    "body",
    [
        {"embeddings": [[0.6, 0.8]]},  # one vector for two texts
        {"model": EMBED_MODEL},
        [[0.6, 0.8], [0.8, 0.6]],
    ],
)
async def test_ollama_answer_of_the_wrong_shape_is_unavailable(body: Any) -> None:
    runner, url = await serve(body)
    provider = OllamaProvider(url, model="llama2")
    try:
        with pytest.raises(ProviderUnavailable, match="not Ollama's JSON"):
            await provider.embed(TEXTS)
    finally:
        await provider.close()
        await runner.cleanup()


# ---------------------------------------------------------------------------- openai


async def test_openai_embeds_through_the_official_client(
    openai: OpenAIProvider, fake: FakeOllama
) -> None:
    result = await openai.embed(TEXTS)
    # The client asks for base64 (float32) and decodes it: equal up to float32 rounding.
    assert len(result.vectors) == 2
    for vector, text in zip(result.vectors, TEXTS, strict=True):
        assert vector == pytest.approx(fake_embedding(text), rel=1e-6, abs=1e-7)
    assert (result.model, result.provider, result.mock) == (EMBED_MODEL, "openai", False)
    assert result.prompt_tokens == 7
    [sent] = fake.requests
    assert sent["path"] == "/v1/embeddings"
    assert sent["body"]["model"] == EMBED_MODEL
    assert sent["body"]["input"] == TEXTS
    assert sent["body"]["encoding_format"] == "base64"


async def test_openai_default_embedding_model() -> None:
    provider = OpenAIProvider("http://127.0.0.1:1/v1", api_key="", model="gpt-4o-mini")
    try:
        assert provider.default_embedding_model == "text-embedding-3-small"
        assert await provider.embed([]) == Embeddings([], "text-embedding-3-small", "openai", 0)
    finally:
        await provider.close()


async def test_openai_unknown_model_is_model_not_found(openai: OpenAIProvider) -> None:
    with pytest.raises(ModelNotFound, match="all-minilm"):
        await openai.embed(TEXTS, model="all-minilm")


async def test_openai_closed_port_is_unavailable() -> None:
    url = f"http://127.0.0.1:{closed_port()}/v1"
    provider = OpenAIProvider(url, api_key="", model="llama2", connect_timeout=1)
    try:
        with pytest.raises(ProviderUnavailable):
            await provider.embed(TEXTS)
    finally:
        await provider.close()


async def test_openai_429_and_5xx(openai: OpenAIProvider, fake: FakeOllama) -> None:
    fake.fail_next(1, 429, headers={"retry-after-ms": "1500"})
    with pytest.raises(RateLimited) as raised:
        await openai.embed(TEXTS)
    assert raised.value.retry_after == 1.5
    fake.fail_next(1, 503)
    with pytest.raises(ProviderUnavailable):
        await openai.embed(TEXTS)


async def test_openai_per_token_answer_is_mean_pooled_in_index_order() -> None:
    """llama_cpp.server with a model that has no pooling answers one vector per token."""
    data = [
        {"object": "embedding", "index": 1, "embedding": [[0.0, 1.0], [0.0, 3.0]]},
        {"object": "embedding", "index": 0, "embedding": [[1.0, 0.0], [3.0, 0.0]]},
    ]
    body = {"object": "list", "data": data, "model": "gemma", "usage": {"prompt_tokens": 4}}
    runner, url = await serve(body)
    provider = OpenAIProvider(url, api_key="", model="gemma")
    try:
        result = await provider.embed(TEXTS)
    finally:
        await provider.close()
        await runner.cleanup()
    assert result.vectors == [[1.0, 0.0], [0.0, 1.0]]
    assert (result.model, result.prompt_tokens) == ("gemma", 4)


@pytest.mark.parametrize(
    "body",
    [
        {"object": "list", "data": [], "model": "m"},
        {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [1.0]}]},
        {"object": "list", "data": [{"index": 0, "embedding": "AACAPw=="}]},  # base64 [1.0]
        {},
    ],
)
async def test_openai_answer_of_the_wrong_shape_is_unavailable(body: Any) -> None:
    runner, url = await serve(body)
    provider = OpenAIProvider(url, api_key="", model="m")
    try:
        with pytest.raises(ProviderUnavailable, match="bad answer"):
            await provider.embed(TEXTS)
    finally:
        await provider.close()
        await runner.cleanup()


async def test_fake_v1_embeddings_validates_like_ollama(fake: FakeOllama) -> None:
    async with httpx.AsyncClient(base_url=f"{fake.url}/v1") as http:
        floats = await http.post("/embeddings", json={"model": EMBED_MODEL, "input": "hi"})
        assert floats.json()["data"] == [
            {"object": "embedding", "embedding": fake_embedding("hi"), "index": 0}
        ]
        assert floats.json()["usage"] == {"prompt_tokens": 1, "total_tokens": 1}
        for body, status in [
            ({"model": EMBED_MODEL, "input": []}, 400),
            ({"model": EMBED_MODEL}, 400),
            ({"model": EMBED_MODEL, "input": "x", "encoding_format": "int8"}, 400),
            ({"model": EMBED_MODEL, "input": [1, 2]}, 400),
            ({"model": "nope", "input": "x"}, 404),
        ]:
            refused = await http.post("/embeddings", json=body)
            assert refused.status_code == status, body
            assert refused.json()["error"]["message"]


async def test_fake_api_embed_input_as_in_ollama(fake: FakeOllama) -> None:
    async with httpx.AsyncClient(base_url=fake.url) as http:
        empty = await http.post("/api/embed", json={"model": EMBED_MODEL, "input": ""})
        assert empty.json()["embeddings"] == []  # Ollama only loads the model
        bad = await http.post("/api/embed", json={"model": "nope", "input": 5})
        assert bad.status_code == 400  # the input is checked before the model
        sized = await http.post(
            "/api/embed", json={"model": EMBED_MODEL, "input": "x", "dimensions": 4}
        )
        assert len(sized.json()["embeddings"][0]) == 4


# ------------------------------------------------------------------------------ mock


async def test_mock_vectors_are_deterministic_unit_length_and_labelled() -> None:
    mock = MockProvider()
    first = await mock.embed([*TEXTS, TEXTS[0]])
    again = await MockProvider().embed([TEXTS[0]])
    assert first.mock is True and first.provider == "mock"
    assert first.model == mock.default_embedding_model == "mock-embedding"
    assert [len(v) for v in first.vectors] == [MOCK_DIMENSIONS] * 3
    assert all(norm(v) == pytest.approx(1.0) for v in first.vectors)
    assert first.vectors[0] == first.vectors[2] == again.vectors[0]
    assert first.vectors[0] != first.vectors[1]
    assert first.vectors[0] == mock_vector(TEXTS[0])
    assert first.prompt_tokens == 11  # words
    assert (await mock.embed(["x"], model="any")).model == "any"
    assert (await mock.embed([])).vectors == []
    assert len(mock_vector("x", 40)) == 40  # more than one sha256 of bytes


# ---------------------------------------------------------------------------- router


class Scripted:
    """A provider whose ``embed`` follows a script: each call takes the next outcome."""

    def __init__(self, name: str, *, error: ProviderError | None = None) -> None:
        self.name = name
        self.default_model = f"{name}-chat"
        self.default_embedding_model = f"{name}-embed"
        self.error = error  # used when the script is empty
        self.script: list[ProviderError | None] = []
        self.gate: asyncio.Event | None = None  # set: the call waits for it
        self.calls = 0
        self.models: list[str | None] = []

    async def embed(self, texts: list[str], *, model: str | None = None) -> Embeddings:
        self.calls += 1
        self.models.append(model)
        error = self.script.pop(0) if self.script else self.error
        if self.gate is not None:
            await self.gate.wait()
        if error is not None:
            raise error
        return Embeddings([[1.0]] * len(texts), model or self.default_embedding_model, self.name)

    async def chat(self, request: ChatRequest, *, stream: bool = False) -> AsyncIterator[Chunk]:
        yield Chunk("an answer", done=True)

    async def list_models(self) -> list[str]:
        return [self.default_model]

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None


def sample(metric: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(metric, labels) or 0.0


async def test_router_falls_back_from_a_down_ollama(fake: FakeOllama) -> None:
    """PROCESSING_MODE=hybrid: Ollama first, the OpenAI API when Ollama cannot answer."""
    down = OllamaProvider(f"http://127.0.0.1:{closed_port()}", model="llama2")
    down.name = unique("ollama")
    openai = OpenAIProvider(f"{fake.url}/v1", api_key="", model="llama2", embedding_model="llama2")
    router = RouterProvider([down, openai], fail_max=2, reset_timeout=30)
    try:
        assert router.default_embedding_model == EMBED_MODEL
        result = await router.embed(TEXTS)
        assert (result.provider, result.model) == ("openai", "llama2")
        assert len(result.vectors) == 2
        assert sample("chatprocessor_provider_fallbacks_total", provider=down.name) == 1
        await router.embed(TEXTS)
        assert router.breaker_states()[down.name] == "open"
        fake.requests.clear()
        assert (await router.embed(TEXTS)).provider == "openai"  # Ollama not even tried
    finally:
        await router.close()


async def test_router_breaker_opens_and_skips_the_provider() -> None:
    first = Scripted(unique("a"), error=ProviderUnavailable("down"))
    second = Scripted(unique("b"))
    router = RouterProvider([first, second], fail_max=3, reset_timeout=30)
    for _ in range(5):
        assert (await router.embed(["x"])).provider == second.name
    assert first.calls == 3
    assert router.breaker_states()[first.name] == "open"


async def test_router_chat_and_embed_share_a_breaker() -> None:
    first, second = Scripted(unique("a"), error=ProviderTimeout("slow")), Scripted(unique("b"))
    router = RouterProvider([first, second], fail_max=1, reset_timeout=30)
    await router.embed(["x"])
    assert router.breaker_states()[first.name] == "open"
    request = ChatRequest([ChatMessage("user", "hello")])
    [chunk] = [c async for c in router.chat(request)]
    assert chunk.provider == second.name  # a provider down for embeddings is down for chat


async def test_router_half_open_trial_success_closes_the_breaker() -> None:
    first = Scripted(unique("a"))
    first.script = [ProviderUnavailable("down")]
    router = RouterProvider([first, Scripted(unique("b"))], fail_max=1, reset_timeout=RESET)
    await router.embed(["x"])
    assert router.breaker_states()[first.name] == "open"
    await asyncio.sleep(AFTER_RESET)
    assert (await router.embed(["x"])).provider == first.name
    assert router.breaker_states()[first.name] == "closed"


async def test_router_runs_one_trial_call_while_half_open() -> None:
    first, second = Scripted(unique("a")), Scripted(unique("b"))
    first.script = [ProviderUnavailable("down")]
    router = RouterProvider([first, second], fail_max=1, reset_timeout=RESET)
    await router.embed(["x"])
    await asyncio.sleep(AFTER_RESET)
    first.gate = asyncio.Event()
    trial = asyncio.create_task(router.embed(["x"]))
    while first.calls < 2:
        await asyncio.sleep(0.001)
    assert (await router.embed(["x"])).provider == second.name  # skipped meanwhile
    first.gate.set()
    assert (await trial).provider == first.name
    assert first.calls == 2


@pytest.mark.parametrize("error", [ModelNotFound("no such model"), BadRequest("too long")])
async def test_router_permanent_error_is_raised_at_once_and_not_counted(
    error: ProviderError,
) -> None:
    first, second = Scripted(unique("a"), error=error), Scripted(unique("b"))
    router = RouterProvider([first, second], fail_max=1, reset_timeout=30)
    for _ in range(2):
        with pytest.raises(type(error)):
            await router.embed(["x"])
    assert second.calls == 0
    assert router.breaker_states()[first.name] == "closed"


async def test_router_fallback_lacking_the_model_raises_the_earlier_failure() -> None:
    first = Scripted(unique("a"), error=ProviderUnavailable("down"))
    second = Scripted(unique("b"), error=ModelNotFound("no such model"))
    router = RouterProvider([first, second], fail_max=5, reset_timeout=30)
    with pytest.raises(ProviderUnavailable, match="down"):
        await router.embed(["x"], model="m")
    assert first.models == second.models == ["m"]  # a named model goes to every provider


async def test_router_circuit_open_when_every_breaker_is_open() -> None:
    first = Scripted(unique("a"), error=ProviderUnavailable("down"))
    router = RouterProvider([first], fail_max=1, reset_timeout=30)
    with pytest.raises(ProviderUnavailable):
        await router.embed(["x"])
    with pytest.raises(CircuitOpen) as raised:
        await router.embed(["x"])
    assert raised.value.retry_after is not None and 0 < raised.value.retry_after <= 30
    assert first.calls == 1


async def test_router_keeps_the_mock_label() -> None:
    router = RouterProvider([MockProvider()])
    result = await router.embed(["x"])
    assert (result.provider, result.mock) == ("mock", True)


# -------------------------------------------------------------------------- embedded


@pytest.fixture(scope="module")
def embedded() -> Any:
    from chatprocessor.providers.embedded import EmbeddedProvider

    return EmbeddedProvider()


@pytest.mark.embedded
@pytest.mark.timeout(120)
async def test_embedded_model_embeds(embedded: Any) -> None:
    from chatprocessor.providers.embedded import MODEL_NAME

    texts = ["The cat sat on the mat.", "Stock markets fell sharply today.", "hello"]
    batch = await embedded.embed(texts)
    alone = await embedded.embed([texts[1]])
    assert (batch.model, batch.provider, batch.mock) == (MODEL_NAME, "embedded", False)
    assert len(batch.vectors) == 3
    assert len({len(v) for v in batch.vectors}) == 1 and len(batch.vectors[0]) > 100
    assert all(norm(v) == pytest.approx(1.0) for v in batch.vectors)
    # The same text gives the same vector, alone or second in a batch (llama-cpp-python's
    # per-token output gets every text after the first wrong: the provider must not use
    # it). In a batch the sums run in another order: equal up to rounding, cosine ~0.9999.
    assert cosine(alone.vectors[0], batch.vectors[1]) > 0.999
    assert (await embedded.embed([texts[1]])).vectors == alone.vectors  # deterministic
    assert cosine(batch.vectors[0], batch.vectors[1]) < 0.9
    assert batch.prompt_tokens is not None and batch.prompt_tokens >= 3 + 6 + 1


@pytest.mark.embedded
@pytest.mark.timeout(120)
async def test_embedded_model_cuts_long_texts_and_refuses_other_models(embedded: Any) -> None:
    from chatprocessor.providers.embedded import EMBEDDING_CONTEXT

    result = await embedded.embed(["word " * (EMBEDDING_CONTEXT + 100)])
    assert result.prompt_tokens == EMBEDDING_CONTEXT
    with pytest.raises(ModelNotFound):
        await embedded.embed(["x"], model="nomic-embed-text")
