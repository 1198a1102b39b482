"""Seed 002's contract: a pending AI task in, its PATCH body out.

Task (from ``GET /api/ai-tasks/pending``)::

    {"_id": "68b8...", "type": "text_embedding", "state": "pending",
     "content": {"text": "Text to embed", "model": "nomic-embed-text"},
     "callbackRoute": "...", "callbackParams": {...}, "createdAt": "..."}

PATCH body: ``{"state": "succeeded", "result": {...}}`` or ``{"state": "failed", "error": "..."}``.
With SUPPORTED_MODELS set, a task asking for another model fails with a clear error.
"""

from __future__ import annotations

from typing import Any

import orjson

from chatprocessor.contracts.base import check_size
from chatprocessor.core.errors import MalformedMessage
from chatprocessor.core.job import Job, Result
from chatprocessor.providers.base import same_model
from chatprocessor.tasks import known_types


class TaskCodec:
    decode_in_thread = False
    emits_events = False

    def __init__(self, *, max_bytes: int, supported_models: list[str] | None = None) -> None:
        self.max_bytes = max_bytes
        self.supported_models = supported_models or []

    def decode(
        self,
        body: bytes,
        *,
        message_id: str | None = None,
        reply_to: str | None = None,
        correlation_id: str | None = None,
    ) -> Job:
        check_size(body, self.max_bytes)
        task = _task(body)
        task_id = _task_id(task)
        if task_id is None:
            raise MalformedMessage("task without an _id")
        kind = task.get("type")
        if kind not in known_types():
            raise MalformedMessage(
                f"unknown task type {kind!r} (known: {', '.join(known_types())})"
            )
        content = task.get("content") or task.get("input")
        if not isinstance(content, dict) or not isinstance(content.get("text"), str):
            raise MalformedMessage("task content needs a text")
        model = content.get("model")
        if model is not None and not isinstance(model, str):
            raise MalformedMessage("task content.model must be a string")
        if (
            model
            and self.supported_models
            and not any(same_model(model, allowed) for allowed in self.supported_models)
        ):
            raise MalformedMessage(
                f"model {model!r} is not in SUPPORTED_MODELS ({', '.join(self.supported_models)})"
            )
        return Job(
            id=task_id,
            conversation_id=task_id,
            prompt=content["text"],
            model=model or None,
            reply_to=task_id,
            correlation_id=task_id,
            kind=str(kind),
            meta={"task": task},
        )

    def error_job(
        self,
        body: bytes,
        *,
        message_id: str | None = None,
        reply_to: str | None = None,
        correlation_id: str | None = None,
    ) -> Job | None:
        """A task whose ``_id`` can be read is reported failed."""
        try:
            task_id = _task_id(_task(body[: self.max_bytes + 1]))
        except MalformedMessage:
            return None
        if task_id is None:
            return None
        return Job(id=task_id, conversation_id=task_id, prompt="", reply_to=task_id)

    def reply(self, job: Job, result: Result) -> bytes:
        if result.error is not None:
            return orjson.dumps({"state": "failed", "error": result.error})
        return orjson.dumps({"state": "succeeded", "result": orjson.loads(result.text)})

    def encode_chunk(self, conversation_id: int | str, index: int, delta: str) -> bytes:
        """Tasks do not stream; kept for the protocol."""
        return orjson.dumps({"index": index, "delta": delta})


def _task(body: bytes) -> dict[str, Any]:
    try:
        task = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedMessage(f"task is not valid JSON: {exc}") from exc
    if not isinstance(task, dict):
        raise MalformedMessage("a task must be a JSON object")
    return task


def _task_id(task: dict[str, Any]) -> str | None:
    value = task.get("_id", task.get("id"))
    return str(value) if isinstance(value, str | int) and str(value) else None
