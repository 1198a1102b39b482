"""Per-tenant requests per minute, in process (limits' MemoryStorage).

The window is a minute; sliding is checked by moving ``time.time`` (what ``limits`` and the
limiter read), so no test waits.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import pytest
from prometheus_client import REGISTRY

from chatprocessor.core.errors import TenantRateLimited
from chatprocessor.features.tenant_limits import MIN_RETRY_AFTER, TenantRateLimiter

Open = Callable[..., TenantRateLimiter]


@pytest.fixture
async def open_limiter() -> AsyncIterator[Open]:
    opened: list[TenantRateLimiter] = []

    def factory(limits: dict[str, int] | Callable[[str], int]) -> TenantRateLimiter:
        per_minute = limits if callable(limits) else (lambda tenant: limits.get(tenant, 0))
        limiter = TenantRateLimiter(per_minute)
        opened.append(limiter)
        return limiter

    yield factory
    for limiter in opened:
        await limiter.close()


class Clock:
    """``time.time`` under the test's control."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = time.time()
        monkeypatch.setattr(time, "time", lambda: self.now)

    def advance(self, seconds: float) -> None:
        self.now += seconds


def rate_limited(tenant: str) -> float:
    return REGISTRY.get_sample_value("ai_rate_limited_total", {"tenant_id": tenant}) or 0.0


async def test_admits_the_limit_then_refuses_with_retry_after(open_limiter: Open) -> None:
    limiter = open_limiter({"acme": 3})
    for _ in range(3):
        await limiter.check("acme")
    before = rate_limited("acme")
    with pytest.raises(TenantRateLimited) as caught:
        await limiter.check("acme")
    assert 0 < caught.value.retry_after <= 60
    assert caught.value.transient
    assert "'acme'" in str(caught.value)
    assert "3 requests per minute" in str(caught.value)
    assert rate_limited("acme") == before + 1


async def test_a_refused_request_is_not_counted(
    open_limiter: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock(monkeypatch)
    limiter = open_limiter({"acme": 2})
    await limiter.check("acme")
    clock.advance(30)
    await limiter.check("acme")
    for _ in range(5):  # refusals must not push the window's end further out
        with pytest.raises(TenantRateLimited):
            await limiter.check("acme")
    clock.advance(30.5)  # the first request left the window: exactly one slot
    await limiter.check("acme")
    with pytest.raises(TenantRateLimited):
        await limiter.check("acme")


async def test_retry_after_is_when_the_oldest_request_leaves(
    open_limiter: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock(monkeypatch)
    limiter = open_limiter({"acme": 2})
    await limiter.check("acme")
    clock.advance(20)
    await limiter.check("acme")
    clock.advance(15)
    with pytest.raises(TenantRateLimited) as caught:
        await limiter.check("acme")
    # the first request was 35 s ago: it leaves the 60 s window in 25 s
    assert caught.value.retry_after == pytest.approx(25, abs=1)


async def test_window_slides(open_limiter: Open, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(monkeypatch)
    limiter = open_limiter({"acme": 2})
    await limiter.check("acme")
    await limiter.check("acme")
    clock.advance(59)
    with pytest.raises(TenantRateLimited):
        await limiter.check("acme")
    clock.advance(2)
    await limiter.check("acme")
    await limiter.check("acme")
    with pytest.raises(TenantRateLimited):
        await limiter.check("acme")


async def test_retry_after_has_a_floor(open_limiter: Open, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(monkeypatch)
    limiter = open_limiter({"acme": 1})
    await limiter.check("acme")
    clock.advance(59.999)
    with pytest.raises(TenantRateLimited) as caught:
        await limiter.check("acme")
    assert caught.value.retry_after >= MIN_RETRY_AFTER


async def test_tenants_have_their_own_windows(open_limiter: Open) -> None:
    limiter = open_limiter({"acme": 1, "globex": 2, "a/b": 1, "a": 1})
    await limiter.check("acme")
    with pytest.raises(TenantRateLimited):
        await limiter.check("acme")
    await limiter.check("globex")  # acme's full window does not hold globex back
    await limiter.check("globex")
    with pytest.raises(TenantRateLimited):
        await limiter.check("globex")
    # a separator in an id does not make two tenants meet
    await limiter.check("a/b")
    await limiter.check("a")


async def test_limit_zero_never_limits_nor_opens_a_store(open_limiter: Open) -> None:
    limiter = open_limiter({"acme": 0})
    for _ in range(200):
        await limiter.check("acme")
    await limiter.check("unknown")  # not configured: 0
    assert limiter._storage is None


async def test_the_limit_is_read_on_each_check(open_limiter: Open) -> None:
    limits = {"acme": 1}
    limiter = open_limiter(lambda tenant: limits[tenant])
    await limiter.check("acme")
    with pytest.raises(TenantRateLimited):
        await limiter.check("acme")
    limits["acme"] = 0  # limit lifted
    await limiter.check("acme")
    limits["acme"] = 5  # a new amount counts afresh
    for _ in range(5):
        await limiter.check("acme")
    with pytest.raises(TenantRateLimited):
        await limiter.check("acme")
