"""The Transport protocol: the one contract every broker adapter implements.

A transport hands out deliveries and publishes messages. A delivery is settled
exactly once, by one of:

- ``ack()``                      the job is done and its reply confirmed: forget it;
- ``retry(delay, error)``        try again after ``delay`` seconds, through a delay queue
                                 (the attempt count goes up by one, in the ``x-attempt`` header);
- ``dead_letter(error, reason)`` it can never succeed: park it unchanged in ``<queue>.dlq``
                                 with headers saying why, when and after how many attempts;
- ``release()``                  give it back untouched (shutdown): another worker takes it.

Retry and dead-letter copy the message first and remove the original only once
the copy is confirmed, so a crash in between duplicates a message, never loses it.

``publish`` returns only once the broker has taken responsibility for the
message (publisher confirm, or a committed row), and raises PublishFailed when
the destination does not exist (AMQP ``mandatory``).
"""

from __future__ import annotations

import abc
import math
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

#: Attempts already made (failed) before this delivery; absent means 0.
ATTEMPT_HEADER = "x-attempt"
#: Epoch milliseconds (an integer: AMQP would round a float header to 32 bits) before which
#: a delayed message must not be processed.
RETRY_AT_HEADER = "x-retry-at"
#: Epoch milliseconds of the job's first failure (bounds how long it may wait for breakers).
FIRST_FAILED_HEADER = "x-first-failed-at"
#: Headers a dead letter carries.
DLQ_REASON = "x-dead-letter-reason"  # rejected | retries_exhausted | failed | ...
DLQ_ERROR = "x-last-error"
DLQ_FAILED_AT = "x-failed-at"  # ISO 8601, UTC
DLQ_ATTEMPTS = "x-attempts"
DLQ_QUEUE = "x-original-queue"
DLQ_SUFFIX = ".dlq"
MAX_ATTEMPT = 1_000_000

#: Dead-letter reasons.
REJECTED = "rejected"  # the message itself is bad: permanent, no attempt made
FORBIDDEN = "forbidden"  # the sender may not ask for it (another user's conversation)
FAILED = "failed"  # a permanent error while processing (e.g. the provider refused it)
RETRIES_EXHAUSTED = "retries_exhausted"
REPLY_REFUSED = "reply_refused"  # the broker would not take the reply
INTERNAL_ERROR = "internal_error"
OVER_BUDGET = "over_budget"  # the tenant spent its daily or monthly budget (seed 004)


@dataclass(slots=True)
class Outgoing:
    """A message to publish."""

    body: bytes
    message_id: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    type: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    content_type: str | None = None
    #: 0-10, higher first, on queues declared with priorities (RabbitMQ ``x-max-priority``).
    priority: int | None = None


def dead_letter_name(queue: str) -> str:
    return queue + DLQ_SUFFIX


def dead_letter_headers(
    headers: dict[str, Any], *, queue: str, reason: str, error: str, attempts: int
) -> dict[str, Any]:
    """The message's own headers plus why, when and after how many attempts it failed."""
    return {
        **headers,
        DLQ_REASON: reason,
        DLQ_ERROR: error[:1000],
        DLQ_FAILED_AT: datetime.now(UTC).isoformat(timespec="milliseconds"),
        DLQ_ATTEMPTS: attempts,
        DLQ_QUEUE: queue,
    }


def retry_headers(headers: dict[str, Any], *, attempt: int, error: str) -> dict[str, Any]:
    """Headers of the copy that goes through the delay queue."""
    return {**headers, ATTEMPT_HEADER: attempt, DLQ_ERROR: error[:1000]}


def replay_headers(headers: dict[str, Any]) -> dict[str, Any]:
    """A replayed dead letter starts again with a fresh retry budget."""
    dropped = {ATTEMPT_HEADER, RETRY_AT_HEADER, FIRST_FAILED_HEADER, DLQ_REASON, DLQ_ERROR}
    dropped |= {DLQ_FAILED_AT}
    dropped |= {DLQ_ATTEMPTS, DLQ_QUEUE, "x-death", "x-first-death-exchange"}
    dropped |= {"x-first-death-queue", "x-first-death-reason", "x-last-death-exchange"}
    dropped |= {"x-last-death-queue", "x-last-death-reason"}
    return {k: v for k, v in headers.items() if k not in dropped}


def header_number(headers: dict[str, Any], name: str) -> float:
    """A numeric header, 0 when absent or not a number (headers come from anyone)."""
    value = headers.get(name)
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    try:
        number = float(value) if value is not None and not isinstance(value, bool) else 0.0
    except (TypeError, ValueError):
        return 0.0
    return number if math.isfinite(number) else 0.0


@dataclass(slots=True)
class DeadLetter:
    """A message parked in ``<queue>.dlq``, as ``chatprocessor dlq list`` shows it."""

    id: str
    body: bytes
    message_id: str | None
    headers: dict[str, Any]

    @property
    def reason(self) -> str:
        return str(self.headers.get(DLQ_REASON, ""))

    @property
    def error(self) -> str:
        return str(self.headers.get(DLQ_ERROR, ""))

    @property
    def failed_at(self) -> str:
        return str(self.headers.get(DLQ_FAILED_AT, ""))

    @property
    def attempts(self) -> int:
        return int(header_number(self.headers, DLQ_ATTEMPTS))


class Delivery(abc.ABC):
    """A message taken from a queue, to be settled exactly once.

    The public methods keep the exactly-once rule for every transport (a second
    settle, whatever path the worker took, does nothing); adapters implement
    the underscored ones.
    """

    queue: str
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

    @property
    def attempt(self) -> int:
        """Failed attempts before this one (the ``x-attempt`` header, clamped: anyone can
        write headers, and an absurd count must still fit an AMQP integer)."""
        return max(0, min(MAX_ATTEMPT, int(header_number(self.headers, ATTEMPT_HEADER))))

    @property
    def first_failed_at(self) -> float | None:
        """Epoch seconds of the job's first failed attempt, if any."""
        return header_number(self.headers, FIRST_FAILED_HEADER) / 1000 or None

    @property
    def retry_at(self) -> float:
        """Epoch seconds before which it must wait (0: now)."""
        return header_number(self.headers, RETRY_AT_HEADER) / 1000

    async def dead_letter(self, error: str, *, reason: str = REJECTED) -> None:
        """Never retry: park it unchanged in the dead-letter queue, headers saying why."""
        if self._first_settle():
            attempts = self.attempt + (0 if reason == REJECTED else 1)
            headers = dead_letter_headers(
                self.headers, queue=self.queue, reason=reason, error=error, attempts=attempts
            )
            await self._unsettle_on_error(self._dead_letter(error, headers))

    async def retry(self, delay: float, error: str, *, count: bool = True) -> None:
        """Come back after ``delay`` seconds; ``count=False`` waits without using an attempt."""
        if self._first_settle():
            if count:
                headers = retry_headers(self.headers, attempt=self.attempt + 1, error=error)
            else:  # only waiting longer: keep the attempt count and the last error
                headers = dict(self.headers)
            headers.pop(RETRY_AT_HEADER, None)
            headers.setdefault(FIRST_FAILED_HEADER, math.floor(time.time() * 1000))
            if delay > 0:
                headers[RETRY_AT_HEADER] = math.ceil((time.time() + delay) * 1000)
            await self._unsettle_on_error(self._retry(delay, headers))

    async def _unsettle_on_error(self, settling: Awaitable[None]) -> None:
        # The copy was not confirmed, so the original is still ours: let the
        # caller settle it another way (release) instead of leaving it hanging.
        try:
            await settling
        except BaseException:
            self.settled = False
            raise

    async def release(self) -> None:
        """Not processed: put it back for another consumer."""
        if self._first_settle():
            await self._release()

    @abc.abstractmethod
    async def _ack(self) -> None: ...

    @abc.abstractmethod
    async def _dead_letter(self, error: str, headers: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    async def _retry(self, delay: float, headers: dict[str, Any]) -> None: ...

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

    async def declare_input(self, queue: str) -> None:
        """Declare ``queue`` plus its dead-letter queue and its delay queues."""
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


class DeadLetterAdmin(Protocol):
    """What ``chatprocessor dlq`` needs: inspect, replay and purge ``<queue>.dlq``."""

    async def list_dead_letters(self, queue: str, limit: int) -> list[DeadLetter]:
        """Up to ``limit`` dead letters of ``queue``, oldest first; they stay where they are."""
        ...

    async def replay_dead_letters(
        self, queue: str, *, limit: int | None = None, message_id: str | None = None
    ) -> int:
        """Move dead letters back to ``queue`` with a fresh retry budget; returns how many."""
        ...

    async def purge_dead_letters(self, queue: str) -> int:
        """Delete every dead letter of ``queue``; returns how many."""
        ...
