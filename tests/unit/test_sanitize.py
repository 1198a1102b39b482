"""The response sanitizer on answers real models give: fences, prose, slips, cut-offs."""

from __future__ import annotations

import copy
import json
import time
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest

from chatprocessor.core.errors import InvalidModelOutput, ProviderError, ProviderTimeout
from chatprocessor.sanitize import (
    FOOD_ANALYSIS,
    extract_json,
    load_schema,
    repair_prompt,
    sanitize,
    validate,
)

PIZZA: dict[str, Any] = {
    "dish_name": "Pizza",
    "estimated_avg_calories": 285,
    "ingredients": ["cheese", "tomato sauce", "dough"],
    "total_avg_weight": 200,
    "contains": {"protein": 12.0, "carbs": 36.0, "fat": 10.0},
}
PIZZA_TEXT = json.dumps(PIZZA)  # the seed's example, as the model writes it


# --- extraction -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        PIZZA_TEXT,
        f"  \n{PIZZA_TEXT}\n\n",
        f"```json\n{PIZZA_TEXT}\n```",
        f"```\n{PIZZA_TEXT}\n```",
        f"```JSON\n{PIZZA_TEXT}\n```",
        f"```Json   \n{json.dumps(PIZZA, indent=2)}\n```\n",
        f"```{PIZZA_TEXT}```",
        f"Sure! Here it is:\n\n```json\n{PIZZA_TEXT}\n```\n\nLet me know if you need more.",
        f"Sure! Here is the analysis: {PIZZA_TEXT} Let me know if you need anything else.",
        f"Here you go:\n{json.dumps(PIZZA, indent=4)}",
    ],
    ids=[
        "bare",
        "whitespace",
        "json-fence",
        "untagged-fence",
        "upper-case-tag",
        "mixed-case-tag-indented",
        "one-line-fence",
        "prose-around-fence",
        "prose-around-object",
        "prose-then-indented",
    ],
)
def test_the_seed_analysis_is_found_wherever_the_model_puts_it(answer: str) -> None:
    assert extract_json(answer) == PIZZA


def test_braces_and_brackets_inside_strings_do_not_confuse_the_search() -> None:
    answer = (
        'Sure! {"note": "use {curly} braces and ] brackets", "nested": {"list": ["a}", "[b"]},'
        ' "quote": "she said \\"}\\""} Hope that helps {really}.'
    )
    assert extract_json(answer) == {
        "note": "use {curly} braces and ] brackets",
        "nested": {"list": ["a}", "[b"]},
        "quote": 'she said "}"',
    }


def test_prose_brackets_before_the_json_are_stepped_over() -> None:
    answer = 'I {think} the answer [see below] is: {"dish_name": "Soup", "tags": ["hot"]}'
    assert extract_json(answer) == {"dish_name": "Soup", "tags": ["hot"]}
    assert extract_json('A stray { here. {"a": 1}') == {"a": 1}
    assert extract_json("""[note: 5'10" tall] {"a": 1}""") == {"a": 1}


def test_arrays_are_json_output_too() -> None:
    assert extract_json('The ingredients: ["cheese", "dough"].') == ["cheese", "dough"]
    assert extract_json('```json\n[{"a": 1}, {"a": 2}]\n```') == [{"a": 1}, {"a": 2}]


def test_the_first_valid_block_wins() -> None:
    two_fences = '```json\n{"first": 1}\n```\nor\n```json\n{"second": 2}\n```'
    assert extract_json(two_fences) == {"first": 1}
    assert extract_json('{"first": 1} and also {"second": 2}') == {"first": 1}
    broken_then_valid = '```json\n{"first": oops}\n```\n```json\n{"second": 2}\n```'
    assert extract_json(broken_then_valid) == {"second": 2}


def test_a_json_fence_beats_other_languages_and_earlier_prose_json() -> None:
    answer = 'Format {"a": 0}:\n```python\nx = {"py": 1}\n```\n```json\n{"b": 2}\n```'
    assert extract_json(answer) == {"b": 2}


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ('{"a": 1, "b": [1, 2,],}', {"a": 1, "b": [1, 2]}),
        (
            "{'dish_name': 'Pizza', 'ingredients': ['cheese']}",
            {"dish_name": "Pizza", "ingredients": ["cheese"]},
        ),
        (
            '{"vegan": False, "spicy": True, "note": None}',
            {"vegan": False, "spicy": True, "note": None},
        ),
        ('{\n  "a": 1, // the count\n  "b": 2 /* grams */\n}', {"a": 1, "b": 2}),
        ("Result: {dish_name: 'Pizza', calories: 285}", {"dish_name": "Pizza", "calories": 285}),
        ("```json\n{'a': True,}\n```", {"a": True}),
    ],
    ids=[
        "trailing-commas",
        "single-quotes",
        "python-literals",
        "comments",
        "unquoted-keys",
        "fenced-slips",
    ],
)
def test_common_model_slips_are_forgiven(answer: str, expected: Any) -> None:
    assert extract_json(answer) == expected


def test_strict_json_is_preferred_over_repairing_an_earlier_slip() -> None:
    assert extract_json("{'sloppy': True} then {\"clean\": true}") == {"clean": True}


@pytest.mark.parametrize(
    "answer",
    [
        '{"dish_name": "Pizza", "ingredients": ["cheese", "tom',
        '```json\n{"dish_name": "Pizza", "contains": {"protein": 12.0}, "ingredients": [\n',
        '{"a": {"b": 1}, "c": [1, 2',
        '{"calories": 28',
        '{"ok": tru',
    ],
)
def test_truncated_json_is_refused_not_completed(answer: str) -> None:
    # Completing it would invent structure and silently drop the cut-off data; nested pieces
    # that happen to be complete ({"b": 1}, {"protein": 12.0}) are not the answer either.
    with pytest.raises(InvalidModelOutput, match="cut off"):
        extract_json(answer)


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("", "empty"),
        ("   \n\t ", "empty"),
        ("I'm sorry, I can't analyse this photo.", "no valid JSON object or array"),
        ("Use {curly} braces or [see above] for details.", "no valid JSON object or array"),
        ("42", "bare JSON value"),
        ('"just a string"', "bare JSON value"),
        ("```json\nnull\n```", "bare JSON value"),
        ('{"a": [1, 2}', "no valid JSON object or array"),
    ],
)
def test_answers_without_a_json_object_or_array_are_refused(answer: str, reason: str) -> None:
    with pytest.raises(InvalidModelOutput, match=reason) as info:
        extract_json(answer)
    assert isinstance(info.value, ProviderError)
    assert info.value.transient is False


@pytest.mark.parametrize(
    "answer",
    ["{a " * 30_000, "[" * 100_000 + "]" * 100_000, "x [" * 30_000, '"' * 50_000 + "{" * 1000],
    ids=["stray-openers", "absurd-nesting", "unclosed-prose", "quotes-then-braces"],
)
def test_pathological_answers_fail_fast(answer: str) -> None:
    started = time.perf_counter()
    with pytest.raises(InvalidModelOutput):
        extract_json(answer)
    assert time.perf_counter() - started < 2.0


# --- schema validation ------------------------------------------------------------------------


def test_the_food_schema_accepts_the_seed_example_and_extras() -> None:
    schema = load_schema(FOOD_ANALYSIS)
    validate(PIZZA, schema)
    validate({**PIZZA, "confidence": 0.8, "contains": {**PIZZA["contains"], "fiber": 2}}, schema)


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (lambda d: d.pop("dish_name"), "'dish_name' is a required property"),
        (lambda d: d["contains"].pop("fat"), "$.contains: 'fat' is a required property"),
        (lambda d: d.update(estimated_avg_calories="285 kcal"), "$.estimated_avg_calories"),
        (lambda d: d["contains"].update(protein="12g"), "$.contains.protein"),
        (lambda d: d.update(ingredients="cheese"), "$.ingredients"),
        (lambda d: d["ingredients"].append(3), "$.ingredients[3]"),
        (lambda d: d.update(total_avg_weight=-5), "$.total_avg_weight"),
    ],
)
def test_schema_errors_name_the_failing_field(change: Any, where: str) -> None:
    bad = copy.deepcopy(PIZZA)
    change(bad)
    with pytest.raises(InvalidModelOutput, match="does not follow the schema") as info:
        validate(bad, load_schema(FOOD_ANALYSIS))
    assert where in str(info.value)


def test_no_schema_accepts_any_json_and_the_schema_draft_is_honoured() -> None:
    validate({"anything": [1, None]}, None)
    draft7 = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "array",
        "items": {"type": "integer"},
    }
    validate([1, 2], draft7)
    with pytest.raises(InvalidModelOutput, match=r"\$\[1\]"):
        validate([1, "2"], draft7)


def test_an_invalid_schema_is_the_callers_bug_not_the_models() -> None:
    with pytest.raises(jsonschema.SchemaError):
        validate({}, {"type": "not-a-type"})


def test_unknown_schema_names_are_refused_clearly() -> None:
    for name in ("no_such_schema", "../chat", ""):
        with pytest.raises(
            ValueError, match=r"unknown schema .*; shipped schemas: .*food_analysis"
        ):
            load_schema(name)
    assert load_schema(FOOD_ANALYSIS)["type"] == "object"
    assert load_schema(FOOD_ANALYSIS) is not load_schema(FOOD_ANALYSIS)  # callers may mutate


# --- sanitize and its one repair attempt ------------------------------------------------------


class Repairer:
    """A repair callback that answers from a script and records what it was told."""

    def __init__(self, *answers: str) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, str]] = []

    async def __call__(self, bad_answer: str, reason: str) -> str:
        self.calls.append((bad_answer, reason))
        return self.answers.pop(0)


async def test_a_good_answer_needs_no_repair() -> None:
    repair = Repairer()
    answer = f"Here it is:\n```json\n{PIZZA_TEXT}\n```"
    assert await sanitize(answer, schema=load_schema(FOOD_ANALYSIS), repair=repair) == PIZZA
    assert repair.calls == []


async def test_one_repair_fixes_an_answer_without_json() -> None:
    repair = Repairer(f"```json\n{PIZZA_TEXT}\n```")
    bad = "It looks like a pizza, about 285 kcal."
    assert await sanitize(bad, schema=load_schema(FOOD_ANALYSIS), repair=repair) == PIZZA
    assert len(repair.calls) == 1
    assert repair.calls[0][0] == bad
    assert "no valid JSON" in repair.calls[0][1]


async def test_one_repair_fixes_an_answer_that_breaks_the_schema() -> None:
    no_name = {k: v for k, v in PIZZA.items() if k != "dish_name"}
    repair = Repairer(PIZZA_TEXT)
    assert (
        await sanitize(json.dumps(no_name), schema=load_schema(FOOD_ANALYSIS), repair=repair)
        == PIZZA
    )
    [(_, reason)] = repair.calls
    assert "'dish_name' is a required property" in reason


async def test_a_second_failure_is_final_and_names_both_reasons() -> None:
    repair = Repairer(json.dumps({**PIZZA, "dish_name": 7}), PIZZA_TEXT)
    with pytest.raises(InvalidModelOutput) as info:
        await sanitize("Sorry, no idea.", schema=load_schema(FOOD_ANALYSIS), repair=repair)
    message = str(info.value)
    assert "after one repair attempt" in message
    assert "no valid JSON object or array" in message  # the first answer's reason
    assert "$.dish_name" in message  # the repaired answer's reason
    assert len(repair.calls) == 1  # never a second repair, even though the next would succeed


async def test_without_a_repair_callback_the_first_failure_is_final() -> None:
    with pytest.raises(InvalidModelOutput, match="cut off"):
        await sanitize('{"dish_name": "Pizza", "ingr')
    assert await sanitize("Answer: [1, 2]") == [1, 2]


async def test_a_failing_repair_call_propagates_so_transient_errors_stay_retryable() -> None:
    async def timeout(bad_answer: str, reason: str) -> str:
        raise ProviderTimeout("no answer in 30 s")

    with pytest.raises(ProviderTimeout):
        await sanitize("nothing here", repair=timeout)


# --- the repair prompt ------------------------------------------------------------------------


def test_the_repair_prompt_gives_the_reason_the_schema_and_the_bad_answer() -> None:
    schema = load_schema(FOOD_ANALYSIS)
    prompt = repair_prompt(
        "It is a pizza.", "the answer holds no valid JSON object or array", schema
    )
    assert "the answer holds no valid JSON object or array" in prompt
    assert "only one valid JSON object or array" in prompt
    assert json.dumps(schema, ensure_ascii=False) in prompt
    assert "It is a pizza." in prompt
    assert "schema" not in repair_prompt("x", "cut off", None)


def test_the_repair_prompt_clips_a_huge_bad_answer() -> None:
    prompt = repair_prompt("x" * 100_000, "cut off", None)
    assert len(prompt) < 5000
    assert prompt.endswith("[...]")


async def test_repair_prompt_composes_into_a_repair_callback() -> None:
    schema = load_schema(FOOD_ANALYSIS)
    sent: list[str] = []

    async def ask_model_again(bad_answer: str, reason: str) -> str:
        sent.append(repair_prompt(bad_answer, reason, schema))
        return PIZZA_TEXT

    assert (
        await sanitize("```json\n{'dish_name': 'Pizza'\n```", schema=schema, repair=ask_model_again)
        == PIZZA
    )
    assert len(sent) == 1
    assert "Your previous answer was:\n```json\n{'dish_name': 'Pizza'" in sent[0]
