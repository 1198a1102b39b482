"""OpenAIProvider.embed against a real OpenAI-compatible server: llama_cpp.server with the
bundled Gemma 3 270M and ``--embedding true`` (offline). Proves the official client's
embeddings call, and the mean-pooling of the per-token vectors this server sends for a model
without pooling, give what the embedded provider gives for the same model."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterator

import pytest

from chatprocessor.providers.embedded import EmbeddedProvider
from chatprocessor.providers.openai import OpenAIProvider
from tests.integration.test_openai_llama_server import llama_server

pytestmark = [pytest.mark.embedded, pytest.mark.timeout(180)]

TEXT = "The capital of France is Paris."


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """llama_cpp.server in embedding mode (its setting ``embedding``)."""
    with llama_server(tmp_path_factory.mktemp("llama_server"), "--embedding", "true") as s:
        yield s


@pytest.fixture
async def provider(server: tuple[str, str]) -> AsyncIterator[OpenAIProvider]:
    url, model = server
    p = OpenAIProvider(url, api_key="", model=model, embedding_model=model, timeout=60)
    yield p
    await p.close()


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


async def test_embedding_through_the_official_client(provider: OpenAIProvider) -> None:
    result = await provider.embed([TEXT])
    [vector] = result.vectors
    assert (result.provider, result.mock) == ("openai", False)
    assert result.model == provider.default_embedding_model
    assert len(vector) == 640  # Gemma 3 270M's width: one pooled vector, not one per token
    assert math.sqrt(sum(x * x for x in vector)) == pytest.approx(1.0)
    assert result.prompt_tokens is not None and result.prompt_tokens >= len(TEXT.split())
    again = await provider.embed([TEXT])
    assert again.vectors == result.vectors
    other = await provider.embed(["Stock markets fell sharply today."])
    assert cosine(vector, other.vectors[0]) < 0.9


async def test_server_and_embedded_provider_agree(provider: OpenAIProvider) -> None:
    """Same model, same text: the server's per-token vectors mean-pooled here match the
    embedded provider's (llama.cpp's own mean pooling), up to rounding."""
    served = await provider.embed([TEXT])
    embedded = EmbeddedProvider()
    try:
        local = await embedded.embed([TEXT])
    finally:
        await embedded.close()
    assert cosine(served.vectors[0], local.vectors[0]) > 0.999
    assert served.prompt_tokens == local.prompt_tokens
