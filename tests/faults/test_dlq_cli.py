"""``chatprocessor dlq list|replay|purge`` end to end on RabbitMQ, after an outage that never
recovered: the dead letters are listed, replayed once the provider is back (every job is
then answered), and purged."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from chatprocessor.core.retry import RetryPolicy
from tests.faults.helpers import (
    Lab,
    Side,
    WorkerProcess,
    make_jobs,
    wait_for,
    worker_env,
)

pytestmark = [pytest.mark.faults, pytest.mark.rabbitmq, pytest.mark.timeout(90)]

JOBS = 10
RETRY = RetryPolicy(max_retries=1, base=0.05, cap=0.1)


async def dlq(env: dict[str, str], cwd: Path, *args: str) -> str:
    """Run ``python -m chatprocessor dlq ARGS``; return its stdout, failing on a non-zero exit."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "chatprocessor",
        "dlq",
        *args,
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 40)
    assert process.returncode == 0, f"dlq {' '.join(args)} -> {process.returncode}: {err.decode()}"
    return out.decode()


def json_lines(text: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in text.splitlines() if line.strip()]


async def park_everything(lab: Lab, side: Side, worker: WorkerProcess, n: int) -> None:
    """An outage that never ends: every job ends in the DLQ with an error reply."""
    fake, ledger = lab.fake, lab.ledger
    fake.fail_next(10**6, status=500)
    await side.publish_jobs(make_jobs(side.tag, n))

    async def parked() -> bool:
        return len(await side.dead_letters()) >= n

    await wait_for(parked, 30, f"{n} dead letters", details=worker.console)
    await wait_for(ledger.all_answered, 10, "an error reply each", details=ledger.summary)


async def test_dlq_list_replay_purge_through_the_cli(lab: Lab) -> None:
    fake, ledger, tmp_path = lab.fake, lab.ledger, lab.tmp_path
    side = await lab.side("rabbitmq", RETRY)
    worker = await lab.worker(side).start()
    await park_everything(lab, side, worker, JOBS)
    env = worker_env(side, fake, tmp_path)

    listed = json_lines(await dlq(env, tmp_path, "list", "--json"))
    assert sorted(e["message_id"] for e in listed) == sorted(ledger.sent)
    for entry in listed:
        assert entry["reason"] == "retries_exhausted"
        assert entry["attempts"] == RETRY.max_retries + 1
        assert "500" in entry["error"]
        assert entry["body"].encode() == ledger.sent[entry["message_id"]]
    # Listing leaves them where they are.
    assert len(await side.dead_letters()) == JOBS

    fake.fail_next(0)  # the provider is back
    out = await dlq(env, tmp_path, "replay")
    assert out.strip() == f"replayed {JOBS} dead letter(s)", out
    await wait_for(
        lambda: ledger.answered_ok() == set(ledger.sent),
        30,
        "every replayed job answered",
        details=lambda: ledger.summary() + "\n" + worker.console(),
    )
    assert json_lines(await dlq(env, tmp_path, "list", "--json")) == []

    # Something new to purge: a message that can never be processed.
    ledger.add_raw("poison-1", b"not json")
    await side.publish(b"not json", message_id="poison-1")

    async def one_parked() -> bool:
        return len(await side.dead_letters()) == 1

    await wait_for(one_parked, 20, "the poison dead-lettered", details=worker.console)
    out = await dlq(env, tmp_path, "purge", "--yes")
    assert out.strip() == "purged 1 dead letter(s)", out
    ledger.purged.add("poison-1")
    assert json_lines(await dlq(env, tmp_path, "list", "--json")) == []
    assert await worker.terminate() == 0, worker.console()

    report = await lab.report(
        side, "dlq list/replay/purge via CLI (dup = error+answer)", error_then_answer=True
    )
    report.assert_ok()
    assert report.figures["llm_calls"] == JOBS * (RETRY.max_retries + 1) + JOBS


async def test_answer_after_replay_is_not_a_duplicate_of_the_error_reply(lab: Lab) -> None:
    fake, ledger = lab.fake, lab.ledger
    side = await lab.side("rabbitmq", RETRY)
    worker = await lab.worker(side).start()
    await park_everything(lab, side, worker, 1)
    fake.fail_next(0)
    assert await side.admin.replay_dead_letters(side.input) == 1  # type: ignore[union-attr]
    await wait_for(lambda: len(ledger.replies) >= 2, 20, "the answer", details=worker.console)
    assert await worker.terminate() == 0
    error_reply, answer = ledger.replies
    assert error_reply.error and not answer.error
    # A consumer that drops duplicates keeps the first message of each message_id.
    seen: set[str | None] = set()
    kept = []
    for reply in ledger.replies:
        if reply.message_id not in seen:
            seen.add(reply.message_id)
            kept.append(reply)
    assert answer in kept, "the answer was dropped as a duplicate of the error reply"
