"""A fake Ollama HTTP server (aiohttp) for tests and benchmarks.

It speaks the same REST protocol as Ollama (``/api/chat``, ``/api/generate``,
``/api/embed``, ``/api/tags``, ``/api/pull``, ``/api/version``, ``/``), so the
official ``ollama`` client and our own providers can be pointed at ``fake.url``.
Like Ollama it also serves the OpenAI API under ``/v1`` (``/v1/models``,
``/v1/chat/completions``, JSON or SSE, ``/v1/embeddings``, floats or base64),
for the official ``openai`` client at ``fake.url + "/v1"``; its errors there
have OpenAI's ``{"error": {...}}`` shape.

Usage::

    async with FakeOllama(models=["llama2"], latency=0.1) as fake:
        client = ollama.AsyncClient(host=fake.url)
        ...
        fake.fail_next(1, status=503)
        assert fake.max_in_flight <= 2

Inference endpoints (chat, generate, embed) go through the same pipeline as in
Ollama: validation (400 / 404 answered at once), the concurrency queue
(``max_concurrency``), ``latency``, then the answer or the injected failure.

Images (base64, in chat messages or at the top of a generate request) must be strict
base64 as Ollama's decoder wants (else 400); :attr:`FakeOllama.images` lists those
received. A request with ``format`` ("json" or a JSON schema) is answered with
``json.dumps(fake.json_answer)`` instead of the echo. ``/api/pull`` streams progress
lines like Ollama's and then lists the model; with ``fake.pullable`` set, other names
fail as in Ollama (``{"error": "pull model manifest: file does not exist"}``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import math
import re
import string
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from types import TracebackType
from typing import Any, Self

from aiohttp import web

__all__ = ["FakeOllama"]

JSONDict = dict[str, Any]

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
MID_STREAM_ERROR = "an error was encountered while running the model: unexpected EOF"
_DEFAULT_ERRORS: dict[int, str] = {
    400: "invalid request",
    404: "not found",
    429: "too many requests",
    500: "llama runner process has terminated: exit status 2",
    502: "bad gateway",
    503: "server busy, please try again.  maximum pending requests exceeded",
    504: "gateway timeout",
}
_CHUNK_RE = re.compile(r"\S+\s*")
_EMBED_DIM = 8
#: What Ollama answers when the registry has no such model.
PULL_NOT_FOUND = "pull model manifest: file does not exist"
#: Default answer to a request with ``format`` (see ``FakeOllama.json_answer``).
DEFAULT_JSON_ANSWER: dict[str, Any] = {"answer": "Paris", "confidence": 0.9}
_BASE64_CHARS = frozenset(string.ascii_letters + string.digits + "+/=\r\n")


class _Fault(Enum):
    """Failure injected into one inference request."""

    NONE = "none"
    HANG = "hang"
    FAIL = "fail"
    MID_STREAM = "mid_stream"


def normalize_model(name: str) -> str:
    """Return ``name`` with ``:latest`` appended when it carries no tag."""
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


def split_chunks(text: str) -> list[str]:
    """Split an answer into token-ish chunks (words with their trailing spaces)."""
    chunks: list[str] = _CHUNK_RE.findall(text)
    lead = text[: len(text) - len(text.lstrip())]
    if lead and chunks:
        chunks[0] = lead + chunks[0]
    elif lead:
        chunks = [lead]
    return chunks


def fake_embedding(text: str, dim: int = _EMBED_DIM) -> list[float]:
    """Deterministic L2-normalised vector derived from sha256(text)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    raw = [(int.from_bytes(digest[2 * i : 2 * i + 2], "big") / 32767.5) - 1.0 for i in range(dim)]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [v / norm for v in raw]


def word_embedding(text: str, dim: int = 256) -> list[float]:
    """A vector with meaning, for retrieval tests: hashed bag of lower-cased words, L2-normalised
    (texts sharing words point the same way; nothing like a real model, but not noise)."""
    raw = [0.0] * dim
    for word in re.findall(r"[a-z0-9]+", text.lower()):
        raw[int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "big") % dim] += 1.0
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [v / norm for v in raw]


def _now() -> str:
    """RFC 3339 timestamp like Ollama's ``created_at``."""
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _word_count(text: str) -> int:
    """Number of whitespace-separated words in ``text``."""
    return len(text.split())


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """JSON error response shaped like Ollama's ``{"error": ...}``."""
    return web.json_response({"error": message}, status=status, headers=headers)


def _openai_error_body(status: int, message: str) -> JSONDict:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = "invalid_request_error" if 400 <= status < 500 else "api_error"
    code = "model_not_found" if status == 404 else None
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _openai_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """JSON error response shaped like OpenAI's (and Ollama's ``/v1``)."""
    return web.json_response(_openai_error_body(status, message), status=status, headers=headers)


def _as_openai_error(response: web.Response) -> web.Response:
    """The same error in OpenAI's shape (validation is shared with the native API)."""
    body = json.loads(response.text or "{}")
    message = str(body.get("error") or response.reason)
    return _openai_error(response.status, message)


@dataclass(frozen=True, slots=True)
class _Completion:
    """A parsed chat/generate request."""

    chat: bool
    model: str
    prompt: str
    prompt_words: int
    streaming: bool
    num_predict: int | None
    started: int
    include_usage: bool = False
    #: ``format`` was "json" or a schema: the answer is ``json_answer``, not the echo.
    structured: bool = False

    @property
    def key(self) -> str:
        """Field holding the answer: ``message`` (chat) or ``response`` (generate)."""
        return "message" if self.chat else "response"

    def payload(self, content: str) -> Any:
        """The answer field's value for ``content``."""
        return {"role": "assistant", "content": content} if self.chat else content

    @classmethod
    def parse(cls, body: JSONDict, *, chat: bool, started: int) -> _Completion | web.Response:
        """Extract what the fake needs from a validated request body (or a 400)."""
        if (bad := _check_images(body, chat=chat)) is not None:
            return bad
        structured = _structured(body.get("format"))
        if isinstance(structured, web.Response):
            return structured
        if chat:
            messages = body.get("messages") or []
            if not isinstance(messages, list):
                return _error(400, "messages must be a list")
            prompt = _last_user_content(messages)
            prompt_words = sum(
                _word_count(str(m.get("content") or "")) for m in messages if isinstance(m, dict)
            )
        else:
            prompt = str(body.get("prompt") or "")
            prompt_words = _word_count(prompt) + _word_count(str(body.get("system") or ""))
        options = body.get("options")
        num_predict = options.get("num_predict") if isinstance(options, dict) else None
        if not isinstance(num_predict, int) or isinstance(num_predict, bool) or num_predict < 0:
            num_predict = None  # Ollama: -1 / -2 mean "no limit"
        return cls(
            chat=chat,
            model=str(body["model"]),
            prompt=prompt,
            prompt_words=prompt_words,
            streaming=body.get("stream", True) is not False,
            num_predict=num_predict,
            started=started,
            structured=structured,
        )

    @classmethod
    def parse_openai(cls, body: JSONDict, *, started: int) -> _Completion | web.Response:
        """The same for ``/v1/chat/completions`` (not streamed unless ``stream: true``)."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _openai_error(400, "messages must be a non-empty list")
        texts: list[JSONDict] = [
            {"role": m.get("role"), "content": _openai_text(m.get("content"))}
            for m in messages
            if isinstance(m, dict)
        ]
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            limit = None
        options = body.get("stream_options")
        return cls(
            chat=True,
            model=str(body["model"]),
            prompt=_last_user_content(texts),
            prompt_words=sum(_word_count(str(t["content"])) for t in texts),
            streaming=body.get("stream") is True,
            num_predict=limit,
            started=started,
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        )


class FakeOllama:
    """In-process fake Ollama server bound to 127.0.0.1 on an ephemeral port."""

    def __init__(
        self,
        *,
        models: list[str] | None = None,
        latency: float = 0.0,
        token_delay: float = 0.0,
        max_concurrency: int | None = None,
        reply: Callable[[str], str] | None = None,
        retry_after: float | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        """Configure the fake; nothing listens until :meth:`start`."""
        self.models: list[str] = [normalize_model(m) for m in (models or ["llama2"])]
        self.latency = latency
        self.token_delay = token_delay
        self.max_concurrency = max_concurrency
        self.reply: Callable[[str], str] = reply or (lambda prompt: f"Echo: {prompt}")
        self.retry_after = retry_after
        self.host = host
        self.port = port
        #: The answer (as JSON text) to requests with ``format``; set it per test.
        self.json_answer: Any = dict(DEFAULT_JSON_ANSWER)
        #: Names ``/api/pull`` can get (None: any name); others fail like Ollama's.
        self.pullable: set[str] | None = None
        #: Seconds between two progress lines of a streamed pull.
        self.pull_delay = 0.0
        #: Makes each text's vector (text, size): noise by default; word_embedding has meaning.
        self.embedder: Callable[[str, int], list[float]] = fake_embedding

        self.requests: list[JSONDict] = []
        self.in_flight = 0
        self.max_in_flight = 0

        self._fail_remaining = 0
        self._fail_status = 500
        self._fail_body: str | None = None
        self._fail_headers: dict[str, str] = {}
        self._mid_stream_remaining = 0
        self._hang_remaining = 0

        self._semaphore: asyncio.Semaphore | None = (
            asyncio.Semaphore(max_concurrency) if max_concurrency is not None else None
        )
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._url: str | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321`` (only once started)."""
        if self._url is None:
            raise RuntimeError("FakeOllama is not started")
        return self._url

    async def start(self) -> None:
        """Start listening; afterwards :attr:`url` is available."""
        if self._runner is not None:
            return
        self._closing = asyncio.Event()
        app = web.Application()
        app.router.add_get("/", self._handle_root)
        app.router.add_get("/api/version", self._handle_version)
        app.router.add_get("/api/tags", self._handle_tags)
        app.router.add_post("/api/chat", self._handle_chat)
        app.router.add_post("/api/generate", self._handle_generate)
        app.router.add_post("/api/embed", self._handle_embed)
        app.router.add_post("/api/pull", self._handle_pull)
        app.router.add_get("/v1/models", self._handle_openai_models)
        app.router.add_post("/v1/chat/completions", self._handle_openai_chat)
        app.router.add_post("/v1/embeddings", self._handle_openai_embeddings)
        # handler_cancellation: a client that gives up frees its slot, as in Ollama.
        runner = web.AppRunner(
            app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        self._runner = runner
        port = int(runner.addresses[0][1])
        self.port = port
        self._url = f"http://{self.host}:{port}"

    async def stop(self) -> None:
        """Stop the server; hung requests are released first."""
        self._closing.set()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        """Start the server."""
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server."""
        await self.stop()

    # ------------------------------------------------------------ fault injection

    def fail_next(
        self,
        n: int,
        status: int = 500,
        body: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Make the next ``n`` inference requests answer ``status`` with ``{"error": body}``.

        ``headers`` are added to those answers (e.g. ``retry-after-ms``).
        """
        self._fail_remaining = n
        self._fail_status = status
        self._fail_body = body
        self._fail_headers = dict(headers or {})

    def fail_mid_stream_next(self, n: int) -> None:
        """Make the next ``n`` streaming chat/generate requests break after 1-2 chunks."""
        self._mid_stream_remaining = n

    def hang_next(self, n: int) -> None:
        """Make the next ``n`` inference requests never answer (until stop/disconnect)."""
        self._hang_remaining = n

    def reset(self) -> None:
        """Clear injected faults and observations."""
        self._fail_remaining = self._mid_stream_remaining = self._hang_remaining = 0
        self.requests.clear()
        self.in_flight = self.max_in_flight = 0

    def add_model(self, name: str) -> None:
        """Make ``name`` available (as ``/api/pull`` does)."""
        full = normalize_model(name)
        if full not in self.models:
            self.models.append(full)

    def has_model(self, name: str) -> bool:
        """Whether ``name`` is known ("llama2" and "llama2:latest" are the same)."""
        return normalize_model(name) in self.models

    @property
    def images(self) -> list[str]:
        """Every base64 image received on ``/api/chat`` and ``/api/generate``, in order."""
        out: list[str] = []
        for entry in self.requests:
            body = entry.get("body")
            if not isinstance(body, dict):
                continue
            if entry["path"] == "/api/generate":
                out.extend(body.get("images") or [])
            elif entry["path"] == "/api/chat":
                for message in body.get("messages") or []:
                    if isinstance(message, dict):
                        out.extend(message.get("images") or [])
        return out

    def _can_pull(self, name: str) -> bool:
        """Whether the fake registry has ``name`` (``pullable``, or anything when None)."""
        if self.pullable is None:
            return True
        return normalize_model(name) in {normalize_model(m) for m in self.pullable}

    def _take_fault(self, streaming: bool) -> _Fault:
        """Consume at most one injected fault for the current request."""
        if self._hang_remaining > 0:
            self._hang_remaining -= 1
            return _Fault.HANG
        if self._fail_remaining > 0:
            self._fail_remaining -= 1
            return _Fault.FAIL
        if streaming and self._mid_stream_remaining > 0:
            self._mid_stream_remaining -= 1
            return _Fault.MID_STREAM
        return _Fault.NONE

    def _injected_error(self, *, openai: bool = False) -> web.Response:
        """The response configured by :meth:`fail_next` (in OpenAI's shape for ``/v1``)."""
        status = self._fail_status
        message = self._fail_body or _DEFAULT_ERRORS.get(status, f"injected failure ({status})")
        headers: dict[str, str] | None = dict(self._fail_headers) or None
        if status == 429 and self.retry_after is not None:
            ra = self.retry_after
            headers = headers or {}
            headers["Retry-After"] = str(int(ra)) if float(ra).is_integer() else str(ra)
        return (_openai_error if openai else _error)(status, message, headers)

    # --------------------------------------------------------------------- helpers

    async def _record(self, request: web.Request) -> Any:
        """Record the request; return its parsed JSON body (None if empty, ValueError if bad)."""
        raw = await request.read()
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError as exc:
                body = exc
        entry: JSONDict = {"method": request.method, "path": request.path}
        entry["body"] = None if isinstance(body, ValueError) else body
        self.requests.append(entry)
        return body

    async def _read_json(self, request: web.Request) -> JSONDict | web.Response:
        """Record a POST request and return its JSON object body, or a 400 response."""
        body = await self._record(request)
        if isinstance(body, ValueError):
            return _error(400, f"invalid JSON in request body: {body}")
        if not isinstance(body, dict):
            return _error(400, "missing request body")
        return body

    def _check_model(self, body: JSONDict) -> web.Response | None:
        """400 when the model is missing, 404 when it is unknown."""
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return _error(400, "model is required")
        if not self.has_model(model):
            return _error(404, f'model "{model}" not found, try pulling it first')
        return None

    async def _acquire(self) -> None:
        """Wait for a processing slot, then count the request as in flight."""
        if self._semaphore is not None:
            await self._semaphore.acquire()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _release(self) -> None:
        """Free the processing slot."""
        self.in_flight -= 1
        if self._semaphore is not None:
            self._semaphore.release()

    async def _hang(self) -> web.Response:
        """Block until the server stops (or the client disconnects and we are cancelled)."""
        await self._closing.wait()
        return _error(503, "server shutting down")

    # -------------------------------------------------------------------- handlers

    async def _handle_root(self, request: web.Request) -> web.Response:
        """``GET /``."""
        await self._record(request)
        return web.Response(text="Ollama is running", content_type="text/plain")

    async def _handle_version(self, request: web.Request) -> web.Response:
        """``GET /api/version``."""
        await self._record(request)
        return web.json_response({"version": "0.0.0-fake"})

    async def _handle_tags(self, request: web.Request) -> web.Response:
        """``GET /api/tags``: one entry per configured model."""
        await self._record(request)
        models = []
        for name in self.models:
            digest = hashlib.sha256(name.encode()).hexdigest()
            models.append(
                {
                    "name": name,
                    "model": name,
                    "modified_at": "2024-01-01T00:00:00.000000000Z",
                    "size": 3_825_819_519,
                    "digest": digest,
                    "details": {
                        "parent_model": "",
                        "format": "gguf",
                        "family": "llama",
                        "families": ["llama"],
                        "parameter_size": "7B",
                        "quantization_level": "Q4_0",
                    },
                }
            )
        return web.json_response({"models": models})

    async def _handle_chat(self, request: web.Request) -> web.StreamResponse:
        """``POST /api/chat``."""
        return await self._handle_completion(request, chat=True)

    async def _handle_generate(self, request: web.Request) -> web.StreamResponse:
        """``POST /api/generate``."""
        return await self._handle_completion(request, chat=False)

    async def _handle_completion(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        """Shared pipeline of chat and generate."""
        started = time.perf_counter_ns()
        body = await self._read_json(request)
        if isinstance(body, web.Response):
            return body
        if (error := self._check_model(body)) is not None:
            return error
        job = _Completion.parse(body, chat=chat, started=started)
        if isinstance(job, web.Response):
            return job

        fault = self._take_fault(job.streaming)
        await self._acquire()
        try:
            if self.latency > 0:
                await asyncio.sleep(self.latency)
            if fault is _Fault.HANG:
                return _as_openai_error(await self._hang())
            if fault is _Fault.FAIL:
                return self._injected_error()
            answer = json.dumps(self.json_answer) if job.structured else self.reply(job.prompt)
            chunks = split_chunks(answer)
            done_reason = "stop"
            if job.num_predict is not None and len(chunks) > job.num_predict:
                chunks = chunks[: job.num_predict]
                done_reason = "length"
            if not job.streaming:
                if self.token_delay > 0 and chunks:
                    await asyncio.sleep(self.token_delay * len(chunks))
                return web.json_response(self._final(job, chunks, done_reason))
            return await self._stream(request, job, chunks, done_reason, fault)
        finally:
            self._release()

    async def _stream(
        self,
        request: web.Request,
        job: _Completion,
        chunks: list[str],
        done_reason: str,
        fault: _Fault,
    ) -> web.StreamResponse:
        """Write the NDJSON stream (possibly broken off by an injected error line)."""
        response = web.StreamResponse(status=200, headers={"Content-Type": NDJSON})
        await response.prepare(request)
        broken = fault is _Fault.MID_STREAM
        emit = chunks[: min(2, max(1, len(chunks) // 2))] if broken else chunks
        for i, chunk in enumerate(emit):
            if i and self.token_delay > 0:
                await asyncio.sleep(self.token_delay)
            line = {
                "model": job.model,
                "created_at": _now(),
                job.key: job.payload(chunk),
                "done": False,
            }
            await response.write(_line(line))
        if self.token_delay > 0 and emit:
            await asyncio.sleep(self.token_delay)
        if broken:
            await response.write(_line({"error": MID_STREAM_ERROR}))
        else:
            await response.write(_line(self._final(job, chunks, done_reason)))
        await response.write_eof()
        return response

    def _final(self, job: _Completion, chunks: list[str], done_reason: str) -> JSONDict:
        """The ``done: true`` object (whole answer unless streaming) with the counters."""
        out: JSONDict = {
            "model": job.model,
            "created_at": _now(),
            job.key: job.payload("" if job.streaming else "".join(chunks)),
            "done": True,
            "done_reason": done_reason,
            "total_duration": time.perf_counter_ns() - job.started,
            "load_duration": 1_000,
            "prompt_eval_count": job.prompt_words,
            "prompt_eval_duration": int(self.latency * 1e9),
            "eval_count": len(chunks),
            "eval_duration": int(self.token_delay * 1e9 * len(chunks)) or 1_000 * len(chunks),
        }
        if not job.chat:
            out["context"] = list(range(job.prompt_words + len(chunks)))
        return out

    # ----------------------------------------------------------- OpenAI API (/v1)

    async def _handle_openai_models(self, request: web.Request) -> web.Response:
        """``GET /v1/models``: one entry per configured model, as Ollama lists them."""
        await self._record(request)
        data = [
            {"id": name, "object": "model", "created": 1_704_067_200, "owned_by": "library"}
            for name in self.models
        ]
        return web.json_response({"object": "list", "data": data})

    async def _handle_openai_chat(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/chat/completions``: the chat pipeline with OpenAI's shapes."""
        started = time.perf_counter_ns()
        body = await self._read_json(request)
        if isinstance(body, web.Response):
            return _as_openai_error(body)
        if (error := self._check_model(body)) is not None:
            return _as_openai_error(error)
        job = _Completion.parse_openai(body, started=started)
        if isinstance(job, web.Response):
            return job

        fault = self._take_fault(job.streaming)
        await self._acquire()
        try:
            if self.latency > 0:
                await asyncio.sleep(self.latency)
            if fault is _Fault.HANG:
                return await self._hang()
            if fault is _Fault.FAIL:
                return self._injected_error(openai=True)
            chunks = split_chunks(self.reply(job.prompt))
            finish_reason = "stop"
            if job.num_predict is not None and len(chunks) > job.num_predict:
                chunks = chunks[: job.num_predict]
                finish_reason = "length"
            if not job.streaming:
                if self.token_delay > 0 and chunks:
                    await asyncio.sleep(self.token_delay * len(chunks))
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(chunks)},
                    "finish_reason": finish_reason,
                }
                return web.json_response(
                    {
                        **_openai_head(job, "chat.completion"),
                        "choices": [choice],
                        "usage": _openai_usage(job, chunks),
                    }
                )
            return await self._stream_openai(request, job, chunks, finish_reason, fault)
        finally:
            self._release()

    async def _stream_openai(
        self,
        request: web.Request,
        job: _Completion,
        chunks: list[str],
        finish_reason: str,
        fault: _Fault,
    ) -> web.StreamResponse:
        """Write the SSE stream: deltas, the finish_reason, the usage chunk, ``[DONE]``.

        An injected mid-stream failure is an ``error`` event, then the connection closes.
        """
        response = web.StreamResponse(status=200, headers={"Content-Type": SSE})
        await response.prepare(request)
        broken = fault is _Fault.MID_STREAM
        emit = chunks[: min(2, max(1, len(chunks) // 2))] if broken else chunks
        head = _openai_head(job, "chat.completion.chunk")
        extra: JSONDict = {"usage": None} if job.include_usage else {}

        def event(delta: JSONDict, reason: str | None) -> JSONDict:
            choice = {"index": 0, "delta": delta, "finish_reason": reason}
            return {**head, "choices": [choice], **extra}

        for i, chunk in enumerate(emit):
            if i and self.token_delay > 0:
                await asyncio.sleep(self.token_delay)
            await response.write(_sse(event({"role": "assistant", "content": chunk}, None)))
        if self.token_delay > 0 and emit:
            await asyncio.sleep(self.token_delay)
        if broken:
            await response.write(_sse(_openai_error_body(500, MID_STREAM_ERROR)))
        else:
            await response.write(_sse(event({}, finish_reason)))
            if job.include_usage:
                usage = {**head, "choices": [], "usage": _openai_usage(job, chunks)}
                await response.write(_sse(usage))
            await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _handle_embed(self, request: web.Request) -> web.Response:
        """``POST /api/embed``: deterministic unit vectors (8 dimensions, or ``dimensions``).

        As in Ollama: ``input`` is a string or a list of strings (else 400, checked before
        the model); an empty string or no input answers no vectors; then the model check
        (404), the queue, latency and injected faults.
        """
        started = time.perf_counter_ns()
        body = await self._read_json(request)
        if isinstance(body, web.Response):
            return body
        texts = _embed_input(body.get("input"))
        if isinstance(texts, web.Response):
            return texts
        if (error := self._check_model(body)) is not None:
            return error
        answer = await self._embed(texts, body.get("dimensions"), started)
        if isinstance(answer, web.Response):
            return answer
        return web.json_response({"model": str(body["model"]), **answer})

    async def _embed(
        self, texts: list[str], dimensions: Any, started: int, *, openai: bool = False
    ) -> JSONDict | web.Response:
        """The shared embed pipeline: queue, latency, injected fault, then Ollama's answer."""
        fault = self._take_fault(False)
        await self._acquire()
        try:
            if self.latency > 0:
                await asyncio.sleep(self.latency)
            if fault is _Fault.HANG:
                return await self._hang()
            if fault is _Fault.FAIL:
                return self._injected_error(openai=openai)
            size = _EMBED_DIM
            if isinstance(dimensions, int) and not isinstance(dimensions, bool) and dimensions > 0:
                size = dimensions  # Ollama cuts and renormalises; the fake makes them that long
            return {
                "embeddings": [self.embedder(t, size) for t in texts],
                "total_duration": time.perf_counter_ns() - started,
                "load_duration": 1_000,
                "prompt_eval_count": sum(_word_count(t) for t in texts),
            }
        finally:
            self._release()

    async def _handle_openai_embeddings(self, request: web.Request) -> web.Response:
        """``POST /v1/embeddings``: the embed pipeline with OpenAI's shapes, as Ollama's ``/v1``.

        ``input`` "" means [""]; no input or [] is a 400; ``encoding_format`` is "float"
        (default) or "base64" (little-endian float32, what the ``openai`` client asks for).
        """
        started = time.perf_counter_ns()
        body = await self._read_json(request)
        if isinstance(body, web.Response):
            return _as_openai_error(body)
        encoding = body.get("encoding_format") or "float"
        if not isinstance(encoding, str) or encoding.lower() not in {"float", "base64"}:
            message = (
                f"Invalid value for 'encoding_format' = {encoding}. "
                "Supported values: ['float', 'base64']."
            )
            return _openai_error(400, message)
        raw_input = body.get("input")
        if raw_input == "":
            raw_input = [""]
        if raw_input is None or raw_input == []:
            return _openai_error(400, "invalid input")
        texts = _embed_input(raw_input)
        if isinstance(texts, web.Response):
            return _as_openai_error(texts)
        if (error := self._check_model(body)) is not None:
            return _as_openai_error(error)
        model = str(body["model"])
        answer = await self._embed(texts, body.get("dimensions"), started, openai=True)
        if isinstance(answer, web.Response):
            return answer
        base64_wanted = encoding.lower() == "base64"
        data = [
            {
                "object": "embedding",
                "embedding": _float32_base64(vector) if base64_wanted else vector,
                "index": i,
            }
            for i, vector in enumerate(answer["embeddings"])
        ]
        tokens = answer["prompt_eval_count"]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return web.json_response({"object": "list", "data": data, "model": model, "usage": usage})

    async def _handle_pull(self, request: web.Request) -> web.StreamResponse:
        """``POST /api/pull``: Ollama's progress lines, then the model is listed.

        A name the fake registry lacks (see ``pullable``) fails as in Ollama: a streamed
        pull has already answered 200, so its error is an ``{"error": ...}`` line after
        "pulling manifest"; with ``"stream": false`` it is a 500.
        """
        body = await self._read_json(request)
        if isinstance(body, web.Response):
            return body
        model = body.get("model") or body.get("name")
        if not isinstance(model, str) or not model:
            return _error(400, "model is required")
        full = normalize_model(model)
        found = self._can_pull(full)
        lines = _pull_lines(full) if found else [{"status": "pulling manifest"}]
        if body.get("stream", True) is False:
            if self.pull_delay > 0:
                await asyncio.sleep(self.pull_delay * len(lines))
            if not found:
                return _error(500, PULL_NOT_FOUND)
            self.add_model(full)
            return web.json_response({"status": "success"})
        response = web.StreamResponse(status=200, headers={"Content-Type": NDJSON})
        await response.prepare(request)
        for i, line in enumerate(lines):
            if i and self.pull_delay > 0:
                await asyncio.sleep(self.pull_delay)
            if line["status"] == "success":
                self.add_model(full)  # listed by the time the client reads "success"
            await response.write(_line(line))
        if not found:
            await response.write(_line({"error": PULL_NOT_FOUND}))
        await response.write_eof()
        return response


def _pull_lines(model: str) -> list[JSONDict]:
    """A pull's progress as Ollama streams it: the manifest, then each layer in turn
    ("pulling <12 hex>", first without ``completed``, then growing, here by 5 %), the
    checks, "success". The weights are big; template, license and params are small."""
    lines: list[JSONDict] = [{"status": "pulling manifest"}]
    layers = [("model", 3_825_819_519, 20), ("template", 59, 1), ("license", 7_020, 1)]
    layers.append(("params", 91, 1))
    for kind, total, steps in layers:
        digest = "sha256:" + hashlib.sha256(f"{model}/{kind}".encode()).hexdigest()
        status = f"pulling {digest[7:19]}"
        lines.append({"status": status, "digest": digest, "total": total})
        for step in range(1, steps + 1):
            completed = -(-total * step // steps)  # rounded up: 10 % is 10 %
            lines.append(
                {"status": status, "digest": digest, "total": total, "completed": completed}
            )
    lines += [{"status": "verifying sha256 digest"}, {"status": "writing manifest"}]
    lines.append({"status": "success"})
    return lines


def _check_images(body: JSONDict, *, chat: bool) -> web.Response | None:
    """400 unless every image is strict base64 (Ollama decodes them as Go's ``[]byte``)."""
    if chat:
        messages = body.get("messages")
        holders = [m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []
    else:
        holders = [body]
    for holder in holders:
        images = holder.get("images")
        if images is None:
            continue
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            return _error(400, "images must be a list of base64 strings")
        for image in images:
            if (at := _base64_error_at(image)) is not None:
                return _error(400, f"illegal base64 data at input byte {at}")
    return None


def _base64_error_at(text: str) -> int | None:
    """Where ``text`` stops being padded standard base64, or None when it decodes.

    Line breaks are skipped, as by Go's decoder; the offset is the first character outside
    the alphabet, else (bad padding or length) the end.
    """
    for i, char in enumerate(text):
        if char not in _BASE64_CHARS:
            return i
    try:
        base64.b64decode(text.replace("\r", "").replace("\n", ""), validate=True)
    except binascii.Error:
        return len(text)
    return None


def _structured(fmt: Any) -> bool | web.Response:
    """Whether ``format`` asks for JSON; a value Ollama refuses is its 500."""
    if fmt is None or fmt == "":
        return False
    if fmt == "json" or isinstance(fmt, dict):
        return True
    message = f'invalid format: {json.dumps(fmt)}; expected "json" or a valid JSON Schema object'
    return _error(500, message)


def _embed_input(raw: Any) -> list[str] | web.Response:
    """``input`` of an embed request as Ollama reads it: a string (none when empty) or a
    list of strings; anything else is its 400."""
    if raw is None or raw == "":
        return []
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and all(isinstance(t, str) for t in raw):
        return list(raw)
    return _error(400, "invalid input type")


def _float32_base64(vector: list[float]) -> str:
    """OpenAI's base64 encoding of a vector: little-endian float32, as Ollama writes it."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def _line(obj: JSONDict) -> bytes:
    """One NDJSON line."""
    return json.dumps(obj, separators=(",", ":")).encode("utf-8") + b"\n"


def _sse(obj: JSONDict) -> bytes:
    """One server-sent event carrying ``obj`` as JSON."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode("utf-8") + b"\n\n"


def _openai_head(job: _Completion, kind: str) -> JSONDict:
    """Fields every OpenAI completion object starts with."""
    return {
        "id": f"chatcmpl-{job.started % 1_000_000}",
        "object": kind,
        "created": int(time.time()),
        "model": job.model,
        "system_fingerprint": "fp_ollama",
    }


def _openai_usage(job: _Completion, chunks: list[str]) -> JSONDict:
    """OpenAI's token counts (words for prompt tokens, chunks for completion tokens)."""
    return {
        "prompt_tokens": job.prompt_words,
        "completion_tokens": len(chunks),
        "total_tokens": job.prompt_words + len(chunks),
    }


def _openai_text(content: Any) -> str:
    """A message's text: a string, or the text parts of a content list."""
    if isinstance(content, list):
        return "".join(
            str(p.get("text") or "")
            for p in content
            if isinstance(p, dict) and p.get("type") == "text"
        )
    return str(content or "")


def _last_user_content(messages: list[Any]) -> str:
    """Content of the last user message (or of the last message, or "")."""
    dicts = [m for m in messages if isinstance(m, dict)]
    for message in reversed(dicts):
        if message.get("role") == "user":
            return str(message.get("content") or "")
    return str(dicts[-1].get("content") or "") if dicts else ""
