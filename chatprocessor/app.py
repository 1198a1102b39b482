"""Wires settings into a running service: transport, provider, worker and ops server."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
from typing import TYPE_CHECKING

import orjson

from chatprocessor.contracts.base import Codec
from chatprocessor.contracts.chat import ChatCodec
from chatprocessor.core.errors import ConfigError
from chatprocessor.core.priority import PriorityGate
from chatprocessor.core.retry import RetryPolicy
from chatprocessor.core.worker import Lane, Worker, WorkerConfig
from chatprocessor.events.cancel import CancelRegistry, CancelSource
from chatprocessor.ops.server import OpsServer
from chatprocessor.providers import build_providers
from chatprocessor.ratelimit import Limits, RateLimiter
from chatprocessor.settings import Settings
from chatprocessor.stores import build_reply_store
from chatprocessor.transports import build_transport
from chatprocessor.transports.base import Outgoing

if TYPE_CHECKING:
    from chatprocessor.events.sink import EventSink
    from chatprocessor.features.budget import BudgetGuard
    from chatprocessor.features.conversation import Conversations
    from chatprocessor.features.governance import Governance
    from chatprocessor.features.history import HistoryStore
    from chatprocessor.providers.base import Provider
    from chatprocessor.stores.job_metrics import JobMetrics
    from chatprocessor.stores.usage_ledger import UsageLedger
    from chatprocessor.transports.base import Transport

log = logging.getLogger(__name__)


def build_codec(settings: Settings) -> Codec:
    """The contract CONTRACT (or TRANSPORT, with auto) names."""
    if settings.transport == "tasks":
        from chatprocessor.contracts.tasks import TaskCodec

        # SUPPORTED_MODELS guards the local providers; OpenAI takes any model it serves.
        local = {"ollama", "embedded"} & set(settings.provider_names)
        return TaskCodec(
            max_bytes=settings.max_message_bytes,
            supported_models=settings.supported_models if local else [],
        )
    if settings.uses_pipeline_contract:
        from chatprocessor.contracts.pipeline import PipelineCodec

        return PipelineCodec(
            max_bytes=settings.max_message_bytes,
            currency=settings.cost_currency,
            high_min=settings.high_priority_min,
        )
    if settings.uses_stream_contract:
        from chatprocessor.contracts.stream import StreamCodec

        return StreamCodec(max_bytes=settings.max_message_bytes, default_tenant=settings.tenant_id)
    if not settings.uses_models_contract:
        return ChatCodec(
            max_bytes=settings.max_message_bytes,
            naming=settings.output_naming,
            bot_user_id=settings.bot_user_id,
        )
    from chatprocessor.contracts.models import ModelsCodec
    from chatprocessor.sanitize import load_schema

    schema = settings.photo_analysis_schema
    return ModelsCodec(
        # A record may carry a photo of MAX_IMAGE_BYTES, as base64, besides the rest.
        max_bytes=settings.max_message_bytes + (settings.max_image_bytes + 2) // 3 * 4,
        photo_topic=settings.photo_response_topic,
        text_topic=settings.text_response_topic,
        expected_user_email=settings.expected_user_email,
        max_image_bytes=settings.max_image_bytes,
        image_max_side=settings.image_max_side,
        photo_schema=load_schema(schema) if schema else None,
    )


def build_worker(settings: Settings) -> Worker:
    retry = RetryPolicy.from_settings(settings)
    models = settings.uses_models_contract
    stream = settings.uses_stream_contract
    pipeline = settings.uses_pipeline_contract
    if models:
        output_queue = settings.text_response_topic
    elif pipeline:
        output_queue = settings.ai_response_queue
    else:
        output_queue = settings.rabbitmq_queue_output
    config = WorkerConfig(
        input_queue=settings.input_queue,
        output_queue=output_queue,
        prefetch=settings.concurrency_limit
        if settings.transport == "tasks"
        else settings.prefetch_count,
        graceful_timeout=settings.graceful_timeout,
        system_prompt=settings.system_prompt,
        stream_flush_interval=settings.stream_flush_ms / 1000,
        retry=retry,
        job_timeout=settings.job_timeout,
        breaker_patience=max(retry.total_backoff(), 2 * settings.breaker_reset_timeout),
        pull_missing_models=settings.pull_missing_models,
        # Seed 002: in ollama and hybrid modes the supported models are downloaded at start.
        models_to_pull=tuple(settings.supported_models)
        if settings.transport == "tasks" and "ollama" in settings.provider_names
        else (),
        lanes=build_lanes(settings) if pipeline else (),
    )
    provider = build_providers(settings)
    # Seed 000's door has no rag mode: without history it needs no context step at all.
    context = not models and settings.transport != "tasks" and (stream or settings.uses_history)
    transport = build_transport(settings)
    governance = build_governance(settings, provider, transport)
    return Worker(
        transport,
        provider,
        build_codec(settings),
        config,
        store=build_reply_store(settings),
        limiter=build_limiter(settings) if settings.transport == "tasks" else None,
        conversations=build_conversations(settings, provider) if context else None,
        events=build_event_sink(settings) if stream else None,
        cancels=CancelRegistry() if stream else None,
        cancel_source=build_cancel_source(settings) if stream else None,
        job_metrics=build_job_metrics(settings) if settings.writes_job_metrics else None,
        governance=governance,
        gate=PriorityGate(settings.model_slots) if pipeline else None,
    )


def build_lanes(settings: Settings) -> tuple[Lane, ...]:
    """The pipeline's three lanes, each with the seed's retry budget and deadline."""
    lanes = []
    for name, queue in settings.lanes.items():
        retry = RetryPolicy(
            getattr(settings, f"lane_{name}_max_retries"),
            getattr(settings, f"lane_{name}_backoff"),
            max(settings.retry_backoff_cap, getattr(settings, f"lane_{name}_backoff")),
        )
        timeout = getattr(settings, f"lane_{name}_timeout") or settings.job_timeout
        prefetch = getattr(settings, f"lane_{name}_prefetch")
        lanes.append(Lane(name, queue, prefetch, retry, min(timeout, settings.job_timeout)))
    return tuple(lanes)


def build_governance(
    settings: Settings, provider: Provider, transport: Transport
) -> Governance | None:
    """Limits, budgets, cache, post-processing and the usage ledger, as settings ask."""
    pipeline = settings.uses_pipeline_contract
    if not (
        pipeline
        or settings.uses_rate_limits
        or settings.uses_budgets
        or settings.uses_cache
        or settings.writes_usage_ledger
        or settings.uses_content_filters
    ):
        return None  # the other doors' hot path stays as it was
    from chatprocessor.features.governance import Governance
    from chatprocessor.features.pricing import PriceTable

    governance = Governance(
        prices=PriceTable.from_setting(
            settings.model_prices, local_price=settings.local_compute_price
        ),
        currency=settings.cost_currency,
        cache_ttl=settings.cache_ttl,
        cache_streaming=settings.cache_streaming,
        cache_context_messages=settings.cache_context_messages,
        classify_replies=settings.classify_replies,
        default_model=provider.default_model,
    )
    if settings.uses_rate_limits:
        from chatprocessor.features.tenant_limits import TenantRateLimiter

        governance.limiter = TenantRateLimiter(
            lambda tenant: settings.tenant_policy(tenant).requests_per_minute or 0,
            redis_url=settings.redis_url,
        )
    if settings.writes_usage_ledger:
        governance.ledger = build_usage_ledger(settings)
    if settings.uses_budgets:
        governance.budget = build_budget(settings, transport)
    if settings.uses_cache:
        from chatprocessor.features.cache import (
            CountingCache,
            MemoryResponseCache,
            RedisResponseCache,
            ResponseCache,
        )

        inner: ResponseCache = (
            RedisResponseCache(settings.redis_url)
            if settings.redis_url
            else MemoryResponseCache(max_entries=settings.cache_max_entries)
        )
        governance.cache = CountingCache(inner)
    if settings.uses_content_filters:
        from chatprocessor.features.content_filter import TenantFilters

        try:
            governance.filters = TenantFilters(
                {tenant: policy.content_filters for tenant, policy in settings.tenants.items()},
                default=settings.content_filters,
                replacement=settings.content_filter_replacement,
            )
        except ValueError as exc:  # e.g. a pattern that matches the empty string
            raise ConfigError(f"invalid configuration: CONTENT_FILTERS / TENANTS: {exc}") from exc
    return governance


def build_usage_ledger(settings: Settings) -> UsageLedger:
    """ai_usage_logs in DATABASE_URL (SQLite in DATA_DIR by default)."""
    from chatprocessor.stores.database import create_engine
    from chatprocessor.stores.usage_ledger import UsageLedger

    return UsageLedger(create_engine(settings.database))


def build_budget(settings: Settings, transport: Transport) -> BudgetGuard:
    """Budgets per tenant: spend in Redis (shared) or in process, alerts to ALERTS_QUEUE."""
    from chatprocessor.features.budget import (
        Alert,
        Budget,
        BudgetGuard,
        MemorySpendStore,
        RedisSpendStore,
        SpendStore,
    )

    # Without Redis, Governance.start seeds the in-process store from the ledger.
    store: SpendStore = (
        RedisSpendStore(settings.redis_url) if settings.redis_url else MemorySpendStore()
    )

    def budget_of(tenant: str) -> Budget:
        policy = settings.tenant_policy(tenant)
        return Budget(daily=policy.daily_budget or 0.0, monthly=policy.monthly_budget or 0.0)

    async def publish_alert(alert: Alert) -> None:
        event = alert.event()
        window = alert.at.strftime("%Y-%m-%d" if alert.period == "daily" else "%Y-%m")
        await transport.declare(settings.alerts_queue)
        await transport.publish(
            settings.alerts_queue,
            Outgoing(
                orjson.dumps(event),
                message_id=f"alert:{alert.tenant}:{alert.period}:{window}:{alert.level}",
                type="BudgetAlert",
            ),
        )

    return BudgetGuard(store, budget_of, on_alert=publish_alert, currency=settings.cost_currency)


def build_conversations(settings: Settings, provider: Provider) -> Conversations:
    """History (Redis with REDIS_URL, else SQLite in DATA_DIR) and, for rag jobs, retrieval."""
    from chatprocessor.features.conversation import Conversations
    from chatprocessor.features.history import RedisHistoryStore, SQLiteHistoryStore
    from chatprocessor.features.rag.retrieval import build_retriever

    history: HistoryStore | None = None
    if settings.uses_history:
        if settings.redis_url:
            history = RedisHistoryStore(
                settings.redis_url,
                ttl=settings.history_ttl,
                max_messages=settings.history_max_messages,
            )
        else:
            history = SQLiteHistoryStore(
                settings.data_dir.expanduser() / "history.sqlite3",
                ttl=settings.history_ttl,
                max_messages=settings.history_max_messages,
            )
    return Conversations(
        provider,
        history=history,
        retriever=functools.partial(build_retriever, settings, provider),
        max_tokens=settings.history_max_tokens,
        max_messages=settings.history_max_messages,
        system_prompt=settings.system_prompt,
    )


def build_event_sink(settings: Settings) -> EventSink:
    """EVENTS_SINK: the Redis Stream EVENTS_STREAM, or the RabbitMQ exchange EVENTS_EXCHANGE."""
    if settings.events_sink == "rabbitmq":
        from chatprocessor.events.rabbitmq_sink import RabbitMQEventSink

        return RabbitMQEventSink(settings.rabbitmq_url, exchange=settings.events_exchange)
    from chatprocessor.events.redis_sink import RedisStreamSink

    assert settings.redis_url is not None  # checked by Settings
    return RedisStreamSink(
        settings.redis_url, stream=settings.events_stream, maxlen=settings.events_stream_maxlen
    )


def build_cancel_source(settings: Settings) -> CancelSource | None:
    """Cancel requests: the Redis Stream CANCEL_STREAM with REDIS_URL, else the RabbitMQ
    fanout exchange CANCEL_EXCHANGE when RabbitMQ is in use; None: jobs cannot be cancelled."""
    if settings.redis_url:
        from chatprocessor.events.cancel import RedisCancelSource

        return RedisCancelSource(settings.redis_url, stream=settings.cancel_stream)
    if settings.transport == "rabbitmq" or settings.events_sink == "rabbitmq":
        from chatprocessor.events.cancel import RabbitMQCancelSource

        return RabbitMQCancelSource(settings.rabbitmq_url, exchange=settings.cancel_exchange)
    log.warning("no REDIS_URL and no RabbitMQ: cancel requests cannot reach this worker")
    return None


def build_job_metrics(settings: Settings) -> JobMetrics:
    """llm_jobs / llm_messages in DATABASE_URL (SQLite in DATA_DIR by default)."""
    from chatprocessor.stores.database import create_engine
    from chatprocessor.stores.job_metrics import JobMetrics

    return JobMetrics(create_engine(settings.database))


def build_limiter(settings: Settings) -> RateLimiter | None:
    """RATE_LIMIT_*: the task API door's limits per minute to per month, or None."""
    if not settings.rate_limit_enabled:
        return None
    limits = Limits(
        per_minute=settings.rate_limit_per_minute,
        per_hour=settings.rate_limit_per_hour,
        per_day=settings.rate_limit_per_day,
        per_week=settings.rate_limit_per_week,
        per_month=settings.rate_limit_per_month,
        strategy=settings.rate_limit_strategy,
    )
    if not limits.enabled:
        return None
    return RateLimiter(limits, redis_url=settings.redis_url, data_dir=settings.data_dir)


async def run_service(settings: Settings, stop: asyncio.Event) -> None:
    """Run until ``stop`` is set; in-flight jobs get GRACEFUL_TIMEOUT to finish."""
    worker = build_worker(settings)
    poller: asyncio.Task[None] | None = None
    ops = (
        OpsServer(
            worker.readiness,
            host=settings.ops_host,
            port=settings.ops_port,
            details=worker.health_details,
        )
        if settings.ops_port
        else None
    )
    log.info(
        "chatprocessor starting: transport=%s providers=%s prefetch=%d",
        settings.transport,
        ",".join(settings.providers),
        settings.prefetch_count,
    )
    try:
        if ops is not None:
            await ops.start()  # /health answers even while the broker is still coming up
            log.info("ops server on http://%s:%d (/health /ready /metrics)", ops.host, ops.port)
        starting = asyncio.create_task(worker.start())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not starting.done():  # stopped while still connecting
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            return
        starting.result()
        # What start-up built (modules, settings, clients) lives until exit: moving it out
        # of the collector's generations keeps full collections from walking it again.
        gc.freeze()
        log.info("ready: waiting for prompts on %r", worker.config.input_queue)
        if settings.uses_pipeline_contract:
            from chatprocessor.ops.queue_depth import QueueDepthPoller

            poller = asyncio.create_task(QueueDepthPoller(worker.transport, settings.lanes).run())
        try:
            await worker.run(stop)
        finally:
            if poller is not None:
                poller.cancel()
                await asyncio.gather(poller, return_exceptions=True)
    finally:
        await worker.transport.close()
        await worker.provider.close()
        await worker.store.close()
        await worker.close_features()
        if worker.limiter is not None:
            await worker.limiter.close()
        if ops is not None:
            await ops.stop()
        log.info("chatprocessor stopped")
