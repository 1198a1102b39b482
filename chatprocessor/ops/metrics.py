"""Prometheus metrics of the worker, registered once per process."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

# The _created series doubles every scrape for no use in dashboards.
disable_created_metrics()  # type: ignore[no-untyped-call]

#: Outcomes: replied, error_reply, rejected, released, requester_gone, reply_refused.
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
