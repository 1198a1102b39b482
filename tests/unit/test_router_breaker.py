"""RouterProvider: ordered fallback, one circuit breaker per provider, and their metrics."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable

import pytest
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
from chatprocessor.providers import build_providers
from chatprocessor.providers.base import ChatRequest, Chunk
from chatprocessor.providers.mock import MockProvider
from chatprocessor.providers.ollama import OllamaProvider
from chatprocessor.providers.router import RouterProvider
from chatprocessor.settings import Settings
from tests.fakes.ollama import FakeOllama

pytestmark = pytest.mark.timeout(30)

HELLO = ChatRequest([ChatMessage("user", "hello")])
#: Short cool-down: the breaker's clock is real time (pybreaker reads datetime.now).
RESET = 0.05
AFTER_RESET = 0.12
_ids = itertools.count()


def unique(name: str) -> str:
    """Metrics live in the process-wide registry: give each test its own label values."""
    return f"{name}-{next(_ids)}"


class Fake:
    """A provider following a script: each call takes the next outcome (None = answer)."""

    def __init__(
        self,
        name: str,
        *,
        pieces: tuple[str, ...] = ("an ", "answer"),
        error: ProviderError | None = None,
        mid_stream: bool = False,
        chunk_model: str | None = "",
        on_call: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.default_model = f"{name}-model"
        self.pieces = pieces
        self.error = error  # used when the script is empty
        self.script: list[ProviderError | None] = []
        self.mid_stream = mid_stream  # fail after the first piece instead of before
        self.chunk_model = self.default_model if chunk_model == "" else chunk_model
        self.on_call = on_call
        self.gate: asyncio.Event | None = None  # set: the call waits for it
        self.entered = asyncio.Event()
        self.calls = 0
        self.closed_streams = 0

    async def chat(self, request: ChatRequest, *, stream: bool = False) -> AsyncIterator[Chunk]:
        self.calls += 1
        self.entered.set()
        if self.on_call is not None:
            self.on_call()
        error = self.script.pop(0) if self.script else self.error
        try:
            if self.gate is not None:
                await self.gate.wait()
            if error is not None and not self.mid_stream:
                raise error
            for piece in self.pieces:
                yield Chunk(piece, model=self.chunk_model)
                if error is not None:
                    raise error
            yield Chunk("", done=True, model=self.chunk_model, prompt_tokens=1, completion_tokens=2)
        finally:
            self.closed_streams += 1

    async def list_models(self) -> list[str]:
        return [self.default_model]

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        pass


async def ask(router: RouterProvider, *, stream: bool = False) -> list[Chunk]:
    return [chunk async for chunk in router.chat(HELLO, stream=stream)]


def text(chunks: list[Chunk]) -> str:
    return "".join(c.delta for c in chunks)


def sample(metric: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(metric, labels) or 0.0


def fallbacks(provider: str) -> float:
    return sample("chatprocessor_provider_fallbacks_total", provider=provider)


def failures(provider: str, error: str) -> float:
    return sample("chatprocessor_provider_failures_total", provider=provider, error=error)


def gauge(provider: str) -> float | None:
    return REGISTRY.get_sample_value("chatprocessor_breaker_state", {"provider": provider})


# ------------------------------------------------------------------------ fallback


async def test_falls_back_in_order_and_the_answer_names_who_answered() -> None:
    order: list[str] = []
    a, b, c = (
        Fake(unique("a"), error=ProviderUnavailable("a down"), on_call=lambda: order.append("a")),
        Fake(unique("b"), error=ProviderTimeout("b slow"), on_call=lambda: order.append("b")),
        Fake(unique("c"), pieces=("from ", "c"), on_call=lambda: order.append("c")),
    )
    router = RouterProvider([a, b, c])
    chunks = await ask(router, stream=True)
    assert order == ["a", "b", "c"]
    assert text(chunks) == "from c"
    assert chunks[-1].done is True
    assert {ch.provider for ch in chunks} == {c.name}
    assert {ch.model for ch in chunks} == {c.default_model}
    assert router.name == f"{a.name},{b.name},{c.name}"
    assert router.default_model == a.default_model


async def test_chunk_without_a_model_gets_the_answering_providers_model() -> None:
    first = Fake(unique("first"), error=RateLimited("busy", retry_after=3))
    second = Fake(unique("second"), chunk_model=None)
    chunks = await ask(RouterProvider([first, second]))
    assert [ch.model for ch in chunks] == [second.default_model] * len(chunks)
    assert [ch.provider for ch in chunks] == [second.name] * len(chunks)


async def test_the_first_provider_answers_when_it_works() -> None:
    first, second = Fake(unique("first"), pieces=("one",)), Fake(unique("second"))
    router = RouterProvider([first, second])
    chunks = await ask(router)
    assert text(chunks) == "one"
    assert chunks[0].provider == first.name
    assert (first.calls, second.calls) == (1, 0)
    assert router.breaker_states() == {first.name: "closed", second.name: "closed"}


async def test_all_failing_raises_the_last_error() -> None:
    last = ProviderTimeout("third timed out")
    providers = [
        Fake(unique("first"), error=ProviderUnavailable("first down")),
        Fake(unique("second"), error=RateLimited("second busy")),
        Fake(unique("third"), error=last),
    ]
    with pytest.raises(ProviderTimeout) as info:
        await ask(RouterProvider(list(providers)))
    assert info.value is last
    assert [p.calls for p in providers] == [1, 1, 1]


# ------------------------------------------------------------------------ breaker


async def test_breaker_opens_after_fail_max_and_the_provider_is_not_called() -> None:
    first = Fake(unique("first"), error=ProviderUnavailable("down"))
    second = Fake(unique("second"), pieces=("backup",))
    router = RouterProvider([first, second], fail_max=3, reset_timeout=60)
    for expected in (1, 2):
        assert text(await ask(router)) == "backup"
        assert first.calls == expected
        assert router.breaker_states()[first.name] == "closed"
    assert text(await ask(router)) == "backup"
    assert first.calls == 3
    assert router.breaker_states()[first.name] == "open"
    for _ in range(5):
        assert text(await ask(router)) == "backup"
    assert first.calls == 3, "an open breaker skips the provider without calling it"
    assert second.calls == 8


async def test_only_consecutive_failures_count() -> None:
    first = Fake(unique("first"))
    second = Fake(unique("second"))
    down = ProviderUnavailable("down")
    first.script = [down, down, None, down, down]
    router = RouterProvider([first, second], fail_max=3, reset_timeout=60)
    for _ in range(5):
        await ask(router)
    assert router.breaker_states()[first.name] == "closed"
    assert first.calls == 5
    first.script = [down]
    await ask(router)
    assert router.breaker_states()[first.name] == "open"


async def test_half_open_trial_success_closes_the_breaker() -> None:
    name = unique("first")
    first = Fake(name, error=ProviderTimeout("slow"))
    second = Fake(unique("second"), pieces=("backup",))
    router = RouterProvider([first, second], fail_max=1, reset_timeout=RESET)
    await ask(router)
    assert router.breaker_states()[name] == "open"
    await ask(router)
    assert first.calls == 1  # still cooling down
    seen: list[float | None] = []
    first.error = None
    first.on_call = lambda: seen.append(gauge(name))
    await asyncio.sleep(AFTER_RESET)
    chunks = await ask(router)
    assert text(chunks) == "an answer"
    assert chunks[0].provider == name
    assert first.calls == 2
    assert seen == [1.0], "during the trial call the gauge says half-open"
    assert router.breaker_states()[name] == "closed"
    assert gauge(name) == 0.0
    await ask(router)
    assert first.calls == 3


async def test_half_open_trial_failure_reopens_the_breaker() -> None:
    name = unique("first")
    first = Fake(name, error=ProviderUnavailable("down"))
    second = Fake(unique("second"), pieces=("backup",))
    router = RouterProvider([first, second], fail_max=2, reset_timeout=RESET)
    await ask(router)
    await ask(router)
    assert router.breaker_states()[name] == "open"
    await asyncio.sleep(AFTER_RESET)
    assert text(await ask(router)) == "backup"
    assert first.calls == 3, "one trial call"
    assert router.breaker_states()[name] == "open"
    assert gauge(name) == 2.0
    assert text(await ask(router)) == "backup"
    assert first.calls == 3, "one failed trial reopens it at once, for a new cool-down"


async def test_only_one_trial_call_runs_while_half_open() -> None:
    first = Fake(unique("first"), error=ProviderUnavailable("down"))
    second = Fake(unique("second"), pieces=("backup",))
    router = RouterProvider([first, second], fail_max=1, reset_timeout=RESET)
    await ask(router)
    await asyncio.sleep(AFTER_RESET)
    first.error = None
    first.gate = asyncio.Event()
    first.entered.clear()
    probe = asyncio.create_task(ask(router))
    await first.entered.wait()
    assert router.breaker_states()[first.name] == "half-open"
    # Other jobs meanwhile go to the next provider instead of piling onto the probe.
    for _ in range(2):  # a second call onto the gated provider would hang: fail fast instead
        assert text(await asyncio.wait_for(ask(router), 2)) == "backup"
    assert first.calls == 2
    first.gate.set()
    assert text(await probe) == "an answer"
    assert router.breaker_states()[first.name] == "closed"
    assert text(await ask(router)) == "an answer"
    assert first.calls == 3


# ------------------------------------------------------------- permanent errors


@pytest.mark.parametrize("error", [BadRequest("refused"), ModelNotFound("no such model")])
async def test_permanent_errors_are_raised_at_once_and_not_counted(error: ProviderError) -> None:
    first = Fake(unique("first"), error=error)
    second = Fake(unique("second"))
    router = RouterProvider([first, second], fail_max=2, reset_timeout=60)
    for _ in range(4):
        with pytest.raises(type(error)) as info:
            await ask(router)
        assert info.value is error
    assert second.calls == 0
    assert first.calls == 4
    assert router.breaker_states()[first.name] == "closed"


async def test_a_permanent_error_breaks_a_run_of_transient_failures() -> None:
    """The provider answered (with a refusal): it is up, so the consecutive count restarts."""
    first = Fake(unique("first"))
    second = Fake(unique("second"))
    down = ProviderUnavailable("down")
    first.script = [down, BadRequest("refused"), down]
    router = RouterProvider([first, second], fail_max=2, reset_timeout=60)
    await ask(router)
    with pytest.raises(BadRequest):
        await ask(router)
    await ask(router)
    assert router.breaker_states()[first.name] == "closed"


async def test_a_fallback_lacking_the_model_does_not_dead_letter_the_job() -> None:
    """The first provider is only down: the job is retried later, not refused for good."""
    down = ProviderUnavailable("first down")
    first = Fake(unique("first"), error=down)
    second = Fake(unique("second"), error=ModelNotFound("second has no llama2"))
    third = Fake(unique("third"), error=BadRequest("third refuses"))
    with pytest.raises(ProviderUnavailable) as info:
        await ask(RouterProvider([first, second, third]))
    assert info.value is down
    assert (first.calls, second.calls, third.calls) == (1, 1, 1)


async def test_a_fallback_lacking_the_model_behind_an_open_breaker_is_circuit_open() -> None:
    first = Fake(unique("first"), error=ProviderUnavailable("first down"))
    second = Fake(unique("second"), error=ModelNotFound("second has no llama2"))
    router = RouterProvider([first, second], fail_max=1, reset_timeout=60)
    with pytest.raises(ProviderUnavailable):
        await ask(router)
    with pytest.raises(CircuitOpen):
        await ask(router)
    assert (first.calls, second.calls) == (1, 2)


# --------------------------------------------------------------- all open


async def test_circuit_open_when_every_breaker_is_open() -> None:
    a = Fake(unique("a"), error=ProviderUnavailable("a down"))
    b_error = ProviderTimeout("b slow")
    b = Fake(unique("b"), error=b_error)
    router = RouterProvider([a, b], fail_max=1, reset_timeout=60)
    with pytest.raises(ProviderTimeout) as first_try:
        await ask(router)
    assert first_try.value is b_error
    assert router.breaker_states() == {a.name: "open", b.name: "open"}
    with pytest.raises(CircuitOpen) as info:
        await ask(router)
    assert isinstance(info.value, ProviderUnavailable)
    assert info.value.transient is True
    assert a.name in str(info.value)
    assert b.name in str(info.value)
    assert (a.calls, b.calls) == (1, 1)


async def test_a_single_provider_gets_a_breaker_too() -> None:
    only = Fake(unique("only"), error=ProviderUnavailable("down"))
    router = RouterProvider([only], fail_max=2, reset_timeout=60)
    for _ in range(2):
        with pytest.raises(ProviderUnavailable):
            await ask(router)
    with pytest.raises(CircuitOpen):
        await ask(router)
    assert only.calls == 2


# ------------------------------------------------------------ after a chunk


async def test_failure_after_the_first_chunk_is_raised_and_counted() -> None:
    name = unique("first")
    first = Fake(
        name, pieces=("half ", "an answer"), error=ProviderUnavailable("cut"), mid_stream=True
    )
    second = Fake(unique("second"))
    router = RouterProvider([first, second], fail_max=1, reset_timeout=60)
    before_fallbacks = fallbacks(name)
    before_failures = failures(name, "ProviderUnavailable")
    seen: list[Chunk] = []
    with pytest.raises(ProviderUnavailable, match="cut"):
        async for chunk in router.chat(HELLO, stream=True):
            seen.append(chunk)
    assert [c.delta for c in seen] == ["half "], "no second answer spliced onto the first"
    assert second.calls == 0
    assert router.breaker_states()[name] == "open"
    assert failures(name, "ProviderUnavailable") == before_failures + 1
    assert fallbacks(name) == before_fallbacks


async def test_a_consumer_stopping_early_closes_the_provider_stream_and_is_no_failure() -> None:
    first = Fake(unique("first"), pieces=("a ", "b ", "c"))
    router = RouterProvider([first], fail_max=1, reset_timeout=60)
    stream = router.chat(HELLO, stream=True)
    assert (await anext(stream)).delta == "a "
    await stream.aclose()  # type: ignore[attr-defined]
    assert first.closed_streams == 1
    assert router.breaker_states()[first.name] == "closed"


# -------------------------------------------------------------------- metrics


async def test_metrics_fallbacks_failures_and_breaker_state() -> None:
    a_name, b_name = unique("a"), unique("b")
    from chatprocessor.ops.metrics import BREAKER_STATE

    BREAKER_STATE.labels(a_name).set(2)  # a stale value from before: reset at construction
    a = Fake(a_name, error=RateLimited("busy"))
    b = Fake(b_name)
    router = RouterProvider([a, b], fail_max=2, reset_timeout=60)
    assert (gauge(a_name), gauge(b_name)) == (0.0, 0.0)

    await ask(router)
    assert fallbacks(a_name) == 1
    assert failures(a_name, "RateLimited") == 1
    assert gauge(a_name) == 0.0

    await ask(router)  # second failure: opens
    assert fallbacks(a_name) == 2
    assert failures(a_name, "RateLimited") == 2
    assert gauge(a_name) == 2.0

    await ask(router)  # skipped: handed on without a call, so no new failure
    assert fallbacks(a_name) == 3
    assert failures(a_name, "RateLimited") == 2
    assert fallbacks(b_name) == 0, "the last provider answered: nothing handed on"
    assert gauge(b_name) == 0.0


async def test_metrics_when_the_last_provider_fails_too() -> None:
    a_name, b_name = unique("a"), unique("b")
    a = Fake(a_name, error=ProviderUnavailable("down"))
    b = Fake(b_name, error=BadRequest("refused"))  # permanent, after a's transient failure
    with pytest.raises(ProviderUnavailable):
        await ask(RouterProvider([a, b]))
    assert fallbacks(a_name) == 1
    assert fallbacks(b_name) == 0, "no provider after the last one"
    assert failures(a_name, "ProviderUnavailable") == 1
    assert failures(b_name, "BadRequest") == 1


# --------------------------------------------------------- a real provider


async def test_breaker_around_a_real_ollama_provider() -> None:
    async with FakeOllama(models=["llama2"]) as fake:
        ollama = OllamaProvider(fake.url, model="llama2", timeout=5, connect_timeout=1)
        backup = Fake(unique("backup"), pieces=("backup",))
        router = RouterProvider([ollama, backup], fail_max=2, reset_timeout=RESET)
        try:
            chunks = await ask(router)
            assert text(chunks) == "Echo: hello"
            assert (chunks[-1].provider, chunks[-1].model) == ("ollama", "llama2")

            before = failures("ollama", "ProviderUnavailable")
            fake.fail_next(2, status=503)
            for _ in range(2):
                chunks = await ask(router, stream=True)
                assert text(chunks) == "backup"
                assert chunks[-1].provider == backup.name
            assert failures("ollama", "ProviderUnavailable") == before + 2
            assert router.breaker_states()["ollama"] == "open"

            sent = len(fake.requests)
            assert text(await ask(router)) == "backup"
            assert len(fake.requests) == sent, "the open breaker kept the request from Ollama"

            await asyncio.sleep(AFTER_RESET)
            chunks = await ask(router, stream=True)
            assert text(chunks) == "Echo: hello"
            assert chunks[-1].provider == "ollama"
            assert router.breaker_states()["ollama"] == "closed"
        finally:
            await router.close()


async def test_ollama_429_through_the_router_keeps_retry_after() -> None:
    async with FakeOllama(models=["llama2"], retry_after=7) as fake:
        router = RouterProvider([OllamaProvider(fake.url, model="llama2", timeout=5)])
        try:
            fake.fail_next(1, status=429)
            with pytest.raises(RateLimited) as info:
                await ask(router)
            assert info.value.retry_after == 7.0
        finally:
            await router.close()


# ------------------------------------------------------------ build_providers


@pytest.mark.parametrize("names", ["mock", "mock,mock"])
def test_build_providers_always_returns_a_router_with_the_breaker_settings(
    monkeypatch: pytest.MonkeyPatch, names: str
) -> None:
    monkeypatch.setenv("PROVIDERS", names)
    monkeypatch.setenv("BREAKER_FAIL_MAX", "3")
    monkeypatch.setenv("BREAKER_RESET_TIMEOUT", "12.5")
    router = build_providers(Settings.load())
    assert isinstance(router, RouterProvider)
    assert all(isinstance(p, MockProvider) for p in router.providers)
    assert len(router.providers) == len(names.split(","))
    assert [(b.fail_max, b.reset_timeout) for b in router.breakers] == [(3, 12.5)] * len(
        router.providers
    )
    assert router.default_model == "mock"
