"""An ordered list of providers (PROVIDERS=ollama,embedded): the next one answers when one fails.

A provider is skipped only for transient failures that happen before it sent
any text; once a stream has started, switching would splice two answers.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from chatprocessor.core.errors import ProviderError, ProviderUnavailable
from chatprocessor.providers.base import ChatRequest, Chunk, Provider

log = logging.getLogger(__name__)


class RouterProvider:
    name = "router"

    def __init__(self, providers: list[Provider]) -> None:
        if not providers:
            raise ValueError("a router needs at least one provider")
        self.providers = providers
        self.default_model = providers[0].default_model

    async def chat(self, request: ChatRequest, *, stream: bool = False) -> AsyncIterator[Chunk]:
        last: ProviderError | None = None
        for provider in self.providers:
            started = False
            try:
                async for chunk in provider.chat(request, stream=stream):
                    started = True
                    chunk.provider = chunk.provider or provider.name
                    yield chunk
                return
            except ProviderError as exc:
                if started or not exc.transient:
                    raise
                log.warning("provider %s failed (%s); trying the next one", provider.name, exc)
                last = exc
        raise last or ProviderUnavailable("no provider answered")

    async def list_models(self) -> list[str]:
        models: list[str] = []
        for provider in self.providers:
            try:
                models.extend(await provider.list_models())
            except ProviderError:
                continue
        return models

    async def ping(self) -> bool:
        for provider in self.providers:
            if await provider.ping():
                return True
        return False

    async def close(self) -> None:
        for provider in self.providers:
            await provider.close()
