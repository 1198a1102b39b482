"""Seed 003's contract: ``chat.request`` jobs in, answer events out.

A request names its job, user and session (``jobId``, ``userId``, ``sessionId``),
a mode (``gen``: from the conversation; ``rag``: from retrieved passages too) and
the message. The answer goes out as events on a Redis Stream (or a RabbitMQ
exchange), each carrying ``type``, ``id``, ``jobId``, ``userId`` and ``sessionId``:

- ``token``  {"seq", "attempt", "delta"}: a piece of the answer while it is generated;
- ``final``  {"text", "status", "model", "provider", "promptTokens", "completionTokens",
  "latencyMs", "timeToFirstTokenMs", "sources"}: the whole text (partial when
  ``status`` is ``cancelled`` or ``timeout``);
- ``error``  {"error", "code"}: why there is no answer;
- ``done``   {"status"}: the last event of a job, always sent.

``id`` is derived from the job, so a consumer can drop an event it already has.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from chatprocessor.contracts.base import check_size, json_object, peek_object, reasons
from chatprocessor.contracts.naming import any_case
from chatprocessor.core.errors import MalformedMessage
from chatprocessor.core.job import Job, Result

MAX_ID_LENGTH = 200
#: Statuses a ``done`` event can carry.
Status = Literal[
    "completed", "cancelled", "timeout", "failed", "forbidden", "rejected", "over_budget"
]


def _as_text(value: Any) -> Any:
    """Ids may arrive as JSON numbers (a .NET long): keep them as text."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class ChatRequestMessage(BaseModel):
    """One ``chat.request`` job, as the gateway publishes it."""

    model_config = ConfigDict(extra="ignore")

    job_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH, validation_alias=any_case("job_id"))
    user_id: str = Field(
        min_length=1, max_length=MAX_ID_LENGTH, validation_alias=any_case("user_id")
    )
    session_id: str = Field(
        min_length=1, max_length=MAX_ID_LENGTH, validation_alias=any_case("session_id")
    )
    mode: Literal["gen", "rag"] = Field("gen", validation_alias=any_case("mode"))
    message: str = Field(min_length=1, validation_alias=any_case("message"))
    tenant_id: str | None = Field(
        None, min_length=1, max_length=MAX_ID_LENGTH, validation_alias=any_case("tenant_id")
    )
    model: str | None = Field(None, min_length=1, validation_alias=any_case("model"))
    system_prompt: str | None = Field(None, validation_alias=any_case("system_prompt"))
    temperature: float | None = Field(None, ge=0, le=2, validation_alias=any_case("temperature"))
    max_tokens: int | None = Field(None, ge=1, le=32768, validation_alias=any_case("max_tokens"))
    #: A deadline of its own, shorter than JOB_TIMEOUT (which stays the upper bound).
    timeout_seconds: float | None = Field(
        None, gt=0, le=86_400, validation_alias=any_case("timeout_seconds")
    )

    @field_validator("job_id", "user_id", "session_id", "tenant_id", mode="before")
    @classmethod
    def _ids_as_text(cls, value: Any) -> Any:
        return _as_text(value)

    @field_validator("message")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("message is blank")
        return value

    @field_validator("mode", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value


def _base(job: Job, kind: str, event_id: str) -> dict[str, Any]:
    return {
        "type": kind,
        "id": event_id,
        "jobId": job.id,
        "userId": "" if job.user_id is None else str(job.user_id),
        "sessionId": str(job.conversation_id),
    }


def token_event(job: Job, attempt: int, seq: int, delta: str) -> dict[str, Any]:
    """A piece of the answer; a retried attempt streams again from seq 0 (``attempt`` + 1)."""
    event = _base(job, "token", f"{job.id}:{attempt}:{seq}")
    event.update(seq=seq, attempt=attempt, delta=delta)
    return event


def final_event(job: Job, result: Result) -> dict[str, Any]:
    event = _base(job, "final", f"{job.id}:final")
    event.update(
        text=result.text,
        status=result.status,
        model=result.model_used,
        provider=result.provider,
        promptTokens=result.prompt_tokens,
        completionTokens=result.completion_tokens,
        latencyMs=result.latency_ms,
        timeToFirstTokenMs=result.time_to_first_token_ms,
        sources=result.sources,
    )
    return event


def error_event(job: Job, error: str, code: str) -> dict[str, Any]:
    event = _base(job, "error", f"{job.id}:error")
    event.update(error=error, code=code)
    return event


def done_event(job: Job, status: str) -> dict[str, Any]:
    event = _base(job, "done", f"{job.id}:done")
    event["status"] = status
    return event


class StreamCodec:
    """chat.request bytes to a Job; a Result to its closing events (final or error, done)."""

    #: Answers leave as events (contracts/stream.py), through an EventSink, not a queue.
    emits_events = True
    decode_in_thread = False

    def __init__(self, *, max_bytes: int, default_tenant: str = "default") -> None:
        self.max_bytes = max_bytes
        self.default_tenant = default_tenant

    def decode(
        self,
        body: bytes,
        *,
        message_id: str | None = None,
        reply_to: str | None = None,
        correlation_id: str | None = None,
    ) -> Job:
        check_size(body, self.max_bytes)
        data = json_object(body)
        try:
            request = ChatRequestMessage.model_validate(data)
        except ValidationError as exc:
            raise MalformedMessage(f"not a chat.request: {reasons(exc)}") from exc
        meta: dict[str, Any] = {}
        if request.timeout_seconds is not None:
            meta["timeout"] = request.timeout_seconds
        return Job(
            id=request.job_id,
            conversation_id=request.session_id,
            prompt=request.message,
            user_id=request.user_id,
            model=request.model,
            system_prompt=request.system_prompt,
            temperature=request.temperature,
            max_tokens=request.max_tokens,
            stream=True,
            reply_to=reply_to,
            correlation_id=correlation_id,
            meta=meta,
            tenant=request.tenant_id or self.default_tenant,
            mode=request.mode,
        )

    def error_job(
        self,
        body: bytes,
        *,
        message_id: str | None = None,
        reply_to: str | None = None,
        correlation_id: str | None = None,
    ) -> Job | None:
        """A bad request still gets ``error`` and ``done`` when its jobId and userId can be read."""
        data = peek_object(body, self.max_bytes)
        if data is None:
            return None

        def pick(snake: str) -> str | None:
            for key in (snake, *any_case(snake).choices):
                value = _as_text(data.get(str(key)))
                if isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH:
                    return value
            return None

        job_id, user_id = pick("job_id"), pick("user_id")
        if job_id is None or user_id is None:
            return None
        return Job(
            id=job_id,
            conversation_id=pick("session_id") or "",
            prompt="",
            user_id=user_id,
            reply_to=reply_to,
            correlation_id=correlation_id,
        )

    def reply_events(self, job: Job, result: Result) -> list[dict[str, Any]]:
        """The events that close a job: ``final`` (or ``error``), then ``done``."""
        if result.error is not None:
            status = result.status if result.status != "completed" else "failed"
            return [error_event(job, result.error, status), done_event(job, status)]
        return [final_event(job, result), done_event(job, result.status)]

    def reply(self, job: Job, result: Result) -> bytes:
        """The closing events as a JSON array (kept by the idempotency store as they are)."""
        return orjson.dumps(self.reply_events(job, result))

    def token_event(self, job: Job, attempt: int, seq: int, delta: str) -> dict[str, Any]:
        return token_event(job, attempt, seq, delta)

    def encode_chunk(self, conversation_id: int | str, index: int, delta: str) -> bytes:
        """Unused: this door's pieces are ``token`` events (``token_event``)."""
        return orjson.dumps({"sessionId": conversation_id, "seq": index, "delta": delta})
