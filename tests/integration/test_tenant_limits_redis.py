"""Tenant rate limits and budgets on the real Redis, shared by several instances (workers)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import pytest
import redis.asyncio as redis

from chatprocessor.core.errors import StoreUnavailable, TenantRateLimited
from chatprocessor.features.budget import (
    DAY_TTL,
    MONTH_TTL,
    Budget,
    BudgetGuard,
    RedisSpendStore,
)
from chatprocessor.features.tenant_limits import TenantRateLimiter
from tests.conftest import REDIS_URL

pytestmark = pytest.mark.timeout(30)

UNREACHABLE = "redis://127.0.0.1:1/0"
NOW = datetime(2025, 3, 14, 10, 0, tzinfo=UTC)


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A key prefix of the test's own; every key under it is deleted afterwards."""
    value = f"test:tenant-limits:{uuid.uuid4().hex}"
    yield value
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=f"*{value}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def client() -> AsyncIterator[redis.Redis]:
    c = redis.Redis.from_url(REDIS_URL)
    yield c
    await c.aclose()


@pytest.fixture
async def opened() -> AsyncIterator[list[TenantRateLimiter | RedisSpendStore]]:
    things: list[TenantRateLimiter | RedisSpendStore] = []
    yield things
    for thing in things:
        await thing.close()


@pytest.mark.redis
async def test_rate_limit_is_shared_by_two_workers(
    prefix: str, client: redis.Redis, opened: list[TenantRateLimiter | RedisSpendStore]
) -> None:
    limits = {"acme": 3, "globex": 1}
    per_minute: Callable[[str], int] = lambda tenant: limits[tenant]  # noqa: E731
    first = TenantRateLimiter(per_minute, redis_url=REDIS_URL, prefix=prefix)
    second = TenantRateLimiter(per_minute, redis_url=REDIS_URL, prefix=prefix)
    opened += [first, second]

    await first.check("acme")
    await second.check("acme")
    await first.check("acme")
    for limiter in (first, second):
        with pytest.raises(TenantRateLimited) as caught:
            await limiter.check("acme")
        assert 0 < caught.value.retry_after <= 60
    await second.check("globex")  # another tenant has its own window
    with pytest.raises(TenantRateLimited):
        await first.check("globex")
    keys = [k.decode() async for k in client.scan_iter(match=f"*{prefix}*")]
    assert len(keys) == 2
    assert any("acme" in k for k in keys)
    assert any("globex" in k for k in keys)


@pytest.mark.redis
async def test_concurrent_checks_never_exceed_the_limit(
    prefix: str, opened: list[TenantRateLimiter | RedisSpendStore]
) -> None:
    workers = [
        TenantRateLimiter(lambda tenant: 5, redis_url=REDIS_URL, prefix=prefix) for _ in range(3)
    ]
    opened += workers
    results = await asyncio.gather(
        *(w.check("acme") for w in workers for _ in range(4)), return_exceptions=True
    )
    admitted = [r for r in results if r is None]
    refused = [r for r in results if isinstance(r, TenantRateLimited)]
    assert (len(admitted), len(refused)) == (5, 7)


@pytest.mark.redis
async def test_spend_totals_are_shared_and_expire(
    prefix: str, client: redis.Redis, opened: list[TenantRateLimiter | RedisSpendStore]
) -> None:
    first = RedisSpendStore(REDIS_URL, prefix=prefix)
    second = RedisSpendStore(REDIS_URL, prefix=prefix)
    opened += [first, second]

    assert await first.totals("acme", NOW) == (0.0, 0.0)
    assert await first.add("acme", 1.25, NOW) == (1.25, 1.25)
    assert await second.add("acme", 0.5, NOW) == (1.75, 1.75)
    assert await first.totals("acme", NOW) == (1.75, 1.75)
    assert await second.totals("globex", NOW) == (0.0, 0.0)
    next_day = NOW.replace(day=15)
    assert await second.add("acme", 1.0, next_day) == (1.0, 2.75)

    day_key = f"{prefix}:acme:day:2025-03-14"
    month_key = f"{prefix}:acme:month:2025-03"
    assert await client.get(day_key) == b"1.75"
    assert await client.get(month_key) == b"2.75"
    assert 0 < await client.ttl(day_key) <= DAY_TTL
    assert DAY_TTL < await client.ttl(month_key) <= MONTH_TTL


@pytest.mark.redis
async def test_alert_dedupe_across_two_workers(
    prefix: str, client: redis.Redis, opened: list[TenantRateLimiter | RedisSpendStore]
) -> None:
    first = RedisSpendStore(REDIS_URL, prefix=prefix)
    second = RedisSpendStore(REDIS_URL, prefix=prefix)
    opened += [first, second]

    answers = await asyncio.gather(
        *(s.first_alert("acme", "daily", "warning", NOW) for s in (first, second, first, second))
    )
    assert sorted(answers) == [False, False, False, True]
    # another level, period, window or tenant is a first again
    assert await second.first_alert("acme", "daily", "critical", NOW)
    assert await second.first_alert("acme", "monthly", "warning", NOW)
    assert await first.first_alert("acme", "daily", "warning", NOW.replace(day=15))
    assert not await first.first_alert("acme", "monthly", "warning", NOW.replace(day=15))
    assert await first.first_alert("globex", "daily", "warning", NOW)

    daily = f"{prefix}:acme:alert:daily:2025-03-14:warning"
    monthly = f"{prefix}:acme:alert:monthly:2025-03:warning"
    assert 0 < await client.ttl(daily) <= DAY_TTL
    assert DAY_TTL < await client.ttl(monthly) <= MONTH_TTL


@pytest.mark.redis
async def test_two_guards_on_redis_alert_once(
    prefix: str, opened: list[TenantRateLimiter | RedisSpendStore]
) -> None:
    stores = [RedisSpendStore(REDIS_URL, prefix=prefix) for _ in range(2)]
    opened += stores
    guards = [BudgetGuard(s, lambda tenant: Budget(daily=10.0), clock=lambda: NOW) for s in stores]
    results = await asyncio.gather(*(g.spend("acme", 2.0) for g in guards for _ in range(2)))
    alerts = [a for batch in results for a in batch]
    assert [(a.period, a.level) for a in alerts] == [("daily", "warning")]  # 8 of 10
    results = await asyncio.gather(*(g.spend("acme", 0.8) for g in guards))
    alerts = [a for batch in results for a in batch]
    assert [(a.period, a.level) for a in alerts] == [("daily", "critical")]  # 9.6 of 10


async def test_unreachable_redis_is_store_unavailable() -> None:
    limiter = TenantRateLimiter(lambda tenant: 5, redis_url=UNREACHABLE)
    store = RedisSpendStore(UNREACHABLE)
    try:
        with pytest.raises(StoreUnavailable):
            await limiter.check("acme")
        with pytest.raises(StoreUnavailable):
            await store.add("acme", 1.0, NOW)
        with pytest.raises(StoreUnavailable):
            await store.totals("acme", NOW)
        with pytest.raises(StoreUnavailable):
            await store.first_alert("acme", "daily", "warning", NOW)
        guard = BudgetGuard(store, lambda tenant: Budget(daily=1.0))
        with pytest.raises(StoreUnavailable):
            await guard.check("acme")
    finally:
        await limiter.close()
        await store.close()
