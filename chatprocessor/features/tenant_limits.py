"""Requests per minute per tenant (seed 004 section 3), checked before any model call.

A sliding window (the ``limits`` library's moving window: a request counts for exactly
60 s after it was admitted), in Redis when a URL is given, so every worker shares one
window per tenant, else in this process (``limits``' MemoryStorage). A request over the
limit is not counted and raises :class:`~chatprocessor.core.errors.TenantRateLimited`
with the seconds until the tenant's oldest counted request leaves the window, so the
engine can delay the job instead of spending an attempt on it.

Unlike :mod:`chatprocessor.ratelimit` (one service-wide limit that waits), this never
waits: the job goes back to the broker with a delay and the worker's slot is freed.
The tenant is percent-encoded into the key, so tenants never share a window.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import quote

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError

from chatprocessor.core.errors import StoreUnavailable, TenantRateLimited
from chatprocessor.ops import metrics
from chatprocessor.ratelimit import _async_uri
from chatprocessor.stores.redis_client import CALL_TIMEOUT

T = TypeVar("T")

#: The shortest retry_after given, so rounding never asks for an immediate retry loop.
MIN_RETRY_AFTER = 0.05


class TenantRateLimiter:
    """Requests per minute per tenant, sliding window (limits' moving window), in Redis when a
    URL is given (shared by every worker) else in process (limits' MemoryStorage)."""

    def __init__(
        self,
        per_minute: Callable[[str], int],
        *,
        redis_url: str | None = None,
        prefix: str = "ai:rate",
    ) -> None:
        """``per_minute(tenant)`` is the tenant's limit, 0 meaning none. It is asked on each
        check, so a changed limit applies at once (the count of a new amount starts afresh:
        ``limits`` keeps the amount in its key)."""
        self._per_minute = per_minute
        self._redis_url = redis_url
        self._prefix = prefix
        self._storage: Storage | None = None
        self._limiter: MovingWindowRateLimiter | None = None

    async def check(self, tenant: str) -> None:
        """Count one request of ``tenant`` if it fits its window, else raise
        :class:`TenantRateLimited` (nothing counted; ``AI_RATE_LIMITED`` incremented).
        A limit of 0 returns at once without touching the store. Raises
        :class:`StoreUnavailable` when the store cannot be reached."""
        limit = self._per_minute(tenant)
        if limit <= 0:
            return
        item = RateLimitItemPerMinute(limit)
        ids = (self._prefix, quote(tenant, safe=""))
        limiter = self._strategy()
        # The moving window's acquire is atomic (a Lua script on Redis): no test-then-hit race.
        if await _guard(limiter.hit(item, *ids)):
            return
        retry_after = await self._retry_after(limiter, item, ids)
        metrics.labelled(metrics.AI_RATE_LIMITED, tenant).inc()
        raise TenantRateLimited(
            f"tenant {tenant!r} is over its rate limit of {limit} requests per minute;"
            f" retry in {retry_after:.2f}s",
            retry_after=retry_after,
        )

    async def close(self) -> None:
        """Release the store's connection (Redis); counts stay in the store."""
        storage, self._storage, self._limiter = self._storage, None, None
        if isinstance(storage, MemoryStorage):
            # Its expiry sweep is a task of its own; do not leave it pending on the loop.
            timer = getattr(storage, "timer", None)
            if timer is not None:
                timer.cancel()
        elif isinstance(storage, RedisStorage):
            # limits has no close(): its redis-py bridge keeps the client as `storage`.
            client = getattr(storage.bridge, "storage", None)
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()

    async def _retry_after(
        self, limiter: MovingWindowRateLimiter, item: RateLimitItem, ids: tuple[str, str]
    ) -> float:
        """Seconds until the oldest request in the tenant's window leaves it."""
        stats = await _guard(limiter.get_window_stats(item, *ids))
        return max(MIN_RETRY_AFTER, stats.reset_time - time.time())

    def _strategy(self) -> MovingWindowRateLimiter:
        if self._limiter is None:
            if self._redis_url:
                # As stores.redis_client: no socket_timeout (redis-py's wait_for can swallow
                # a cancellation on 3.11), calls are bounded in _guard instead.
                options: dict[str, Any] = {
                    "socket_connect_timeout": CALL_TIMEOUT,
                    "socket_timeout": None,
                    "client_name": "chatprocessor-tenant-rate",
                }
                self._storage = RedisStorage(
                    _async_uri(self._redis_url),
                    implementation="redispy",
                    wrap_exceptions=True,
                    **options,
                )
            else:
                self._storage = MemoryStorage()
            self._limiter = MovingWindowRateLimiter(self._storage)
        return self._limiter


async def _guard(call: Awaitable[T]) -> T:
    """The store's answer, or :class:`StoreUnavailable` if it fails or takes too long."""
    try:
        async with asyncio.timeout(CALL_TIMEOUT):
            return await call
    except StorageError as exc:
        raise StoreUnavailable(f"tenant rate limit store: {exc.storage_error}") from exc
    except TimeoutError as exc:
        raise StoreUnavailable(
            f"tenant rate limit store: no answer within {CALL_TIMEOUT}s"
        ) from exc
