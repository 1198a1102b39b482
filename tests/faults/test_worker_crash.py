"""The worker process dies (kill -9) or is stopped (SIGTERM) with jobs in flight.

A real ``python -m chatprocessor run`` answers from the fake Ollama; a second one is
started afterwards. Nothing may be lost, and a job whose reply was seen is never sent
to the LLM again (the reply store in DATA_DIR answers the redelivery).
"""

from __future__ import annotations

import time

import pytest

from chatprocessor.core.retry import RetryPolicy
from tests.faults.helpers import KINDS, Lab, make_jobs, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.timeout(90)]

JOBS = 40


@pytest.mark.parametrize("kind", KINDS)
async def test_kill_9_with_jobs_in_flight_then_restart(kind: str, lab: Lab) -> None:
    fake, ledger = lab.fake, lab.ledger
    fake.latency = 0.3
    side = await lab.side(kind)
    await side.publish_jobs(make_jobs(side.tag, JOBS))

    first = await lab.worker(side).start()
    await wait_for(
        lambda: len(ledger.answered()) >= 10 and fake.in_flight >= 4,
        30,
        "10 answers with more jobs in flight",
        details=first.console,
    )
    first.kill()
    assert await first.wait_exit(10) == -9
    asked_before_kill = len(fake.chat_calls())

    second = await lab.worker(side).start()
    await wait_for(
        ledger.all_answered,
        40,
        "every job answered after the restart",
        details=lambda: ledger.summary() + "\n" + second.console(),
    )
    assert await second.terminate() == 0, second.console()
    report = await lab.report(side, "kill -9 mid-load, restart")
    report.assert_ok()
    assert report.figures["answered"] == JOBS
    assert report.figures["dead_lettered"] == 0
    # Only jobs the dead worker held can have been asked twice: at most a prefetch's worth.
    assert report.figures["llm_calls"] - JOBS <= 8, report.figures
    assert asked_before_kill < report.figures["llm_calls"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("grace", ["finish", "return"])
async def test_sigterm_under_load_then_restart(kind: str, grace: str, lab: Lab) -> None:
    """``finish``: the grace period covers the jobs in flight, they are answered before exit.
    ``return``: it does not; they go back to the queue untouched, for the next worker."""
    fake, ledger = lab.fake, lab.ledger
    finishing = grace == "finish"
    fake.latency = 0.4 if finishing else 3.0
    side = await lab.side(kind)
    jobs = make_jobs(side.tag, 30)
    await side.publish_jobs(jobs)

    first = await lab.worker(side, GRACEFUL_TIMEOUT="10" if finishing else "0.2").start()
    await wait_for(
        lambda: fake.in_flight >= 4 and (not finishing or len(ledger.answered()) >= 5),
        30,
        "jobs in flight",
        details=first.console,
    )
    started = time.monotonic()
    code = await first.terminate(timeout=20)
    took = time.monotonic() - started
    assert code == 0, first.console()
    asked = {ledger.prompts[prompt] for prompt, _ in fake.chat_calls()}
    answered_by_first = set(ledger.answered())
    if finishing:
        # Everything the LLM had started on was answered before the process exited.
        assert asked <= answered_by_first, sorted(asked - answered_by_first)
    else:
        assert took < 5, f"exit took {took:.1f}s with GRACEFUL_TIMEOUT=0.2"
        assert not asked & answered_by_first  # cut off, not answered

    fake.latency = 0.05
    second = await lab.worker(side).start()
    await wait_for(
        ledger.all_answered,
        30,
        "every job answered after the restart",
        details=lambda: ledger.summary() + "\n" + second.console(),
    )
    assert await second.terminate() == 0, second.console()
    report = await lab.report(side, f"SIGTERM mid-load ({grace} in grace)")
    report.assert_ok()
    assert report.figures["answered"] == len(jobs)
    if finishing:
        assert report.figures["llm_calls"] == len(jobs)  # nothing asked twice
        assert report.figures["duplicated"] == 0


@pytest.mark.parametrize("kind", KINDS)
async def test_kill_9_during_an_outage_keeps_the_delayed_jobs(kind: str, lab: Lab) -> None:
    """Jobs waiting in the delay queues (RabbitMQ) or as delayed rows (local) when the worker
    dies are not the worker's: they come back to the next one, with their attempt counts."""
    fake, ledger = lab.fake, lab.ledger
    side = await lab.side(kind, RetryPolicy(max_retries=8, base=0.2, cap=0.4))
    fake.fail_next(25, status=503)
    await side.publish_jobs(make_jobs(side.tag, 20))
    first = await lab.worker(side).start()
    await wait_for(
        lambda: len(fake.chat_calls()) >= 15, 20, "the outage under way", details=first.console
    )
    first.kill()
    assert await first.wait_exit(10) == -9
    second = await lab.worker(side).start()
    await wait_for(
        ledger.all_answered,
        40,
        "every job answered once the provider is back",
        details=lambda: ledger.summary() + "\n" + second.console(),
    )
    assert await second.terminate() == 0, second.console()
    report = await lab.report(side, "kill -9 during an LLM outage")
    report.assert_ok()
    assert ledger.answered_ok() == set(ledger.sent)
    assert report.figures["dead_lettered"] == 0
