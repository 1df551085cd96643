"""The price table and the cost arithmetic: what the cost breaker and the status
query add up must be what the table says a call costs."""

from __future__ import annotations

import pytest
from anthropic.types import Usage as ApiUsage

from makima.llm.client import DEFAULT_EVALUATOR_MODEL, DEFAULT_PLANNER_MODEL
from makima.llm.pricing import PRICES, cost_usd, price_for, usage_from_api


def test_cost_of_a_usage_is_the_price_tables_arithmetic() -> None:
    price = PRICES["claude-sonnet-5-5"]
    expected = (1_000 * price.input + 500 * price.output + 2_000 * price.cache_read
                + 3_000 * price.cache_write) / 1_000_000

    usage = usage_from_api("claude-sonnet-5-5", {
        "input_tokens": 1_000, "output_tokens": 500,
        "cache_read_input_tokens": 2_000, "cache_creation_input_tokens": 3_000,
    })

    assert usage.input_tokens == 1_000
    assert usage.output_tokens == 500
    assert usage.cache_read_tokens == 2_000
    assert usage.cache_write_tokens == 3_000
    assert usage.cost_usd == pytest.approx(expected, abs=1e-9)
    # and in plain numbers, so a wrong table entry is caught too: $2/$10/$0.10/$2.50 per MTok
    assert usage.cost_usd == pytest.approx(0.002 + 0.005 + 0.0002 + 0.0075)


def test_sdk_usage_object_with_one_hour_cache_writes() -> None:
    api_usage = ApiUsage.model_validate({
        "input_tokens": 10, "output_tokens": 20, "cache_read_input_tokens": 0,
        "cache_creation_input_tokens": 1_000,
        "cache_creation": {"ephemeral_5m_input_tokens": 600, "ephemeral_1h_input_tokens": 400},
    })
    price = PRICES["claude-opus-5-5"]

    usage = usage_from_api("claude-opus-5-5", api_usage)

    expected = (10 * price.input + 20 * price.output + 600 * price.cache_write
                + 400 * price.input * 2) / 1_000_000
    assert usage.cost_usd == pytest.approx(expected, abs=1e-9)


def test_dated_model_names_use_their_family_price() -> None:
    assert price_for("claude-haiku-4-5-20251001") == PRICES["claude-haiku-4-5"]
    assert price_for("claude-sonnet-4-5-20250929") == PRICES["claude-sonnet-4-5"]


def test_unknown_model_is_charged_the_highest_rate() -> None:
    # Erring high keeps the cost breaker from letting an unpriced model overspend.
    highest = max(p.output for p in PRICES.values())
    assert price_for("some-future-model").output == highest
    assert cost_usd("some-future-model", output_tokens=1_000_000) == highest


def test_long_prompts_of_haiku_5_5_cost_more() -> None:
    short = cost_usd("claude-haiku-5-5", input_tokens=100_000, output_tokens=1_000)
    long = cost_usd("claude-haiku-5-5", input_tokens=100_001, output_tokens=1_000)
    assert long == pytest.approx(short * 5, rel=1e-3)


def test_default_models_are_priced() -> None:
    assert DEFAULT_PLANNER_MODEL in PRICES
    assert DEFAULT_EVALUATOR_MODEL in PRICES
