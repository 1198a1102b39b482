"""Rate limits: SQLite in DATA_DIR by default, the real Redis with REDIS_URL.

Periods of a minute or more are checked through usage() numbers; waiting is checked
with per-second ``limits`` items (``RateLimiter.from_items``) so no test waits a minute.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from limits import RateLimitItem, RateLimitItemPerSecond

from chatprocessor.core.errors import StoreUnavailable
from chatprocessor.ratelimit import Limits, RateLimiter, Strategy
from tests.conftest import REDIS_URL

Factory = Callable[..., RateLimiter]
SEEDED = Limits(per_minute=20, per_hour=100, per_day=500, per_week=2000, per_month=7500)


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def open_limiter(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Factory]:
    """Limiters on one backend; a unique namespace per test, Redis keys deleted afterwards."""
    redis_url = REDIS_URL if request.param == "redis" else None
    namespace = f"test-{uuid.uuid4().hex[:10]}"
    opened: list[RateLimiter] = []

    def factory(
        spec: Limits | Mapping[str, RateLimitItem],
        strategy: Strategy = "rolling",
        namespace: str = namespace,
        data_dir: Path = tmp_path,
    ) -> RateLimiter:
        if isinstance(spec, Limits):
            limiter = RateLimiter(spec, redis_url=redis_url, data_dir=data_dir, namespace=namespace)
        else:
            limiter = RateLimiter.from_items(
                spec, strategy=strategy, redis_url=redis_url, data_dir=data_dir, namespace=namespace
            )
        opened.append(limiter)
        return limiter

    yield factory
    for limiter in opened:
        if redis_url:
            await limiter.clear()  # deletes exactly the keys this limiter wrote
        await limiter.close()
    if redis_url:
        import redis.asyncio as redis

        client = redis.Redis.from_url(redis_url)
        try:
            for used in {limiter._ids[0] for limiter in opened}:
                assert [key async for key in client.scan_iter(match=f"*/{used}/*")] == []
        finally:
            await client.aclose()


def per_second(amount: int, seconds: int = 1) -> RateLimitItem:
    return RateLimitItemPerSecond(amount, seconds)


async def timed(call: Callable[[], Any]) -> float:
    start = time.monotonic()
    await call()
    return time.monotonic() - start


# --- configuration ------------------------------------------------------------------------


def test_limits_map_each_period_to_its_window() -> None:
    items = SEEDED.items()
    assert {name: (item.amount, item.get_expiry()) for name, item in items.items()} == {
        "minute": (20, 60),
        "hour": (100, 3600),
        "day": (500, 86400),
        "week": (2000, 7 * 86400),
        "month": (7500, 30 * 86400),  # a month is 30 days
    }
    assert Limits(per_hour=5).items().keys() == {"hour"}  # 0 = that period is not limited
    assert SEEDED.enabled and not Limits().enabled


@pytest.mark.parametrize("kwargs", [{"per_minute": -1}, {"per_month": -5}, {"strategy": "sliding"}])
def test_limits_reject_bad_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Limits(**kwargs)


def test_from_items_rejects_empty_amounts(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        RateLimiter.from_items({"x": per_second(0)}, redis_url=None, data_dir=tmp_path)


async def test_disabled_limiter_never_waits_and_opens_no_store(tmp_path: Path) -> None:
    limiter = RateLimiter(Limits(), redis_url=None, data_dir=tmp_path / "data")
    assert not limiter.enabled
    elapsed = await timed(lambda: asyncio.gather(*(limiter.acquire() for _ in range(1000))))
    assert elapsed < 2
    assert await limiter.try_acquire()
    assert await limiter.usage() == {}
    await limiter.close()
    assert not (tmp_path / "data").exists()


# --- waiting ----------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["rolling", "fixed"])
async def test_call_over_the_limit_waits_for_the_window(
    open_limiter: Factory, strategy: Strategy, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = open_limiter({"window": per_second(3, 2)}, strategy)
    caplog.set_level(logging.INFO, logger="chatprocessor.ratelimit")
    start = time.monotonic()
    for _ in range(3):
        await limiter.acquire()
    assert time.monotonic() - start < 1.5  # the first three fit at once
    assert not caplog.records

    await limiter.acquire()  # the fourth waits until the 2 s window frees a slot
    waited = time.monotonic() - start
    assert 1.9 <= waited < 6
    waits = [r for r in caplog.records if "rate limit" in r.getMessage()]
    assert len(waits) == 1 and waits[0].levelno == logging.INFO  # once per wait, not per check
    assert "3 per window" in waits[0].getMessage()


async def test_try_acquire_refuses_without_counting(open_limiter: Factory) -> None:
    limiter = open_limiter({"minute": per_second(2, 60)})
    assert await limiter.try_acquire()
    assert await limiter.try_acquire()
    for _ in range(3):
        assert not await limiter.try_acquire()
    assert (await limiter.usage())["minute"]["used"] == 2


async def test_waiting_sleeps_instead_of_spinning(open_limiter: Factory) -> None:
    limiter = open_limiter({"hour": per_second(1, 3600)})
    await limiter.acquire()
    checks = 0
    attempt = limiter._attempt

    async def counting() -> dict[str, float]:
        nonlocal checks
        checks += 1
        return await attempt()

    limiter._attempt = counting  # type: ignore[method-assign]
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(limiter.acquire(), timeout=1.5)
    assert checks == 1  # one check, then one long sleep (capped at MAX_SLEEP)
    assert (await limiter.usage())["hour"]["used"] == 1  # the waiting call counted nothing


async def test_rolling_and_fixed_windows_differ(open_limiter: Factory) -> None:
    """Calls at 0 s and 2 s, limit 2 per 4 s, checked at 4.6 s: the fixed window has reset
    (both slots free), the rolling one still holds the call made at 2 s (one slot free)."""

    async def free_slots_after(strategy: Strategy) -> int:
        limiter = open_limiter({"window": per_second(2, 4)}, strategy)
        start = time.monotonic()
        assert await limiter.try_acquire()
        await asyncio.sleep(2.0)
        assert await limiter.try_acquire()
        await asyncio.sleep(4.6 - (time.monotonic() - start))
        free = 0
        while await limiter.try_acquire():
            free += 1
        return free

    rolling, fixed = await asyncio.gather(free_slots_after("rolling"), free_slots_after("fixed"))
    assert rolling == 1
    assert fixed == 2


async def test_every_period_must_fit_and_the_tightest_decides(open_limiter: Factory) -> None:
    limiter = open_limiter({"fast": per_second(1, 1), "slow": per_second(2, 3)})
    start = time.monotonic()
    await limiter.acquire()  # t=0
    await limiter.acquire()  # waits ~1 s for "fast"
    second = time.monotonic() - start
    await limiter.acquire()  # "fast" is free by 2 s but "slow" (2 per 3 s) only at ~3 s
    third = time.monotonic() - start
    assert 0.9 <= second < 3
    assert 2.9 <= third < 6


async def test_a_refusal_in_one_period_counts_in_none(open_limiter: Factory) -> None:
    limiter = open_limiter({"burst": per_second(5, 60), "cap": per_second(2, 60)})
    assert await limiter.try_acquire()
    assert await limiter.try_acquire()
    assert not await limiter.try_acquire()  # "cap" is full
    usage = await limiter.usage()
    assert usage["burst"]["used"] == 2  # the refused call did not use a "burst" slot
    assert usage["cap"]["used"] == 2


async def test_concurrent_callers_all_pass_within_the_limit(open_limiter: Factory) -> None:
    limiter = open_limiter({"second": per_second(4, 1)})
    start = time.monotonic()
    done: list[float] = []

    async def call() -> None:
        await limiter.acquire()
        done.append(time.monotonic() - start)

    await asyncio.wait_for(asyncio.gather(*(call() for _ in range(10))), timeout=30)
    assert len(done) == 10  # nobody failed
    assert done[-1] >= 1.9  # 10 calls at 4 per second span at least two more windows
    for first in done:  # never more than 4 in any 1 s (less a little clock slack)
        assert sum(1 for t in done if first <= t < first + 0.95) <= 4


# --- usage --------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["rolling", "fixed"])
async def test_usage_reports_each_period(open_limiter: Factory, strategy: Strategy) -> None:
    limiter = open_limiter(Limits(per_minute=20, per_day=500, strategy=strategy))
    assert await limiter.usage() == {
        "minute": {"limit": 20, "used": 0, "remaining": 20, "reset_in_seconds": 0.0},
        "day": {"limit": 500, "used": 0, "remaining": 500, "reset_in_seconds": 0.0},
    }
    for _ in range(3):
        await limiter.acquire()
    usage = await limiter.usage()
    assert usage.keys() == {"minute", "day"}
    assert {k: v for k, v in usage["minute"].items() if k != "reset_in_seconds"} == {
        "limit": 20,
        "used": 3,
        "remaining": 17,
    }
    assert usage["day"]["used"] == 3 and usage["day"]["remaining"] == 497
    assert 50 <= usage["minute"]["reset_in_seconds"] <= 60
    assert 86400 - 10 <= usage["day"]["reset_in_seconds"] <= 86400

    await limiter.clear()
    assert (await limiter.usage())["minute"]["used"] == 0


async def test_usage_remaining_never_negative(open_limiter: Factory) -> None:
    limiter = open_limiter({"minute": per_second(1, 60)}, "fixed")
    assert await limiter.try_acquire()
    assert not await limiter.try_acquire()
    assert (await limiter.usage())["minute"] == pytest.approx(
        {"limit": 1, "used": 1, "remaining": 0, "reset_in_seconds": 60}, abs=10
    )


# --- persistence and sharing ---------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["rolling", "fixed"])
async def test_counts_survive_a_restart(open_limiter: Factory, strategy: Strategy) -> None:
    limits = Limits(per_minute=3, per_hour=100, strategy=strategy)
    before = open_limiter(limits)
    for _ in range(3):
        await before.acquire()
    await before.close()

    after = open_limiter(limits)  # a new process on the same DATA_DIR / Redis
    assert not await after.try_acquire()
    usage = await after.usage()
    assert usage["minute"]["used"] == 3 and usage["hour"]["used"] == 3
    assert usage["minute"]["reset_in_seconds"] > 30

    other = open_limiter(limits, namespace=f"other-{uuid.uuid4().hex[:8]}")
    assert await other.try_acquire()  # another namespace counts on its own


async def test_limiters_sharing_a_store_share_the_limit(open_limiter: Factory) -> None:
    first = open_limiter({"minute": per_second(5, 60)})
    second = open_limiter({"minute": per_second(5, 60)})
    results = [await (first if i % 2 else second).try_acquire() for i in range(10)]
    assert results.count(True) == 5
    results = await asyncio.gather(*(lim.try_acquire() for lim in (first, second) * 5))
    assert not any(results)


async def test_an_unreachable_store_raises_store_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    sqlite = RateLimiter(Limits(per_minute=1), redis_url=None, data_dir=blocker)
    redis = RateLimiter(Limits(per_minute=1), redis_url="redis://127.0.0.1:1/0", data_dir=tmp_path)
    try:
        for limiter in (sqlite, redis):
            with pytest.raises(StoreUnavailable):
                await limiter.acquire()
            with pytest.raises(StoreUnavailable):
                await limiter.usage()
    finally:
        await sqlite.close()
        await redis.close()
