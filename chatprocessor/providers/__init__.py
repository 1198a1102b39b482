"""LLM providers: one module per backend behind the Provider protocol of ``base``."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chatprocessor.providers.base import Provider
    from chatprocessor.settings import Settings


def build_provider(name: str, settings: Settings) -> Provider:
    """One provider by its PROVIDERS name."""
    if name == "ollama":
        from chatprocessor.providers.ollama import OllamaProvider

        return OllamaProvider(
            settings.ollama_base_url,
            model=settings.ollama_model,
            timeout=settings.ollama_timeout,
            connect_timeout=settings.ollama_connect_timeout,
            embedding_model=settings.ollama_embedding_model,
        )
    if name == "embedded":
        from chatprocessor.providers.embedded import EmbeddedProvider

        return EmbeddedProvider(
            model_path=settings.embedded_model_path,
            context=settings.embedded_context,
            threads=settings.embedded_threads,
            max_tokens=settings.embedded_max_tokens,
        )
    if name == "openai":
        from chatprocessor.providers.openai import OpenAIProvider

        return OpenAIProvider(
            settings.openai_base_url,
            api_key=settings.openai_api_key.get_secret_value(),
            model=settings.openai_model,
            timeout=settings.openai_timeout,
            connect_timeout=settings.openai_connect_timeout,
            embedding_model=settings.openai_embedding_model,
        )
    if name == "mock":
        from chatprocessor.providers.mock import MockProvider

        return MockProvider()
    raise ValueError(f"unknown provider {name!r}")


def build_providers(settings: Settings) -> Provider:
    """PROVIDERS as one router trying them in order, each behind a circuit breaker.

    A single provider gets a router too, so its breaker stops hammering it when it is down.
    """
    from chatprocessor.providers.router import RouterProvider

    providers = [build_provider(name, settings) for name in settings.provider_names]
    return RouterProvider(
        providers,
        fail_max=settings.breaker_fail_max,
        reset_timeout=settings.breaker_reset_timeout,
    )
