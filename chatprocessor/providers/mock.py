"""A deterministic provider for development and tests; its answers say they are mock.

Its embeddings are made up from a hash of each text: equal texts get equal
vectors, others unrelated ones (no meaning at all). The result is marked
``mock=True`` so nobody stores them as real vectors.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any

from chatprocessor.providers.base import ChatRequest, Chunk, Embeddings

#: Dimensions of a mock vector: enough to tell texts apart, small enough to read in a log.
MOCK_DIMENSIONS = 16


def mock_vector(text: str, dimensions: int = MOCK_DIMENSIONS) -> list[float]:
    """A unit-length vector from sha256(text): stable across runs, machines and Python versions
    (``hash()`` is salted per process)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    while len(digest) < 2 * dimensions:
        digest += hashlib.sha256(digest).digest()
    values = [int.from_bytes(digest[i : i + 2], "big") for i in range(0, 2 * dimensions, 2)]
    raw = [value / 32767.5 - 1.0 for value in values]
    norm = math.sqrt(math.fsum(v * v for v in raw)) or 1.0
    return [v / norm for v in raw]


def mock_json(schema: Mapping[str, Any]) -> Any:
    """The simplest value a JSON schema accepts (first enum value, minimum, required keys), so
    jobs asking for structured output (classifications) work with the mock provider."""
    if "enum" in schema:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = kind[0]
    if kind == "object":
        properties = schema.get("properties", {})
        return {name: mock_json(properties.get(name, {})) for name in schema.get("required", [])}
    if kind == "array":
        return [mock_json(schema.get("items", {})) for _ in range(schema.get("minItems", 0))]
    if kind in ("number", "integer"):
        low, high = schema.get("minimum", 0), schema.get("maximum")
        value = (low + high) / 2 if high is not None else low
        return int(value) if kind == "integer" else value
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    return "mock"


class MockProvider:
    name = "mock"
    default_model = "mock"
    default_embedding_model = "mock-embedding"

    def answer(self, request: ChatRequest) -> str:
        prompt = request.messages[-1].content if request.messages else ""
        if isinstance(request.format, dict):  # structured output: the simplest valid answer
            return json.dumps(mock_json(request.format))
        if request.format == "json":
            return json.dumps({"answer": f"[mock] You said: {prompt}"})
        return f"[mock] You said: {prompt}"

    async def chat(self, request: ChatRequest, *, stream: bool = False) -> AsyncIterator[Chunk]:
        text = self.answer(request)
        pieces = re.findall(r"\S+\s*", text) or [text]
        if request.max_tokens is not None:
            pieces = pieces[: request.max_tokens]
        prompt_tokens = sum(len(m.content.split()) for m in request.messages)
        if stream:
            for piece in pieces:
                yield Chunk(piece, model=self.default_model)
            yield Chunk(
                "",
                done=True,
                model=self.default_model,
                prompt_tokens=prompt_tokens,
                completion_tokens=len(pieces),
            )
        else:
            yield Chunk(
                "".join(pieces),
                done=True,
                model=self.default_model,
                prompt_tokens=prompt_tokens,
                completion_tokens=len(pieces),
            )

    async def embed(self, texts: list[str], *, model: str | None = None) -> Embeddings:
        return Embeddings(
            [mock_vector(text) for text in texts],
            model=model or self.default_embedding_model,
            provider=self.name,
            prompt_tokens=sum(len(text.split()) for text in texts),
            mock=True,
        )

    async def list_models(self) -> list[str]:
        return [self.default_model]

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None
