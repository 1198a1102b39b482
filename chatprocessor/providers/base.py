"""The Provider protocol: what the engine needs from any LLM backend.

``chat`` yields chunks: with ``stream=True`` one per generated piece, else a
single one; the last chunk has ``done=True`` and carries the token counts.
Providers raise only the project's own ProviderError subclasses.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

from chatprocessor.core.job import ChatMessage


@dataclass(slots=True)
class ChatRequest:
    messages: list[ChatMessage]
    model: str | None = None  # None: the provider's default model
    temperature: float | None = None
    max_tokens: int | None = None
    #: Structured output: "json", or a JSON schema the answer must follow (Ollama's
    #: ``format``); None for free text. Providers that cannot enforce it ignore it.
    format: str | dict[str, Any] | None = None


@dataclass(slots=True)
class Chunk:
    delta: str
    done: bool = False
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    #: Set by a router: which of its providers produced the chunk.
    provider: str | None = None


class Provider(Protocol):
    #: Short name used in logs and metrics ("ollama", "embedded", "mock").
    name: str
    #: The model used when a job names none.
    default_model: str

    def chat(self, request: ChatRequest, *, stream: bool = False) -> AsyncIterator[Chunk]:
        """Answer a conversation; see the module docstring."""
        ...

    async def list_models(self) -> list[str]:
        """Names of the models this provider can run now."""
        ...

    async def ping(self) -> bool:
        """True when the provider can answer now (loads an embedded model on first call)."""
        ...

    async def close(self) -> None:
        """Release connections, threads and models."""
        ...


def same_model(a: str, b: str) -> bool:
    """Ollama treats ``llama2`` and ``llama2:latest`` as one model."""

    def norm(name: str) -> str:
        return name if ":" in name else f"{name}:latest"

    return norm(a) == norm(b)


def parse_retry_after(raw: str | None) -> float | None:
    """Seconds to wait from a Retry-After value: delay-seconds or an HTTP-date; else None."""
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # HTTP-dates are GMT; a date without a zone is not one
            return None
        return max(0.0, when.timestamp() - time.time())
    return seconds if math.isfinite(seconds) and seconds >= 0 else None
