"""The internal job and result every door is translated to and from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant"
    content: str
    #: Base64 images for a vision model (already checked: chatprocessor/vision.py).
    images: tuple[str, ...] = ()


@dataclass(slots=True)
class Job:
    """One request to answer, whatever door it came through."""

    id: str
    conversation_id: int | str
    prompt: str
    user_id: int | str | None = None
    model: str | None = None
    system_prompt: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    stream: bool = False
    reply_to: str | None = None
    correlation_id: str | None = None
    #: Checked base64 images sent with the prompt (a vision request).
    images: tuple[str, ...] = ()
    #: The answer must be JSON: "json", or a JSON schema it must follow (then sanitized).
    format: str | dict[str, Any] | None = None
    #: What a door needs to shape its reply (e.g. seed 001's user_email and request kind).
    meta: dict[str, Any] = field(default_factory=dict)
    #: "chat" (a conversation for the LLM), or a task type of chatprocessor/tasks.py.
    kind: str = "chat"
    #: Whose data this job may see (history, documents); TENANT_ID when the door names none.
    tenant: str = "default"
    #: "gen": answer from the conversation; "rag": from retrieved passages too (seed 003).
    mode: str = "gen"
    #: Earlier turns the request carries itself (seed 004's payload.context), oldest first.
    context: tuple[ChatMessage, ...] = ()
    #: 1-10, higher first (seed 004); None when the door has no priorities.
    priority: int | None = None

    def messages(self, default_system_prompt: str = "") -> list[ChatMessage]:
        """The conversation sent to the model: optional system prompt, then the user's turn."""
        system = self.system_prompt if self.system_prompt is not None else default_system_prompt
        out = [ChatMessage("system", system)] if system else []
        out.extend(self.context)
        out.append(ChatMessage("user", self.prompt, self.images))
        return out


@dataclass(slots=True)
class Result:
    """The answer to a job, or the error that stopped it."""

    text: str
    model_used: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_ms: int | None = None
    error: str | None = None
    #: "completed", or why generation stopped early: "cancelled" or "timeout" (text is partial).
    status: str = "completed"
    #: Milliseconds from the call to the first generated text (streamed answers).
    time_to_first_token_ms: int | None = None
    #: Which provider answered (a router may fall back).
    provider: str | None = None
    #: RAG: the passages the answer was given, as {"source", "chunk", "score"} dicts.
    sources: list[dict[str, Any]] = field(default_factory=list)
    #: Price of the job (MODEL_PRICES), in COST_CURRENCY; None where costs are not tracked.
    cost: float | None = None
    #: The answer came from the response cache (no model call).
    cached: bool = False
    #: Seed 004 post-processing: intent, sentiment, confidence, suggestedActions.
    analysis: dict[str, Any] = field(default_factory=dict)
