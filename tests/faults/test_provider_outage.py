"""The LLM fails for a while (HTTP 500, 429 with Retry-After, hangs) and then recovers, or
never recovers.

A transient failure goes through the delay queues and is retried; once the provider
answers again every job is answered, and the retries show in /metrics. A provider
that never recovers sends every job to the dead-letter queue after MAX_RETRIES + 1
attempts, with exactly one error reply each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from chatprocessor.core.retry import RetryPolicy
from chatprocessor.transports.base import DLQ_QUEUE
from tests.faults.helpers import (
    KINDS,
    Lab,
    TimedFakeOllama,
    llm_calls_per_request,
    make_jobs,
    metric,
    wait_for,
)

pytestmark = [pytest.mark.faults, pytest.mark.timeout(90)]

JOBS = 20


@dataclass(frozen=True)
class Outage:
    name: str
    failures: int  # LLM calls that fail before it recovers
    error: str  # the error class counted in chatprocessor_retries_total{error}
    env: dict[str, str] = field(default_factory=dict)

    def inject(self, fake: TimedFakeOllama) -> None:
        if self.name == "http-500":
            fake.fail_next(self.failures, status=500)
        elif self.name == "http-429":
            fake.retry_after = 0.2
            fake.fail_next(self.failures, status=429)
        else:  # hangs: only a deadline ends them
            fake.hang_next(self.failures)


OUTAGES = {
    "http-500": Outage("http-500", 30, "ProviderUnavailable"),
    "http-429": Outage("http-429", 30, "RateLimited"),
    "hang-job-timeout": Outage("hang-job-timeout", 12, "ProviderTimeout", {"JOB_TIMEOUT": "0.5"}),
    "hang-ollama-timeout": Outage(
        "hang-ollama-timeout", 12, "ProviderTimeout", {"OLLAMA_TIMEOUT": "0.5"}
    ),
}
CASES = [
    pytest.param("rabbitmq", name, marks=pytest.mark.rabbitmq, id=f"rabbitmq-{name}")
    for name in OUTAGES
] + [pytest.param("local", "http-500", id="local-http-500")]


@pytest.mark.parametrize(("kind", "outage_name"), CASES)
async def test_outage_then_recovery_answers_every_job(
    kind: str, outage_name: str, lab: Lab
) -> None:
    fake, ledger = lab.fake, lab.ledger
    outage = OUTAGES[outage_name]
    side = await lab.side(kind, RetryPolicy(max_retries=6, base=0.05, cap=0.4))
    worker = await lab.worker(side, **outage.env).start()
    outage.inject(fake)
    jobs = make_jobs(side.tag, JOBS)
    await side.publish_jobs(jobs)

    await wait_for(
        ledger.all_answered,
        40,
        "every job answered after the outage",
        details=lambda: ledger.summary() + "\n" + worker.console(),
    )

    async def nothing_queued() -> bool:
        return await side.backlog() == 0

    await wait_for(nothing_queued, 10, "nothing left queued")
    text = await worker.metrics()
    assert await worker.terminate() == 0, worker.console()
    report = await lab.report(side, f"LLM outage {outage.name}, recovers")
    report.assert_ok()

    assert ledger.answered_ok() == set(ledger.sent), "some jobs got an error reply"
    assert report.figures["dead_lettered"] == 0
    assert report.figures["llm_calls"] == JOBS + outage.failures
    retries = metric(text, "chatprocessor_retries_total")
    assert metric(text, "chatprocessor_retries_total", error=outage.error) > 0, text
    assert retries >= outage.failures, text
    assert metric(text, "chatprocessor_dead_letters_total") == 0
    assert metric(text, "chatprocessor_messages_total", outcome="replied") == JOBS
    assert metric(text, "chatprocessor_messages_total", outcome="retried") == retries


@pytest.mark.parametrize("kind", KINDS)
async def test_provider_that_never_recovers_dead_letters_every_job(kind: str, lab: Lab) -> None:
    fake, ledger = lab.fake, lab.ledger
    max_retries = 2
    side = await lab.side(kind, RetryPolicy(max_retries=max_retries, base=0.05, cap=0.2))
    worker = await lab.worker(side).start()
    fake.fail_next(10**6, status=500)
    jobs = make_jobs(side.tag, 15)
    await side.publish_jobs(jobs)

    async def all_dead() -> bool:
        return len(await side.dead_letters()) >= len(jobs)

    await wait_for(
        all_dead,
        40,
        "every job dead-lettered",
        details=lambda: ledger.summary() + "\n" + worker.console(),
    )
    await wait_for(ledger.all_answered, 10, "an error reply for every job", details=ledger.summary)
    text = await worker.metrics()
    assert await worker.terminate() == 0, worker.console()
    report = await lab.report(side, "LLM never recovers")
    report.assert_ok()

    letters = ledger.dead
    assert sorted(d.message_id or "" for d in letters) == sorted(j.id for j in jobs)
    bodies = {j.id: j.body for j in jobs}
    for letter in letters:
        assert letter.reason == "retries_exhausted", letter.headers
        assert letter.attempts == max_retries + 1, letter.headers
        assert "500" in letter.error, letter.error
        assert letter.failed_at, letter.headers
        assert letter.headers[DLQ_QUEUE] == side.input
        assert letter.body == bodies[letter.message_id or ""]  # unchanged
    replies = ledger.by_request()
    for job in jobs:
        [error_reply] = replies[job.id]  # exactly one, and it is an error reply
        data = error_reply.data
        assert data["conversation_id"] == job.conversation_id
        assert data["message"] == "" and "500" in data["error"]
    calls = llm_calls_per_request(ledger, fake)
    assert all(calls[j.id] == max_retries + 1 for j in jobs), dict(calls)
    assert report.figures["dead_lettered"] == len(jobs)
    assert metric(text, "chatprocessor_dead_letters_total", reason="retries_exhausted") == len(jobs)
    assert metric(text, "chatprocessor_retries_total") == len(jobs) * max_retries


@pytest.mark.rabbitmq
async def test_429_retry_after_is_honoured(lab: Lab) -> None:
    """A 429 with ``Retry-After: 1`` must not be retried after the 0.05 s backoff."""
    fake, ledger = lab.fake, lab.ledger
    side = await lab.side("rabbitmq", RetryPolicy(max_retries=4, base=0.05, cap=0.4))
    worker = await lab.worker(side).start()
    fake.retry_after = 1.0
    fake.fail_next(3, status=429)
    jobs = make_jobs(side.tag, 3)
    await side.publish_jobs(jobs)
    await wait_for(ledger.all_answered, 20, "every job answered", details=worker.console)
    assert await worker.terminate() == 0
    by_job: dict[str, list[float]] = {}
    for prompt, at in fake.chat_calls():
        by_job.setdefault(ledger.prompts[prompt], []).append(at)
    gaps = {job: round(times[1] - times[0], 2) for job, times in by_job.items()}
    assert all(len(times) == 2 for times in by_job.values()), by_job
    assert min(gaps.values()) >= 0.9, f"retried before Retry-After (1 s): gaps {gaps}"


@pytest.mark.rabbitmq
async def test_a_tripped_circuit_breaker_does_not_dead_letter_jobs(lab: Lab) -> None:
    """A blip of 5 failures trips the breaker (1.5 s cool-down); the provider then answers
    every call, in 1 s. No job may be dead-lettered for the breaker's sake."""
    fake, ledger = lab.fake, lab.ledger
    fake.latency = 1.0
    side = await lab.side("rabbitmq", RetryPolicy(max_retries=3, base=0.05, cap=0.4))
    worker = await lab.worker(side, BREAKER_FAIL_MAX="5", BREAKER_RESET_TIMEOUT="1.5").start()
    fake.fail_next(5, status=500)
    jobs = make_jobs(side.tag, 10)
    await side.publish_jobs(jobs)
    await wait_for(
        ledger.all_answered,
        40,
        "a reply to every job",
        details=lambda: ledger.summary() + "\n" + worker.console(),
    )
    assert await worker.terminate() == 0
    report = await lab.report(side, "LLM blip trips the breaker, jobs wait")
    errors = sorted({str(r.error) for r in ledger.replies if r.error})
    assert ledger.answered_ok() == set(ledger.sent), f"error replies: {errors}"
    assert report.figures["dead_lettered"] == 0
