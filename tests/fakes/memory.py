"""An in-memory transport and delivery for driving the Worker without a broker.

The delivery records how the worker settled it; the transport records what was published.
"""

from __future__ import annotations

from typing import Any

from chatprocessor.core.errors import PublishFailed
from chatprocessor.transports.base import Delivery, Outgoing


class MemoryDelivery(Delivery):
    """A delivery that records how it was settled: ``actions`` holds one tuple per settle,
    ``("ack",)``, ``("dead_letter", error, headers)``, ``("retry", delay, headers)`` or
    ``("release",)``. ``refuse_retry`` makes the delay queue refuse the copy (a nack)."""

    def __init__(
        self,
        body: bytes,
        *,
        message_id: str | None = None,
        reply_to: str | None = None,
        correlation_id: str | None = None,
        headers: dict[str, Any] | None = None,
        refuse_retry: bool = False,
    ) -> None:
        self.queue = "in"
        self.body = body
        self.message_id = message_id
        self.correlation_id = correlation_id
        self.reply_to = reply_to
        self.type = None
        self.headers = dict(headers or {})
        self.redelivered = False
        self.refuse_retry = refuse_retry
        self.actions: list[tuple[Any, ...]] = []

    @property
    def kinds(self) -> list[str]:
        return [action[0] for action in self.actions]

    @property
    def settlements(self) -> list[tuple[str, dict[str, Any]]]:
        """(kind, headers written) per settle; headers are empty for ack and release."""
        return [(a[0], a[2] if len(a) > 2 else {}) for a in self.actions]

    async def _ack(self) -> None:
        self.actions.append(("ack",))

    async def _dead_letter(self, error: str, headers: dict[str, Any]) -> None:
        self.actions.append(("dead_letter", error, headers))

    async def _retry(self, delay: float, headers: dict[str, Any]) -> None:
        if self.refuse_retry:
            raise PublishFailed("broker refused the message for 'in.retry.1000ms'")
        self.actions.append(("retry", delay, headers))

    async def _release(self) -> None:
        self.actions.append(("release",))


class MemoryTransport:
    """Publishes into a list; every queue exists."""

    def __init__(self) -> None:
        self.published: list[tuple[str, Outgoing]] = []

    async def publish(self, destination: str, message: Outgoing) -> None:
        self.published.append((destination, message))

    async def declare(self, queue: str) -> None:
        return None

    async def declare_input(self, queue: str) -> None:
        return None
