"""What the model sees of a conversation: ownership, history, retrieved passages, token budget.

Before the call, ``prepare`` checks that the job's user owns its conversation
(the first user to write in a conversation owns it; anyone else is refused and
audited), loads the latest turns, retrieves passages for a ``rag`` job, and fits
system prompt + passages + history + new message into HISTORY_MAX_TOKENS, keeping
room for the answer. After the reply is confirmed, ``remember`` appends the turn.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from chatprocessor.core.errors import (
    Forbidden,
    ProviderError,
    ProviderUnavailable,
    StoreUnavailable,
)
from chatprocessor.core.job import ChatMessage, Job, Result
from chatprocessor.features.context import CachedCounter, EstimateCounter, TokenCounter, fit
from chatprocessor.features.history import ConversationKey, HistoryStore
from chatprocessor.ops import metrics

if TYPE_CHECKING:
    from chatprocessor.features.rag.retrieval import Retriever
    from chatprocessor.providers.base import Provider

log = logging.getLogger(__name__)
audit = logging.getLogger("chatprocessor.audit")

#: Room kept for the answer when the job sets no max_tokens.
DEFAULT_ANSWER_RESERVE = 256


@dataclass(slots=True)
class Prepared:
    """The conversation to send, and what went into it."""

    messages: list[ChatMessage]
    prompt_tokens: int
    #: True when counted with the model's tokenizer, False for an estimate.
    exact: bool
    history_used: int = 0
    history_dropped: int = 0
    sources: list[dict[str, Any]] = field(default_factory=list)


def conversation_key(job: Job) -> ConversationKey:
    user = "" if job.user_id is None else str(job.user_id)
    return ConversationKey(job.tenant, user, str(job.conversation_id))


class Conversations:
    """History and retrieval around each chat job; either may be absent."""

    def __init__(
        self,
        provider: Provider,
        *,
        history: HistoryStore | None,
        retriever: Callable[[], Awaitable[Retriever]] | None = None,
        max_tokens: int = 2048,
        max_messages: int = 50,
        system_prompt: str = "",
    ) -> None:
        self.provider = provider
        self.history = history
        #: Opens the document store at the first rag job: most workers never see one.
        self._open_retriever = retriever
        self._retriever: Retriever | None = None
        self._opening = asyncio.Lock()
        self.max_tokens = max_tokens
        self.max_messages = max_messages
        self.system_prompt = system_prompt
        self._counters: dict[str, TokenCounter] = {}

    async def start(self) -> None:
        if self.history is not None and not await self.history.ping():
            log.warning("history store unavailable; jobs will be answered without history")

    async def close(self) -> None:
        if self.history is not None:
            await self.history.close()
        if self._retriever is not None:
            await self._retriever.close()

    async def retriever(self) -> Retriever | None:
        if self._retriever is None and self._open_retriever is not None:
            async with self._opening:
                if self._retriever is None:
                    self._retriever = await self._open_retriever()
        return self._retriever

    async def counter(self, model: str | None) -> TokenCounter:
        """The model's own tokenizer when its provider has one, else an estimate (logged once)."""
        name = model or self.provider.default_model
        counter = self._counters.get(name)
        if counter is None:
            exact: TokenCounter | None = None
            offer = getattr(self.provider, "token_counter", None)
            if offer is not None:
                try:
                    exact = await offer(model)
                except Exception as exc:  # a tokenizer is a nicety: never fail a job for it
                    log.warning("token counter of %s unavailable: %s", self.provider.name, exc)
            counter = CachedCounter(exact or EstimateCounter())
            log.info("counting context tokens for model %r with %s", name, counter.name)
            self._counters[name] = counter
        return counter

    async def prepare(self, job: Job) -> Prepared:
        """Raises Forbidden when the job's user does not own the conversation."""
        key = conversation_key(job)
        history: list[ChatMessage] = []
        if self.history is not None:
            try:
                owner = await self.history.claim(key)
                if owner != key.user:
                    audit.warning(
                        "refused: user %r asked for conversation %r of tenant %r, owned by "
                        "another user (job %s)",
                        key.user,
                        key.conversation,
                        key.tenant,
                        job.id,
                    )
                    metrics.OWNERSHIP_REFUSED.inc()
                    raise Forbidden(f"conversation {key.conversation!r} belongs to another user")
                history = await self.history.load(key, self.max_messages)
            except StoreUnavailable as exc:
                log.warning("history store unavailable (%s): answering without history", exc)
        sources: list[dict[str, Any]] = []
        extra: list[ChatMessage] = []
        retriever = await self.retriever() if job.mode == "rag" else None
        if retriever is not None:
            from chatprocessor.features.rag.retrieval import rag_messages
            from chatprocessor.features.rag.retrieval import sources as source_list

            try:
                passages = await retriever.search(job.tenant, job.prompt)
            except StoreUnavailable as exc:  # transient: the job is tried again later
                raise ProviderUnavailable(f"document store unavailable: {exc}") from exc
            if passages:
                extra.append(rag_messages(passages))
                sources = source_list(passages)
            else:
                log.info("rag: no passage found for tenant %r", job.tenant)
        system = job.system_prompt if job.system_prompt is not None else self.system_prompt
        counter = await self.counter(job.model)
        new = ChatMessage("user", job.prompt, job.images)
        reserve = job.max_tokens or DEFAULT_ANSWER_RESERVE
        try:
            fitted = await fit(
                system=system or None,
                history=history,
                new=new,
                budget=self.max_tokens,
                counter=counter,
                reserve=reserve,
                extra=extra,
            )
        except ProviderError as exc:  # the tokenizer's server failed: estimate this time
            log.warning("token counter failed (%s): estimating this job's context", exc)
            fitted = await fit(
                system=system or None,
                history=history,
                new=new,
                budget=self.max_tokens,
                counter=EstimateCounter(),
                reserve=reserve,
                extra=extra,
            )
        if fitted.dropped:
            log.info(
                "context: %d of %d history message(s) left out to fit %d tokens",
                fitted.dropped,
                len(history),
                self.max_tokens,
            )
        return Prepared(
            messages=fitted.messages,
            prompt_tokens=fitted.prompt_tokens,
            exact=fitted.exact,
            history_used=len(history) - fitted.dropped,
            history_dropped=fitted.dropped,
            sources=sources,
        )

    async def remember(self, job: Job, result: Result) -> None:
        """Append the turn once its reply is confirmed; a partial answer is kept as it is."""
        if self.history is None or result.error is not None or not result.text:
            return
        turn = [ChatMessage("user", job.prompt), ChatMessage("assistant", result.text)]
        try:
            await self.history.append(conversation_key(job), job.id, turn)
        except StoreUnavailable as exc:
            log.warning("could not append the turn to the history: %s", exc)
