"""The response cache (seed 004, section 4): an answer given once is given again for free.

A job's key is the sha256 of what decides its answer: the content, the model settings
and the recent context (the last 3 messages, first 100 characters each: the seed's rule).
Entries are stored per tenant, so tenants never share answers even for the same key,
in an envelope ``{"version", "data", "cachedAt", "expiresAt"}`` (epoch milliseconds).
An entry of another CACHE_VERSION, an expired one, or one that cannot be decoded reads
as a miss: bump CACHE_VERSION when the shape of ``data`` changes.

Two backends with one API: :class:`MemoryResponseCache` (in process, bounded) and
:class:`RedisResponseCache` (shared by every worker). :class:`CountingCache` wraps either
and counts hits and misses per tenant in Prometheus. A Redis that fails raises
:class:`~chatprocessor.core.errors.StoreUnavailable`; the caller decides to go on
without the cache.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from typing import Any, Protocol
from urllib.parse import quote

import orjson
from cachetools import TLRUCache

from chatprocessor.core.errors import StoreUnavailable
from chatprocessor.core.job import Job
from chatprocessor.ops import metrics
from chatprocessor.stores.redis_client import CALL_TIMEOUT

log = logging.getLogger(__name__)

#: Stored in every envelope and in Redis keys; entries of another version read as misses.
CACHE_VERSION = "v1"
#: Characters of each context message that count in the key (seed 004).
CONTEXT_CHARS = 100
KEY_PREFIX = "ai:cache"


def cache_key(job: Job, *, default_model: str, context_messages: int = 3) -> str:
    """The sha256 hex of what decides the job's answer.

    The content (prompt, and a digest of each attached image: a photo changes the
    answer), the model settings (model or ``default_model``, temperature, max_tokens,
    ``meta["personality"]``, system prompt, kind, format, mode, and the classification
    asked for: ``meta["classify"]`` and ``meta["intents"]``) and the last
    ``context_messages`` context messages as (role, first 100 characters). Encoded as
    JSON with sorted keys, so every process computes the same key (no ``hash()``).
    """
    recent = job.context[-context_messages:] if context_messages > 0 else ()
    material = {
        "content": job.prompt,
        "images": [hashlib.sha256(image.encode()).hexdigest() for image in job.images],
        "model": job.model or default_model,
        "temperature": job.temperature,
        "max_tokens": job.max_tokens,
        "personality": job.meta.get("personality"),
        "system_prompt": job.system_prompt,
        "kind": job.kind,
        "format": job.format,
        "mode": job.mode,
        "classify": job.meta.get("classify"),
        "intents": job.meta.get("intents"),
        "context": [[m.role, m.content[:CONTEXT_CHARS]] for m in recent],
    }
    # default=str: a personality of an unusual type still gives a key instead of failing.
    encoded = orjson.dumps(material, option=orjson.OPT_SORT_KEYS, default=str)
    return hashlib.sha256(encoded).hexdigest()


class ResponseCache(Protocol):
    async def get(self, tenant: str, key: str) -> dict[str, Any] | None:
        """The tenant's cached answer for ``key``, or None (absent, expired, other version)."""
        ...

    async def set(self, tenant: str, key: str, value: dict[str, Any], ttl: float) -> None:
        """Keep ``value`` for ``ttl`` seconds; ``ttl <= 0`` stores nothing."""
        ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


def _check_ttl(ttl: float) -> bool:
    """True when an entry with this ttl should be stored."""
    if math.isinf(ttl) and ttl > 0:
        raise ValueError("a cache ttl must be finite")
    return ttl > 0  # False for NaN too


def _envelope(value: dict[str, Any], ttl: float) -> bytes:
    now_ms = int(time.time() * 1000)
    return orjson.dumps(
        {
            "version": CACHE_VERSION,
            "data": value,
            "cachedAt": now_ms,
            "expiresAt": now_ms + math.ceil(ttl * 1000),
        }
    )


def _unwrap(raw: bytes | str, where: str) -> dict[str, Any] | None:
    """The envelope's data when it is of this version and not expired, else None."""
    try:
        envelope = orjson.loads(raw)
        version, data, expires_at = envelope["version"], envelope["data"], envelope["expiresAt"]
        if not isinstance(data, dict) or not isinstance(expires_at, int | float):
            raise TypeError("not an envelope")
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        log.debug("response cache (%s): undecodable entry ignored: %s", where, exc)
        return None
    if version != CACHE_VERSION or time.time() * 1000 >= expires_at:
        return None
    return data


def _part(value: str) -> str:
    """A key part without ':' so tenant ``a:b`` + key ``c`` never meets ``a`` + ``b:c``."""
    return quote(value, safe="")


def _expiry(_key: tuple[str, str], value: tuple[float, bytes], _now: float) -> float:
    return value[0]


class MemoryResponseCache:
    """In this process, at most ``max_entries`` entries (least recently used go first).

    Entries are kept encoded, as in Redis, so a caller changing a dict it stored or got
    back never changes the cache. Each entry leaves at its own expiry (``TLRUCache``
    with the wall clock, the clock of the envelope's ``expiresAt``).
    """

    def __init__(self, *, max_entries: int = 10_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._entries: TLRUCache[tuple[str, str], tuple[float, bytes]] = TLRUCache(
            maxsize=max_entries, ttu=_expiry, timer=time.time
        )

    async def get(self, tenant: str, key: str) -> dict[str, Any] | None:
        entry = self._entries.get((tenant, key))
        return None if entry is None else _unwrap(entry[1], "memory")

    async def set(self, tenant: str, key: str, value: dict[str, Any], ttl: float) -> None:
        if not _check_ttl(ttl):
            return
        self._entries[(tenant, key)] = (time.time() + ttl, _envelope(value, ttl))

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._entries.clear()


class RedisResponseCache:
    """One string per (tenant, key) with a Redis expiry, shared by every worker.

    Key: ``<prefix>:<CACHE_VERSION>:<tenant>:<key>`` (tenant and key percent-encoded).
    Redis expires whole seconds (``EX`` = ttl rounded up); the envelope's ``expiresAt``
    keeps the exact ttl. Each call is bounded by CALL_TIMEOUT.
    """

    def __init__(self, url: str, *, prefix: str = KEY_PREFIX) -> None:
        import redis.asyncio as redis

        from chatprocessor.stores.redis_client import redis_client

        self.prefix = prefix
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError, TimeoutError)
        # No socket_timeout (see redis_client): calls are bounded with asyncio.timeout.
        self._redis: Any = redis_client(url, name="chatprocessor-cache")

    def _key(self, tenant: str, key: str) -> str:
        return f"{self.prefix}:{CACHE_VERSION}:{_part(tenant)}:{_part(key)}"

    async def get(self, tenant: str, key: str) -> dict[str, Any] | None:
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                raw = await self._redis.get(self._key(tenant, key))
        except self._errors as exc:
            raise StoreUnavailable(f"response cache (redis): {exc}") from exc
        return None if raw is None else _unwrap(raw, "redis")

    async def set(self, tenant: str, key: str, value: dict[str, Any], ttl: float) -> None:
        if not _check_ttl(ttl):
            return
        body = _envelope(value, ttl)
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                await self._redis.set(self._key(tenant, key), body, ex=math.ceil(ttl))
        except self._errors as exc:
            raise StoreUnavailable(f"response cache (redis): {exc}") from exc

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                return bool(await self._redis.ping())
        except self._errors:
            return False

    async def close(self) -> None:
        await self._redis.aclose()


class CountingCache:
    """Any :class:`ResponseCache`, with hits and misses counted per tenant
    (``ai_cache_hits_total`` / ``ai_cache_misses_total``). A failed read counts as neither."""

    def __init__(self, inner: ResponseCache) -> None:
        self.inner = inner

    async def get(self, tenant: str, key: str) -> dict[str, Any] | None:
        value = await self.inner.get(tenant, key)
        counter = metrics.AI_CACHE_MISSES if value is None else metrics.AI_CACHE_HITS
        metrics.labelled(counter, tenant).inc()
        return value

    async def set(self, tenant: str, key: str, value: dict[str, Any], ttl: float) -> None:
        await self.inner.set(tenant, key, value, ttl)

    async def ping(self) -> bool:
        return await self.inner.ping()

    async def close(self) -> None:
        await self.inner.close()
