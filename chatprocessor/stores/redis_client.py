"""The one way chatprocessor opens a Redis client (events, cancels, history, replies).

No ``socket_timeout``: redis-py enforces it with ``asyncio.wait_for``, which on Python
3.11 can swallow a task's cancellation (a worker that never stops, seen with a cancel
listener whose connection dropped). Callers bound each call with
``asyncio.timeout(CALL_TIMEOUT)`` instead.
"""

from __future__ import annotations

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

#: Errors that mean "Redis cannot be reached" rather than "Redis said no".
UNREACHABLE: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    OSError,
)

#: Seconds a Redis call may take before the server counts as unreachable.
CALL_TIMEOUT = 5.0


def redis_client(url: str, *, name: str | None = None) -> redis.Redis:
    """A client with one connection pool and a short retry (one stale pooled connection is
    replaced at once; a Redis that is down fails in milliseconds, not after backoff).
    ``name`` is shown by CLIENT LIST.

    No ``socket_timeout``: with one, redis-py wraps each write in ``asyncio.wait_for``,
    which on Python 3.11 can swallow a task's cancellation (the task then runs on, e.g.
    blocked in the next XREAD). Callers bound each call with ``asyncio.timeout`` instead.
    """
    return redis.Redis.from_url(
        url,
        client_name=name,
        socket_connect_timeout=CALL_TIMEOUT,
        socket_timeout=None,  # redis-py 8's default is 5 s
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 1),
        health_check_interval=30,
    )
