"""Prices per model: seed 004's table, MODEL_PRICES, model families, local models."""

from __future__ import annotations

import logging

import pytest

from chatprocessor.features.pricing import DEFAULT_PRICES, Price, PriceTable


def test_the_seed_prices_are_built_in() -> None:
    table = PriceTable()
    assert table.price("openai", "gpt-4") == Price(0.03, 0.06)
    assert table.price("openai", "gpt-3.5-turbo") == Price(0.001, 0.002)
    assert table.price("anthropic", "claude-2") == Price(0.01, 0.03)
    assert table.price("openai", "gpt-4o-mini") == Price(0.00015, 0.0006)


def test_cost_is_per_thousand_tokens_of_each_kind() -> None:
    table = PriceTable()
    # 1,500 in at 0.03 and 500 out at 0.06 per 1,000.
    assert table.cost("openai", "gpt-4", 1500, 500) == pytest.approx(0.045 + 0.03)
    assert table.cost("openai", "gpt-4", 0, 0) == 0.0


def test_setting_overrides_and_extends_the_table() -> None:
    table = PriceTable.from_setting(
        {"gpt-4": {"input": 0.02, "output": 0.04}, "llama3": {"input": 0, "output": 0.0001}}
    )
    assert table.price("openai", "gpt-4") == Price(0.02, 0.04)
    assert table.price("ollama", "llama3") == Price(0.0, 0.0001)
    assert table.price("openai", "gpt-3.5-turbo") == DEFAULT_PRICES["gpt-3.5-turbo"]
    assert DEFAULT_PRICES["gpt-4"] == Price(0.03, 0.06)  # the built-in table is not changed


def test_an_ollama_tag_is_ignored() -> None:
    table = PriceTable({"llama3": Price(0.001, 0.002)})
    assert table.price("ollama", "llama3:8b") == Price(0.001, 0.002)
    assert table.price("ollama", "llama3:latest") == Price(0.001, 0.002)


@pytest.mark.parametrize(
    ("model", "family"),
    [
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4-0613", "gpt-4"),
        ("gpt-3.5-turbo-0125", "gpt-3.5-turbo"),
        ("GPT-4-0613", "gpt-4"),
    ],
)
def test_a_dated_model_takes_the_price_of_its_longest_family(model: str, family: str) -> None:
    assert PriceTable().price("openai", model) == DEFAULT_PRICES[family]


def test_a_family_must_be_followed_by_a_dash() -> None:
    # gpt-4o-mini is not gpt-4 priced, and gpt-4turbo is no gpt-4 either.
    table = PriceTable({"gpt-4": Price(1.0, 1.0)})
    assert table.price("openai", "gpt-4o-mini-2024") == DEFAULT_PRICES["gpt-4o-mini"]
    assert table.price("openai", "gpt-4turbo") is None


@pytest.mark.parametrize("provider", ["embedded", "ollama", "mock", "Ollama"])
def test_local_models_cost_the_local_compute_price(provider: str) -> None:
    table = PriceTable(local_price=0.0005)
    assert table.price(provider, "gemma3-270m") == Price(0.0005, 0.0005)
    assert table.cost(provider, "gemma3-270m", 1000, 3000) == pytest.approx(0.002)
    assert PriceTable().cost(provider, "gemma3-270m", 1000, 1000) == 0.0


def test_a_local_model_in_the_table_takes_its_own_price() -> None:
    table = PriceTable({"llama3": Price(0.0, 0.0001)}, local_price=0.5)
    assert table.price("ollama", "llama3:8b") == Price(0.0, 0.0001)


def test_an_unknown_remote_model_costs_nothing_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    table = PriceTable()
    with caplog.at_level(logging.WARNING, logger="chatprocessor.features.pricing"):
        assert table.price("openai", "o3-pro") is None
        assert table.cost("openai", "o3-pro", 1000, 1000) == 0.0
        assert table.cost("openai", "o3-pro", 5, 5) == 0.0
        assert table.cost(None, "mystery", 5, 5) == 0.0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "o3-pro" in warnings[0]
    assert "MODEL_PRICES" in warnings[0]
    assert "mystery" in warnings[1]


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"llama3": {"output": 0.1}}, r"'llama3'.*missing input"),
        ({"llama3": {"input": 0.1}}, r"'llama3'.*missing output"),
        ({"llama3": {}}, r"'llama3'.*missing input and output"),
        ({"gpt-x": {"input": -1, "output": 0.1}}, r"'gpt-x'.*input must be a number >= 0"),
        ({"gpt-x": {"input": 0.1, "output": float("nan")}}, r"'gpt-x'.*output"),
        ({"gpt-x": {"input": 0.1, "output": 0.2, "inptu": 1}}, r"'gpt-x'.*unknown field.*inptu"),
    ],
)
def test_a_bad_setting_names_the_model(setting: dict[str, dict[str, float]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PriceTable.from_setting(setting)


def test_a_negative_local_price_is_refused() -> None:
    with pytest.raises(ValueError, match="local compute price"):
        PriceTable(local_price=-0.1)
