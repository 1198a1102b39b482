"""Seed 001's contract (the Models Processor): a photo or a text prompt in, an analysis or text out.

A request is a record's value; its key names the request and is the reply's key too::

    {"user_email": "user@example.com", "prompt": "...", "photo": "<base64>"}   # photo optional

The seed's own example wraps it as ``{"key": ..., "value": {...}}``: accepted as well.
Replies, keyed like the request:

- with a photo, on PHOTO_RESPONSE_TOPIC: ``{"user_email", "analysis"}``, the analysis being
  the model's JSON (sanitized, checked against PHOTO_ANALYSIS_SCHEMA) as a JSON string;
- without, on TEXT_RESPONSE_TOPIC: ``{"user_email", "response", "model"}``;
- a failed request gets ``{"user_email", "error"}`` (plus ``model`` for text) on the same topic.

With EXPECTED_USER_EMAIL set, other users' records are skipped and counted (NotForUs).
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from chatprocessor.contracts.base import check_size, reasons
from chatprocessor.contracts.chat import request_id
from chatprocessor.core.errors import MalformedMessage, NotForUs
from chatprocessor.core.job import Job, Result
from chatprocessor.vision import prepare_image

PHOTO = "photo"
TEXT = "text"
DEFAULT_PHOTO_PROMPT = "Describe what is in this photo. Answer with JSON only."


class ModelsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    user_email: str = Field(min_length=1, max_length=320)
    prompt: str = ""
    photo: str | None = None


class ModelsCodec:
    """Decodes seed-001 requests into jobs (checking any photo) and shapes their replies."""

    #: Checking and downscaling a photo takes milliseconds of CPU: not on the event loop.
    decode_in_thread = True

    emits_events = False

    def __init__(
        self,
        *,
        max_bytes: int,
        photo_topic: str,
        text_topic: str,
        expected_user_email: str = "",
        max_image_bytes: int,
        image_max_side: int = 0,
        photo_schema: dict[str, Any] | None = None,
    ) -> None:
        self.max_bytes = max_bytes
        self.photo_topic = photo_topic
        self.text_topic = text_topic
        self.expected_user_email = expected_user_email.strip().lower()
        self.max_image_bytes = max_image_bytes
        self.image_max_side = image_max_side
        self.photo_schema = photo_schema

    def decode(
        self,
        body: bytes,
        *,
        message_id: str | None = None,
        reply_to: str | None = None,
        correlation_id: str | None = None,
    ) -> Job:
        check_size(body, self.max_bytes)
        data, key = _unwrap(body)
        try:
            request = ModelsRequest.model_validate(data)
        except ValidationError as exc:
            raise MalformedMessage(f"not a models request: {reasons(exc)}") from exc
        email = request.user_email.lower()
        if self.expected_user_email and email != self.expected_user_email:
            raise NotForUs(f"record for another user ({request.user_email})")
        key = correlation_id or key
        meta = {"user_email": request.user_email}
        if request.photo:
            image = prepare_image(
                request.photo, max_bytes=self.max_image_bytes, max_side=self.image_max_side
            )
            return Job(
                id=request_id(body, message_id),
                conversation_id=key or request.user_email,
                prompt=request.prompt or DEFAULT_PHOTO_PROMPT,
                reply_to=self.photo_topic,
                correlation_id=key,
                images=(image,),
                format=self.photo_schema or "json",
                meta={**meta, "kind": PHOTO},
            )
        if not request.prompt:
            raise MalformedMessage("a request without a photo needs a prompt")
        return Job(
            id=request_id(body, message_id),
            conversation_id=key or request.user_email,
            prompt=request.prompt,
            reply_to=self.text_topic,
            correlation_id=key,
            meta={**meta, "kind": TEXT},
        )

    def error_job(
        self,
        body: bytes,
        *,
        message_id: str | None = None,
        reply_to: str | None = None,
        correlation_id: str | None = None,
    ) -> Job | None:
        """An error reply needs the user's e-mail; the topic follows whether a photo came."""
        try:
            data, key = _unwrap(body[: self.max_bytes + 1])
        except MalformedMessage:
            return None
        email = data.get("user_email")
        if not isinstance(email, str) or not email.strip():
            return None
        if self.expected_user_email and email.strip().lower() != self.expected_user_email:
            return None
        photo = bool(data.get("photo"))
        key = correlation_id or key
        return Job(
            id=request_id(body, message_id),
            conversation_id=key or email,
            prompt="",
            reply_to=self.photo_topic if photo else self.text_topic,
            correlation_id=key,
            meta={"user_email": email.strip(), "kind": PHOTO if photo else TEXT},
        )

    def reply(self, job: Job, result: Result) -> bytes:
        out: dict[str, Any] = {"user_email": job.meta.get("user_email", "")}
        text = job.meta.get("kind") != PHOTO
        if result.error is not None:
            out["error"] = result.error
        elif text:
            out["response"] = result.text
        else:
            out["analysis"] = result.text
        if text:
            out["model"] = result.model_used
        return orjson.dumps(out)

    def encode_chunk(self, conversation_id: int | str, index: int, delta: str) -> bytes:
        """Seed 001 has no streaming; kept for the protocol."""
        return orjson.dumps({"index": index, "delta": delta})


def _unwrap(body: bytes) -> tuple[dict[str, Any], str | None]:
    """The request object and the key the seed's example puts beside it, if any."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedMessage(f"body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise MalformedMessage(f"body must be a JSON object, got {type(data).__name__}")
    key = data.get("key")
    if isinstance(data.get("value"), dict):
        data = data["value"]
    return data, key if isinstance(key, str) and key else None
