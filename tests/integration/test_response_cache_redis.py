"""The response cache on the real Redis: round trip, expiry, tenants, versions, outages."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import redis.asyncio as redis

from chatprocessor.core.errors import StoreUnavailable
from chatprocessor.features.cache import CACHE_VERSION, RedisResponseCache
from tests.conftest import REDIS_URL

pytestmark = [pytest.mark.redis, pytest.mark.timeout(30)]

ANSWER = {"content": "9 to 5", "intent": "hours", "metadata": {"model": "llama2", "tokens": 12}}


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A key prefix of this test; its keys are deleted afterwards."""
    name = f"test:cache:{uuid.uuid4().hex}"
    yield name
    client = redis.Redis.from_url(REDIS_URL)
    keys = [k async for k in client.scan_iter(match=f"{name}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
async def cache(prefix: str) -> AsyncIterator[RedisResponseCache]:
    store = RedisResponseCache(REDIS_URL, prefix=prefix)
    yield store
    await store.close()


@pytest.fixture
async def raw() -> AsyncIterator[Any]:
    """A plain client, to look at and tamper with what the cache stored."""
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


async def test_round_trip_stores_the_seed_envelope(
    cache: RedisResponseCache, raw: Any, prefix: str
) -> None:
    assert await cache.ping() is True
    assert await cache.get("acme", "k1") is None
    before = int(time.time() * 1000)
    await cache.set("acme", "k1", ANSWER, ttl=300)
    assert await cache.get("acme", "k1") == ANSWER

    stored = orjson.loads(await raw.get(f"{prefix}:{CACHE_VERSION}:acme:k1"))
    assert stored["version"] == CACHE_VERSION
    assert stored["data"] == ANSWER
    assert before <= stored["cachedAt"] <= int(time.time() * 1000)
    assert stored["expiresAt"] == stored["cachedAt"] + 300_000


async def test_the_key_carries_a_redis_expiry(
    cache: RedisResponseCache, raw: Any, prefix: str
) -> None:
    await cache.set("acme", "k1", ANSWER, ttl=30)
    ttl = await raw.ttl(f"{prefix}:{CACHE_VERSION}:acme:k1")
    assert 0 < ttl <= 30
    await cache.set("acme", "k2", ANSWER, ttl=0.5)  # Redis rounds up to whole seconds
    assert await raw.ttl(f"{prefix}:{CACHE_VERSION}:acme:k2") == 1


async def test_an_entry_expires_after_its_exact_ttl(
    cache: RedisResponseCache, raw: Any, prefix: str
) -> None:
    await cache.set("acme", "k1", ANSWER, ttl=0.05)
    assert await cache.get("acme", "k1") == ANSWER
    await asyncio.sleep(0.1)
    # Redis keeps the key for its whole second, the envelope's expiresAt ends it already.
    assert await raw.exists(f"{prefix}:{CACHE_VERSION}:acme:k1") == 1
    assert await cache.get("acme", "k1") is None


async def test_ttl_not_positive_stores_nothing(
    cache: RedisResponseCache, raw: Any, prefix: str
) -> None:
    await cache.set("acme", "k1", ANSWER, ttl=0)
    await cache.set("acme", "k2", ANSWER, ttl=-5)
    assert [k async for k in raw.scan_iter(match=f"{prefix}:*")] == []


async def test_tenants_never_share_entries(cache: RedisResponseCache, prefix: str) -> None:
    await cache.set("acme", "same", {"content": "acme's answer"}, ttl=60)
    assert await cache.get("globex", "same") is None
    await cache.set("globex", "same", {"content": "globex's answer"}, ttl=60)
    assert await cache.get("acme", "same") == {"content": "acme's answer"}
    assert await cache.get("globex", "same") == {"content": "globex's answer"}
    # A ':' in a tenant cannot make its keys meet another tenant's.
    await cache.set("a:b", "c", {"content": "first"}, ttl=60)
    assert await cache.get("a", "b:c") is None


async def test_workers_share_entries(cache: RedisResponseCache, prefix: str) -> None:
    other_worker = RedisResponseCache(REDIS_URL, prefix=prefix)
    try:
        await cache.set("acme", "k1", ANSWER, ttl=60)
        assert await other_worker.get("acme", "k1") == ANSWER
    finally:
        await other_worker.close()


async def test_an_entry_of_another_version_is_a_miss(
    cache: RedisResponseCache, raw: Any, prefix: str
) -> None:
    now = int(time.time() * 1000)
    old = {"version": "v0", "data": ANSWER, "cachedAt": now, "expiresAt": now + 60_000}
    await raw.set(f"{prefix}:{CACHE_VERSION}:acme:k1", orjson.dumps(old), ex=60)
    assert await cache.get("acme", "k1") is None
    old["version"] = CACHE_VERSION  # the same envelope in this version is a hit
    await raw.set(f"{prefix}:{CACHE_VERSION}:acme:k1", orjson.dumps(old), ex=60)
    assert await cache.get("acme", "k1") == ANSWER


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'{"version": "v1"}',
        b'{"version": "v1", "data": "text", "expiresAt": 99999999999999}',
        b'{"version": "v1", "data": {}, "expiresAt": "tomorrow"}',
    ],
)
async def test_an_undecodable_entry_is_a_miss(
    cache: RedisResponseCache, raw: Any, prefix: str, body: bytes
) -> None:
    await raw.set(f"{prefix}:{CACHE_VERSION}:acme:k1", body, ex=60)
    assert await cache.get("acme", "k1") is None


async def test_unreachable_redis_raises_store_unavailable() -> None:
    cache = RedisResponseCache("redis://127.0.0.1:1/0")
    try:
        with pytest.raises(StoreUnavailable, match="response cache"):
            await cache.get("acme", "k1")
        with pytest.raises(StoreUnavailable, match="response cache"):
            await cache.set("acme", "k1", ANSWER, ttl=60)
        assert await cache.ping() is False
    finally:
        await cache.close()
