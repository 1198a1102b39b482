"""The Transport protocol: the one contract every broker adapter implements.

A transport hands out deliveries and publishes messages. A delivery is settled
exactly once, by one of:

- ``ack()``               the job is done and its reply confirmed: forget it;
- ``dead_letter(reason)`` it can never succeed: park it with the reason;
- ``release()``           give it back untouched (shutdown): another worker takes it.

``publish`` returns only once the broker has taken responsibility for the
message (publisher confirm, or a committed row), and raises PublishFailed when
the destination does not exist (AMQP ``mandatory``).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(slots=True)
class Outgoing:
    """A message to publish."""

    body: bytes
    message_id: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    type: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)


class Delivery(abc.ABC):
    """A message taken from a queue, to be settled exactly once.

    The public methods keep the exactly-once rule for every transport (a second
    settle, whatever path the worker took, does nothing); adapters implement
    the underscored ones.
    """

    body: bytes
    message_id: str | None
    correlation_id: str | None
    reply_to: str | None
    type: str | None
    headers: dict[str, Any]
    redelivered: bool
    settled: bool = False

    def _first_settle(self) -> bool:
        if self.settled:
            return False
        self.settled = True
        return True

    async def ack(self) -> None:
        """Done: remove it from the queue."""
        if self._first_settle():
            await self._ack()

    async def dead_letter(self, reason: str) -> None:
        """Never retry: move it aside with the reason."""
        if self._first_settle():
            await self._dead_letter(reason)

    async def release(self) -> None:
        """Not processed: put it back for another consumer."""
        if self._first_settle():
            await self._release()

    @abc.abstractmethod
    async def _ack(self) -> None: ...

    @abc.abstractmethod
    async def _dead_letter(self, reason: str) -> None: ...

    @abc.abstractmethod
    async def _release(self) -> None: ...


class ReplyQueue(Protocol):
    """A private, temporary queue a request/reply client reads its answers from."""

    name: str

    def messages(self) -> AsyncIterator[Delivery]:
        """Messages arriving on the queue, already settled (auto-ack)."""
        ...

    async def close(self) -> None:
        """Delete the queue."""
        ...


class Transport(Protocol):
    """A message broker seen from chatprocessor."""

    async def connect(self, *, attempts: int | None = None) -> None:
        """Connect, retrying with backoff; ``attempts=None`` retries until the broker answers."""
        ...

    async def declare(self, queue: str) -> None:
        """Make sure a durable queue exists, accepting one declared by others as it is."""
        ...

    def consume(self, queue: str, prefetch: int) -> AsyncIterator[Delivery]:
        """Deliveries from ``queue``; at most ``prefetch`` unsettled at any time."""
        ...

    async def publish(self, destination: str, message: Outgoing) -> None:
        """Publish persistently; return once the broker confirmed it."""
        ...

    async def open_reply_queue(self) -> ReplyQueue:
        """A private queue for replies (used by ``chatprocessor send``)."""
        ...

    async def ping(self) -> bool:
        """True when the broker is reachable now."""
        ...

    async def close(self) -> None:
        """Close connections; unsettled deliveries go back to their queue."""
        ...
