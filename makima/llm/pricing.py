"""What a model call cost: the per-model price table (the one place to update
when Anthropic changes its prices) and the arithmetic that turns an API usage
block into makima's `Usage` with `cost_usd`.

Prices are US dollars per million tokens, from Anthropic's pricing pages as of
2026-11. Cache writes are the 5-minute kind (what `cache_control: ephemeral`
asks for); 1-hour writes, when the API reports them, cost twice the input rate.

A model missing from the table is priced at the most expensive entry, so the
cost breaker errs towards stopping early rather than overspending; a warning
names the model so the table can be completed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from makima.models import Usage

logger = logging.getLogger(__name__)

PER_MILLION = 1_000_000


@dataclass(frozen=True)
class ModelPrice:
    input: float  # USD per million uncached input tokens
    output: float
    cache_write: float  # 5-minute cache write
    cache_read: float
    #: Some models bill every token of a request at `long_prompt_multiplier` times
    #: the rates above when the prompt (input + cache reads + writes) is longer.
    long_prompt_threshold: int | None = None
    long_prompt_multiplier: float = 1.0

    @property
    def cache_write_1h(self) -> float:
        return self.input * 2


_OPUS_5 = ModelPrice(input=5.0, output=25.0, cache_write=6.25, cache_read=0.50)
_SONNET_4 = ModelPrice(input=3.0, output=15.0, cache_write=3.75, cache_read=0.30)
_FABLE_5 = ModelPrice(input=10.0, output=50.0, cache_write=12.50, cache_read=1.00)
_FABLE_5_1 = ModelPrice(input=10.0, output=50.0, cache_write=12.50, cache_read=0.25)

#: Keyed by model name; a dated name (`claude-haiku-4-5-20251001`) matches the
#: longest key it starts with.
PRICES: dict[str, ModelPrice] = {
    "claude-fable-5-1": _FABLE_5_1,
    "claude-mythos-5-1": _FABLE_5_1,
    "claude-fable-5": _FABLE_5,
    "claude-mythos-5": _FABLE_5,
    "claude-opus-5-5": ModelPrice(input=4.0, output=20.0, cache_write=5.0, cache_read=0.20),
    "claude-opus-5": _OPUS_5,
    "claude-opus-4-8": _OPUS_5,
    "claude-opus-4-7": _OPUS_5,
    "claude-opus-4-6": _OPUS_5,
    "claude-opus-4-5": _OPUS_5,
    "claude-opus-4-1": ModelPrice(input=15.0, output=75.0, cache_write=18.75, cache_read=1.50),
    "claude-sonnet-5-5": ModelPrice(input=2.0, output=10.0, cache_write=2.50, cache_read=0.10),
    "claude-sonnet-5": ModelPrice(input=2.0, output=10.0, cache_write=2.50, cache_read=0.20),
    "claude-sonnet-4-6": _SONNET_4,
    "claude-sonnet-4-5": _SONNET_4,
    "claude-sonnet-4": _SONNET_4,
    "claude-haiku-5-5": ModelPrice(
        input=0.10, output=0.50, cache_write=0.125, cache_read=0.01,
        long_prompt_threshold=100_000, long_prompt_multiplier=5.0,
    ),
    "claude-haiku-4-5": ModelPrice(input=1.0, output=5.0, cache_write=1.25, cache_read=0.10),
}

_MOST_EXPENSIVE = max(PRICES.values(), key=lambda p: (p.output, p.input))


def price_for(model: str) -> ModelPrice:
    """The price of `model`: an exact entry, else the longest entry it starts
    with, else the most expensive entry (with a warning)."""
    if model in PRICES:
        return PRICES[model]
    matches = [name for name in PRICES if model.startswith(name)]
    if matches:
        return PRICES[max(matches, key=len)]
    logger.warning("no price for model %r in makima/llm/pricing.py; charging the highest rate",
                   model)
    return _MOST_EXPENSIVE


def cost_usd(
    model: str,
    *,
    input_tokens: int = 0,
    output_tokens: int = 0,
    cache_read_tokens: int = 0,
    cache_write_tokens: int = 0,
    cache_write_1h_tokens: int = 0,
) -> float:
    """Dollars for one call. `cache_write_tokens` counts every cache write; the
    part of it written with a 1-hour lifetime is `cache_write_1h_tokens`."""
    price = price_for(model)
    cache_write_5m = max(cache_write_tokens - cache_write_1h_tokens, 0)
    dollars = (
        input_tokens * price.input
        + output_tokens * price.output
        + cache_read_tokens * price.cache_read
        + cache_write_5m * price.cache_write
        + cache_write_1h_tokens * price.cache_write_1h
    ) / PER_MILLION
    prompt = input_tokens + cache_read_tokens + cache_write_tokens
    if price.long_prompt_threshold is not None and prompt > price.long_prompt_threshold:
        dollars *= price.long_prompt_multiplier
    return round(dollars, 6)


def usage_from_api(model: str, api_usage: Any) -> Usage:
    """makima's `Usage` (tokens and cost) from the `usage` block of a Messages API
    response (the SDK's object or its dict form)."""

    def field(name: str) -> int:
        value = api_usage.get(name) if isinstance(api_usage, dict) else getattr(api_usage, name, 0)
        return int(value or 0)

    breakdown = (api_usage.get("cache_creation") if isinstance(api_usage, dict)
                 else getattr(api_usage, "cache_creation", None))
    one_hour = 0
    if breakdown is not None:
        raw = (breakdown.get("ephemeral_1h_input_tokens") if isinstance(breakdown, dict)
               else getattr(breakdown, "ephemeral_1h_input_tokens", 0))
        one_hour = int(raw or 0)

    input_tokens = field("input_tokens")
    output_tokens = field("output_tokens")
    cache_read = field("cache_read_input_tokens")
    cache_write = field("cache_creation_input_tokens")
    return Usage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        cost_usd=cost_usd(
            model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cache_read_tokens=cache_read,
            cache_write_tokens=cache_write,
            cache_write_1h_tokens=one_hour,
        ),
    )
