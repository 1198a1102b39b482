"""Ollama: chat (``POST /api/chat``) and embeddings (``POST /api/embed``) on aiohttp, listing
and pulling models through ``ollama``.

The chat call, made for every job, talks HTTP with aiohttp directly: under the
official ``ollama`` client, httpx's request building, cookie jar and pydantic
models cost more CPU per call than the rest of a job together (measured in
bench/overhead.py, where this choice is what lets chatprocessor keep up with a
bare aio-pika loop). The official client still serves the rare calls, listing and
pulling models (and the tests run it against the fake server, which proves the
fake speaks the protocol).

Connecting fails fast (OLLAMA_CONNECT_TIMEOUT); reading waits OLLAMA_TIMEOUT
between bytes. An ``{"error": ...}`` line in the middle of a stream is a
failure, never a short answer; a 429 becomes RateLimited with the seconds of
its Retry-After header.

Embeddings go through ``/api/embed`` on the same session (the deprecated
``/api/embeddings`` takes one text per call): one request for all the texts,
vectors already of unit length; an unknown model is ModelNotFound, as in chat.

Images ride in each message (``"images": [base64, ...]``) and structured output in
``format``, as Ollama's API has them. A pull (``POST /api/pull``) may take minutes:
it waits OLLAMA_TIMEOUT per progress line, not in total.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import httpx
import ollama
import orjson

from chatprocessor.core.errors import (
    BadRequest,
    ModelNotFound,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from chatprocessor.providers.base import (
    ChatRequest,
    Chunk,
    Embeddings,
    as_vectors,
    parse_retry_after,
    same_model,
)

log = logging.getLogger(__name__)

_JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}
#: Health probes (/ready, start-up, check) must not wait OLLAMA_TIMEOUT on a hung server.
PROBE_TIMEOUT = 5.0
#: Connections kept open to Ollama (aiohttp's default; more requests wait for one).
CONNECTIONS = 100
#: The embedding model used when the caller names none (Ollama's most pulled one).
DEFAULT_EMBEDDING_MODEL = "nomic-embed-text"
#: A pull logs a layer's progress once per this many steps (10: every 10 %), plus each new status.
PULL_LOG_STEPS = 10


def http_error(status: int, message: str, model: str, retry_after: float | None) -> ProviderError:
    """An error status of the Ollama API in the project's tree."""
    if status == 404:
        return ModelNotFound(f"ollama: model {model!r} not found ({message})")
    if status == 429:
        return RateLimited(f"ollama: rate limited ({message})", retry_after)
    if 400 <= status < 500:
        return BadRequest(f"ollama: request refused, HTTP {status}: {message}")
    return ProviderUnavailable(f"ollama: HTTP {status}: {message}")


def translate(exc: BaseException, model: str) -> ProviderError:
    """Map aiohttp's and the official client's errors into the project's tree."""
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, ollama.ResponseError):
        return http_error(exc.status_code, exc.error, model, None)
    if isinstance(exc, asyncio.TimeoutError | httpx.TimeoutException):  # aiohttp's derive
        return ProviderTimeout(f"ollama: no answer in time ({type(exc).__name__})")
    if isinstance(exc, ValueError):  # a proxy's HTML page, a truncated line
        return ProviderUnavailable(f"ollama: the answer is not Ollama's JSON ({exc})")
    return ProviderUnavailable(f"ollama: cannot reach the server ({type(exc).__name__}: {exc})")


# ValueError covers a body that is not Ollama's JSON (orjson's and pydantic's errors derive).
_CLIENT_ERRORS = (
    aiohttp.ClientError,
    aiohttp.http_exceptions.HttpProcessingError,  # e.g. LineTooLong in a stream
    asyncio.TimeoutError,
    ollama.ResponseError,
    httpx.HTTPError,
    OSError,
    ValueError,
)


class OllamaProvider:
    name = "ollama"

    def __init__(
        self,
        base_url: str,
        *,
        model: str,
        timeout: float = 300.0,
        connect_timeout: float = 5.0,
        embedding_model: str = DEFAULT_EMBEDDING_MODEL,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.default_model = model
        self.default_embedding_model = embedding_model
        self._read_timeout = timeout
        self._connect_timeout = connect_timeout
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=connect_timeout, sock_read=timeout
        )
        self._session: aiohttp.ClientSession | None = None  # made in the running loop
        self._probe = ollama.AsyncClient(
            host=base_url, timeout=httpx.Timeout(PROBE_TIMEOUT, connect=connect_timeout)
        )

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=CONNECTIONS),
                timeout=self._timeout,
                # One server, no sessions: no cookie jar to update on every answer. Proxy
                # variables are ignored (aiohttp's trust_env=False): Ollama is local.
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    @staticmethod
    def _body(request: ChatRequest, model: str, stream: bool) -> bytes:
        # orjson writes the images tuple as an array as it is: no copy, and messages
        # without images cost one truth test.
        body: dict[str, Any] = {
            "model": model,
            "messages": [
                {"role": m.role, "content": m.content, "images": m.images}
                if m.images
                else {"role": m.role, "content": m.content}
                for m in request.messages
            ],
            "stream": stream,
        }
        if request.format is not None:
            body["format"] = request.format
        options: dict[str, Any] = {}
        if request.temperature is not None:
            options["temperature"] = request.temperature
        if request.max_tokens is not None:
            options["num_predict"] = request.max_tokens
        if options:
            body["options"] = options
        return orjson.dumps(body)

    @staticmethod
    def _chunk(part: Mapping[str, Any], model: str) -> Chunk:
        if not isinstance(part, Mapping):
            raise ProviderUnavailable(f"ollama: expected a JSON object, got {type(part).__name__}")
        if "error" in part:
            raise ProviderUnavailable(f"ollama: error during generation: {part['error']}")
        done = bool(part.get("done"))
        message = part.get("message") or {}
        return Chunk(
            delta=message.get("content") or "",
            done=done,
            model=part.get("model") or model,
            prompt_tokens=part.get("prompt_eval_count") if done else None,
            completion_tokens=part.get("eval_count") if done else None,
        )

    async def chat(self, request: ChatRequest, *, stream: bool = False) -> AsyncIterator[Chunk]:
        model = request.model or self.default_model
        body = self._body(request, model, stream)
        try:
            async with self._http().post(
                f"{self.base_url}/api/chat", data=body, headers=_JSON_HEADERS
            ) as response:
                if response.status >= 400:
                    raise await _failure(response, model)
                if not stream:
                    yield self._chunk(orjson.loads(await response.read()), model)
                    return
                finished = False
                async for line in response.content:  # NDJSON: one object per line
                    if line.strip():
                        chunk = self._chunk(orjson.loads(line), model)
                        finished = chunk.done
                        yield chunk
        except _CLIENT_ERRORS as exc:
            raise translate(exc, model) from exc
        if not finished:
            raise ProviderUnavailable("ollama: stream ended before done")

    async def embed(self, texts: list[str], *, model: str | None = None) -> Embeddings:
        model = model or self.default_embedding_model
        if not texts:
            return Embeddings([], model=model, provider=self.name, prompt_tokens=0)
        body = orjson.dumps({"model": model, "input": texts})
        try:
            async with self._http().post(
                f"{self.base_url}/api/embed", data=body, headers=_JSON_HEADERS
            ) as response:
                if response.status >= 400:
                    raise await _failure(response, model)
                answer = orjson.loads(await response.read())
                if not isinstance(answer, dict):
                    raise ValueError(f"an embed answer is an object, not {type(answer).__name__}")
                vectors = as_vectors(answer.get("embeddings"), len(texts))
        except _CLIENT_ERRORS as exc:
            raise translate(exc, model) from exc
        tokens = answer.get("prompt_eval_count")
        return Embeddings(
            vectors,
            model=str(answer.get("model") or model),
            provider=self.name,
            prompt_tokens=tokens if isinstance(tokens, int) else None,
        )

    async def list_models(self) -> list[str]:
        try:
            listing = await self._probe.list()
        except _CLIENT_ERRORS as exc:
            raise translate(exc, self.default_model) from exc
        return [m.model for m in listing.models if m.model]

    async def has_model(self, name: str | None = None) -> bool:
        """Whether Ollama has ``name`` (default: the configured model) installed now.

        ``llama2`` and ``llama2:latest`` are one model. An unreachable server raises
        ProviderUnavailable/ProviderTimeout instead of answering False: "absent" would lead
        a caller to start a pull that cannot work either.
        """
        wanted = name or self.default_model
        return any(same_model(wanted, installed) for installed in await self.list_models())

    async def pull_model(self, name: str | None = None) -> None:
        """Download ``name`` (default: the configured model) into Ollama, logging progress.

        Waits up to the provider's read timeout for each progress line (a pull takes
        minutes, a line comes every fraction of a second), so its own client: the shared
        one gives up after PROBE_TIMEOUT. Raises ModelNotFound when Ollama cannot pull that
        name (its ``{"error": ...}`` line or a 4xx), else as ``chat`` does.
        """
        model = name or self.default_model
        progress = _PullProgress(model)
        timeout = httpx.Timeout(self._read_timeout, connect=self._connect_timeout)
        client = ollama.AsyncClient(host=self.base_url, timeout=timeout)
        try:
            async for part in await client.pull(model, stream=True):
                progress.update(part.status, part.digest, part.completed, part.total)
        except ollama.ResponseError as exc:
            raise _pull_error(exc, model) from exc
        except _CLIENT_ERRORS as exc:
            raise translate(exc, model) from exc
        finally:
            await client.close()  # type: ignore[no-untyped-call]
        if not progress.succeeded:
            raise ProviderUnavailable(f"ollama: the pull of {model!r} ended before success")

    async def ping(self) -> bool:
        try:
            await self.list_models()
        except ProviderError:
            return False
        return True

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()
        await self._probe.close()  # type: ignore[no-untyped-call]


async def _failure(response: aiohttp.ClientResponse, model: str) -> ProviderError:
    """An error status of the Ollama API, with its message and any Retry-After."""
    return http_error(
        response.status,
        _error_text(await response.read(), response.reason),
        model,
        parse_retry_after(response.headers.get("Retry-After")),
    )


def _error_text(body: bytes, reason: str | None) -> str:
    """Ollama's ``{"error": ...}`` message, else the body's text, else the reason phrase."""
    try:
        error = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        error = None
    if error:
        return str(error)
    return body.decode(errors="replace").strip()[:500] or reason or "no message"


def _pull_error(exc: ollama.ResponseError, model: str) -> ProviderError:
    """A refused pull: Ollama cannot get that name (an error line, a 4xx), else as in chat."""
    status = exc.status_code
    if status == -1:  # the official client's mark for an {"error": ...} line in a stream
        return ModelNotFound(f"ollama: cannot pull {model!r}: {exc.error}")
    if 400 <= status < 500 and status != 429:
        return ModelNotFound(f"ollama: cannot pull {model!r}, HTTP {status}: {exc.error}")
    return http_error(status, exc.error, model, None)


class _PullProgress:
    """Picks the progress lines of a pull worth logging: Ollama sends one every ~60 ms per
    layer, so a layer logs each PULL_LOG_STEPS-th of its size, and each new status."""

    __slots__ = ("_statuses", "_steps", "model", "succeeded")

    def __init__(self, model: str) -> None:
        self.model = model
        self.succeeded = False
        self._statuses: dict[str | None, str] = {}  # last status logged, per digest
        self._steps: dict[str, int] = {}  # last step logged, per digest

    def update(
        self, status: str | None, digest: str | None, completed: int | None, total: int | None
    ) -> None:
        status = status or ""
        if status == "success":
            self.succeeded = True
        new_status = self._statuses.get(digest) != status
        if not (digest and total):
            if new_status:
                self._statuses[digest] = status
                log.info("ollama: pulling %s: %s", self.model, status)
            return
        done = min(max(completed or 0, 0), total)
        step = done * PULL_LOG_STEPS // total
        if not new_status and step <= self._steps.get(digest, -1):
            return
        self._statuses[digest] = status
        self._steps[digest] = step
        log.info(
            "ollama: pulling %s: %s %d%% of %s",
            self.model,
            status,
            done * 100 // total,
            _size(total),
        )


def _size(n: int) -> str:
    """Bytes for a person: 3.8 GB, 12 kB."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"
