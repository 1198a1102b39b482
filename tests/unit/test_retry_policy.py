"""Backoff with jitter, Retry-After as a floor, and the delay-queue tiers."""

from __future__ import annotations

import random

import pytest

from chatprocessor.core.retry import RetryPolicy, pick_tier, tier_name


def test_attempts_are_bounded_by_max_retries() -> None:
    policy = RetryPolicy(max_retries=2)
    assert [policy.should_retry(n) for n in (1, 2, 3)] == [True, True, False]
    assert not RetryPolicy(max_retries=0).should_retry(1)


def test_delay_grows_exponentially_with_jitter_and_stays_within_base_and_cap() -> None:
    random.seed(7)
    policy = RetryPolicy(base=1.0, cap=30.0)
    for attempt in range(1, 12):
        step = min(30.0, 2 ** (attempt - 1))
        delays = [policy.delay(attempt) for _ in range(300)]
        assert all(1.0 <= d <= max(1.0, step) for d in delays)
        if step >= 4:  # jitter: the draws spread over the step, not one value
            assert max(delays) - min(delays) > step / 2
    assert max(policy.delay(20) for _ in range(300)) <= 30.0


def test_retry_after_is_a_floor_even_beyond_the_cap() -> None:
    policy = RetryPolicy(base=1.0, cap=10.0)
    assert all(policy.delay(1, retry_after=7.5) >= 7.5 for _ in range(50))
    assert all(120.0 <= policy.delay(1, retry_after=120.0) <= 121.0 for _ in range(50))
    assert policy.delay(1, retry_after=10 * 3600) <= 3601.0  # capped at an hour (MAX_WAIT)
    # A Retry-After shorter than the backoff does not shorten it.
    assert all(policy.delay(6, retry_after=0.1) >= 1.0 for _ in range(50))


def test_tiers_are_powers_of_two_up_to_the_cap() -> None:
    assert RetryPolicy(base=1.0, cap=300.0).tiers() == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]
    assert RetryPolicy(base=0.5, cap=0.5).tiers() == [0.5]
    assert RetryPolicy(base=2.0, cap=8.0).tiers() == [2, 4, 8]


@pytest.mark.parametrize(
    ("delay", "tier"), [(0.2, 1), (1, 1), (1.9, 1), (2, 2), (13, 8), (299, 256), (1000, 300)]
)
def test_a_delay_takes_the_longest_tier_not_longer_than_it(delay: float, tier: float) -> None:
    assert pick_tier(RetryPolicy(base=1.0, cap=300.0).tiers(), delay) == tier


def test_hops_through_tiers_add_up_to_the_delay_within_one_base_step() -> None:
    tiers = RetryPolicy(base=1.0, cap=300.0).tiers()
    for delay in (1.0, 3.7, 13.0, 300.0, 777.7):
        waited, hops = 0.0, 0
        while delay - waited > 0.05:
            waited += pick_tier(tiers, delay - waited)
            hops += 1
        assert delay <= waited < delay + 1.0
        assert hops <= 12


def test_tier_queue_names_carry_milliseconds() -> None:
    assert tier_name("UserPromptReceived", 0.05) == "UserPromptReceived.retry.50ms"
    assert tier_name("q", 300) == "q.retry.300000ms"


def test_total_backoff_is_the_sum_of_the_capped_steps() -> None:
    assert RetryPolicy(max_retries=5, base=1.0, cap=300.0).total_backoff() == 31.0
    assert RetryPolicy(max_retries=4, base=1.0, cap=4.0).total_backoff() == 11.0
    assert RetryPolicy(max_retries=0).total_backoff() == 0.0
