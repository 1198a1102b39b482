"""Seed 004's governance around each job: limits, budget, cache, post-processing, costs.

The order is the seed's ``processJob``, with the refusals first so that a tenant
over its limits never reaches the model::

    rate limit (delay) -> budget (refuse) -> cache -> model -> classify -> filters -> price
    ... reply confirmed ... -> usage ledger, spend (alerts at 80 % / 95 %), metrics

A state store that cannot be reached (Redis down) never stops a job: the step is
skipped with a warning, since the ledger still records the cost.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from chatprocessor.core.errors import InvalidModelOutput, ProviderError, StoreUnavailable
from chatprocessor.core.job import ChatMessage, Job, Result
from chatprocessor.features.cache import cache_key
from chatprocessor.features.classify import (
    DEFAULT_INTENTS,
    analysis_schema,
    classify,
    extract_actions,
    merge_actions,
)
from chatprocessor.ops import metrics

if TYPE_CHECKING:
    from chatprocessor.features.budget import BudgetGuard
    from chatprocessor.features.cache import ResponseCache
    from chatprocessor.features.content_filter import TenantFilters
    from chatprocessor.features.pricing import PriceTable
    from chatprocessor.features.tenant_limits import TenantRateLimiter
    from chatprocessor.stores.usage_ledger import UsageLedger

log = logging.getLogger(__name__)

#: Job types answered by a classification alone (seed 004's AIJob.type).
CLASSIFY_TYPES = {"sentiment_analysis": "sentiment", "intent_classification": "intent"}
#: Job types answered by the model, then classified when CLASSIFY_REPLIES is on.
CHAT_TYPES = ("chat_response", "batch_processing")


class ModelCalls(Protocol):
    """What the worker lets this step do with the model for one job."""

    @property
    def streaming(self) -> bool: ...

    @property
    def remembers(self) -> bool:
        """The answer depends on stored conversation history."""
        ...

    async def answer(self, job: Job) -> Result:
        """The job's answer, as the worker gives it without governance."""
        ...

    async def ask(self, job: Job, messages: list[ChatMessage]) -> Result:
        """One model call with exactly these messages (no streaming to the requester)."""
        ...

    async def send_whole(self, text: str) -> None:
        """A cached answer to a streamed job, as one piece."""
        ...


@dataclasses.dataclass(slots=True)
class Governance:
    """Every part is optional; None turns that step off."""

    prices: PriceTable
    currency: str = "USD"
    limiter: TenantRateLimiter | None = None
    budget: BudgetGuard | None = None
    cache: ResponseCache | None = None
    cache_ttl: float = 300.0
    cache_streaming: bool = False
    cache_context_messages: int = 3
    ledger: UsageLedger | None = None
    filters: TenantFilters | None = None
    classify_replies: bool = True
    default_model: str = ""

    async def start(self) -> None:
        if self.ledger is not None:
            await self.ledger.start()
            await self._seed_spend(self.ledger)

    async def _seed_spend(self, ledger: UsageLedger) -> None:
        """Without Redis, today's and this month's spend start from the ledger, so a restart
        does not hand a tenant its budget again."""
        from chatprocessor.features.budget import MemorySpendStore

        if self.budget is None or not isinstance(self.budget.store, MemorySpendStore):
            return
        try:
            totals = await ledger.spend_totals(datetime.now(UTC))
        except StoreUnavailable as exc:
            log.warning("budgets: cannot read the spend from the usage ledger (%s); from 0", exc)
            return
        self.budget.store = MemorySpendStore(initial=totals)
        log.info("budgets: spend of %d tenant(s) read from the usage ledger", len(totals))

    async def close(self) -> None:
        for part in (self.ledger, self.cache, self.budget, self.limiter):
            if part is not None:
                await part.close()

    # -- before and around the model ------------------------------------------------------

    async def run(self, job: Job, lane: str, calls: ModelCalls) -> Result:
        """The job's Result with cost and analysis; raises TenantRateLimited or BudgetExceeded
        before any model call, ProviderError when the model fails."""
        started = time.perf_counter()
        if self.limiter is not None:
            await _unless_down(self.limiter.check(job.tenant), "rate limit")
        if self.budget is not None:
            estimate = float(job.meta.get("cost_estimate") or 0.0)
            await _unless_down(self.budget.check(job.tenant, estimate), "budget")
        key = None if calls.remembers else self._cache_key(job, calls.streaming)
        if key is not None:
            hit = await self._cached(job, key)
            if hit is not None:
                if calls.streaming:
                    await calls.send_whole(hit.text)
                hit.latency_ms = round((time.perf_counter() - started) * 1000)
                self._observe(job, hit, started)
                return hit
        result = await self._generate(job, calls)
        if self.filters is not None and result.text:
            result.text = self.filters.apply(job.tenant, result.text)
        result.cost = self.prices.cost(
            result.provider,
            result.model_used,
            result.prompt_tokens or 0,
            result.completion_tokens or 0,
        )
        if key is not None and result.status == "completed":
            await self._store(job, key, result)
        self._observe(job, result, started)
        return result

    @staticmethod
    def _observe(job: Job, result: Result, started: float) -> None:
        metrics.labelled(
            metrics.AI_PROCESSING_SECONDS,
            job.tenant,
            result.provider or "",
            result.model_used,
            _job_type(job),
        ).observe(time.perf_counter() - started)

    async def _generate(self, job: Job, calls: ModelCalls) -> Result:
        focus = CLASSIFY_TYPES.get(job.kind)
        if focus is not None:  # the classification is the answer
            spent, labels = await self._classify(job, calls, focus)
            spent.analysis = labels
            spent.text = orjson.dumps(labels).decode()
            return spent
        # The pipeline's chat types are conversations; other doors' kinds (tasks) stay theirs.
        chat_job = dataclasses.replace(job, kind="chat") if job.kind in CHAT_TYPES else job
        result = await calls.answer(chat_job)
        if job.kind not in CHAT_TYPES:
            return result
        analysis: dict[str, Any] = {}
        if result.status == "completed" and self._classifies(job):
            try:
                extra, analysis = await self._classify(job, calls, "both", repair=False)
            except (InvalidModelOutput, ProviderError) as exc:
                # The answer stands without its labels: a reply is worth more than a tag.
                log.warning("could not classify the message (%s); replying without labels", exc)
            else:
                _add_tokens(result, extra)
        # Suggested actions: the model's, then the list items of the answer itself.
        analysis["suggestedActions"] = merge_actions(
            analysis.get("suggestedActions", []), extract_actions(result.text)
        )
        result.analysis = analysis
        return result

    def _classifies(self, job: Job) -> bool:
        wanted = job.meta.get("classify")
        return self.classify_replies if wanted is None else bool(wanted)

    async def _classify(
        self, job: Job, calls: ModelCalls, focus: str, *, repair: bool = True
    ) -> tuple[Result, dict[str, Any]]:
        """Intent and sentiment of the visitor's message, as checked JSON (one or two calls)."""
        intents: Sequence[str] = job.meta.get("intents") or DEFAULT_INTENTS
        schema = analysis_schema(intents)
        spent = Result(text="", model_used=job.model or self.default_model)
        ask_job = dataclasses.replace(job, kind="chat", stream=False, format=schema)

        async def ask(messages: list[ChatMessage], _schema: dict[str, Any]) -> str:
            answer = await calls.ask(ask_job, messages)
            _add_tokens(spent, answer)
            spent.model_used, spent.provider = answer.model_used, answer.provider
            return answer.text

        analysis = await classify(ask, job.prompt, intents=intents, focus=focus, repair=repair)
        return spent, analysis

    # -- the cache ------------------------------------------------------------------------

    def _cache_key(self, job: Job, streaming: bool) -> str | None:
        if self.cache is None or self.cache_ttl <= 0:
            return None
        asked = job.meta.get("cache")
        if asked is False or (streaming and not (self.cache_streaming or asked is True)):
            return None
        return cache_key(
            job, default_model=self.default_model, context_messages=self.cache_context_messages
        )

    async def _cached(self, job: Job, key: str) -> Result | None:
        assert self.cache is not None
        try:
            data = await self.cache.get(job.tenant, key)
        except StoreUnavailable as exc:
            log.warning("response cache unreadable (%s); asking the model", exc)
            return None
        if data is None:
            return None
        return Result(
            text=str(data.get("text", "")),
            model_used=str(data.get("model", "")),
            provider=data.get("provider"),
            prompt_tokens=0,
            completion_tokens=0,
            cost=0.0,
            cached=True,
            analysis=dict(data.get("analysis") or {}),
        )

    async def _store(self, job: Job, key: str, result: Result) -> None:
        assert self.cache is not None
        value = {
            "text": result.text,
            "model": result.model_used,
            "provider": result.provider,
            "analysis": result.analysis,
        }
        try:
            await self.cache.set(job.tenant, key, value, self.cache_ttl)
        except StoreUnavailable as exc:
            log.warning("response cache unwritable (%s); the answer is not cached", exc)

    # -- after the reply ------------------------------------------------------------------

    async def finished(self, job: Job, lane: str, result: Result) -> None:
        """The reply was delivered: ledger row, spend (and its alerts), metrics."""
        provider = result.provider or ""
        cost = result.cost or 0.0
        tokens_in, tokens_out = result.prompt_tokens or 0, result.completion_tokens or 0
        if tokens_in:
            metrics.labelled(
                metrics.AI_TOKENS, job.tenant, provider, result.model_used, "input"
            ).inc(tokens_in)
        if tokens_out:
            metrics.labelled(
                metrics.AI_TOKENS, job.tenant, provider, result.model_used, "output"
            ).inc(tokens_out)
        if cost:
            metrics.labelled(
                metrics.AI_COST, job.tenant, provider, result.model_used, self.currency
            ).inc(cost)
        self._record(job, lane, result, result.status)
        if self.budget is not None and cost > 0:
            await _unless_down(self.budget.spend(job.tenant, cost), "budget")

    async def failed(self, job: Job, lane: str, error: Result, kind: str) -> None:
        """The job ended without an answer (dead-lettered): error metric and ledger row."""
        metrics.labelled(metrics.AI_ERRORS, job.tenant, error.provider or "", kind).inc()
        self._record(job, lane, error, error.status)

    def _record(self, job: Job, lane: str, result: Result, status: str) -> None:
        if self.ledger is None:
            return
        from chatprocessor.stores.usage_ledger import UsageRecord

        self.ledger.record(
            UsageRecord(
                job_id=job.id,
                tenant_id=job.tenant,
                provider=result.provider,
                model=result.model_used or job.model or self.default_model,
                job_type=_job_type(job),
                lane=lane,
                input_tokens=result.prompt_tokens or 0,
                output_tokens=result.completion_tokens or 0,
                total_cost=result.cost or 0.0,
                currency=self.currency,
                cache_hit=result.cached,
                status=status,
                latency_ms=result.latency_ms,
            )
        )


def _job_type(job: Job) -> str:
    return str(job.meta.get("type") or job.kind)


def _add_tokens(into: Result, more: Result) -> None:
    into.prompt_tokens = (into.prompt_tokens or 0) + (more.prompt_tokens or 0)
    into.completion_tokens = (into.completion_tokens or 0) + (more.completion_tokens or 0)


async def _unless_down(step: Any, what: str) -> Any:
    """Await a limit step; a store that is down lets the job through with a warning."""
    try:
        return await step
    except StoreUnavailable as exc:
        log.warning("%s store unavailable (%s); the job goes on unchecked", what, exc)
        return None
