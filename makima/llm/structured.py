"""Structured answers from the model: ask for a pydantic model through a tool
whose input schema is that model's JSON schema, validate what comes back with
pydantic, and when it does not validate show the model the validation error
once and ask again. A second invalid answer raises `LLMOutputInvalid` with the
raw text kept for the event log.

The tool is offered with `tool_choice: auto` and the prompt asks the model to
call it: newer models refuse forced tool use while thinking, and an answer
given as plain JSON text is accepted too.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from makima.errors import LLMFatalError, MakimaError
from makima.llm.client import LLMClient
from makima.llm.pricing import usage_from_api
from makima.models import Usage

T = TypeVar("T", bound=BaseModel)

#: Longest raw answer kept on an error or a result (for the event log).
MAX_RAW_TEXT = 4000


class LLMOutputInvalid(LLMFatalError):
    """The model's answer did not validate, even after it was shown the error."""

    def __init__(self, message: str, raw_text: str = "", usage: Usage | None = None) -> None:
        super().__init__(message)
        self.raw_text = raw_text
        self.usage = usage or Usage()  # what the invalid answers cost


@dataclass
class StructuredResult(Generic[T]):
    value: T
    usage: Usage
    raw_text: str
    calls: int = 1
    #: What the model was told on the corrective turn, if there was one.
    corrections: list[str] = field(default_factory=list)


def tool_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The JSON schema of `model` with every `$ref` inlined: a self-contained
    object schema, which every tool-use model accepts."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                target = copy.deepcopy(defs[ref.removeprefix("#/$defs/")])
                rest = {k: v for k, v in node.items() if k != "$ref"}
                return inline({**target, **rest})
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    return inline(schema)


async def structured_call(
    llm: LLMClient,
    *,
    output_type: type[T],
    tool_name: str,
    tool_description: str,
    model: str,
    system: list[dict[str, Any]],
    messages: list[dict[str, Any]],
    max_tokens: int,
) -> StructuredResult[T]:
    """Ask `model` for an `output_type` through the tool `tool_name`.

    Raises LLMRetryableError / LLMFatalError from the client, and LLMOutputInvalid
    when the corrected answer is still invalid. `usage` sums every call made.
    """
    tool = {
        "name": tool_name,
        "description": tool_description,
        "input_schema": tool_schema(output_type),
    }
    conversation = list(messages)
    usage = Usage()
    corrections: list[str] = []
    raw_text = ""
    for call in (1, 2):
        try:
            response = await llm.create_message(
                model=model,
                max_tokens=max_tokens,
                system=system,
                tools=[tool],
                tool_choice={"type": "auto"},
                messages=conversation,
            )
        except MakimaError as exc:
            # the correction call failed: the first answer was billed all the same
            if call > 1:
                exc.usage = usage + (exc.usage or Usage())
            raise
        usage = usage + usage_from_api(model, response.usage)
        raw_text = _raw_text(response.content)
        tool_use = next(
            (b for b in response.content if b.type == "tool_use" and b.name == tool_name), None
        )
        if response.stop_reason == "refusal":
            raise LLMOutputInvalid(
                f"the model refused to answer ({tool_name}): {raw_text[:500]}", raw_text, usage
            )
        problem, value = _validate(output_type, tool_name, tool_use, response)
        if value is not None:
            return StructuredResult(value, usage, raw_text[:MAX_RAW_TEXT], call, corrections)
        if call == 2:
            raise LLMOutputInvalid(
                f"the model's {tool_name} answer did not validate after one correction: "
                f"{problem}",
                raw_text[:MAX_RAW_TEXT],
                usage,
            )
        corrections.append(problem)
        conversation = conversation + [
            {"role": "assistant", "content": _assistant_content(response.content)},
            {"role": "user", "content": _correction(tool_name, response.content, problem)},
        ]
    raise AssertionError("unreachable")  # the loop returns or raises


def _validate(output_type: type[T], tool_name: str, tool_use: Any,
              response: Any) -> tuple[str, T | None]:
    if tool_use is not None:
        candidate: Any = tool_use.input
    else:
        text = "\n".join(b.text for b in response.content if b.type == "text")
        candidate = _json_in_text(text)
        if candidate is None:
            reason = ("the answer was cut off at max_tokens"
                      if response.stop_reason == "max_tokens" else "no tool call")
            return (f"{reason}: answer by calling the `{tool_name}` tool with an input that "
                    "matches its schema", None)
    try:
        return "", output_type.model_validate(candidate)
    except ValidationError as exc:
        return _describe(exc), None


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors(include_url=False)[:20]:
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        lines.append(f"{where}: {error['msg']}")
    return "; ".join(lines)


def _correction(tool_name: str, blocks: list[Any], problem: str) -> list[dict[str, Any]]:
    """The corrective user turn. Every tool call of the previous answer gets its
    tool_result (the API refuses a turn that leaves one unanswered)."""
    text = (f"That answer is not valid: {problem}. Call `{tool_name}` again with a corrected, "
            "complete input.")
    calls = [b for b in blocks if b.type == "tool_use"]
    if not calls:
        return [{"type": "text", "text": text}]
    return [{"type": "tool_result", "tool_use_id": call.id, "is_error": True, "content": text}
            for call in calls]


def _assistant_content(blocks: list[Any]) -> list[dict[str, Any]]:
    """The assistant's blocks, sent back as they came (thinking blocks included:
    newer models require them unchanged on the next turn)."""
    content = []
    for block in blocks:
        data = block.model_dump(exclude_none=True, mode="json")
        if data.get("type") == "text" and not data.get("text"):
            continue  # the API refuses empty text blocks
        content.append(data)
    return content


def _raw_text(blocks: list[Any]) -> str:
    parts = []
    for block in blocks:
        if block.type == "text":
            parts.append(block.text)
        elif block.type == "tool_use":
            parts.append(json.dumps(block.input, ensure_ascii=False))
    return "\n".join(p for p in parts if p)


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def _json_in_text(text: str) -> Any:
    """A JSON object given as plain text (bare or in a code fence), or None."""
    for candidate in [*_FENCE.findall(text), text]:
        candidate = candidate.strip()
        start, end = candidate.find("{"), candidate.rfind("}")
        if start == -1 or end <= start:
            continue
        try:
            return json.loads(candidate[start:end + 1])
        except json.JSONDecodeError:
            continue
    return None
