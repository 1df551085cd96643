"""makima's LLM layer: the Anthropic client built from the environment and its
error classification (client), structured answers validated with pydantic
(structured), and the price table that turns usage into dollars (pricing).
Prompts live in makima/prompts."""

from makima.llm.client import (
    DEFAULT_EVALUATOR_MODEL,
    DEFAULT_PLANNER_MODEL,
    LLMClient,
    classify_error,
    llm_from_env,
)
from makima.llm.pricing import cost_usd, usage_from_api
from makima.llm.structured import LLMOutputInvalid, StructuredResult, structured_call

__all__ = [
    "DEFAULT_EVALUATOR_MODEL",
    "DEFAULT_PLANNER_MODEL",
    "LLMClient",
    "LLMOutputInvalid",
    "StructuredResult",
    "classify_error",
    "cost_usd",
    "llm_from_env",
    "structured_call",
    "usage_from_api",
]
