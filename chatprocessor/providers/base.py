"""The Provider protocol: what the engine needs from any LLM backend.

``chat`` yields chunks: with ``stream=True`` one per generated piece, else a
single one; the last chunk has ``done=True`` and carries the token counts.
``embed`` turns texts into one unit-length vector each (so a dot product is the
cosine similarity, whichever provider answered). Providers raise only the
project's own ProviderError subclasses.
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


@dataclass(slots=True)
class Embeddings:
    """The vectors of ``embed``: one per text, in the order of the texts."""

    vectors: list[list[float]]
    #: The model that made them: vectors of two models are not comparable.
    model: str
    #: Which provider answered ("ollama", "openai", ...): a router may fall back.
    provider: str
    prompt_tokens: int | None = None
    #: True for MockProvider's made-up vectors: never to be stored as real ones.
    mock: bool = False


class Provider(Protocol):
    #: Short name used in logs and metrics ("ollama", "embedded", "mock").
    name: str
    #: The model used when a job names none.
    default_model: str

    @property
    def default_embedding_model(self) -> str:
        """The model ``embed`` uses when the caller names none."""
        ...

    def chat(self, request: ChatRequest, *, stream: bool = False) -> AsyncIterator[Chunk]:
        """Answer a conversation; see the module docstring."""
        ...

    async def embed(self, texts: list[str], *, model: str | None = None) -> Embeddings:
        """One unit-length vector per text; model None: the provider's default embedding model.

        No texts: an empty result, without asking the provider.
        """
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


def unit(vector: list[float]) -> list[float]:
    """``vector`` scaled to length 1; returned as it is when it already is (or is all zeros)."""
    norm = math.sqrt(math.fsum(x * x for x in vector))
    if norm == 0.0 or abs(norm - 1.0) < 1e-6:
        return vector
    return [x / norm for x in vector]


def mean_pool(tokens: list[list[float]]) -> list[float]:
    """One vector for a text from one per token: their mean, dimension by dimension."""
    count = len(tokens)
    return [math.fsum(column) / count for column in zip(*tokens, strict=True)]


def as_vectors(raw: Any, count: int) -> list[list[float]]:
    """``count`` unit-length vectors from an answer's list of embeddings.

    A text may come back as one vector per token (llama.cpp with a model that
    declares no pooling, e.g. a chat model): those are mean-pooled. Raises ValueError
    when the answer is not that shape, so callers report a bad answer, not a crash.
    """
    if not isinstance(raw, list) or len(raw) != count:
        got = len(raw) if isinstance(raw, list) else type(raw).__name__
        raise ValueError(f"expected {count} embeddings, got {got}")
    vectors: list[list[float]] = []
    for item in raw:
        if not isinstance(item, list) or not item:
            raise ValueError("an embedding is not a non-empty list of numbers")
        if isinstance(item[0], list):
            if not all(isinstance(token, list) and _numbers(token) for token in item):
                raise ValueError("a per-token embedding is not lists of numbers")
            try:
                vectors.append(unit(mean_pool(item)))
            except ValueError as exc:  # zip(strict=True): tokens of unequal length
                raise ValueError(f"per-token vectors of unequal length ({exc})") from exc
        elif _numbers(item):
            vectors.append(unit([float(x) for x in item]))
        else:
            raise ValueError("an embedding is not a list of numbers")
    return vectors


def _numbers(values: list[Any]) -> bool:
    return all(isinstance(x, int | float) and not isinstance(x, bool) for x in values)
