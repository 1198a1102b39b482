"""Fitting a conversation into a token budget: whole turns, newest first, fixed parts kept."""

from __future__ import annotations

import pytest

from chatprocessor.core.job import ChatMessage
from chatprocessor.features.context import (
    MESSAGE_OVERHEAD,
    CachedCounter,
    EstimateCounter,
    fit,
)

pytestmark = pytest.mark.timeout(10)


class WordCounter:
    """One token per word, exact: budgets in tests are easy to work out. Counts its calls."""

    exact = True
    name = "words"

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    async def count(self, texts: list[str]) -> list[int]:
        self.calls.append(list(texts))
        return [len(text.split()) for text in texts]


def cost(*texts: str) -> int:
    """What fit() charges for these messages with WordCounter."""
    return sum(len(t.split()) + MESSAGE_OVERHEAD for t in texts)


def turns(n: int) -> list[ChatMessage]:
    """n user/assistant turns, 2 words each: q1 a1 ... (oldest first)."""
    out: list[ChatMessage] = []
    for i in range(1, n + 1):
        out += [ChatMessage("user", f"question {i}"), ChatMessage("assistant", f"answer {i}")]
    return out


NEW = ChatMessage("user", "the new question")


async def test_everything_fits_when_the_budget_allows() -> None:
    counter = WordCounter()
    history = turns(3)
    fitted = await fit(system="be brief", history=history, new=NEW, budget=1000, counter=counter)
    assert [m.content for m in fitted.messages] == [
        "be brief",
        *(m.content for m in history),
        "the new question",
    ]
    assert fitted.messages[0].role == "system"
    assert fitted.dropped == 0
    assert fitted.exact is True
    assert fitted.over_budget is False
    expected = cost("be brief", "the new question", *(m.content for m in history))
    assert fitted.prompt_tokens == expected
    assert len(counter.calls) == 1  # every text counted in one call


async def test_keeps_the_newest_turns_that_fit() -> None:
    history = turns(5)
    fixed = cost("be brief", "the new question")
    turn = cost("question 1", "answer 1")
    budget = fixed + 2 * turn + turn // 2  # room for two turns and a half
    fitted = await fit(
        system="be brief", history=history, new=NEW, budget=budget, counter=WordCounter()
    )
    kept = [m.content for m in fitted.messages[1:-1]]
    assert kept == ["question 4", "answer 4", "question 5", "answer 5"]
    assert fitted.dropped == 6
    assert fitted.prompt_tokens == fixed + 2 * turn <= budget


async def test_never_splits_a_pair() -> None:
    history = turns(3)
    fixed = cost("the new question")
    turn = cost("question 1", "answer 1")
    # One token short of two turns: the older turn's answer alone would fit, it is not kept.
    fitted = await fit(
        system=None, history=history, new=NEW, budget=fixed + 2 * turn - 1, counter=WordCounter()
    )
    assert [m.content for m in fitted.messages] == ["question 3", "answer 3", "the new question"]
    assert fitted.dropped == 4


async def test_an_orphan_answer_at_the_start_is_dropped() -> None:
    """Trimming by count may cut a turn's question away: its answer alone is not shown."""
    history = [ChatMessage("assistant", "answer 0"), *turns(2)]
    fitted = await fit(system=None, history=history, new=NEW, budget=1000, counter=WordCounter())
    assert [m.content for m in fitted.messages] == [
        "question 1",
        "answer 1",
        "question 2",
        "answer 2",
        "the new question",
    ]
    assert fitted.dropped == 1


async def test_reserve_keeps_room_for_the_answer() -> None:
    history = turns(4)
    fixed = cost("the new question")
    turn = cost("question 1", "answer 1")
    budget = fixed + 4 * turn
    whole = await fit(system=None, history=history, new=NEW, budget=budget, counter=WordCounter())
    assert whole.dropped == 0
    reserved = await fit(
        system=None,
        history=history,
        new=NEW,
        budget=budget,
        counter=WordCounter(),
        reserve=2 * turn,
    )
    assert reserved.dropped == 4
    assert reserved.prompt_tokens + 2 * turn <= budget


async def test_extra_sits_between_history_and_the_new_message() -> None:
    passages = ChatMessage("system", "passage one passage two")
    history = turns(2)
    fitted = await fit(
        system="sys",
        history=history,
        new=NEW,
        budget=1000,
        counter=WordCounter(),
        extra=[passages],
    )
    assert fitted.messages == [ChatMessage("system", "sys"), *history, passages, NEW]
    assert fitted.prompt_tokens == cost(
        "sys", "passage one passage two", "the new question", *(m.content for m in history)
    )


async def test_fixed_parts_over_budget_are_kept_and_history_dropped() -> None:
    long_system = " ".join(["word"] * 100)
    history = turns(2)
    passages = ChatMessage("system", "some passage")
    fitted = await fit(
        system=long_system,
        history=history,
        new=NEW,
        budget=50,
        counter=WordCounter(),
        extra=[passages],
    )
    assert fitted.messages == [ChatMessage("system", long_system), passages, NEW]
    assert fitted.dropped == len(history)
    assert fitted.over_budget is True
    assert fitted.prompt_tokens == cost(long_system, "some passage", "the new question") > 50


async def test_no_history() -> None:
    fitted = await fit(system=None, history=[], new=NEW, budget=100, counter=WordCounter())
    assert fitted.messages == [NEW]
    assert fitted.dropped == 0
    assert fitted.prompt_tokens == cost("the new question")


async def test_history_of_answers_only_is_dropped() -> None:
    history = [ChatMessage("assistant", "answer 1"), ChatMessage("assistant", "answer 2")]
    fitted = await fit(system=None, history=history, new=NEW, budget=100, counter=WordCounter())
    assert fitted.messages == [NEW]
    assert fitted.dropped == 2


async def test_the_estimate_is_marked_inexact() -> None:
    fitted = await fit(
        system=None, history=turns(1), new=NEW, budget=100, counter=EstimateCounter()
    )
    assert fitted.exact is False


async def test_estimate_counter() -> None:
    counter = EstimateCounter()
    assert counter.exact is False
    assert "4 chars/token" in counter.name
    assert await counter.count(["", "a", "abcd", "abcde", "x" * 400]) == [0, 1, 1, 2, 100]
    # Bytes, not characters: a 3-byte character weighs its bytes.
    assert await counter.count(["日本語"]) == [3]


async def test_cached_counter_counts_each_text_once() -> None:
    inner = WordCounter()
    counter = CachedCounter(inner)
    assert counter.exact is True and counter.name == "words"
    assert await counter.count(["a b", "c", "a b"]) == [2, 1, 2]
    assert inner.calls == [["a b", "c"]]  # duplicates inside one call counted once
    assert await counter.count(["c", "d e f", "a b"]) == [1, 3, 2]
    assert inner.calls[-1] == ["d e f"]  # only the new text
    assert await counter.count(["a b", "c"]) == [2, 1]
    assert len(inner.calls) == 2  # all cached: no call at all


async def test_cached_counter_forgets_the_least_recently_used() -> None:
    inner = WordCounter()
    counter = CachedCounter(inner, size=2)
    await counter.count(["one"])
    await counter.count(["two words"])
    await counter.count(["one"])  # "one" is now the most recent
    await counter.count(["three more words"])  # evicts "two words"
    inner.calls.clear()
    assert await counter.count(["one", "three more words", "two words"]) == [1, 3, 2]
    assert inner.calls == [["two words"]]


async def test_history_counted_once_across_turns_with_a_cache() -> None:
    """What the cache is for: the next turn re-sends the same history."""
    inner = WordCounter()
    counter = CachedCounter(inner)
    history = turns(3)
    await fit(system="sys", history=history, new=NEW, budget=1000, counter=counter)
    history += [NEW, ChatMessage("assistant", "an answer")]
    await fit(
        system="sys",
        history=history,
        new=ChatMessage("user", "next"),
        budget=1000,
        counter=counter,
    )
    assert inner.calls[-1] == ["next", "an answer"]
