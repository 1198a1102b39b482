"""Cancellation requests: who may stop a job, and how a request reaches the worker running it.

A client (the gateway, the CLI) broadcasts ``{"jobId", "userId"}``; every worker hears it,
because any of them may be running the job. The :class:`CancelRegistry` of each worker
decides: the job's owner cancels it, anyone else is refused and audited, and a cancel for
a job not running here is remembered for a while, since it may have overtaken its job
(the job is still queued, or about to be redelivered here). Sources:
:class:`RedisCancelSource` (a Redis Stream every worker reads from its end) and
:class:`RabbitMQCancelSource` (a fanout exchange, one private queue per worker); the
``send_cancel_*`` helpers are the client side.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
import redis.asyncio as redis

from chatprocessor.core.errors import BrokerUnavailable, PublishFailed
from chatprocessor.events.sink import safe_url
from chatprocessor.ops.metrics import CANCELS, labelled
from chatprocessor.stores.redis_client import CALL_TIMEOUT, UNREACHABLE, redis_client

__all__ = [
    "CANCELLED",
    "DEFAULT_CANCEL_EXCHANGE",
    "DEFAULT_CANCEL_STREAM",
    "CancelRegistry",
    "CancelScope",
    "CancelSource",
    "RabbitMQCancelSource",
    "RedisCancelSource",
    "cancel_body",
    "parse_cancel",
    "send_cancel_rabbitmq",
    "send_cancel_redis",
]

log = logging.getLogger(__name__)
audit = logging.getLogger("chatprocessor.audit")

#: The reason a scope carries once its owner cancelled it.
CANCELLED = "cancelled"
DEFAULT_CANCEL_STREAM = "sse:chat:cancel"
DEFAULT_CANCEL_EXCHANGE = "chat.cancel"
#: The cancel listener's name in Redis's CLIENT LIST.
CANCEL_CLIENT_NAME = "chatprocessor-cancel"
_BACKOFF_START = 0.5
_BACKOFF_CAP = 30.0
#: Different users remembered per unknown job; more are dropped oldest first.
_USERS_PER_JOB = 8


@dataclass(slots=True)
class CancelScope:
    """One running job's cancellation state: await ``event`` (or check ``cancelled``)."""

    job_id: str
    user_id: str
    event: asyncio.Event = field(default_factory=asyncio.Event)
    #: Why the job was stopped (``"cancelled"``), None while it may run on.
    reason: str | None = None

    @property
    def cancelled(self) -> bool:
        return self.event.is_set()

    def cancel(self, reason: str = CANCELLED) -> None:
        """Stop the job; the first reason wins."""
        if not self.event.is_set():
            self.reason = reason
            self.event.set()


class CancelRegistry:
    """The jobs running in this process and the cancels that arrived before their job.

    Not thread-safe: use it from the event loop that runs the jobs.
    """

    def __init__(
        self,
        *,
        remember: float = 600.0,
        limit: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.remember = remember
        self.limit = limit
        self._clock = clock
        self._running: dict[str, CancelScope] = {}
        #: job id -> {user id: expiry}, oldest first (all share one ``remember``).
        self._early: OrderedDict[str, dict[str, float]] = OrderedDict()

    def register(self, job_id: str, user_id: str) -> CancelScope:
        """Track a job starting here; a cancel its owner sent earlier applies at once."""
        scope = CancelScope(job_id, user_id)
        self._running[job_id] = scope
        now = self._clock()
        for requester, expiry in self._early.pop(job_id, {}).items():
            if expiry <= now:
                continue
            if requester == user_id:
                scope.cancel()
                labelled(CANCELS, "early").inc()
                log.info("job %s cancelled by its owner before it started", job_id)
            else:
                self._refuse(job_id, user_id, requester)
        return scope

    def unregister(self, job_id: str) -> None:
        """Forget a finished job (a later cancel for it is then remembered, harmlessly)."""
        self._running.pop(job_id, None)

    def get(self, job_id: str) -> CancelScope | None:
        """The running job's scope, if it runs here."""
        return self._running.get(job_id)

    def request(self, job_id: str, user_id: str) -> bool:
        """Cancel ``job_id`` for ``user_id``; True when a running job was cancelled.

        Another user's request is refused: False, an audit line, nothing changes. A job
        not running here: the request is remembered for ``remember`` seconds (at most
        ``limit`` jobs, oldest dropped first) and False is returned.
        """
        scope = self._running.get(job_id)
        if scope is None:
            self._remember(job_id, user_id)
            return False
        if scope.user_id != user_id:
            self._refuse(job_id, scope.user_id, user_id)
            return False
        if not scope.cancelled:
            scope.cancel()
            labelled(CANCELS, "accepted").inc()
            log.info("job %s cancelled by its owner", job_id)
        return True

    def remembered(self) -> int:
        """How many jobs have an early cancel waiting (expired ones pruned first)."""
        self._prune(self._clock())
        return len(self._early)

    def _refuse(self, job_id: str, owner: str, requester: str) -> None:
        labelled(CANCELS, "refused").inc()
        audit.warning(
            "cancel refused: user %r asked to cancel job %s owned by user %r",
            requester,
            job_id,
            owner,
            extra={"job_id": job_id, "user_id": requester, "owner_id": owner},
        )

    def _remember(self, job_id: str, user_id: str) -> None:
        now = self._clock()
        self._prune(now)
        users = self._early.pop(job_id, {})
        users.pop(user_id, None)
        users[user_id] = now + self.remember
        while len(users) > _USERS_PER_JOB:
            del users[next(iter(users))]
        self._early[job_id] = users  # newest last, so pruning stops at the first live one
        while len(self._early) > self.limit:
            self._early.popitem(last=False)

    def _prune(self, now: float) -> None:
        while self._early:
            job_id, users = next(iter(self._early.items()))
            if max(users.values()) > now:
                return
            del self._early[job_id]


class CancelSource(Protocol):
    """Delivers cancel requests to a registry until its task is cancelled."""

    async def run(self, registry: CancelRegistry) -> None:
        """Listen and hand each request to ``registry``; reconnects after errors."""

    async def close(self) -> None:
        """Release the connection (after cancelling ``run``'s task)."""


def cancel_body(job_id: str, user_id: str) -> bytes:
    """The JSON a cancel request travels as."""
    return orjson.dumps({"jobId": job_id, "userId": user_id})


def parse_cancel(fields: dict[Any, Any]) -> tuple[str, str] | None:
    """``(job_id, user_id)`` from a decoded request (str or bytes keys and values), or None
    when either is missing or empty."""
    values: list[str] = []
    for key in ("jobId", "userId"):
        value = fields.get(key, fields.get(key.encode()))
        if isinstance(value, bytes):
            try:
                value = value.decode()
            except UnicodeDecodeError:
                return None
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value:
            return None
        values.append(value)
    return values[0], values[1]


# -- Redis Streams ---------------------------------------------------------------------


class RedisCancelSource:
    """Reads the cancel stream from its end, without a consumer group: every worker sees
    every request. After a connection loss it resumes from the last entry it read, so a
    cancel sent meanwhile still arrives."""

    def __init__(
        self,
        url: str,
        *,
        stream: str = DEFAULT_CANCEL_STREAM,
        block: float = 1.0,
        client_name: str = CANCEL_CLIENT_NAME,
    ) -> None:
        self.stream = stream
        #: Set once the source reads the stream: cancels sent from then on are seen.
        self.started = asyncio.Event()
        self._safe_url = safe_url(url)
        self._block_ms = max(1, round(block * 1000))
        self._redis = redis_client(url, name=client_name)

    async def run(self, registry: CancelRegistry) -> None:
        last_id: bytes | str | None = None
        delay = _BACKOFF_START
        while True:
            try:
                # The deadline outlasts the BLOCK, so only a dead connection times out.
                async with asyncio.timeout(self._block_ms / 1000 + CALL_TIMEOUT):
                    if last_id is None:
                        last_id = await self._tail()
                        self.started.set()
                        log.info(
                            "listening for cancels on Redis %s, %r", self._safe_url, self.stream
                        )
                    reply: Any = await self._redis.xread(
                        {self.stream: last_id}, count=100, block=self._block_ms
                    )
            except (redis.RedisError, OSError) as exc:
                log.warning(
                    "cancel stream %r on Redis %s failed (%s); retrying in %.1fs",
                    self.stream,
                    self._safe_url,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_CAP)
                continue
            delay = _BACKOFF_START
            for entry_id, fields in _entries(reply):
                last_id = entry_id
                _deliver(registry, parse_cancel(fields or {}), f"entry {entry_id!r}")

    async def _tail(self) -> bytes | str:
        """The id of the newest entry: reading from it sees exactly what comes next."""
        newest: Any = await self._redis.xrevrange(self.stream, count=1)
        return newest[0][0] if newest else "0-0"

    async def close(self) -> None:
        await self._redis.aclose()


async def send_cancel_redis(
    url: str, job_id: str, user_id: str, stream: str = DEFAULT_CANCEL_STREAM
) -> None:
    """Ask every worker to cancel ``job_id`` on behalf of ``user_id`` (a client's helper)."""
    client = redis_client(url)
    try:
        async with asyncio.timeout(CALL_TIMEOUT):
            await client.xadd(
                stream, {"jobId": job_id, "userId": user_id}, maxlen=10_000, approximate=True
            )
    except UNREACHABLE as exc:
        raise BrokerUnavailable(f"cannot reach Redis at {safe_url(url)}: {exc}") from exc
    except redis.RedisError as exc:
        raise PublishFailed(f"Redis refused the cancel: {exc}") from exc
    finally:
        await client.aclose()


def _entries(reply: Any) -> list[tuple[Any, Any]]:
    """The (id, fields) pairs of an XREAD reply (RESP2, the client's default protocol:
    a list of [stream, entries], empty or None when BLOCK timed out)."""
    return [tuple(entry) for _stream, entries in reply or () for entry in entries]


def _deliver(registry: CancelRegistry, request: tuple[str, str] | None, what: str) -> None:
    """Hand one request to the registry; a bad one is logged and skipped."""
    if request is None:
        log.warning("skipping cancel %s: it needs a non-empty jobId and userId", what)
        return
    try:
        registry.request(*request)
    except Exception:  # one bad request must not stop the listener
        log.exception("cancel %s failed", what)


# -- RabbitMQ --------------------------------------------------------------------------


class RabbitMQCancelSource:
    """A private queue per worker (exclusive, auto-deleted) bound to a fanout exchange:
    every worker gets every request. aio-pika's robust connection declares the queue, its
    binding and its consumer again after a reconnect; the queue has a client-chosen unique
    name for that reason (a server-named one would change). Unlike the Redis source, a
    request sent while this worker is disconnected is lost (its queue is gone meanwhile)."""

    def __init__(self, url: str, *, exchange: str = DEFAULT_CANCEL_EXCHANGE) -> None:
        self.exchange = exchange
        #: Set once the queue is bound: cancels sent from then on are seen.
        self.started = asyncio.Event()
        self._url = url
        self._safe_url = safe_url(url)
        self._connection: Any = None

    async def run(self, registry: CancelRegistry) -> None:
        import aio_pika
        import aiormq

        from chatprocessor.events.rabbitmq_sink import CONNECTION_ERRORS, connection_name

        async def on_message(message: Any) -> None:
            try:
                fields = orjson.loads(message.body)
            except orjson.JSONDecodeError:
                fields = None
            request = parse_cancel(fields) if isinstance(fields, dict) else None
            _deliver(registry, request, f"message {message.message_id!r}")

        delay = _BACKOFF_START
        try:
            while True:
                try:
                    self._connection = connection = await aio_pika.connect_robust(
                        self._url,
                        timeout=10,
                        client_properties={"connection_name": connection_name("cancel")},
                        # Requests sent while disconnected are lost: come back soon.
                        reconnect_interval=1,
                    )
                    channel = await connection.channel()
                    exchange = await channel.declare_exchange(
                        self.exchange, aio_pika.ExchangeType.FANOUT, durable=True
                    )
                    queue = await channel.declare_queue(None, exclusive=True, auto_delete=True)
                    await queue.bind(exchange)
                    await queue.consume(on_message, no_ack=True)
                    break
                except (*CONNECTION_ERRORS, aiormq.exceptions.AMQPError) as exc:
                    await self.close()
                    log.warning(
                        "cancel exchange %r on RabbitMQ %s failed (%s); retrying in %.1fs",
                        self.exchange,
                        self._safe_url,
                        exc,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _BACKOFF_CAP)
            self.started.set()
            log.info("listening for cancels on RabbitMQ %s, %r", self._safe_url, self.exchange)
            await asyncio.Future()  # the robust connection consumes until we are cancelled
        finally:
            await self.close()

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()


async def send_cancel_rabbitmq(
    url: str, job_id: str, user_id: str, exchange: str = DEFAULT_CANCEL_EXCHANGE
) -> None:
    """Ask every worker to cancel ``job_id`` on behalf of ``user_id`` (a client's helper)."""
    import aio_pika
    import aiormq

    from chatprocessor.events.rabbitmq_sink import CONNECTION_ERRORS

    try:
        connection = await aio_pika.connect(url, timeout=10)
    except CONNECTION_ERRORS as exc:
        raise BrokerUnavailable(f"cannot reach RabbitMQ at {safe_url(url)}: {exc}") from exc
    try:
        channel = await connection.channel(publisher_confirms=True)
        fanout = await channel.declare_exchange(
            exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        message = aio_pika.Message(cancel_body(job_id, user_id), content_type="application/json")
        await fanout.publish(message, routing_key="", mandatory=False)
    except aiormq.exceptions.DeliveryError as exc:
        raise PublishFailed(f"RabbitMQ refused the cancel for {job_id}") from exc
    except (*CONNECTION_ERRORS, aiormq.exceptions.AMQPError) as exc:
        raise BrokerUnavailable(f"sending the cancel for {job_id} failed: {exc}") from exc
    finally:
        with contextlib.suppress(Exception):
            await connection.close()
