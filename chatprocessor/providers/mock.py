"""A deterministic provider for development and tests; its answers say they are mock."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

from chatprocessor.providers.base import ChatRequest, Chunk


class MockProvider:
    name = "mock"
    default_model = "mock"

    def answer(self, request: ChatRequest) -> str:
        prompt = request.messages[-1].content if request.messages else ""
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

    async def list_models(self) -> list[str]:
        return [self.default_model]

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None
