"""The governance step on its own: order of the checks, cache rules, classification, costs.

The model is a scripted ModelCalls; limits, budget, cache and filters are the real in-process
implementations (their Redis twins have their own integration tests).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY

from chatprocessor.app import build_lanes
from chatprocessor.core.errors import (
    BudgetExceeded,
    InvalidModelOutput,
    ProviderTimeout,
    StoreUnavailable,
    TenantRateLimited,
)
from chatprocessor.core.job import ChatMessage, Job, Result
from chatprocessor.features.budget import Budget, BudgetGuard, MemorySpendStore
from chatprocessor.features.cache import MemoryResponseCache
from chatprocessor.features.content_filter import TenantFilters
from chatprocessor.features.governance import Governance
from chatprocessor.features.pricing import Price, PriceTable
from chatprocessor.features.tenant_limits import TenantRateLimiter
from chatprocessor.settings import Settings

ANALYSIS = {"sentiment": "negative", "intent": "complaint", "confidence": 0.8}


@dataclasses.dataclass
class Calls:
    """A scripted model: answers echo the prompt, asks return ``analysis`` as JSON."""

    streaming: bool = False
    remembers: bool = False
    analysis: Any = dataclasses.field(default_factory=lambda: dict(ANALYSIS))
    answers: list[Job] = dataclasses.field(default_factory=list)
    asks: list[list[ChatMessage]] = dataclasses.field(default_factory=list)
    sent_whole: list[str] = dataclasses.field(default_factory=list)
    fail_ask: Exception | None = None

    async def answer(self, job: Job) -> Result:
        self.answers.append(job)
        return Result(
            f"Sorry!\n- Check the parcel\n- Ask for a refund\n({job.prompt})",
            "m1",
            prompt_tokens=100,
            completion_tokens=50,
            provider="ollama",
        )

    async def ask(self, job: Job, messages: list[ChatMessage]) -> Result:
        assert job.format is not None and not job.stream
        self.asks.append(messages)
        if self.fail_ask is not None:
            raise self.fail_ask
        text = self.analysis if isinstance(self.analysis, str) else orjson.dumps(self.analysis)
        return Result(
            text if isinstance(text, str) else text.decode(),
            "m1",
            prompt_tokens=10,
            completion_tokens=5,
            provider="ollama",
        )

    async def send_whole(self, text: str) -> None:
        self.sent_whole.append(text)


def job(
    kind: str = "chat_response", tenant: str = "acme", prompt: str = "It broke", **meta: Any
) -> Job:
    return Job(
        id=f"j-{prompt}-{tenant}",
        conversation_id="c1",
        prompt=prompt,
        kind=kind,
        tenant=tenant,
        priority=5,
        meta={"type": kind, **meta},
    )


def governance(**parts: Any) -> Governance:
    prices = PriceTable({"m1": Price(1.0, 2.0)})
    return Governance(prices=prices, default_model="m1", **parts)


async def test_a_chat_answer_is_classified_priced_and_gets_actions() -> None:
    calls = Calls()
    result = await governance().run(job(), "standard", calls)
    assert calls.answers[0].kind == "chat"  # the pipeline's type is answered as a conversation
    assert result.analysis["sentiment"] == "negative"
    assert result.analysis["suggestedActions"] == ["Check the parcel", "Ask for a refund"]
    # Both calls are paid for: (110 in x 1 + 55 out x 2) / 1000.
    assert result.prompt_tokens == 110 and result.completion_tokens == 55
    assert result.cost == pytest.approx(0.22)
    assert "It broke" in calls.asks[0][-1].content  # the visitor's message is classified


async def test_a_failed_classification_still_answers_without_labels() -> None:
    calls = Calls(fail_ask=InvalidModelOutput("no JSON"))
    result = await governance().run(job(), "standard", calls)
    assert result.text.startswith("Sorry!")
    assert "sentiment" not in result.analysis
    assert result.analysis["suggestedActions"] == ["Check the parcel", "Ask for a refund"]


async def test_classification_jobs_fail_when_the_model_gives_no_json() -> None:
    calls = Calls(analysis="not json at all")
    with pytest.raises(InvalidModelOutput):
        await governance().run(job("sentiment_analysis"), "standard", calls)
    assert len(calls.asks) == 2  # asked once more with a repair prompt
    assert calls.answers == []


async def test_a_classification_job_answers_with_its_json() -> None:
    calls = Calls()
    result = await governance().run(job("intent_classification"), "batch", calls)
    assert orjson.loads(result.text)["intent"] == "complaint"
    assert result.analysis["intent"] == "complaint" and calls.answers == []
    assert result.cost == pytest.approx((10 + 10) / 1000)


async def test_classify_replies_off_and_per_job_override() -> None:
    calls = Calls()
    quiet = governance(classify_replies=False)
    await quiet.run(job(), "standard", calls)
    assert calls.asks == []
    await quiet.run(job(prompt="again", classify=True), "standard", calls)
    assert len(calls.asks) == 1


async def test_over_budget_is_refused_before_any_model_call() -> None:
    store = MemorySpendStore(initial={"acme": (5.0, 5.0)})
    guard = BudgetGuard(store, lambda tenant: Budget(daily=5.0))
    calls = Calls()
    with pytest.raises(BudgetExceeded, match="daily budget"):
        await governance(budget=guard).run(job(), "standard", calls)
    assert calls.answers == [] and calls.asks == []


async def test_rate_limit_comes_first() -> None:
    limiter = TenantRateLimiter(lambda tenant: 1)
    gov = governance(limiter=limiter)
    await gov.run(job(), "standard", Calls())
    calls = Calls()
    with pytest.raises(TenantRateLimited) as raised:
        await gov.run(job(prompt="second"), "standard", calls)
    assert 0 < raised.value.retry_after <= 60
    assert calls.answers == []


async def test_a_store_that_is_down_lets_the_job_through() -> None:
    class DownLimiter:
        async def check(self, tenant: str) -> None:
            raise StoreUnavailable("redis down")

        async def close(self) -> None:
            pass

    result = await governance(limiter=DownLimiter()).run(job(), "standard", Calls())
    assert result.text.startswith("Sorry!")


async def test_cache_hits_are_free_and_per_tenant() -> None:
    gov = governance(cache=MemoryResponseCache())
    calls = Calls()
    first = await gov.run(job(), "standard", calls)
    hit = await gov.run(job(), "standard", calls)
    assert hit.cached and hit.cost == 0 and hit.text == first.text
    assert hit.analysis["sentiment"] == "negative"
    assert len(calls.answers) == 1
    other = await gov.run(job(tenant="globex"), "standard", calls)
    assert not other.cached and len(calls.answers) == 2


async def test_cache_rules_streaming_history_and_opt_out() -> None:
    gov = governance(cache=MemoryResponseCache())
    streamed = Calls(streaming=True)
    await gov.run(job(), "standard", streamed)
    await gov.run(job(), "standard", streamed)
    assert len(streamed.answers) == 2  # streamed answers are not cached by default
    asked = Calls(streaming=True)
    await gov.run(job(prompt="asked", cache=True), "standard", asked)
    again = await gov.run(job(prompt="asked", cache=True), "standard", asked)
    assert again.cached and asked.sent_whole == [again.text]  # a hit reaches the stream whole
    remembering = Calls(remembers=True)
    await gov.run(job(prompt="hist"), "standard", remembering)
    await gov.run(job(prompt="hist"), "standard", remembering)
    assert len(remembering.answers) == 2  # stored history is invisible to the key
    opted_out = Calls()
    await gov.run(job(prompt="no", cache=False), "standard", opted_out)
    await gov.run(job(prompt="no", cache=False), "standard", opted_out)
    assert len(opted_out.answers) == 2


async def test_content_filters_apply_before_caching() -> None:
    filters = TenantFilters({"acme": ["(?i)refund"]})
    gov = governance(filters=filters, cache=MemoryResponseCache())
    first = await gov.run(job(), "standard", Calls())
    assert "refund" not in first.text.lower() and "[filtered]" in first.text
    hit = await gov.run(job(), "standard", Calls())
    assert hit.cached and hit.text == first.text
    other = await gov.run(job(tenant="globex"), "standard", Calls())
    assert "refund" in other.text


async def test_finished_spends_and_counts_cost() -> None:
    store = MemorySpendStore()
    guard = BudgetGuard(store, lambda tenant: Budget(daily=1.0))
    gov = governance(budget=guard)
    tenant = "spender"
    before = REGISTRY.get_sample_value(
        "ai_cost_total",
        {"tenant_id": tenant, "provider": "ollama", "model": "m1", "currency": "USD"},
    )
    result = await gov.run(job(tenant=tenant), "high", Calls())
    await gov.finished(job(tenant=tenant), "high", result)
    after = REGISTRY.get_sample_value(
        "ai_cost_total",
        {"tenant_id": tenant, "provider": "ollama", "model": "m1", "currency": "USD"},
    )
    assert after == pytest.approx((before or 0) + result.cost)
    day, _ = await store.totals(tenant, guard._clock())
    assert day == pytest.approx(result.cost)


async def test_a_provider_timeout_in_the_answer_propagates() -> None:
    class Slow(Calls):
        async def answer(self, job: Job) -> Result:
            raise ProviderTimeout("slow")

    with pytest.raises(ProviderTimeout):
        await governance().run(job(), "standard", Slow())


def test_lanes_carry_the_seeds_retry_budgets_and_deadlines(tmp_path: Any) -> None:
    settings = Settings(contract="pipeline", data_dir=tmp_path, log_file="", job_timeout=600)
    lanes = {lane.name: lane for lane in build_lanes(settings)}
    assert [lanes[n].queue for n in ("high", "standard", "batch")] == [
        "ai-high-priority",
        "ai-standard",
        "ai-batch",
    ]
    assert (lanes["high"].retry.max_retries, lanes["high"].retry.base) == (2, 2.0)
    assert (lanes["standard"].retry.max_retries, lanes["standard"].retry.base) == (4, 5.0)
    assert lanes["batch"].job_timeout == 300 and lanes["high"].job_timeout == 600
    assert lanes["batch"].prefetch == 1
