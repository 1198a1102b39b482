"""Sentiment and intent from one JSON answer, and suggested actions found in answers."""

from __future__ import annotations

import json
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest

from chatprocessor.core.errors import InvalidModelOutput, ProviderTimeout
from chatprocessor.core.job import ChatMessage
from chatprocessor.features.classify import (
    DEFAULT_INTENTS,
    SENTIMENTS,
    analysis_messages,
    analysis_schema,
    classify,
    extract_actions,
    merge_actions,
    provider_ask,
)
from chatprocessor.providers.ollama import OllamaProvider
from tests.fakes.ollama import FakeOllama

GOOD: dict[str, Any] = {
    "sentiment": "negative",
    "intent": "complaint",
    "confidence": 0.87,
    "suggested_actions": ["Apologise", "Offer a refund"],
}
EXPECTED = {
    "sentiment": "negative",
    "intent": "complaint",
    "confidence": 0.87,
    "suggestedActions": ["Apologise", "Offer a refund"],
}


class ScriptedAsk:
    """An Ask answering canned texts in order, recording what it was asked."""

    def __init__(self, *answers: str) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[list[ChatMessage], dict[str, Any]]] = []

    async def __call__(self, messages: list[ChatMessage], schema: dict[str, Any]) -> str:
        self.calls.append((messages, schema))
        return self.answers.pop(0)


# --- schema and prompts -----------------------------------------------------------------------


def test_schema_restricts_labels_and_requires_the_core_fields() -> None:
    schema = analysis_schema(("billing", "refund"))
    jsonschema.Draft202012Validator.check_schema(schema)
    props = schema["properties"]
    assert props["sentiment"]["enum"] == list(SENTIMENTS)
    assert props["intent"]["enum"] == ["billing", "refund", "other"]
    assert props["suggested_actions"]["maxItems"] == 5
    assert schema["required"] == ["sentiment", "intent", "confidence"]
    # "other" is not repeated, duplicates (any case) are dropped
    assert analysis_schema(("Other", "x", "X"))["properties"]["intent"]["enum"] == ["Other", "x"]
    assert analysis_schema()["properties"]["intent"]["enum"] == list(DEFAULT_INTENTS)


def test_schema_refuses_empty_labels_and_a_bare_string() -> None:
    with pytest.raises(ValueError, match="empty"):
        analysis_schema(("billing", " "))
    with pytest.raises(TypeError):
        analysis_schema("billing")


@pytest.mark.parametrize("focus", ["sentiment", "intent", "both"])
def test_prompt_names_the_text_the_labels_and_an_example(focus: str) -> None:
    messages = analysis_messages("My order never arrived!", intents=("billing",), focus=focus)
    assert [m.role for m in messages] == ["system", "user"]
    system, user = messages[0].content, messages[1].content
    assert "My order never arrived!" in user
    assert "billing, other" in system
    assert "positive, neutral, negative" in system
    assert "ONLY one JSON object" in system
    example = json.loads(system.split("Example of the format: ", 1)[1])
    jsonschema.validate(example, analysis_schema(("billing",)))  # the example is a valid answer
    assert example["intent"] == "billing"


def test_focus_changes_only_the_wording() -> None:
    prompts = {f: analysis_messages("hi", focus=f)[0].content for f in ("sentiment", "intent")}
    assert prompts["sentiment"] != prompts["intent"]
    assert "sentiment of the message" in prompts["sentiment"]
    assert "intent of the message" in prompts["intent"]
    with pytest.raises(ValueError, match="focus"):
        analysis_messages("hi", focus="mood")


# --- classify ---------------------------------------------------------------------------------


async def test_valid_json_is_one_call_and_normalized() -> None:
    ask = ScriptedAsk(json.dumps(GOOD))
    assert await classify(ask, "Where is my parcel?") == EXPECTED
    assert len(ask.calls) == 1
    messages, schema = ask.calls[0]
    assert schema == analysis_schema()
    assert "Where is my parcel?" in messages[-1].content


@pytest.mark.parametrize(
    "answer",
    [
        f"```json\n{json.dumps(GOOD, indent=2)}\n```",
        f"Sure! Here is the classification: {json.dumps(GOOD)} Hope this helps.",
        f"Here you go:\n```\n{json.dumps(GOOD)}\n```\nAnything else?",
    ],
    ids=["fence", "prose", "untagged-fence"],
)
async def test_json_wrapped_in_fences_or_chatter_is_found(answer: str) -> None:
    ask = ScriptedAsk(answer)
    assert await classify(ask, "text") == EXPECTED
    assert len(ask.calls) == 1


async def test_invalid_answer_then_valid_repair() -> None:
    ask = ScriptedAsk("I think the visitor is angry.", json.dumps(GOOD))
    assert await classify(ask, "This is the third time I write!") == EXPECTED
    assert len(ask.calls) == 2
    repair_messages, schema = ask.calls[1]
    assert schema == analysis_schema()
    assert repair_messages[-2] == ChatMessage("assistant", "I think the visitor is angry.")
    assert "could not be used" in repair_messages[-1].content
    assert "This is the third time I write!" in repair_messages[1].content  # same conversation


async def test_label_outside_the_schema_is_repaired() -> None:
    bad = dict(GOOD, sentiment="furious")
    ask = ScriptedAsk(json.dumps(bad), json.dumps(GOOD))
    assert await classify(ask, "text") == EXPECTED
    assert "furious" in ask.calls[1][0][-1].content  # the repair prompt says what was wrong


async def test_invalid_twice_raises_invalid_model_output() -> None:
    ask = ScriptedAsk("no idea", '{"sentiment": "positive"}')
    with pytest.raises(InvalidModelOutput, match="even after one repair") as caught:
        await classify(ask, "text")
    assert caught.value.transient is False
    assert len(ask.calls) == 2


async def test_no_repair_means_one_call_only() -> None:
    ask = ScriptedAsk("no idea", json.dumps(GOOD))
    with pytest.raises(InvalidModelOutput):
        await classify(ask, "text", repair=False)
    assert len(ask.calls) == 1


async def test_errors_of_ask_propagate_unchanged() -> None:
    async def failing(messages: list[ChatMessage], schema: dict[str, Any]) -> str:
        raise ProviderTimeout("no answer in 30 s")

    with pytest.raises(ProviderTimeout):
        await classify(failing, "text")


@pytest.mark.parametrize(
    ("given", "expected"),
    [(1.7, 1.0), (-0.3, 0.0), (0.876, 0.88), (1, 1.0), (0, 0.0)],
)
async def test_confidence_is_clamped_and_rounded(given: float, expected: float) -> None:
    ask = ScriptedAsk(json.dumps(dict(GOOD, confidence=given)))
    result = await classify(ask, "text")
    assert result["confidence"] == expected
    assert isinstance(result["confidence"], float)
    assert len(ask.calls) == 1  # clamping costs no repair


@pytest.mark.parametrize("confidence", ["NaN", "Infinity", '"high"', "true", "null"])
async def test_a_confidence_that_is_not_a_number_is_repaired(confidence: str) -> None:
    first = f'{{"sentiment": "neutral", "intent": "question", "confidence": {confidence}}}'
    ask = ScriptedAsk(first, json.dumps(GOOD))
    assert await classify(ask, "text") == EXPECTED
    assert len(ask.calls) == 2


async def test_labels_in_another_case_cost_no_repair() -> None:
    answer = dict(GOOD, sentiment=" Negative", intent="COMPLAINT")
    ask = ScriptedAsk(json.dumps(answer))
    assert await classify(ask, "text") == EXPECTED
    custom = ScriptedAsk(json.dumps(dict(GOOD, intent="billing")))
    result = await classify(custom, "text", intents=("Billing", "Refund"))
    assert result["intent"] == "Billing"  # the caller's own spelling


async def test_intents_are_restricted_to_the_given_list_plus_other() -> None:
    ask = ScriptedAsk(
        json.dumps(dict(GOOD, intent="complaint")), json.dumps(dict(GOOD, intent="other"))
    )
    result = await classify(ask, "text", intents=("billing", "refund"))
    assert result["intent"] == "other"
    assert len(ask.calls) == 2  # "complaint" is not allowed here: asked again
    assert ask.calls[0][1]["properties"]["intent"]["enum"] == ["billing", "refund", "other"]


async def test_suggested_actions_are_optional_cleaned_and_capped() -> None:
    minimal = ScriptedAsk('{"sentiment": "positive", "intent": "greeting", "confidence": 0.9}')
    assert (await classify(minimal, "Hello!"))["suggestedActions"] == []
    actions = ["  Call back ", "call back", "", "Refund", "Escalate", "Survey", "Log", "Extra"]
    camel = {k: v for k, v in GOOD.items() if k != "suggested_actions"}
    camel["suggestedActions"] = [*actions, "x" * 300]
    ask = ScriptedAsk(json.dumps(camel))
    result = await classify(ask, "text")
    assert result["suggestedActions"] == ["Call back", "Refund", "Escalate"]
    assert len(ask.calls) == 1
    long = ScriptedAsk(json.dumps(dict(GOOD, suggested_actions=["word " * 60])))
    (action,) = (await classify(long, "text"))["suggestedActions"]
    assert len(action) <= 120
    assert action.endswith("\u2026")


async def test_classify_through_an_ollama_provider_and_the_fake_server() -> None:
    async with FakeOllama(models=["llama2"]) as fake:
        fake.json_answer = {"sentiment": "Positive", "intent": "purchase", "confidence": 0.93}
        provider = OllamaProvider(fake.url, model="llama2", timeout=5, connect_timeout=1)
        try:
            result = await classify(provider_ask(provider), "I'd like to buy two more.")
        finally:
            await provider.close()
    assert result == {
        "sentiment": "positive",
        "intent": "purchase",
        "confidence": 0.93,
        "suggestedActions": [],
    }
    (request,) = [r["body"] for r in fake.requests if r["path"] == "/api/chat"]
    assert request["format"] == analysis_schema()  # the schema went as structured output
    assert request["options"]["temperature"] == 0
    assert "I'd like to buy two more." in request["messages"][-1]["content"]


# --- extract_actions / merge_actions ------------------------------------------------------------


def test_extract_actions_from_bullets() -> None:
    answer = (
        "I'm sorry about the delay. You can:\n"
        "- **Track** your parcel in [your account](https://example.com/a)\n"
        "* Contact the `carrier` directly\n"
        "  + Ask for a _refund_ if it is lost\n"
        "\u2022 Wait two more days\n"
        "Thanks for your patience."
    )
    assert extract_actions(answer) == [
        "Track your parcel in your account",
        "Contact the carrier directly",
        "Ask for a refund if it is lost",
        "Wait two more days",
    ]


def test_extract_actions_from_numbered_lists() -> None:
    answer = "Steps:\n1. Open settings\n2) Choose *Billing*\n10. Click [x] Save\nDone in 2024. Bye"
    assert extract_actions(answer) == ["Open settings", "Choose Billing", "Click [x] Save"]


@pytest.mark.parametrize(
    "answer",
    [
        "",
        "Just a plain answer with no list at all.",
        "**Bold** start, *emphasis*, and a rule:\n\n---\n\n- - -\n",
        "Code:\n```yaml\n- name: not an action\n- run: neither\n```\n",
        "In 1999. nothing happened; -5 degrees.",
    ],
    ids=["empty", "prose", "markup-and-rules", "code-fence", "numbers-in-prose"],
)
def test_extract_actions_none(answer: str) -> None:
    assert extract_actions(answer) == []


def test_extract_actions_dedupes_clips_and_limits() -> None:
    answer = "\n".join(
        ["- Call us", "- call  US", "- [ ] Email us", *(f"- Step {i}" for i in range(10))]
    )
    assert extract_actions(answer) == ["Call us", "Email us", "Step 0", "Step 1", "Step 2"]
    assert extract_actions(answer, limit=2) == ["Call us", "Email us"]
    assert extract_actions(answer, limit=0) == []
    (long,) = extract_actions("- " + "very long action " * 20)
    assert len(long) <= 120
    assert long.endswith("\u2026")
    assert long.startswith("very long action very")


def test_merge_actions_keeps_order_and_drops_duplicates() -> None:
    assert merge_actions(["Refund", " call back"], ["REFUND", "Call  back", "Survey"]) == [
        "Refund",
        "call back",
        "Survey",
    ]
    assert merge_actions(["a", "b"], ["c", "d"], limit=3) == ["a", "b", "c"]
    assert merge_actions([], ["", "  "]) == []
