"""Ollama through the official ``ollama`` client (``POST /api/chat``, ``GET /api/tags``).

Connecting fails fast (OLLAMA_CONNECT_TIMEOUT); reading waits OLLAMA_TIMEOUT.
An ``{"error": ...}`` line in the middle of a stream is a failure, never a
short answer. A 429 becomes RateLimited with the seconds of its Retry-After
header: the client's ResponseError carries no headers, so an httpx response
hook records them in a context variable that ``translate`` reads (the hook
runs in the task that awaits the request, the one that catches the error).
"""

from __future__ import annotations

import contextvars
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx
import ollama

from chatprocessor.core.errors import (
    BadRequest,
    ModelNotFound,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from chatprocessor.providers.base import ChatRequest, Chunk, parse_retry_after

#: Retry-After (seconds) of the last response this task received; None unless it was a 429.
_retry_after: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "ollama_retry_after", default=None
)


async def _record_retry_after(response: httpx.Response) -> None:
    """httpx response hook: remember a 429's Retry-After for ``translate``."""
    value = None
    if response.status_code == 429:
        value = parse_retry_after(response.headers.get("retry-after"))
    _retry_after.set(value)


def translate(exc: BaseException, model: str) -> ProviderError:
    """Map the client's and httpx's errors into the project's tree."""
    if isinstance(exc, ollama.ResponseError):
        status = exc.status_code
        if status == 404:
            return ModelNotFound(f"ollama: model {model!r} not found ({exc.error})")
        if status == 429:
            return RateLimited(f"ollama: rate limited ({exc.error})", _retry_after.get())
        if 400 <= status < 500:
            return BadRequest(f"ollama: request refused, HTTP {status}: {exc.error}")
        if status == -1:
            return ProviderUnavailable(f"ollama: error during generation: {exc.error}")
        return ProviderUnavailable(f"ollama: HTTP {status}: {exc.error}")
    if isinstance(exc, httpx.TimeoutException):
        return ProviderTimeout(f"ollama: no answer in time ({type(exc).__name__})")
    return ProviderUnavailable(f"ollama: cannot reach the server ({type(exc).__name__}: {exc})")


# ValueError covers a body that is not Ollama's JSON (a proxy's HTML error page, a
# truncated line): json.JSONDecodeError and pydantic's ValidationError derive from it.
_CLIENT_ERRORS = (ollama.ResponseError, httpx.HTTPError, ConnectionError, ValueError)
#: Health probes (/ready, start-up, check) must not wait OLLAMA_TIMEOUT on a hung server.
PROBE_TIMEOUT = 5.0


class OllamaProvider:
    name = "ollama"

    def __init__(
        self,
        base_url: str,
        *,
        model: str,
        timeout: float = 300.0,
        connect_timeout: float = 5.0,
    ) -> None:
        self.base_url = base_url
        self.default_model = model
        self._client = ollama.AsyncClient(
            host=base_url,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            event_hooks={"response": [_record_retry_after]},
        )
        self._probe = ollama.AsyncClient(
            host=base_url, timeout=httpx.Timeout(PROBE_TIMEOUT, connect=connect_timeout)
        )

    @staticmethod
    def _options(request: ChatRequest) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if request.temperature is not None:
            options["temperature"] = request.temperature
        if request.max_tokens is not None:
            options["num_predict"] = request.max_tokens
        return options

    @staticmethod
    def _chunk(part: Mapping[str, Any] | ollama.ChatResponse, model: str) -> Chunk:
        done = bool(part["done"])
        return Chunk(
            delta=(part["message"]["content"] if part["message"] else "") or "",
            done=done,
            model=part["model"] or model,
            prompt_tokens=part["prompt_eval_count"] if done else None,
            completion_tokens=part["eval_count"] if done else None,
        )

    async def chat(self, request: ChatRequest, *, stream: bool = False) -> AsyncIterator[Chunk]:
        model = request.model or self.default_model
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        options = self._options(request)
        _retry_after.set(None)
        try:
            if not stream:
                response = await self._client.chat(model=model, messages=messages, options=options)
                yield self._chunk(response, model)
                return
            parts = await self._client.chat(
                model=model, messages=messages, options=options, stream=True
            )
            finished = False
            async for part in parts:
                chunk = self._chunk(part, model)
                finished = chunk.done
                yield chunk
        except _CLIENT_ERRORS as exc:
            raise translate(exc, model) from exc
        if not finished:
            raise ProviderUnavailable("ollama: stream ended before done")

    async def list_models(self) -> list[str]:
        try:
            listing = await self._probe.list()
        except _CLIENT_ERRORS as exc:
            raise translate(exc, self.default_model) from exc
        return [m.model for m in listing.models if m.model]

    async def ping(self) -> bool:
        try:
            await self.list_models()
        except ProviderError:
            return False
        return True

    async def close(self) -> None:
        await self._client.close()  # type: ignore[no-untyped-call]
        await self._probe.close()  # type: ignore[no-untyped-call]
