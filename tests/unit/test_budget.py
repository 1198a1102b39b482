"""Per-tenant budgets and alerts, on the in-process spend store with an injected clock."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY

from chatprocessor.core.errors import BudgetExceeded, TenantLimit
from chatprocessor.features.budget import (
    Alert,
    Budget,
    BudgetGuard,
    MemorySpendStore,
    SpendStore,
)

START = datetime(2025, 3, 14, 10, 0, tzinfo=UTC)


class Clock:
    def __init__(self, now: datetime = START) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class CountingStore(MemorySpendStore):
    """The memory store, counting the calls the guard makes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[str] = []

    async def add(self, tenant: str, amount: float, now: datetime) -> tuple[float, float]:
        self.calls.append("add")
        return await super().add(tenant, amount, now)

    async def totals(self, tenant: str, now: datetime) -> tuple[float, float]:
        self.calls.append("totals")
        return await super().totals(tenant, now)

    async def first_alert(self, tenant: str, period: str, level: str, now: datetime) -> bool:
        self.calls.append("first_alert")
        return await super().first_alert(tenant, period, level, now)


def guard(
    budgets: dict[str, Budget],
    *,
    store: SpendStore | None = None,
    clock: Clock | None = None,
    on_alert: Any = None,
) -> BudgetGuard:
    return BudgetGuard(
        store or MemorySpendStore(now=START),
        lambda tenant: budgets.get(tenant, Budget()),
        on_alert=on_alert,
        clock=clock or Clock(),
    )


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def levels(alerts: list[Alert]) -> list[tuple[str, str]]:
    return [(a.period, a.level) for a in alerts]


# --- check: refusing before the model call ----------------------------------------------


async def test_check_passes_under_budget() -> None:
    g = guard({"acme": Budget(daily=10.0)})
    await g.spend("acme", 5.0)
    await g.check("acme")
    await g.check("acme", estimate=5.0)  # exactly reaching the budget is allowed


async def test_check_refuses_at_and_over_budget() -> None:
    g = guard({"acme": Budget(daily=10.0)})
    await g.spend("acme", 10.0)
    before = sample("ai_budget_refused_total", tenant_id="acme", period="daily")
    with pytest.raises(BudgetExceeded) as caught:
        await g.check("acme")
    error = caught.value
    assert isinstance(error, TenantLimit)
    assert not error.transient
    assert (error.tenant, error.period, error.used, error.limit) == ("acme", "daily", 10.0, 10.0)
    assert str(error) == "tenant 'acme' is over its daily budget: 10.0000 of 10.0000 USD spent"
    await g.spend("acme", 1.0)
    with pytest.raises(BudgetExceeded):
        await g.check("acme")
    assert sample("ai_budget_refused_total", tenant_id="acme", period="daily") == before + 2


async def test_check_refuses_when_the_estimate_would_exceed() -> None:
    g = guard({"acme": Budget(daily=10.0)})
    await g.spend("acme", 9.0)
    await g.check("acme", estimate=1.0)
    with pytest.raises(BudgetExceeded) as caught:
        await g.check("acme", estimate=1.5)
    assert caught.value.used == 9.0


async def test_daily_and_monthly_budgets_are_separate() -> None:
    clock = Clock()
    g = guard({"acme": Budget(daily=10.0, monthly=25.0)}, clock=clock)
    await g.spend("acme", 9.0)
    clock.now += timedelta(days=1)
    await g.spend("acme", 9.0)
    clock.now += timedelta(days=1)
    await g.spend("acme", 6.0)  # day 6 of 10, month 24 of 25
    await g.check("acme", estimate=1.0)
    with pytest.raises(BudgetExceeded) as caught:
        await g.check("acme", estimate=2.0)  # fits the day, not the month
    assert caught.value.period == "monthly"
    assert (caught.value.used, caught.value.limit) == (24.0, 25.0)

    only_daily = guard({"acme": Budget(daily=5.0)})
    await only_daily.spend("acme", 5.0)
    with pytest.raises(BudgetExceeded) as caught:
        await only_daily.check("acme")
    assert caught.value.period == "daily"


async def test_no_budget_means_no_store_call() -> None:
    store = CountingStore(now=START)
    g = guard({"acme": Budget()}, store=store)
    await g.check("acme", estimate=1e9)
    await g.check("other")
    assert store.calls == []
    assert await g.spend("acme", 0.0) == []
    assert store.calls == []


async def test_spend_without_a_budget_is_still_added() -> None:
    store = CountingStore(now=START)
    budgets: dict[str, Budget] = {}
    g = guard(budgets, store=store)
    assert await g.spend("acme", 4.0) == []
    assert store.calls == ["add"]  # no alert bookkeeping without a budget
    budgets["acme"] = Budget(daily=4.0)  # a budget set later in the day sees what was spent
    with pytest.raises(BudgetExceeded):
        await g.check("acme")


async def test_initial_totals_seed_today_and_this_month() -> None:
    store = MemorySpendStore({"acme": (3.0, 20.0)}, now=START)
    assert await store.totals("acme", START) == (3.0, 20.0)
    assert await store.totals("globex", START) == (0.0, 0.0)
    g = guard({"acme": Budget(daily=100.0, monthly=20.0)}, store=store)
    with pytest.raises(BudgetExceeded) as caught:
        await g.check("acme")
    assert caught.value.period == "monthly"
    assert await store.totals("acme", START + timedelta(days=1)) == (0.0, 20.0)
    assert await store.totals("acme", START + timedelta(days=31)) == (0.0, 0.0)


# --- spend: alerts ------------------------------------------------------------------------


async def test_alerts_at_80_then_95_once_each() -> None:
    received: list[Alert] = []

    async def on_alert(alert: Alert) -> None:
        received.append(alert)

    g = guard({"acme": Budget(daily=100.0)}, on_alert=on_alert)
    warnings = sample("ai_budget_alerts_total", tenant_id="acme", period="daily", level="warning")
    criticals = sample("ai_budget_alerts_total", tenant_id="acme", period="daily", level="critical")
    assert await g.spend("acme", 79.0) == []
    alerts = await g.spend("acme", 1.0)  # 80 %
    assert levels(alerts) == [("daily", "warning")]
    assert await g.spend("acme", 10.0) == []  # 90 %: still warning, already sent
    alerts = await g.spend("acme", 5.0)  # 95 %
    assert levels(alerts) == [("daily", "critical")]
    assert await g.spend("acme", 3.0) == []
    assert await g.spend("acme", 10.0) == []  # over 100 %: nothing new
    assert levels(received) == [("daily", "warning"), ("daily", "critical")]
    assert (
        sample("ai_budget_alerts_total", tenant_id="acme", period="daily", level="warning")
        == warnings + 1
    )
    assert (
        sample("ai_budget_alerts_total", tenant_id="acme", period="daily", level="critical")
        == criticals + 1
    )


async def test_alert_fields_and_event() -> None:
    g = guard({"acme": Budget(monthly=300.0)})
    [alert] = await g.spend("acme", 250.0)
    assert alert.tenant == "acme"
    assert (alert.period, alert.level) == ("monthly", "warning")
    assert (alert.used, alert.limit, alert.currency) == (250.0, 300.0, "USD")
    assert alert.percentage == pytest.approx(83.3333, abs=1e-3)
    assert alert.at == START
    assert alert.event() == {
        "type": "budget_alert",
        "level": "warning",
        "tenantId": "acme",
        "period": "monthly",
        "used": 250.0,
        "limit": 300.0,
        "percentage": 83.3,
        "currency": "USD",
        "at": "2025-03-14T10:00:00.000Z",
    }


async def test_a_jump_past_95_raises_only_critical_and_spends_the_warning() -> None:
    clock = Clock()
    g = guard({"acme": Budget(daily=10.0, monthly=1000.0)}, clock=clock)
    alerts = await g.spend("acme", 9.7)
    assert levels(alerts) == [("daily", "critical")]
    assert await g.spend("acme", 0.1) == []  # the warning does not follow later

    # the same holds across guards sharing the store (two workers)
    store = MemorySpendStore(now=START)
    first = guard({"acme": Budget(daily=10.0)}, store=store)
    second = guard({"acme": Budget(daily=10.0)}, store=store)
    assert levels(await first.spend("acme", 9.6)) == [("daily", "critical")]
    assert await second.spend("acme", 0.1) == []


async def test_both_periods_can_alert_on_one_spend() -> None:
    g = guard({"acme": Budget(daily=10.0, monthly=10.0)})
    alerts = await g.spend("acme", 8.5)
    assert levels(alerts) == [("daily", "warning"), ("monthly", "warning")]


async def test_a_new_day_resets_daily_totals_and_alerts() -> None:
    clock = Clock()
    g = guard({"acme": Budget(daily=10.0, monthly=100.0)}, clock=clock)
    assert levels(await g.spend("acme", 10.0)) == [("daily", "critical")]
    with pytest.raises(BudgetExceeded):
        await g.check("acme")

    clock.now = START.replace(hour=23, minute=59, second=59)
    with pytest.raises(BudgetExceeded):
        await g.check("acme")
    clock.now = START + timedelta(days=1) - timedelta(hours=10)  # 00:00 UTC the next day
    await g.check("acme", estimate=9.0)
    assert await g.spend("acme", 5.0) == []
    assert levels(await g.spend("acme", 3.0)) == [("daily", "warning")]
    assert levels(await g.spend("acme", 2.0)) == [("daily", "critical")]
    # the month kept counting: 20 of 100, no monthly alert
    assert await g.store.totals("acme", clock.now) == (10.0, 20.0)


async def test_a_new_month_resets_monthly_alerts() -> None:
    clock = Clock(datetime(2025, 1, 31, 23, 0, tzinfo=UTC))
    g = guard({"acme": Budget(monthly=10.0)}, clock=clock, store=MemorySpendStore())
    assert levels(await g.spend("acme", 8.0)) == [("monthly", "warning")]
    clock.now = datetime(2025, 2, 1, 0, 30, tzinfo=UTC)
    await g.check("acme", estimate=10.0)
    assert levels(await g.spend("acme", 8.0)) == [("monthly", "warning")]


async def test_on_alert_failure_does_not_raise(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(alert: Alert) -> None:
        raise RuntimeError("webhook down")

    g = guard({"acme": Budget(daily=10.0)}, on_alert=broken)
    with caplog.at_level(logging.WARNING, logger="chatprocessor.budget"):
        alerts = await g.spend("acme", 9.9)
    assert levels(alerts) == [("daily", "critical")]
    failures = [r for r in caplog.records if r.exc_info and "webhook down" in str(r.exc_info[1])]
    assert len(failures) == 1


async def test_alerts_are_logged_by_level(caplog: pytest.LogCaptureFixture) -> None:
    g = guard({"acme": Budget(daily=10.0)})
    with caplog.at_level(logging.WARNING, logger="chatprocessor.budget"):
        await g.spend("acme", 8.0)
        await g.spend("acme", 1.6)
    records = [
        (r.levelno, r.getMessage()) for r in caplog.records if r.name == "chatprocessor.budget"
    ]
    assert records == [
        (
            logging.WARNING,
            "budget warning: tenant 'acme' has spent 80.0% of its daily budget"
            " (8.0000 of 10.0000 USD)",
        ),
        (
            logging.ERROR,
            "budget critical: tenant 'acme' has spent 96.0% of its daily budget"
            " (9.6000 of 10.0000 USD)",
        ),
    ]


async def test_used_ratio_gauge() -> None:
    g = guard({"gauge-tenant": Budget(daily=10.0, monthly=40.0)})
    await g.spend("gauge-tenant", 2.5)
    assert sample("ai_budget_used_ratio", tenant_id="gauge-tenant", period="daily") == 0.25
    assert sample("ai_budget_used_ratio", tenant_id="gauge-tenant", period="monthly") == 0.0625


async def test_alerted_windows_skip_the_store() -> None:
    store = CountingStore(now=START)
    g = guard({"acme": Budget(daily=10.0)}, store=store)
    await g.spend("acme", 9.6)  # critical, and the warning marked
    assert store.calls == ["add", "first_alert", "first_alert"]
    store.calls.clear()
    await g.spend("acme", 0.1)
    assert store.calls == ["add"]


async def test_custom_thresholds_and_currency() -> None:
    g = BudgetGuard(
        MemorySpendStore(now=START),
        lambda tenant: Budget(daily=100.0),
        currency="EUR",
        thresholds=((50.0, "notice"), (90.0, "critical")),
        clock=Clock(),
    )
    [alert] = await g.spend("acme", 60.0)
    assert (alert.level, alert.currency) == ("notice", "EUR")
    [alert] = await g.spend("acme", 30.0)
    assert alert.level == "critical"
