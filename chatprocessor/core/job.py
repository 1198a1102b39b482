"""The internal job and result every door is translated to and from."""

from __future__ import annotations

from dataclasses import dataclass


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

    def messages(self, default_system_prompt: str = "") -> list[ChatMessage]:
        """The conversation sent to the model: optional system prompt, then the user's turn."""
        system = self.system_prompt if self.system_prompt is not None else default_system_prompt
        out = [ChatMessage("system", system)] if system else []
        out.append(ChatMessage("user", self.prompt))
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
