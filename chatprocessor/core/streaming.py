"""Generation in progress: the text so far, and stopping it when a cancel request arrives."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

#: Sends one batch of text (the batch's index, the text).
PieceSink = Callable[[int, str], Awaitable[None]]


@dataclass(slots=True)
class Generation:
    """What a streamed call produced so far; kept when it is stopped early."""

    model: str
    provider: str
    started: float = field(default_factory=time.perf_counter)
    parts: list[str] = field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    first_token_at: float | None = None
    #: Pieces not yet sent (batched by time), and the index of the next batch.
    pending: list[str] = field(default_factory=list)
    sent: int = 0
    last_flush: float = 0.0

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def ms_to_first_token(self) -> int | None:
        if self.first_token_at is None:
            return None
        return round((self.first_token_at - self.started) * 1000)

    async def flush(self, send: PieceSink) -> None:
        """Send what is pending as one batch."""
        if self.pending:
            text = "".join(self.pending)
            self.pending.clear()
            await send(self.sent, text)
            self.sent += 1
        self.last_flush = time.perf_counter()


async def until_cancelled(work: Coroutine[Any, Any, None], cancelled: asyncio.Event) -> bool:
    """Run ``work``; stop it as soon as ``cancelled`` is set. True when it was stopped.

    Stopping closes the provider's stream, which ends generation (the embedded model
    stops at its next token; an HTTP provider sees the connection close).
    """
    if cancelled.is_set():
        work.close()
        return True
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(cancelled.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when our caller is cancelled (e.g. a timeout)
        waiter.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        return True
    task.result()  # the work's own error
    return False
