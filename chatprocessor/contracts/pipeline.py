"""Seed 004's contract: ``AIJob`` in, ``AIResponse`` out.

An AIJob names its job, tenant, conversation and message, a ``type`` (``chat_response``,
``sentiment_analysis``, ``intent_classification``, ``batch_processing``), a priority 1-10
(higher first) and a payload: the content, optional earlier turns (``context``), the
chatbot's configuration and free-form visitor metadata. Fields are camelCase as the seed
writes them; snake_case and PascalCase are accepted too.

The answer is an AIResponse: the content plus the post-processing's intent, sentiment,
confidence and suggested actions, and metadata (model, provider, time, tokens, cost). Its
``messageId`` is derived from the job, so a platform can drop a duplicate reply.

The seed routes jobs to three queues (``selectQueue``); :func:`lane_for` is that rule.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal, get_args

import orjson
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StringConstraints,
    ValidationError,
    field_validator,
)

from chatprocessor.contracts.base import (
    check_depth,
    check_size,
    json_object,
    peek_object,
    reasons,
)
from chatprocessor.contracts.naming import any_case, to_camel
from chatprocessor.core.errors import MalformedMessage
from chatprocessor.core.job import ChatMessage, Job, Result

MAX_ID_LENGTH = 200
DEFAULT_PRIORITY = 5
JobType = Literal[
    "chat_response", "sentiment_analysis", "intent_classification", "batch_processing"
]
JOB_TYPES: Final[tuple[str, ...]] = get_args(JobType)
BATCH = "batch_processing"
#: The seed's three queues: real-time chat, normal processing, CSV imports.
LANES: Final = ("high", "standard", "batch")
#: Statuses an error reply can carry; any other status of a failed Result becomes "failed".
ERROR_STATUSES: Final = ("rejected", "forbidden", "over_budget", "failed")
#: A context turn's sender (or role) to the role a model knows; unknown senders are "user".
ROLES: Final[dict[str, str]] = {
    "user": "user",
    "visitor": "user",
    "customer": "user",
    "assistant": "assistant",
    "bot": "assistant",
    "agent": "assistant",
    "system": "system",
}

Id = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH)]


def seed_case(snake: str) -> AliasChoices:
    """Like ``any_case`` but camelCase first, so a missing field is reported by its seed name."""
    camel = to_camel(snake)
    return AliasChoices(camel, *(name for name in any_case(snake).choices if name != camel))


def _as_text(value: Any) -> Any:
    """Ids may arrive as JSON numbers: keep them as text."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class ContextMessage(BaseModel):
    """One earlier turn of the conversation, as the platform sends it."""

    model_config = ConfigDict(extra="ignore")

    sender: str = Field("user", validation_alias=AliasChoices("sender", "role", "Sender", "Role"))
    content: str = Field(validation_alias=seed_case("content"))

    def to_chat_message(self) -> ChatMessage:
        return ChatMessage(ROLES.get(self.sender.strip().lower(), "user"), self.content)


class ChatbotConfig(BaseModel):
    """The tenant's chatbot settings that shape the answer."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, min_length=1, validation_alias=seed_case("model"))
    temperature: float | None = Field(None, ge=0, le=2, validation_alias=seed_case("temperature"))
    max_tokens: int | None = Field(None, ge=1, le=32768, validation_alias=seed_case("max_tokens"))
    system_prompt: str | None = Field(None, validation_alias=seed_case("system_prompt"))
    personality: str | None = Field(None, validation_alias=seed_case("personality"))
    cache: bool | None = Field(None, validation_alias=seed_case("cache"))
    intents: list[str] | None = Field(None, validation_alias=seed_case("intents"))
    classify: bool | None = Field(None, validation_alias=seed_case("classify"))


class AIJobPayload(BaseModel):
    model_config = ConfigDict(extra="ignore")

    content: str = Field(validation_alias=seed_case("content"))
    context: list[ContextMessage] | None = Field(None, validation_alias=seed_case("context"))
    chatbot_config: ChatbotConfig | None = Field(None, validation_alias=seed_case("chatbot_config"))
    visitor_metadata: Any = Field(None, validation_alias=seed_case("visitor_metadata"))

    @field_validator("content")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("content is blank")
        return value


class AIJobMetadata(BaseModel):
    model_config = ConfigDict(extra="ignore")

    retry_count: int | None = Field(None, ge=0, validation_alias=seed_case("retry_count"))
    cost_estimate: float | None = Field(
        None, ge=0, allow_inf_nan=False, validation_alias=seed_case("cost_estimate")
    )
    processing_deadline: datetime | None = Field(
        None, validation_alias=seed_case("processing_deadline")
    )


class AIJobMessage(BaseModel):
    """One AIJob, as a platform's WebSocket, REST or CSV import service queues it."""

    model_config = ConfigDict(extra="ignore")

    id: Id = Field(validation_alias=seed_case("id"))
    tenant_id: Id = Field(validation_alias=seed_case("tenant_id"))
    # StrictInt: JSON true/false must not turn into conversation 1/0.
    conversation_id: StrictInt | Id = Field(validation_alias=seed_case("conversation_id"))
    message_id: Id = Field(validation_alias=seed_case("message_id"))
    job_type: JobType = Field(validation_alias=seed_case("type"))
    priority: StrictInt = Field(
        DEFAULT_PRIORITY, ge=1, le=10, validation_alias=seed_case("priority")
    )
    payload: AIJobPayload = Field(validation_alias=seed_case("payload"))
    metadata: AIJobMetadata | None = Field(None, validation_alias=seed_case("metadata"))

    @field_validator("id", "tenant_id", "message_id", mode="before")
    @classmethod
    def _ids_as_text(cls, value: Any) -> Any:
        return _as_text(value)

    @field_validator("job_type", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value


def system_prompt(system_prompt: str | None, personality: str | None) -> str | None:
    """The chatbot's system prompt, with its personality as a closing instruction.

    The seed rewrites the answer to fit the personality afterwards; asking for it up front
    costs no second model call. An explicit empty prompt without a personality stays ""
    (it overrides the worker's default prompt).
    """
    personality = personality.strip() if personality else None
    if not personality:
        return system_prompt
    line = f"Personality: answer in a {personality} manner."
    return f"{system_prompt}\n\n{line}" if system_prompt else line


def lane_for(priority: int, job_type: str, *, high_min: int = 8) -> str:
    """The seed's selectQueue: priority >= high_min -> "high"; batch_processing -> "batch";
    else "standard"."""
    if priority >= high_min:
        return "high"
    if job_type == BATCH:
        return "batch"
    return "standard"


def response_message_id(job_id: str, *, error: bool = False) -> str:
    """The AIResponse's ``messageId``: derived from the job, so a duplicate can be dropped.
    An error reply has an id of its own, so a later answer to the same job is not taken for
    a duplicate of it (as :func:`chatprocessor.contracts.chat.reply_message_id`)."""
    return f"{job_id}:error" if error else f"{job_id}:response"


def _seconds_until(deadline: datetime) -> float:
    """Seconds from now to ``deadline`` (a naive one is taken as UTC)."""
    if deadline.tzinfo is None:
        deadline = deadline.replace(tzinfo=UTC)
    return (deadline - datetime.now(UTC)).total_seconds()


def ai_job(
    *,
    id: str,  # the seed's field name
    tenant_id: str,
    conversation_id: str | int,
    message_id: str,
    type: str,  # the seed's field name
    content: str,
    priority: int = DEFAULT_PRIORITY,
    context: list[dict[str, str]] | None = None,
    chatbot_config: dict[str, Any] | None = None,
    cost_estimate: float | None = None,
) -> dict[str, Any]:
    """An AIJob as the seed writes it (camelCase), ready for ``orjson.dumps``."""
    payload: dict[str, Any] = {"content": content, "chatbotConfig": dict(chatbot_config or {})}
    if context is not None:
        payload["context"] = [dict(turn) for turn in context]
    metadata: dict[str, Any] = {"retryCount": 0}
    if cost_estimate is not None:
        metadata["costEstimate"] = cost_estimate
    return {
        "id": id,
        "tenantId": tenant_id,
        "conversationId": conversation_id,
        "messageId": message_id,
        "type": type,
        "priority": priority,
        "payload": payload,
        "metadata": metadata,
    }


class PipelineCodec:
    """AIJob bytes to a Job; a Result to AIResponse bytes."""

    #: Decoding is a few microseconds: no thread needed.
    decode_in_thread = False
    emits_events = False

    def __init__(self, *, max_bytes: int, currency: str = "USD", high_min: int = 8) -> None:
        self.max_bytes = max_bytes
        self.currency = currency
        self.high_min = high_min

    def decode(
        self,
        body: bytes,
        *,
        message_id: str | None = None,
        reply_to: str | None = None,
        correlation_id: str | None = None,
    ) -> Job:
        """Size first, then JSON, then the schema; MessageRejected saying why."""
        check_size(body, self.max_bytes)
        data = json_object(body)
        check_depth(data)
        try:
            request = AIJobMessage.model_validate(data)
        except ValidationError as exc:
            raise MalformedMessage(f"not an AIJob: {reasons(exc)}") from exc
        payload = request.payload
        config = payload.chatbot_config or ChatbotConfig()
        metadata = request.metadata or AIJobMetadata()
        meta: dict[str, Any] = {
            "type": request.job_type,
            "message_id": request.message_id,
            "personality": config.personality,
            "cache": config.cache,
            "intents": config.intents,
            "classify": config.classify,
            "visitor_metadata": payload.visitor_metadata,
            "cost_estimate": metadata.cost_estimate or 0.0,
            "retry_count": metadata.retry_count or 0,
        }
        if metadata.processing_deadline is not None:
            seconds = _seconds_until(metadata.processing_deadline)
            if seconds <= 0:
                raise MalformedMessage("not an AIJob: metadata.processingDeadline has passed")
            meta["timeout"] = seconds
        return Job(
            id=request.id,
            conversation_id=request.conversation_id,
            prompt=payload.content,
            user_id=None,
            model=config.model,
            system_prompt=system_prompt(config.system_prompt, config.personality),
            temperature=config.temperature,
            max_tokens=config.max_tokens,
            stream=False,
            reply_to=reply_to,
            correlation_id=correlation_id,
            meta=meta,
            kind=request.job_type,
            tenant=request.tenant_id,
            context=tuple(turn.to_chat_message() for turn in payload.context or ()),
            priority=request.priority,
        )

    def error_job(
        self,
        body: bytes,
        *,
        message_id: str | None = None,
        reply_to: str | None = None,
        correlation_id: str | None = None,
    ) -> Job | None:
        """A bad AIJob still gets a failed AIResponse when its id and conversationId can be
        read (tenantId, messageId and type are echoed when readable)."""
        data = peek_object(body, self.max_bytes)
        if data is None:
            return None

        def pick(snake: str) -> Any:
            for key in seed_case(snake).choices:
                if data.get(str(key)) is not None:
                    return data[str(key)]
            return None

        def text(value: Any) -> str | None:
            value = _as_text(value)
            return value if isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH else None

        job_id = text(pick("id"))
        conversation_id = pick("conversation_id")
        if isinstance(conversation_id, bool) or not isinstance(conversation_id, int):
            conversation_id = text(conversation_id)
        if job_id is None or conversation_id is None:
            return None
        meta: dict[str, Any] = {}
        if (reply_of := text(pick("message_id"))) is not None:
            meta["message_id"] = reply_of
        job_type = pick("type")
        if isinstance(job_type, str) and job_type.strip().lower() in JOB_TYPES:
            meta["type"] = job_type.strip().lower()
        return Job(
            id=job_id,
            conversation_id=conversation_id,
            prompt="",
            reply_to=reply_to,
            correlation_id=correlation_id,
            meta=meta,
            kind=meta.get("type", "chat_response"),
            tenant=text(pick("tenant_id")) or "default",
        )

    def response(self, job: Job, result: Result) -> dict[str, Any]:
        """The AIResponse as a dict (what :meth:`reply` encodes)."""
        failed = result.error is not None
        status = result.status
        if failed and status not in ERROR_STATUSES:
            status = "failed"
        analysis = result.analysis
        prompt_tokens = result.prompt_tokens or 0
        completion_tokens = result.completion_tokens or 0
        return {
            "jobId": job.id,
            "tenantId": job.tenant,
            "conversationId": job.conversation_id,
            "messageId": response_message_id(job.id, error=failed),
            "inReplyTo": job.meta.get("message_id"),
            "type": job.meta.get("type", job.kind),
            "status": status,
            "content": "" if failed else result.text,
            "intent": analysis.get("intent"),
            "sentiment": analysis.get("sentiment"),
            "confidence": analysis.get("confidence"),
            "suggestedActions": list(analysis.get("suggestedActions") or []),
            "metadata": {
                "model": result.model_used,
                "provider": result.provider,
                "processingTime": result.latency_ms or 0,
                "cached": result.cached,
                "tokenUsage": {
                    "promptTokens": prompt_tokens,
                    "completionTokens": completion_tokens,
                    "totalTokens": prompt_tokens + completion_tokens,
                },
                "cost": result.cost,
                "currency": self.currency,
            },
            "error": {"code": status, "message": result.error} if failed else None,
        }

    def reply(self, job: Job, result: Result) -> bytes:
        """The AIResponse (a failed one when ``result.error`` is set)."""
        return orjson.dumps(self.response(job, result))

    def encode_chunk(self, conversation_id: int | str, index: int, delta: str) -> bytes:
        """Unused: this door does not stream (AIJobs never ask for it)."""
        return orjson.dumps({"conversationId": conversation_id, "index": index, "delta": delta})

    def lane(self, job: Job) -> str:
        """Which of :data:`LANES` a decoded job goes to."""
        priority = job.priority if job.priority is not None else DEFAULT_PRIORITY
        return lane_for(priority, job.kind, high_min=self.high_min)
