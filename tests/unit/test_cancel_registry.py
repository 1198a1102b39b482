"""CancelRegistry: only a job's owner cancels it; early cancels wait a bounded time."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import REGISTRY

from chatprocessor.events.cancel import CANCELLED, CancelRegistry, parse_cancel

pytestmark = pytest.mark.timeout(10)


class Clock:
    """A hand-moved monotonic clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def cancels(outcome: str) -> float:
    return REGISTRY.get_sample_value("chatprocessor_cancels_total", {"outcome": outcome}) or 0.0


def test_the_owner_cancels_a_running_job() -> None:
    registry = CancelRegistry()
    scope = registry.register("job-1", "alice")
    before = cancels("accepted")

    assert not scope.cancelled
    assert registry.request("job-1", "alice") is True

    assert scope.event.is_set()
    assert scope.reason == CANCELLED
    assert cancels("accepted") == before + 1
    assert registry.request("job-1", "alice") is True  # again: still cancelled, counted once
    assert cancels("accepted") == before + 1


def test_another_user_is_refused_and_audited(caplog: pytest.LogCaptureFixture) -> None:
    registry = CancelRegistry()
    scope = registry.register("job-2", "alice")
    before = cancels("refused")

    with caplog.at_level(logging.WARNING, logger="chatprocessor.audit"):
        assert registry.request("job-2", "mallory") is False

    assert not scope.event.is_set()
    assert scope.reason is None
    assert cancels("refused") == before + 1
    [record] = [r for r in caplog.records if r.name == "chatprocessor.audit"]
    assert record.levelno == logging.WARNING
    assert "mallory" in record.getMessage()
    assert "job-2" in record.getMessage()
    assert record.owner_id == "alice"  # type: ignore[attr-defined]
    # The owner can still cancel afterwards.
    assert registry.request("job-2", "alice") is True


def test_a_cancel_that_overtook_its_job_applies_when_the_job_starts() -> None:
    registry = CancelRegistry()
    before = cancels("early")

    assert registry.request("job-3", "alice") is False  # not running here (yet)
    assert registry.remembered() == 1
    scope = registry.register("job-3", "alice")

    assert scope.event.is_set()
    assert scope.reason == CANCELLED
    assert cancels("early") == before + 1
    assert registry.remembered() == 0  # used up: a redelivery of the job runs


def test_an_early_cancel_from_another_user_is_refused_at_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CancelRegistry()
    registry.request("job-4", "mallory")

    with caplog.at_level(logging.WARNING, logger="chatprocessor.audit"):
        scope = registry.register("job-4", "alice")

    assert not scope.event.is_set()
    assert any(r.name == "chatprocessor.audit" for r in caplog.records)


def test_another_users_early_cancel_does_not_hide_the_owners() -> None:
    registry = CancelRegistry()
    registry.request("job-5", "alice")
    registry.request("job-5", "mallory")  # must not overwrite alice's request

    assert registry.register("job-5", "alice").event.is_set()


def test_an_early_cancel_expires_after_remember_seconds() -> None:
    clock = Clock()
    registry = CancelRegistry(remember=60, clock=clock)
    registry.request("old", "alice")
    clock.now += 30
    registry.request("young", "alice")
    clock.now += 31  # "old" is 61 s old, "young" 31 s

    assert registry.remembered() == 1
    assert not registry.register("old", "alice").event.is_set()
    assert registry.register("young", "alice").event.is_set()


def test_an_expired_entry_is_not_applied_even_before_pruning() -> None:
    clock = Clock()
    registry = CancelRegistry(remember=10, clock=clock)
    registry.request("job-6", "alice")
    clock.now += 11

    assert not registry.register("job-6", "alice").event.is_set()


def test_early_cancels_are_bounded_oldest_dropped_first() -> None:
    registry = CancelRegistry(limit=3)
    for n in range(5):
        registry.request(f"job-{n}", "alice")

    assert registry.remembered() == 3
    assert not registry.register("job-0", "alice").event.is_set()
    assert not registry.register("job-1", "alice").event.is_set()
    assert registry.register("job-4", "alice").event.is_set()


def test_a_finished_job_is_forgotten() -> None:
    registry = CancelRegistry()
    scope = registry.register("job-7", "alice")
    registry.unregister("job-7")

    assert registry.get("job-7") is None
    assert registry.request("job-7", "alice") is False
    assert not scope.event.is_set()
    registry.unregister("job-7")  # twice is harmless


def test_the_first_reason_wins() -> None:
    scope = CancelRegistry().register("job-8", "alice")
    scope.cancel("timeout")
    scope.cancel()

    assert scope.reason == "timeout"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"jobId": "j", "userId": "u"}, ("j", "u")),
        ({b"jobId": b"j", b"userId": b"u"}, ("j", "u")),
        ({"jobId": 42, "userId": "u"}, ("42", "u")),
        ({"jobId": "j"}, None),
        ({"jobId": "", "userId": "u"}, None),
        ({b"jobId": b"\xff", b"userId": b"u"}, None),
        ({"jobId": ["j"], "userId": "u"}, None),
        ({"jobId": True, "userId": "u"}, None),
    ],
)
def test_parse_cancel(fields: dict[object, object], expected: tuple[str, str] | None) -> None:
    assert parse_cancel(fields) == expected
