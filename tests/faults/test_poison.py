"""Poison messages among good ones: only they go to the dead-letter queue, unchanged and
with headers saying why; the chat still hears about the one whose conversation id is
readable; every good job is answered and the LLM never sees the poison."""

from __future__ import annotations

from datetime import datetime

import orjson
import pytest

from chatprocessor.contracts.chat import reply_message_id
from chatprocessor.transports.base import (
    DLQ_ATTEMPTS,
    DLQ_ERROR,
    DLQ_FAILED_AT,
    DLQ_QUEUE,
    DLQ_REASON,
)
from tests.faults.helpers import KINDS, Lab, make_jobs, metric, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.timeout(60)]

#: message id -> (body, what the dead letter's error must mention)
POISON = {
    "poison-json": (b'{"conversation_id": 77, "message": "unterminated', "JSON"),
    "poison-utf8": (b"\xff\xfe\x00not text at all", "UTF-8"),
    "poison-schema": (orjson.dumps({"conversation_id": 4242, "user_id": 1}), "message"),
}
SCHEMA_CONVERSATION = 4242


@pytest.mark.parametrize("kind", KINDS)
async def test_poison_messages_alone_are_dead_lettered(kind: str, lab: Lab) -> None:
    ledger = lab.ledger
    side = await lab.side(kind)
    jobs = make_jobs(side.tag, 21)
    poison = list(POISON.items())
    for n, chunk in enumerate((jobs[:7], jobs[7:14], jobs[14:])):
        await side.publish_jobs(chunk)
        message_id, (body, _) = poison[n]
        ledger.add_raw(message_id, body)
        await side.publish(body, message_id=message_id, headers={"x-tenant": "acme"})
    worker = await lab.worker(side).start()

    async def all_parked() -> bool:
        return len(await side.dead_letters()) >= len(POISON)

    await wait_for(all_parked, 20, "the poison dead-lettered", details=worker.console)
    good = {job.id for job in jobs}
    await wait_for(
        lambda: ledger.all_answered(good | {"poison-schema"}),
        20,
        "the good jobs answered",
        details=lambda: ledger.summary() + "\n" + worker.console(),
    )
    text = await worker.metrics()
    assert await worker.terminate() == 0, worker.console()
    report = await lab.report(side, "poison among good jobs")
    report.assert_ok()

    letters = {letter.message_id: letter for letter in ledger.dead}
    assert set(letters) == set(POISON), sorted(map(str, letters))
    for message_id, (body, mention) in POISON.items():
        letter = letters[message_id]
        assert letter.body == body, f"{message_id}: body changed in the DLQ"
        assert letter.headers[DLQ_REASON] == "rejected"
        assert mention in letter.headers[DLQ_ERROR], letter.headers
        assert letter.headers[DLQ_QUEUE] == side.input
        assert int(letter.headers[DLQ_ATTEMPTS]) == 0  # no attempt was spent on it
        datetime.fromisoformat(str(letter.headers[DLQ_FAILED_AT]))
        assert letter.headers["x-tenant"] == "acme"  # the message's own headers stay

    # Only the schema error has a readable conversation id: one error reply, to it.
    assert ledger.answered() - good == {"poison-schema"}
    [error_reply] = ledger.by_request()["poison-schema"]
    data = error_reply.data
    assert data["conversation_id"] == SCHEMA_CONVERSATION
    assert data["message"] == "" and "message" in data["error"]
    assert error_reply.message_id == reply_message_id("poison-schema", error=True)

    assert ledger.answered_ok() == good
    assert report.figures["llm_calls"] == len(jobs)  # the poison never reached the LLM
    assert metric(text, "chatprocessor_dead_letters_total", reason="rejected") == len(POISON)
    assert metric(text, "chatprocessor_messages_total", outcome="rejected") == len(POISON)
