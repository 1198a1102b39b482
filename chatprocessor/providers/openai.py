"""Any OpenAI-compatible server through the official ``openai`` client.

One adapter covers api.openai.com, vLLM, llama_cpp.server and Ollama's ``/v1``.
The client's own retries are off (``max_retries=0``): chatprocessor retries
through its delay queues, so a retry inside the client would double the wait
and hide failures from the circuit breaker. A 429's ``Retry-After`` travels on
in RateLimited. A stream that stops before a ``finish_reason`` is a failure,
never a short answer.

Embeddings go through ``embeddings.create`` with the client's default
encoding (it asks for base64 and decodes it: a quarter of the bytes of JSON
floats; servers that ignore it answer floats, which it passes through).
llama_cpp.server with a model that declares no pooling answers one vector per
token: those are mean-pooled here, as the embedded provider does.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any, cast

import httpx
import openai

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
)

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionMessageParam

    from chatprocessor.features.context import TokenCounter

#: Health probes (/ready, start-up, check) must not wait OPENAI_TIMEOUT on a hung server.
PROBE_TIMEOUT = 5.0
#: The embedding model used when the caller names none (OpenAI's cheapest current one).
DEFAULT_EMBEDDING_MODEL = "text-embedding-3-small"
#: llama_cpp.server's token counting route, relative to the /v1 base URL (it sits beside it).
TOKENIZE_ROUTE = "../extras/tokenize/count"
#: The client insists on a key; local servers (Ollama, llama_cpp.server) ignore it.
NO_KEY = "unused"
# openai 3.x (on httpx2) wraps transport errors met while reading a stream in its
# APITimeoutError / APIConnectionError; openai 1.x lets httpx's escape there.
# ValueError: a body that is not the API's JSON (a proxy's HTML page, a cut SSE line).
_CLIENT_ERRORS = (openai.OpenAIError, httpx.HTTPError, ValueError)


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from ``retry-after-ms``, else ``Retry-After`` (seconds or HTTP-date).

    None when absent or unusable. Hand-written: the client parses these headers
    only for its own retries, in private code. ``headers`` must match names
    case-insensitively, as httpx's do.
    """
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        try:
            ms = float(raw_ms)
        except ValueError:
            ms = math.nan
        if math.isfinite(ms) and ms >= 0:
            return ms / 1000
    return parse_retry_after(headers.get("retry-after"))


def translate(exc: BaseException, model: str) -> ProviderError:
    """Map the client's and httpx's errors into the project's tree."""
    # APITimeoutError subclasses APIConnectionError: test it first.
    if isinstance(exc, openai.APITimeoutError | httpx.TimeoutException):
        return ProviderTimeout(f"openai: no answer in time ({type(exc).__name__})")
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        detail = f"HTTP {status}: {exc.message}"
        if status == 429:
            seconds = retry_after(exc.response.headers)
            return RateLimited(f"openai: rate limited ({detail})", seconds)
        if status == 404:
            return ModelNotFound(f"openai: model {model!r} not found ({detail})")
        if status == 408:
            return ProviderTimeout(f"openai: the server gave up waiting ({detail})")
        if 400 <= status < 500:
            return BadRequest(f"openai: request refused, {detail}")
        return ProviderUnavailable(f"openai: {detail}")
    if isinstance(exc, openai.APIConnectionError):
        return ProviderUnavailable(f"openai: cannot reach the server ({exc.__cause__ or exc})")
    # A bare APIError is an error event inside a stream; then cut streams, bad JSON.
    return ProviderUnavailable(f"openai: bad answer ({type(exc).__name__}: {exc})")


class OpenAIProvider:
    name = "openai"

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str,
        model: str,
        timeout: float = 300.0,
        connect_timeout: float = 5.0,
        embedding_model: str = DEFAULT_EMBEDDING_MODEL,
    ) -> None:
        self.base_url = base_url
        self.default_model = model
        self.default_embedding_model = embedding_model
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=api_key or NO_KEY,
            # openai.Timeout is the Timeout of the HTTP library this client version uses.
            timeout=openai.Timeout(timeout, connect=connect_timeout),
            max_retries=0,
        )
        # Shares the client's connection pool; only the timeout differs.
        self._probe = self._client.with_options(
            timeout=openai.Timeout(PROBE_TIMEOUT, connect=connect_timeout)
        )
        self._counters: dict[str, _ServerCounter] = {}
        self._tokenize_refused = False

    @staticmethod
    def _options(request: ChatRequest) -> dict[str, Any]:
        # max_tokens, not max_completion_tokens: llama_cpp.server 0.3 knows only the former.
        options: dict[str, Any] = {}
        if request.temperature is not None:
            options["temperature"] = request.temperature
        if request.max_tokens is not None:
            options["max_tokens"] = request.max_tokens
        return options

    async def chat(self, request: ChatRequest, *, stream: bool = False) -> AsyncIterator[Chunk]:
        model = request.model or self.default_model
        messages = cast(
            "list[ChatCompletionMessageParam]",
            [{"role": m.role, "content": m.content} for m in request.messages],
        )
        options = self._options(request)
        try:
            if not stream:
                response = await self._client.chat.completions.create(
                    model=model, messages=messages, stream=False, **options
                )
                usage = response.usage
                yield Chunk(
                    delta=(response.choices[0].message.content or "") if response.choices else "",
                    done=True,
                    model=response.model or model,
                    prompt_tokens=usage.prompt_tokens if usage else None,
                    completion_tokens=usage.completion_tokens if usage else None,
                )
                return
            parts = await self._client.chat.completions.create(
                model=model,
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
                **options,
            )
            finished, used, usage = False, model, None
            async with parts:
                async for part in parts:
                    used = part.model or used
                    usage = part.usage or usage  # the extra last chunk, choices == []
                    for choice in part.choices:
                        finished = finished or choice.finish_reason is not None
                        if choice.delta.content:
                            yield Chunk(choice.delta.content, model=used)
        except _CLIENT_ERRORS as exc:
            raise translate(exc, model) from exc
        if not finished:
            raise ProviderUnavailable("openai: stream ended before a finish_reason")
        yield Chunk(
            "",
            done=True,
            model=used,
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
        )

    async def embed(self, texts: list[str], *, model: str | None = None) -> Embeddings:
        model = model or self.default_embedding_model
        if not texts:  # the API refuses an empty input list
            return Embeddings([], model=model, provider=self.name, prompt_tokens=0)
        try:
            response = await self._client.embeddings.create(model=model, input=texts)
            # Sorted by index: a server may answer in completion order. The client builds
            # answers without validation, so fields a lax server leaves out are read with
            # getattr.
            data = sorted(response.data, key=lambda item: getattr(item, "index", None) or 0)
            vectors = as_vectors([item.embedding for item in data], len(texts))
        except _CLIENT_ERRORS as exc:
            raise translate(exc, model) from exc
        usage = getattr(response, "usage", None)
        return Embeddings(
            vectors,
            model=getattr(response, "model", None) or model,
            provider=self.name,
            prompt_tokens=usage.prompt_tokens if usage else None,
        )

    async def token_counter(self, model: str | None = None) -> TokenCounter | None:
        """llama_cpp.server's own tokenizer (its ``/extras/tokenize/count`` route), to fit a
        conversation into the model's context; None on servers without it (OpenAI, Ollama,
        vLLM answer 404), remembered after the first refusal, or while unreachable."""
        model = model or self.default_model
        if self._tokenize_refused:
            return None
        counter = self._counters.get(model)
        if counter is None:
            base = httpx.URL(self.base_url.rstrip("/") + "/")
            candidate = _ServerCounter(self._probe, str(base.join(TOKENIZE_ROUTE)), model)
            try:
                await candidate.calibrate()
            except openai.APIStatusError as exc:
                self._tokenize_refused = 400 <= exc.status_code < 500  # 5xx: ask again later
                return None
            except ValueError:  # the route answers, but not with a count: not llama_cpp
                self._tokenize_refused = True
                return None
            except _CLIENT_ERRORS:
                return None  # unreachable now: ask again next time
            counter = self._counters[model] = candidate
        return counter

    async def list_models(self) -> list[str]:
        try:
            page = await self._probe.models.list()
        except _CLIENT_ERRORS as exc:
            raise translate(exc, self.default_model) from exc
        return [m.id for m in page.data]

    async def ping(self) -> bool:
        try:
            await self.list_models()
        except ProviderError:
            return False
        return True

    async def close(self) -> None:
        await self._client.close()


class _ServerCounter:
    """Counts with llama_cpp.server's tokenizer: one request per text, on the client's pool.

    The server always adds the model's BOS token; ``calibrate`` counts an empty text
    once to learn how many that is, and counts are given without it. Each request
    waits for the server's model lock, and with its default ``--interrupt_requests``
    ends a stream another job has running there (as any second request does): wrap it
    in a CachedCounter so history is counted once.
    """

    exact = True

    def __init__(self, client: openai.AsyncOpenAI, url: str, model: str) -> None:
        self.name = f"llama_cpp.server tokenizer ({model})"
        self._client = client
        self._url = url
        self._model = model
        self._bos = 0

    async def _tokens(self, text: str) -> int:
        # cast_to=object: the parsed JSON, whichever HTTP library this client version uses.
        answer = await self._client.post(
            self._url, cast_to=object, body={"input": text, "model": self._model}
        )
        count = answer.get("count") if isinstance(answer, dict) else None
        if not isinstance(count, int) or isinstance(count, bool):
            raise ValueError(f"no token count in the answer: {str(answer)[:200]!r}")
        return count

    async def calibrate(self) -> None:
        """Probe the route, and learn what the server adds to every text."""
        self._bos = await self._tokens("")

    async def count(self, texts: list[str]) -> list[int]:
        try:
            counts = await asyncio.gather(*(self._tokens(t) for t in texts if t))
        except _CLIENT_ERRORS as exc:
            raise translate(exc, self._model) from exc
        found = iter(counts)
        return [max(0, next(found) - self._bos) if t else 0 for t in texts]
