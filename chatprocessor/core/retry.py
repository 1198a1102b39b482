"""How long a failed job waits before its next attempt, and through which delay queue.

Backoff is exponential with "full jitter" (a uniform draw between 0 and the
exponential step, floored at RETRY_BACKOFF_BASE), so workers that failed together
do not come back together. A provider's Retry-After is a floor: never earlier.

RabbitMQ delays through a fixed set of queues, one per tier, each with a queue
TTL that dead-letters back to the input (``x-message-ttl`` on the queue, never
per-message TTLs that would block behind each other). Tiers are powers of two
from the base up to the cap. A delay goes through the largest tier not longer
than it; the message carries its due time (``x-retry-at``) and, arriving
early, takes the next hop for the remainder without spending an attempt. So
any delay, including a Retry-After longer than the cap, is served within one
base step, in at most log2(cap / base) + 1 hops.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chatprocessor.settings import Settings


#: The longest wait honoured, seconds: a provider's Retry-After (or a message's due time)
#: beyond it is cut to it, so no job parks for days on one odd header.
MAX_WAIT = 3600.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_retries: int = 5
    base: float = 1.0
    cap: float = 300.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(settings.max_retries, settings.retry_backoff_base, settings.retry_backoff_cap)

    def should_retry(self, attempts_made: int) -> bool:
        """``attempts_made`` failed attempts so far (this one included)."""
        return attempts_made <= self.max_retries

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before attempt ``attempt + 1``, after ``attempt`` failures."""
        step = min(self.cap, self.base * 2 ** max(0, attempt - 1))
        wait = max(self.base, random.uniform(0, step))
        if retry_after is not None and retry_after > wait:
            # The provider knows best: honour it even beyond the cap, up to MAX_WAIT,
            # plus jitter so that the jobs it held back do not all return at once.
            wait = min(retry_after, max(MAX_WAIT, self.cap)) + random.uniform(0, self.base)
        return wait

    def total_backoff(self) -> float:
        """The longest time all retries of one job can spend in backoff."""
        return float(sum(min(self.cap, self.base * 2**k) for k in range(self.max_retries)))

    def tiers(self) -> list[float]:
        """Delay-queue lengths in seconds: base, 2*base, 4*base, ... and the cap."""
        tiers = []
        tier = self.base
        while tier < self.cap:
            tiers.append(tier)
            tier *= 2
        tiers.append(self.cap)
        return tiers


def pick_tier(tiers: list[float], delay: float) -> float:
    """The longest tier not longer than ``delay`` (the shortest one if all are longer)."""
    fitting = [tier for tier in tiers if tier <= delay]
    return max(fitting) if fitting else min(tiers)


def tier_name(queue: str, tier: float) -> str:
    """``UserPromptReceived.retry.4000ms``: the delay queue of ``queue`` for one tier."""
    return f"{queue}.retry.{round(tier * 1000)}ms"
