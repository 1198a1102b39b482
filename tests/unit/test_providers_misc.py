"""MockProvider, RouterProvider, same_model, the embedded transcript and build_providers."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from chatprocessor.core.errors import (
    BadRequest,
    ModelNotFound,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from chatprocessor.core.job import ChatMessage
from chatprocessor.providers import build_providers
from chatprocessor.providers.base import ChatRequest, Chunk, Provider, same_model
from chatprocessor.providers.embedded import transcript
from chatprocessor.providers.mock import MockProvider
from chatprocessor.providers.ollama import OllamaProvider
from chatprocessor.providers.router import RouterProvider
from chatprocessor.settings import Settings

HELLO = ChatRequest([ChatMessage("user", "hello brave new world")])


async def collect(provider: Provider, req: ChatRequest, *, stream: bool = False) -> list[Chunk]:
    return [chunk async for chunk in provider.chat(req, stream=stream)]


# ------------------------------------------------------------------------- mock


async def test_mock_answer_is_deterministic_and_names_model() -> None:
    mock = MockProvider()
    [first] = await collect(mock, HELLO)
    [second] = await collect(mock, HELLO)
    assert first == second
    assert first.delta == "[mock] You said: hello brave new world"
    assert first.done is True
    assert first.model == "mock"
    assert mock.default_model == "mock"
    assert first.prompt_tokens == 4
    assert first.completion_tokens == len(first.delta.split())


async def test_mock_answers_the_last_message() -> None:
    req = ChatRequest([ChatMessage("system", "be nice"), ChatMessage("user", "ping")])
    [chunk] = await collect(MockProvider(), req)
    assert chunk.delta == "[mock] You said: ping"
    assert chunk.prompt_tokens == 3  # system words count too


async def test_mock_stream_and_non_stream_give_the_same_text() -> None:
    mock = MockProvider()
    [whole] = await collect(mock, HELLO, stream=False)
    pieces = await collect(mock, HELLO, stream=True)
    assert len(pieces) > 2
    assert "".join(p.delta for p in pieces) == whole.delta
    assert [p.done for p in pieces] == [False] * (len(pieces) - 1) + [True]
    assert pieces[-1].delta == ""
    assert pieces[-1].completion_tokens == whole.completion_tokens


@pytest.mark.parametrize("stream", [False, True])
async def test_mock_max_tokens_truncates(stream: bool) -> None:
    req = ChatRequest([ChatMessage("user", "hello brave new world")], max_tokens=2)
    chunks = await collect(MockProvider(), req, stream=stream)
    assert "".join(c.delta for c in chunks) == "[mock] You "
    assert chunks[-1].completion_tokens == 2


async def test_mock_list_models_and_ping() -> None:
    mock = MockProvider()
    assert await mock.list_models() == ["mock"]
    assert await mock.ping() is True


# ----------------------------------------------------------------------- router


class Scripted:
    """A provider that yields ``pieces`` and then, if set, raises ``error``."""

    def __init__(
        self,
        name: str,
        pieces: list[str] | None = None,
        error: ProviderError | None = None,
        *,
        models: list[str] | None = None,
        alive: bool = True,
    ) -> None:
        self.name = name
        self.default_model = f"{name}-model"
        self.pieces = pieces or []
        self.error = error
        self.models = models if models is not None else [self.default_model]
        self.alive = alive
        self.calls = 0
        self.closed = False

    async def chat(self, request: ChatRequest, *, stream: bool = False) -> AsyncIterator[Chunk]:
        self.calls += 1
        for piece in self.pieces:
            yield Chunk(piece, model=self.default_model)
        if self.error is not None:
            raise self.error
        yield Chunk("", done=True, model=self.default_model)

    async def list_models(self) -> list[str]:
        if not self.alive:
            raise ProviderUnavailable(f"{self.name} is down")
        return self.models

    async def ping(self) -> bool:
        return self.alive

    async def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize(
    "error",
    [ProviderUnavailable("down"), ProviderTimeout("slow"), RateLimited("busy", retry_after=1)],
)
async def test_router_falls_back_on_transient_error_before_first_chunk(
    error: ProviderError,
) -> None:
    first = Scripted("first", error=error)
    second = Scripted("second", ["from ", "second"])
    router = RouterProvider([first, second])
    chunks = await collect(router, HELLO, stream=True)
    assert "".join(c.delta for c in chunks) == "from second"
    assert chunks[-1].done is True
    assert all(c.model == "second-model" for c in chunks)
    assert (first.calls, second.calls) == (1, 1)


@pytest.mark.parametrize("error", [BadRequest("refused"), ModelNotFound("no such model")])
async def test_router_does_not_fall_back_on_permanent_error(error: ProviderError) -> None:
    first = Scripted("first", error=error)
    second = Scripted("second", ["never"])
    router = RouterProvider([first, second])
    with pytest.raises(type(error)) as info:
        await collect(router, HELLO)
    assert info.value is error
    assert second.calls == 0


async def test_router_does_not_fall_back_once_a_chunk_was_yielded() -> None:
    first = Scripted("first", ["half an "], error=ProviderUnavailable("broke mid-stream"))
    second = Scripted("second", ["other answer"])
    router = RouterProvider([first, second])
    seen: list[Chunk] = []
    with pytest.raises(ProviderUnavailable, match="broke mid-stream"):
        async for chunk in router.chat(HELLO, stream=True):
            seen.append(chunk)
    assert [c.delta for c in seen] == ["half an "]
    assert second.calls == 0


async def test_router_raises_the_last_error_when_all_fail() -> None:
    last = ProviderTimeout("third timed out")
    providers = [
        Scripted("first", error=ProviderUnavailable("first down")),
        Scripted("second", error=RateLimited("second busy")),
        Scripted("third", error=last),
    ]
    router = RouterProvider(list(providers))
    with pytest.raises(ProviderTimeout) as info:
        await collect(router, HELLO)
    assert info.value is last
    assert [p.calls for p in providers] == [1, 1, 1]


async def test_router_uses_the_first_provider_when_it_works() -> None:
    first = Scripted("first", ["one"])
    second = Scripted("second", ["two"])
    router = RouterProvider([first, second])
    chunks = await collect(router, HELLO)
    assert "".join(c.delta for c in chunks) == "one"
    assert second.calls == 0
    assert router.default_model == "first-model"


async def test_router_models_ping_and_close() -> None:
    down = Scripted("down", alive=False)
    up = Scripted("up", models=["a", "b"])
    router = RouterProvider([down, up])
    assert await router.list_models() == ["a", "b"]
    assert await router.ping() is True
    assert await RouterProvider([Scripted("x", alive=False)]).ping() is False
    await router.close()
    assert down.closed and up.closed


def test_router_needs_a_provider() -> None:
    with pytest.raises(ValueError, match="at least one"):
        RouterProvider([])


# ------------------------------------------------------------------- same_model


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("llama2", "llama2:latest", True),
        ("llama2:latest", "llama2", True),
        ("llama2", "llama2", True),
        ("llama2", "llama2:7b", False),
        ("llama2:7b", "llama2:13b", False),
        ("llama2", "mistral", False),
    ],
)
def test_same_model(a: str, b: str, same: bool) -> None:
    assert same_model(a, b) is same


# ------------------------------------------------------------------- transcript


def test_transcript_ends_with_assistant_and_keeps_system_text() -> None:
    text = transcript(
        [
            ChatMessage("system", "  You are terse.  "),
            ChatMessage("user", "What is 2+2? "),
            ChatMessage("assistant", "4"),
            ChatMessage("user", "And 3+3?"),
        ]
    )
    assert text.endswith("Assistant:")
    assert "You are terse." in text
    lines = text.splitlines()
    # The system text is context, not a speaker's turn.
    assert not any(line.startswith(("User: You are", "Assistant: You are")) for line in lines)
    # The conversation's turns come last, in order, right before the open assistant turn.
    assert lines[-4:] == ["User: What is 2+2?", "Assistant: 4", "User: And 3+3?", "Assistant:"]


def test_transcript_without_system_ends_with_the_users_turn() -> None:
    text = transcript([ChatMessage("user", "hi")])
    assert text.endswith("User: hi\nAssistant:")
    assert text.count("User: hi") == 1


# --------------------------------------------------------------- build_providers


def test_build_providers_router_for_several(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROVIDERS", "ollama,mock")
    monkeypatch.setenv("OLLAMA_BASE_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("OLLAMA_MODEL", "mistral")
    provider = build_providers(Settings.load())
    assert isinstance(provider, RouterProvider)
    kinds = [type(p) for p in provider.providers]
    assert kinds == [OllamaProvider, MockProvider]
    ollama = provider.providers[0]
    assert isinstance(ollama, OllamaProvider)
    assert ollama.base_url == "http://127.0.0.1:1"
    assert provider.default_model == "mistral"


def test_build_providers_single_mock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROVIDERS", "mock")
    provider = build_providers(Settings.load())
    # Always a router, so that a single provider gets a circuit breaker too.
    assert isinstance(provider, RouterProvider)
    assert [type(p) for p in provider.providers] == [MockProvider]
    assert provider.name == "mock"


async def test_router_built_from_settings_falls_back_to_mock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nothing listens on port 1: the router answers from the mock instead."""
    monkeypatch.setenv("PROVIDERS", "ollama,mock")
    monkeypatch.setenv("OLLAMA_BASE_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("OLLAMA_CONNECT_TIMEOUT", "1")
    provider = build_providers(Settings.load())
    try:
        chunks = await collect(provider, HELLO)
    finally:
        await provider.close()
    assert chunks[-1].delta == "[mock] You said: hello brave new world"
    assert chunks[-1].model == "mock"


async def test_mock_provider_answers_a_schema_with_a_valid_value() -> None:
    """Classification jobs (seed 004) work end to end with PROVIDERS=mock."""
    from chatprocessor.features.classify import analysis_schema
    from chatprocessor.providers.mock import MockProvider
    from chatprocessor.sanitize import sanitize

    schema = analysis_schema(["billing", "other"])
    request = ChatRequest([ChatMessage("user", "classify this")], format=schema)
    [chunk] = [c async for c in MockProvider().chat(request)]
    value = await sanitize(chunk.delta, schema=schema)
    assert value == {"sentiment": "positive", "intent": "billing", "confidence": 0.5}
