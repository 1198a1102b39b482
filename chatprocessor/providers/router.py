"""Ordered providers (PROVIDERS=ollama,openai,embedded), each behind a circuit breaker.

A job goes to the first provider whose breaker lets it through; a transient
failure before the first chunk hands it to the next one. Once a stream has
started, a failure is raised: switching would splice two answers.

Breakers are pybreaker's ``CircuitBreaker``, one per provider, used through
``calling()`` around the whole stream:

- only transient ProviderErrors (unavailable, timeout, 429) are failures;
  ``fail_max`` consecutive ones open the breaker and the provider is skipped;
- a call cancelled by JOB_TIMEOUT (or shutdown) is a failure too: a hung
  provider must trip its breaker;
- anything else that ends a call is a success (pybreaker has no neutral
  outcome): an answer, a permanent refusal (the provider did answer) or the
  consumer stopping early;
- ``reset_timeout`` seconds after opening, the next call is the one trial
  (half-open); pybreaker would let concurrent calls through too, so the
  router skips the others while the probe runs. Success closes, failure reopens.

A permanent error (BadRequest, ModelNotFound) is raised at once when no
provider was skipped or failed before it. After that it only means this
fallback cannot serve the job (e.g. it lacks the model the job names), so
the router goes on and finally raises the earlier transient error, or
CircuitOpen (transient, with the shortest remaining cool-down as retry_after)
when the others were all skipped: the job is retried once a breaker may let it
through, instead of being dead-lettered.

``embed`` follows the same rules through the same breakers (a provider that is
down is down for both). Each provider uses its own default embedding model
unless the caller names one, so the result names the provider and model that
answered: vectors of different models are not comparable.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import TypeVar

import pybreaker

from chatprocessor.core.errors import CircuitOpen, ModelNotFound, ProviderError
from chatprocessor.ops import metrics
from chatprocessor.providers.base import ChatRequest, Chunk, Embeddings, Provider

log = logging.getLogger(__name__)

T = TypeVar("T")

#: BREAKER_STATE values.
STATE_VALUES = {pybreaker.STATE_CLOSED: 0, pybreaker.STATE_HALF_OPEN: 1, pybreaker.STATE_OPEN: 2}


def _not_a_failure(exc: BaseException) -> bool:
    """pybreaker exclusion: everything but a transient provider error or a cancelled call."""
    if isinstance(exc, asyncio.CancelledError):
        return False
    return not (isinstance(exc, ProviderError) and exc.transient)


class _StateGauge(pybreaker.CircuitBreakerListener):
    """Mirrors each breaker's state into BREAKER_STATE and the log; notes when each opened."""

    def __init__(self) -> None:
        self.opened_at: dict[str, float] = {}

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        metrics.BREAKER_STATE.labels(cb.name).set(STATE_VALUES[new_state.name])
        if new_state.name == pybreaker.STATE_OPEN:
            self.opened_at[str(cb.name)] = time.monotonic()
        old = old_state.name if old_state is not None else "-"
        log.warning("circuit breaker of provider %s: %s -> %s", cb.name, old, new_state.name)


class RouterProvider:
    def __init__(
        self, providers: list[Provider], *, fail_max: int = 5, reset_timeout: float = 30.0
    ) -> None:
        if not providers:
            raise ValueError("a router needs at least one provider")
        self.providers = providers
        #: Logs read "provider ollama,openai": the list it stands for.
        self.name = ",".join(provider.name for provider in providers)
        self.default_model = providers[0].default_model
        self.reset_timeout = reset_timeout
        self._listener = listener = _StateGauge()
        self.breakers = [
            pybreaker.CircuitBreaker(
                fail_max=fail_max,
                reset_timeout=reset_timeout,
                exclude=[_not_a_failure],
                listeners=[listener],
                name=provider.name,
                throw_new_error_on_trip=False,  # keep the provider's own error
            )
            for provider in providers
        ]
        #: Providers whose half-open trial call is running now.
        self._probing: set[int] = set()
        for provider in providers:
            metrics.BREAKER_STATE.labels(provider.name).set(0)

    @property
    def default_embedding_model(self) -> str:
        """The first provider's, read on use: a provider without embeddings still routes chat."""
        return self.providers[0].default_embedding_model

    def breaker_states(self) -> dict[str, str]:
        """Provider name -> "closed", "open" or "half-open" (for /health and tests).

        An open breaker whose reset_timeout has passed still reads "open" until
        the next job tries it.
        """
        return {p.name: b.current_state for p, b in zip(self.providers, self.breakers, strict=True)}

    def chat(self, request: ChatRequest, *, stream: bool = False) -> AsyncIterator[Chunk]:
        def tag(chunk: Chunk, provider: Provider) -> Chunk:
            chunk.provider = chunk.provider or provider.name
            chunk.model = chunk.model or provider.default_model
            return chunk

        return self._first_that_answers(lambda p: p.chat(request, stream=stream), tag)

    async def embed(self, texts: list[str], *, model: str | None = None) -> Embeddings:
        """As ``chat``: the first provider that answers gives the vectors."""

        async def one(provider: Provider) -> AsyncIterator[Embeddings]:
            yield await provider.embed(texts, model=model)

        def tag(result: Embeddings, provider: Provider) -> Embeddings:
            result.provider = result.provider or provider.name
            return result

        results = self._first_that_answers(one, tag)
        try:  # closed at once: the breaker records the call when the generator ends
            return await anext(results)
        finally:
            await results.aclose()

    async def _first_that_answers(
        self,
        call: Callable[[Provider], AsyncIterator[T]],
        tag: Callable[[T, Provider], T],
    ) -> AsyncGenerator[T, None]:
        """What ``call`` yields for the first provider that answers, in order, each behind
        its circuit breaker. Once a provider has yielded, its failures are the caller's."""
        last: ProviderError | None = None  # the last transient failure
        skipped: list[str] = []  # breaker open (or its trial call running)
        count = len(self.providers)
        for index, (provider, breaker) in enumerate(
            zip(self.providers, self.breakers, strict=True)
        ):
            started = False
            try:
                if breaker.current_state == pybreaker.STATE_HALF_OPEN and index in self._probing:
                    raise pybreaker.CircuitBreakerError("trial call already running")
                with breaker.calling():
                    probe = breaker.current_state == pybreaker.STATE_HALF_OPEN
                    if probe:
                        self._probing.add(index)
                    items = call(provider)
                    try:
                        async for item in items:
                            started = True
                            yield tag(item, provider)
                    finally:
                        if probe:
                            self._probing.discard(index)
                        # A consumer that stops early stops the provider too (frees its stream).
                        aclose = getattr(items, "aclose", None)
                        if aclose is not None:
                            await aclose()
                return
            except pybreaker.CircuitBreakerError:
                log.info("provider %s skipped: its circuit breaker is open", provider.name)
                skipped.append(provider.name)
            except ProviderError as exc:
                metrics.PROVIDER_FAILURES.labels(provider.name, type(exc).__name__).inc()
                if started or not (exc.transient or last is not None or skipped):
                    raise
                if exc.transient:
                    last = exc
                log.warning("provider %s failed (%s)", provider.name, exc)
            if index + 1 < count:
                metrics.FALLBACKS.labels(provider.name).inc()
                log.warning("trying provider %s", self.providers[index + 1].name)
        if last is not None:
            raise last
        raise CircuitOpen(
            f"no provider answered; circuit breaker open: {', '.join(skipped)}",
            retry_after=self._cool_down_left(skipped),
        )

    def _cool_down_left(self, names: list[str]) -> float | None:
        """Seconds until the first of these open breakers lets a trial call through."""
        now = time.monotonic()
        left = [
            self._listener.opened_at[name] + self.reset_timeout - now
            for name in names
            if name in self._listener.opened_at
        ]
        soonest = min(left, default=0.0)
        return soonest if soonest > 0 else None

    async def list_models(self) -> list[str]:
        models: list[str] = []
        for provider in self.providers:
            try:
                models.extend(await provider.list_models())
            except ProviderError:
                continue
        return models

    async def pull_model(self, name: str) -> None:
        """Pull ``name`` on the first provider that can pull models (Ollama)."""
        for provider in self.providers:
            pull = getattr(provider, "pull_model", None)
            if pull is not None:
                await pull(name)
                return
        raise ModelNotFound(f"no provider here can pull model {name!r}")

    async def ping(self) -> bool:
        for provider in self.providers:
            if await provider.ping():
                return True
        return False

    async def close(self) -> None:
        for provider in self.providers:
            await provider.close()
