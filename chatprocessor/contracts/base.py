"""What the worker needs from a contract (a "door"): bytes in to a Job, a Result to bytes out."""

from __future__ import annotations

from typing import Any, Protocol

import orjson
from pydantic import ValidationError

from chatprocessor.core.errors import MalformedMessage, MessageTooLarge
from chatprocessor.core.job import Job, Result


def check_size(body: bytes, max_bytes: int) -> None:
    """Refuse a body over the limit before anything parses it."""
    if len(body) > max_bytes:
        raise MessageTooLarge(f"message is {len(body)} bytes, over MAX_MESSAGE_BYTES={max_bytes}")


#: Deepest nesting of objects and arrays accepted in a message (a bomb of brackets is refused
#: before a schema walks it).
MAX_JSON_DEPTH = 32


def check_depth(data: Any, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse JSON nested deeper than ``max_depth`` (MalformedMessage)."""
    if _depth(data, max_depth) > max_depth:
        raise MalformedMessage(f"JSON nested deeper than {max_depth} levels")


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of objects and arrays in parsed JSON, stopping early once past ``limit``."""
    stack = [(value, 1)]
    deepest = 0
    while stack:
        node, level = stack.pop()
        if not isinstance(node, dict | list):
            continue
        deepest = max(deepest, level)
        if deepest > limit:
            break
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, level + 1) for child in children)
    return deepest


def json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or MalformedMessage saying what it is instead."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedMessage(f"body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise MalformedMessage(f"body must be a JSON object, got {type(data).__name__}")
    return data


def peek_object(body: bytes, max_bytes: int) -> dict[str, Any] | None:
    """Best effort, for an error reply to a message that failed to decode: its JSON object."""
    if len(body) > max_bytes:
        return None
    try:
        return json_object(body)
    except MalformedMessage:
        return None


def reasons(exc: ValidationError) -> str:
    """A pydantic validation error as ``field: message; ...`` for a dead letter's reason."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors()
    )


class Codec(Protocol):
    #: Decoding may take long (images): the worker runs it on a thread.
    decode_in_thread: bool
    #: True for doors whose answers leave as events through an EventSink (EventCodec).
    emits_events: bool

    def decode(
        self,
        body: bytes,
        *,
        message_id: str | None = None,
        reply_to: str | None = None,
        correlation_id: str | None = None,
    ) -> Job:
        """The job, or MessageRejected with the reason (NotForUs: filtered, not an error)."""
        ...

    def error_job(
        self,
        body: bytes,
        *,
        message_id: str | None = None,
        reply_to: str | None = None,
        correlation_id: str | None = None,
    ) -> Job | None:
        """For a message that failed to decode: whom an error reply goes to, if anyone."""
        ...

    def reply(self, job: Job, result: Result) -> bytes:
        """The reply's body (an error reply when ``result.error`` is set)."""
        ...

    def encode_chunk(self, conversation_id: int | str, index: int, delta: str) -> bytes:
        """One streamed piece (only for doors whose requests can ask for streaming)."""
        ...


class EventCodec(Codec, Protocol):
    """A door that answers with events (seed 003): tokens while generating, then a close."""

    def token_event(self, job: Job, attempt: int, seq: int, delta: str) -> dict[str, Any]:
        """One batch of generated text."""
        ...

    def reply_events(self, job: Job, result: Result) -> list[dict[str, Any]]:
        """The events that close the job (what ``reply`` encodes)."""
        ...
