"""Prometheus metrics of the worker, registered once per process."""

from __future__ import annotations

import functools
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.metrics import MetricWrapperBase

# The _created series doubles every scrape for no use in dashboards.
disable_created_metrics()  # type: ignore[no-untyped-call]

#: Outcomes: replied, duplicate, retried, error_reply, rejected, released, requester_gone,
#: reply_refused.
MESSAGES = Counter(
    "chatprocessor_messages_total", "Messages taken from the input queue, by outcome", ["outcome"]
)
PROCESSING_SECONDS = Histogram(
    "chatprocessor_processing_seconds",
    "Time from taking a message to settling it",
    buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
LLM_SECONDS = Histogram(
    "chatprocessor_llm_seconds",
    "Time spent in the LLM provider per job",
    ["provider"],
    buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
TOKENS = Counter("chatprocessor_tokens_total", "Tokens processed", ["kind"])
IN_FLIGHT = Gauge("chatprocessor_jobs_in_flight", "Jobs being processed now")
RETRIES = Counter(
    "chatprocessor_retries_total", "Jobs sent to a delay queue for another attempt", ["error"]
)
DEAD_LETTERS = Counter(
    "chatprocessor_dead_letters_total", "Jobs moved to the dead-letter queue", ["reason"]
)
DUPLICATES = Counter(
    "chatprocessor_duplicates_total",
    "Redelivered jobs answered from the idempotency store instead of the LLM",
)
IDEMPOTENCY_ERRORS = Counter(
    "chatprocessor_idempotency_errors_total", "Idempotency store reads or writes that failed"
)
FALLBACKS = Counter(
    "chatprocessor_provider_fallbacks_total",
    "Jobs a provider could not answer and handed to the next one",
    ["provider"],
)
PROVIDER_FAILURES = Counter(
    "chatprocessor_provider_failures_total", "Failed provider calls", ["provider", "error"]
)
#: 0 closed (calls go through), 1 half-open (one probe call), 2 open (skipped).
BREAKER_STATE = Gauge(
    "chatprocessor_breaker_state", "Circuit breaker state per provider", ["provider"]
)
OWNERSHIP_REFUSED = Counter(
    "chatprocessor_ownership_refused_total",
    "Jobs refused because their conversation belongs to another user",
)
TIME_TO_FIRST_TOKEN = Histogram(
    "chatprocessor_time_to_first_token_seconds",
    "Time from the LLM call to its first generated text (streamed answers)",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
STOPPED_EARLY = Counter(
    "chatprocessor_generations_stopped_total",
    "Streamed answers stopped before their end, by why (cancelled, timeout)",
    ["status"],
)


RATE_LIMIT = Gauge(
    "chatprocessor_rate_limit", "Tasks allowed per period (RATE_LIMIT_*)", ["period"]
)
RATE_LIMIT_USED = Gauge(
    "chatprocessor_rate_limit_used", "Tasks counted in the current window", ["period"]
)
RATE_LIMIT_WAITS = Counter(
    "chatprocessor_rate_limit_waits_total", "Tasks that waited for a rate-limit slot"
)


@functools.cache
def labelled(metric: MetricWrapperBase, *values: str) -> Any:
    """``metric.labels(*values)``, looked up once: label sets are few, jobs are many."""
    return metric.labels(*values)


#: Outcomes: accepted (the owner cancelled a running job), refused (another user asked),
#: early (a cancel that arrived before its job started here, applied when it started).
CANCELS = Counter(
    "chatprocessor_cancels_total", "Cancel requests for jobs running here, by outcome", ["outcome"]
)
EVENTS_SENT = Counter(
    "chatprocessor_events_sent_total", "Stream events stored by the event sink", ["type"]
)
#: Outcomes: written (records stored), failed (write attempts that errored), dropped
#: (records given up: queue full or errors after the retries).
JOB_METRICS_WRITES = Counter(
    "chatprocessor_job_metrics_writes_total",
    "Job metrics records written to the database (DATABASE_URL), by outcome",
    ["outcome"],
)


# -- seed 004: the AI processing pipeline (tenants, lanes, costs, cache) ----------------------
# Names follow seed 004's collector; tenant_id labels are bounded by the tenants a platform has.

AI_PROCESSING_SECONDS = Histogram(
    "ai_processing_duration_seconds",
    "AI processing duration in seconds, by tenant, provider, model and job type",
    ["tenant_id", "provider", "model", "type"],
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30),
)
#: token_type: input or output.
AI_TOKENS = Counter(
    "ai_tokens_used", "Tokens used", ["tenant_id", "provider", "model", "token_type"]
)
#: A counter, not the seed's gauge: a gauge set to the last job's cost cannot be summed.
AI_COST = Counter(
    "ai_cost",
    "Cost of the jobs, priced from MODEL_PRICES",
    ["tenant_id", "provider", "model", "currency"],
)
#: error_type: rate_limited, over_budget, timeout, provider, invalid_output, rejected, ...
AI_ERRORS = Counter(
    "ai_processing_errors", "AI processing errors", ["tenant_id", "provider", "error_type"]
)
AI_CACHE_HITS = Counter("ai_cache_hits", "Response cache hits", ["tenant_id"])
AI_CACHE_MISSES = Counter("ai_cache_misses", "Response cache misses", ["tenant_id"])
#: priority: the lane (high, standard, batch).
AI_QUEUE_DEPTH = Gauge(
    "ai_queue_depth", "Jobs waiting in a lane's queue", ["queue_name", "priority"]
)
AI_QUEUE_WAIT = Histogram(
    "ai_model_wait_seconds",
    "Time a job waited for a model slot (MODEL_CONCURRENCY), by lane",
    ["lane"],
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
AI_RATE_LIMITED = Counter(
    "ai_rate_limited", "Jobs delayed by their tenant's requests-per-minute limit", ["tenant_id"]
)
#: period: daily or monthly.
AI_BUDGET_REFUSED = Counter(
    "ai_budget_refused", "Jobs refused because their tenant is over budget", ["tenant_id", "period"]
)
#: level: warning (80 %) or critical (95 %).
AI_BUDGET_ALERTS = Counter(
    "ai_budget_alerts", "Budget alerts raised", ["tenant_id", "period", "level"]
)
AI_BUDGET_USED = Gauge(
    "ai_budget_used_ratio",
    "Share of the tenant's budget spent (1 = all of it)",
    ["tenant_id", "period"],
)
AI_CONTENT_FILTERED = Counter(
    "ai_content_filtered", "Answers changed by a tenant's content filters", ["tenant_id"]
)
#: Outcomes: written, failed (write attempts that errored), dropped (records given up).
AI_USAGE_WRITES = Counter(
    "ai_usage_ledger_writes", "Usage ledger rows (ai_usage_logs), by outcome", ["outcome"]
)
