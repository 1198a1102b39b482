"""Fitting a conversation into the model's context window.

``fit`` keeps the system prompt, any extra messages (retrieved passages) and the
new message, then as much recent history as the token budget allows, whole
turns only: a model shown an answer without its question, or a question without
its answer, continues the conversation wrongly. Tokens are counted with the
model's own tokenizer when its provider offers one, else estimated.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from chatprocessor.core.job import ChatMessage

#: Tokens a chat template adds around each message (role marker, start/end of turn):
#: 3 to 4 in the common templates (ChatML, Gemma, Llama 3), so 4 errs on the safe side.
MESSAGE_OVERHEAD = 4
#: Characters per token of the estimate (see EstimateCounter).
CHARS_PER_TOKEN = 4
#: Texts a CachedCounter remembers: a few hundred conversations' worth of history.
CACHE_SIZE = 4096


class TokenCounter(Protocol):
    #: True: the model's own tokenizer; False: an estimate.
    exact: bool
    #: What counts, for logs: "llama.cpp tokenizer", "estimate (4 chars/token)".
    name: str

    async def count(self, texts: list[str]) -> list[int]:
        """Tokens of each text, in order (0 for an empty text)."""
        ...


class EstimateCounter:
    """About 4 characters per token: OpenAI's rule of thumb for English text with the BPE
    tokenizers of current models (Llama, Gemma and GPT vocabularies land near it).

    Counted in UTF-8 bytes, not characters: the same for ASCII, and closer for other
    scripts, where a character is 2 to 4 bytes and often a token or more. Code and
    unusual text still take more tokens than this says: keep a margin in the budget.
    """

    exact = False
    name = f"estimate ({CHARS_PER_TOKEN} chars/token)"

    async def count(self, texts: list[str]) -> list[int]:
        return [math.ceil(len(text.encode()) / CHARS_PER_TOKEN) for text in texts]


class CachedCounter:
    """A counter that remembers the last ``size`` texts it counted.

    The history is sent again with every turn: without a cache each job would
    tokenize the whole conversation anew (a round trip per text for a server's
    tokenizer). Keyed by a digest of the text, so long texts are not kept twice.
    """

    def __init__(self, counter: TokenCounter, *, size: int = CACHE_SIZE) -> None:
        self.inner = counter
        self.exact = counter.exact
        self.name = counter.name
        self._size = size
        self._cache: OrderedDict[bytes, int] = OrderedDict()

    async def count(self, texts: list[str]) -> list[int]:
        keys = [hashlib.blake2b(text.encode(), digest_size=16).digest() for text in texts]
        counted: dict[bytes, int] = {}
        missing: dict[bytes, str] = {}
        for key, text in zip(keys, texts, strict=True):
            if key in counted or key in missing:
                continue
            tokens = self._cache.get(key)
            if tokens is None:
                missing[key] = text
            else:
                self._cache.move_to_end(key)
                counted[key] = tokens
        if missing:  # one call for every text not seen yet
            fresh = await self.inner.count(list(missing.values()))
            for key, tokens in zip(missing, fresh, strict=True):
                counted[key] = self._cache[key] = tokens
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return [counted[key] for key in keys]


@dataclass(slots=True)
class Fitted:
    """The messages to send and what fitting them cost."""

    #: System (if any), kept history (oldest first), extra, then the new message.
    messages: list[ChatMessage]
    #: Counted total, MESSAGE_OVERHEAD per message included.
    prompt_tokens: int
    #: History messages left out.
    dropped: int
    #: True when counted by the model's tokenizer.
    exact: bool
    #: True when system + extra + new alone exceed budget - reserve (sent anyway, no history).
    over_budget: bool = False


async def fit(
    *,
    system: str | None,
    history: list[ChatMessage],
    new: ChatMessage,
    budget: int,
    counter: TokenCounter,
    reserve: int = 0,
    extra: list[ChatMessage] | None = None,
) -> Fitted:
    """Keep system, extra and new, then the newest whole turns of ``history`` that fit in
    ``budget - reserve`` tokens (``reserve``: room for the answer, e.g. max_tokens).

    A turn is a user message and the replies after it; replies before the first user
    message (their question was trimmed away) are always dropped. Older turns are not
    used once a newer one did not fit: the model must see the latest context unbroken.
    Images are not counted (their cost depends on the model's vision encoder).
    """
    extra = list(extra or [])
    head = [ChatMessage("system", system)] if system else []
    fixed = [*head, *extra, new]
    counts = await counter.count([m.content for m in fixed] + [m.content for m in history])
    fixed_cost = sum(counts[: len(fixed)]) + MESSAGE_OVERHEAD * len(fixed)
    costs = [tokens + MESSAGE_OVERHEAD for tokens in counts[len(fixed) :]]

    room = budget - max(reserve, 0) - fixed_cost
    kept_from = len(history)  # index of the oldest history message kept
    used = 0
    for start, end in reversed(_turns(history)):
        cost = sum(costs[start:end])
        if used + cost > room:
            break
        used += cost
        kept_from = start
    kept = history[kept_from:]
    return Fitted(
        messages=[*head, *kept, *extra, new],
        prompt_tokens=fixed_cost + used,
        dropped=len(history) - len(kept),
        exact=counter.exact,
        over_budget=room < 0,
    )


def _turns(history: list[ChatMessage]) -> list[tuple[int, int]]:
    """``(start, end)`` of each turn: a user message and what follows until the next one."""
    starts = [i for i, message in enumerate(history) if message.role == "user"]
    ends = [*starts[1:], len(history)] if starts else []
    return list(zip(starts, ends, strict=True))
