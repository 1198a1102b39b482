"""Seed 000's contract: UserPromptReceived in, BotResponseCreated out.

Input accepts snake_case, camelCase and PascalCase names (what a .NET
publisher sends); output uses the spelling set by OUTPUT_NAMING.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from typing import Required, TypedDict

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from chatprocessor.contracts.base import (
    check_depth,
    check_size,
    json_object,
    peek_object,
    reasons,
)
from chatprocessor.contracts.naming import Naming, any_case, rename
from chatprocessor.core.errors import MalformedMessage
from chatprocessor.core.job import Job, Result

#: Namespace for reply ids, so a reply's message_id is a pure function of its request.
REPLY_NAMESPACE = uuid.UUID("5b0c6f8e-4f6c-4b52-9a57-3f0a1f6c2d11")
_NAMESPACE_BYTES = REPLY_NAMESPACE.bytes


class ChatOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    temperature: float | None = Field(None, ge=0, le=2, validation_alias=any_case("temperature"))
    max_tokens: int | None = Field(None, ge=1, le=32768, validation_alias=any_case("max_tokens"))


class UserPromptReceived(BaseModel):
    """A user's prompt, published by the chat service on RABBITMQ_QUEUE_INPUT."""

    model_config = ConfigDict(extra="ignore")

    # StrictInt: JSON true/false must not turn into conversation 1/0.
    conversation_id: StrictInt | str = Field(validation_alias=any_case("conversation_id"))
    message: str = Field(min_length=1, validation_alias=any_case("message"))
    user_id: StrictInt | str | None = Field(None, validation_alias=any_case("user_id"))
    timestamp: datetime | None = Field(None, validation_alias=any_case("timestamp"))
    model: str | None = Field(None, min_length=1, validation_alias=any_case("model"))
    system_prompt: str | None = Field(None, validation_alias=any_case("system_prompt"))
    options: ChatOptions | None = Field(None, validation_alias=any_case("options"))
    stream: bool = Field(False, validation_alias=any_case("stream"))

    @field_validator("message")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("message is blank")
        return value


class BotResponseCreated(TypedDict, total=False):
    """The answer, published on the request's reply_to or RABBITMQ_QUEUE_OUTPUT.

    Built as a plain dict (no model): every reply is our own, made from typed values.
    """

    conversation_id: Required[int | str]
    message: Required[str]
    user_id: Required[int | str]
    timestamp: Required[str]  # format_timestamp
    model_used: Required[str]
    error: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: int


def format_timestamp(moment: datetime) -> str:
    """UTC, second precision, trailing Z: the seed's ``2025-12-16T10:30:05Z``."""
    utc = moment.astimezone(UTC)
    return (
        f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}"
        f"T{utc.hour:02d}:{utc.minute:02d}:{utc.second:02d}Z"
    )


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()[:32]


def request_id(body: bytes, message_id: str | None) -> str:
    """The broker's message_id when set, else a digest of the body: stable across redeliveries."""
    return message_id or body_digest(body)


def reply_message_id(job_id: str, *, error: bool = False) -> str:
    """Derived from the request, so a consumer can drop a duplicate reply. An error reply
    has an id of its own: the answer to the same job replayed later must not look like
    a duplicate of it."""
    name = f"{job_id}#error" if error else job_id
    # uuid.uuid5, without its UUID object: this runs for every reply.
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + name.encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class ChatCodec:
    """Turns UserPromptReceived bytes into a Job and a Result into BotResponseCreated bytes."""

    def __init__(
        self, *, max_bytes: int, naming: Naming = "snake", bot_user_id: int | str = 0
    ) -> None:
        self.max_bytes = max_bytes
        self.naming: Naming = naming
        self.bot_user_id = bot_user_id

    def decode(
        self,
        body: bytes,
        *,
        message_id: str | None = None,
        reply_to: str | None = None,
        correlation_id: str | None = None,
    ) -> Job:
        """Check size first, then JSON, then the schema; raise MessageRejected with the reason."""
        check_size(body, self.max_bytes)
        data = json_object(body)
        check_depth(data)
        try:
            prompt = UserPromptReceived.model_validate(data)
        except ValidationError as exc:
            raise MalformedMessage(f"not a UserPromptReceived: {reasons(exc)}") from exc
        options = prompt.options or ChatOptions()
        return Job(
            id=request_id(body, message_id),
            conversation_id=prompt.conversation_id,
            prompt=prompt.message,
            user_id=prompt.user_id,
            model=prompt.model,
            system_prompt=prompt.system_prompt,
            temperature=options.temperature,
            max_tokens=options.max_tokens,
            stream=prompt.stream,
            reply_to=reply_to,
            correlation_id=correlation_id,
        )

    def peek_conversation_id(self, body: bytes) -> int | str | None:
        """Best-effort conversation id of a message that failed to decode, for an error reply."""
        data = peek_object(body, self.max_bytes)
        if data is None:
            return None
        for key in ("conversation_id", "conversationId", "ConversationId"):
            value = data.get(key)
            if isinstance(value, int | str) and not isinstance(value, bool):
                return value
        return None

    #: Decoding is a few microseconds: no thread needed.
    decode_in_thread = False

    emits_events = False

    def error_job(
        self,
        body: bytes,
        *,
        message_id: str | None = None,
        reply_to: str | None = None,
        correlation_id: str | None = None,
    ) -> Job | None:
        """Where an error reply to a message that failed to decode goes, if it can be told."""
        conversation_id = self.peek_conversation_id(body)
        if conversation_id is None:
            return None
        return Job(
            id=request_id(body, message_id),
            conversation_id=conversation_id,
            prompt="",
            reply_to=reply_to,
            correlation_id=correlation_id,
        )

    def reply(self, job: Job, result: Result) -> bytes:
        return self.encode(job.conversation_id, result)

    def encode(self, conversation_id: int | str, result: Result) -> bytes:
        """BotResponseCreated, optional fields left out when unknown."""
        reply: BotResponseCreated = {
            "conversation_id": conversation_id,
            "message": result.text,
            "user_id": self.bot_user_id,
            "timestamp": format_timestamp(datetime.now(UTC)),
            "model_used": result.model_used,
        }
        if result.error is not None:
            reply["error"] = result.error
        if result.prompt_tokens is not None:
            reply["prompt_tokens"] = result.prompt_tokens
        if result.completion_tokens is not None:
            reply["completion_tokens"] = result.completion_tokens
        if result.latency_ms is not None:
            reply["latency_ms"] = result.latency_ms
        return orjson.dumps(rename(dict(reply), self.naming))

    def encode_chunk(self, conversation_id: int | str, index: int, delta: str) -> bytes:
        """A BotResponseChunk: part of a streamed answer, sent only to the request's reply_to."""
        data = {"conversation_id": conversation_id, "index": index, "delta": delta}
        return orjson.dumps(rename(data, self.naming))
