"""Per-tenant daily and monthly budgets with 80 % / 95 % alerts (seed 004 section 3).

:meth:`BudgetGuard.check` runs before any model call and refuses a tenant whose
spend for the day or the month (UTC) has reached its budget, or would pass it with
the job's estimated cost (:class:`~chatprocessor.core.errors.BudgetExceeded`).
:meth:`BudgetGuard.spend` adds a job's actual cost afterwards and raises an alert
the first time a period crosses each threshold: once per tenant, period, level and
window (the day or the month), even with many workers, because the store decides
who is first (Redis ``SET NX``). A spend that jumps straight past 95 % raises only
the critical alert, and the warning is marked as sent with it.

Totals live in a :class:`SpendStore`: :class:`RedisSpendStore` when workers share
Redis, else :class:`MemorySpendStore` seeded at start-up from the usage ledger. The
store's totals are a fast running sum for the guard; the ledger stays the record.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import quote

from chatprocessor.core.errors import BudgetExceeded, StoreUnavailable
from chatprocessor.ops import metrics
from chatprocessor.stores.redis_client import CALL_TIMEOUT

log = logging.getLogger("chatprocessor.budget")

#: Periods, as named in alerts, errors and metrics.
PERIODS = ("daily", "monthly")
#: Seconds a Redis day total (and a daily alert marker) is kept: the day, plus slack for
#: clocks and for reading yesterday's total around midnight.
DAY_TTL = 2 * 86_400
#: Seconds a Redis month total (and a monthly alert marker) is kept: the longest month + 1 day.
MONTH_TTL = 32 * 86_400
#: Default thresholds (percent of the budget, level), highest first.
THRESHOLDS: tuple[tuple[float, str], ...] = ((95.0, "critical"), (80.0, "warning"))


@dataclass(frozen=True, slots=True)
class Budget:
    """A tenant's budget in money; 0 means no budget for that period."""

    daily: float = 0.0
    monthly: float = 0.0

    @property
    def enabled(self) -> bool:
        """Whether either period has a budget."""
        return self.daily > 0 or self.monthly > 0


@dataclass(frozen=True, slots=True)
class Alert:
    """A tenant's spend crossed a threshold of one period's budget."""

    tenant: str
    period: str  # "daily" | "monthly"
    level: str  # "warning" (>= 80 %) | "critical" (>= 95 %)
    used: float
    limit: float
    percentage: float
    currency: str
    at: datetime  # UTC

    def event(self) -> dict[str, Any]:
        """The alert as a JSON-ready event for the platform (seed 004's alert system)."""
        at = _utc(self.at).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return {
            "type": "budget_alert",
            "level": self.level,
            "tenantId": self.tenant,
            "period": self.period,
            "used": self.used,
            "limit": self.limit,
            "percentage": round(self.percentage, 1),
            "currency": self.currency,
            "at": at,
        }


class SpendStore(Protocol):
    """Running spend totals per tenant for the current UTC day and month, and alert dedupe."""

    async def add(self, tenant: str, amount: float, now: datetime) -> tuple[float, float]:
        """Add ``amount`` to the day and month of ``now``; the (day, month) totals after it."""
        ...

    async def totals(self, tenant: str, now: datetime) -> tuple[float, float]:
        """The (day, month) totals of ``now``'s day and month (0 when nothing was spent)."""
        ...

    async def first_alert(self, tenant: str, period: str, level: str, now: datetime) -> bool:
        """True exactly once per tenant, period, level and period window (the day or the
        month of ``now``): the caller that gets True sends the alert."""
        ...

    async def close(self) -> None: ...


def _utc(now: datetime) -> datetime:
    """``now`` in UTC (a naive datetime is taken as UTC)."""
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)


def _day(now: datetime) -> str:
    return _utc(now).strftime("%Y-%m-%d")


def _month(now: datetime) -> str:
    return _utc(now).strftime("%Y-%m")


def _window(period: str, now: datetime) -> str:
    """The day (daily) or month (monthly) that ``now`` falls in, as used in keys."""
    return _day(now) if period == "daily" else _month(now)


class MemorySpendStore:
    """Totals in this process, for one worker (or workers that each enforce their share).

    ``initial`` seeds today's and this month's totals per tenant, e.g. summed from the usage
    ledger at start-up, so a restart does not forget what was spent. Only the current day
    and month are kept: a total from an earlier window counts as 0.
    """

    def __init__(
        self,
        initial: Mapping[str, tuple[float, float]] | None = None,
        now: datetime | None = None,
    ) -> None:
        now = now or datetime.now(UTC)
        day, month = _day(now), _month(now)
        # tenant -> (window, total)
        self._days: dict[str, tuple[str, float]] = {}
        self._months: dict[str, tuple[str, float]] = {}
        # (tenant, period, level) -> the window whose alert was sent
        self._alerts: dict[tuple[str, str, str], str] = {}
        for tenant, (day_total, month_total) in (initial or {}).items():
            self._days[tenant] = (day, float(day_total))
            self._months[tenant] = (month, float(month_total))

    async def add(self, tenant: str, amount: float, now: datetime) -> tuple[float, float]:
        day, month = self._totals(tenant, now)
        day, month = day + amount, month + amount
        self._days[tenant] = (_day(now), day)
        self._months[tenant] = (_month(now), month)
        return day, month

    async def totals(self, tenant: str, now: datetime) -> tuple[float, float]:
        return self._totals(tenant, now)

    def _totals(self, tenant: str, now: datetime) -> tuple[float, float]:
        day_window, day = self._days.get(tenant, ("", 0.0))
        month_window, month = self._months.get(tenant, ("", 0.0))
        return (
            day if day_window == _day(now) else 0.0,
            month if month_window == _month(now) else 0.0,
        )

    async def first_alert(self, tenant: str, period: str, level: str, now: datetime) -> bool:
        window = _window(period, now)
        if self._alerts.get((tenant, period, level)) == window:
            return False
        self._alerts[(tenant, period, level)] = window
        return True

    async def close(self) -> None:
        return None


class RedisSpendStore:
    """Totals in Redis, shared by every worker.

    Keys (UTC): ``<prefix>:<tenant>:day:<YYYY-MM-DD>`` (kept 2 days),
    ``<prefix>:<tenant>:month:<YYYY-MM>`` (kept 32 days), both raised by INCRBYFLOAT in one
    MULTI with their EXPIRE; alert markers ``<prefix>:<tenant>:alert:<period>:<window>:<level>``
    set with SET NX EX. The tenant is percent-encoded (plain ids are unchanged), so a ':' in
    an id cannot make two tenants share a key.
    """

    def __init__(self, url: str, *, prefix: str = "ai:spend") -> None:
        import redis.asyncio as redis

        from chatprocessor.stores.redis_client import redis_client

        self.prefix = prefix
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError, TimeoutError)
        self._redis: Any = redis_client(url, name="chatprocessor-budget")

    def _base(self, tenant: str) -> str:
        return f"{self.prefix}:{quote(tenant, safe='')}"

    def _keys(self, tenant: str, now: datetime) -> tuple[str, str]:
        base = self._base(tenant)
        return f"{base}:day:{_day(now)}", f"{base}:month:{_month(now)}"

    async def add(self, tenant: str, amount: float, now: datetime) -> tuple[float, float]:
        day_key, month_key = self._keys(tenant, now)
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                async with self._redis.pipeline(transaction=True) as pipe:
                    pipe.incrbyfloat(day_key, amount)
                    pipe.expire(day_key, DAY_TTL)
                    pipe.incrbyfloat(month_key, amount)
                    pipe.expire(month_key, MONTH_TTL)
                    day, _, month, _ = await pipe.execute()
        except self._errors as exc:
            raise StoreUnavailable(f"budget spend store (redis): {exc}") from exc
        return float(day), float(month)

    async def totals(self, tenant: str, now: datetime) -> tuple[float, float]:
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                day, month = await self._redis.mget(self._keys(tenant, now))
        except self._errors as exc:
            raise StoreUnavailable(f"budget spend store (redis): {exc}") from exc
        return float(day or 0.0), float(month or 0.0)

    async def first_alert(self, tenant: str, period: str, level: str, now: datetime) -> bool:
        key = f"{self._base(tenant)}:alert:{period}:{_window(period, now)}:{level}"
        ttl = DAY_TTL if period == "daily" else MONTH_TTL
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                created = await self._redis.set(key, "1", nx=True, ex=ttl)
        except self._errors as exc:
            raise StoreUnavailable(f"budget spend store (redis): {exc}") from exc
        return bool(created)

    async def close(self) -> None:
        await self._redis.aclose()


def _now() -> datetime:
    return datetime.now(UTC)


class BudgetGuard:
    """Refuses over-budget tenants before a model call and alerts as their spend grows."""

    def __init__(
        self,
        store: SpendStore,
        budget_of: Callable[[str], Budget],
        *,
        on_alert: Callable[[Alert], Awaitable[None]] | None = None,
        currency: str = "USD",
        thresholds: tuple[tuple[float, str], ...] = THRESHOLDS,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        """``budget_of(tenant)`` is asked on each call (a changed budget applies at once);
        ``on_alert`` receives each alert raised (e.g. to publish :meth:`Alert.event`)."""
        #: The spend store; public so start-up can swap in one seeded from the usage ledger.
        self.store = store
        self._budget_of = budget_of
        self._on_alert = on_alert
        self._currency = currency
        self._thresholds = tuple(sorted(thresholds, reverse=True))
        self._clock = clock
        # (tenant, period, level) -> window known to be alerted: skips the store's dedupe
        # call on every later spend of that window. One entry per tenant, period and level.
        self._sent: dict[tuple[str, str, str], str] = {}

    async def check(self, tenant: str, estimate: float = 0.0) -> None:
        """Raise :class:`BudgetExceeded` (and count ``AI_BUDGET_REFUSED``) when a period's
        spend has reached its budget or would pass it with ``estimate``. No store call for a
        tenant without a budget. Raises :class:`StoreUnavailable` when the store fails."""
        budget = self._budget_of(tenant)
        if not budget.enabled:
            return
        day, month = await self.store.totals(tenant, self._clock())
        estimate = max(0.0, estimate)
        for period, used, limit in _limited(budget, day, month):
            if used >= limit or used + estimate > limit:
                metrics.labelled(metrics.AI_BUDGET_REFUSED, tenant, period).inc()
                raise BudgetExceeded(
                    f"tenant {tenant!r} is over its {period} budget:"
                    f" {used:.4f} of {limit:.4f} {self._currency} spent",
                    tenant=tenant,
                    period=period,
                    used=used,
                    limit=limit,
                )

    async def spend(self, tenant: str, amount: float) -> list[Alert]:
        """Add a job's cost (only when ``amount > 0``, budget or not, so a budget set later in
        the window sees it), update ``AI_BUDGET_USED`` and raise the alerts crossed for the
        first time in this window; returns them. Raises :class:`StoreUnavailable` when the
        total cannot be added; a failed alert dedupe is logged and retried on the next spend."""
        if amount <= 0:
            return []
        now = self._clock()
        day, month = await self.store.add(tenant, amount, now)
        alerts: list[Alert] = []
        for period, used, limit in _limited(self._budget_of(tenant), day, month):
            metrics.labelled(metrics.AI_BUDGET_USED, tenant, period).set(used / limit)
            alert = await self._crossed(tenant, period, used, limit, now)
            if alert is not None:
                await self._emit(alert)
                alerts.append(alert)
        return alerts

    async def close(self) -> None:
        """Close the store."""
        await self.store.close()

    async def _crossed(
        self, tenant: str, period: str, used: float, limit: float, now: datetime
    ) -> Alert | None:
        """The alert of the highest threshold crossed, if this caller is the first to see it."""
        percentage = used / limit * 100.0
        crossed = [level for threshold, level in self._thresholds if percentage >= threshold]
        if not crossed:
            return None
        top, *lower = crossed
        window = _window(period, now)
        if self._sent.get((tenant, period, top)) == window:
            return None
        try:
            first = await self.store.first_alert(tenant, period, top, now)
        except StoreUnavailable as exc:
            log.warning(
                "budget: cannot check whether tenant %r's %s %s alert was sent (%s);"
                " trying again on its next spend",
                tenant,
                period,
                top,
                exc,
            )
            return None
        self._sent[(tenant, period, top)] = window  # sent, by us or by another worker
        if not first:
            return None
        # A jump past several thresholds raises only the highest: the lower ones are spent.
        for level in lower:
            try:
                await self.store.first_alert(tenant, period, level, now)
            except StoreUnavailable as exc:
                log.warning("budget: cannot mark the %s %s alert as sent (%s)", period, level, exc)
            else:
                self._sent[(tenant, period, level)] = window
        return Alert(
            tenant=tenant,
            period=period,
            level=top,
            used=used,
            limit=limit,
            percentage=percentage,
            currency=self._currency,
            at=_utc(now),
        )

    async def _emit(self, alert: Alert) -> None:
        """Log, count and hand the alert to ``on_alert`` (whose failures are only logged)."""
        log.log(
            logging.ERROR if alert.level == "critical" else logging.WARNING,
            "budget %s: tenant %r has spent %.1f%% of its %s budget (%.4f of %.4f %s)",
            alert.level,
            alert.tenant,
            alert.percentage,
            alert.period,
            alert.used,
            alert.limit,
            alert.currency,
        )
        metrics.labelled(metrics.AI_BUDGET_ALERTS, alert.tenant, alert.period, alert.level).inc()
        if self._on_alert is not None:
            try:
                await self._on_alert(alert)
            except Exception:
                log.exception(
                    "budget: delivering the %s %s alert of tenant %r failed",
                    alert.period,
                    alert.level,
                    alert.tenant,
                )


def _limited(budget: Budget, day: float, month: float) -> Iterator[tuple[str, float, float]]:
    """(period, used, limit) of each period that has a budget."""
    if budget.daily > 0:
        yield "daily", day, budget.daily
    if budget.monthly > 0:
        yield "monthly", month, budget.monthly
