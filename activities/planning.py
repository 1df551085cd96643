"""The planning activity: ask the planner model for a `Plan` (first plan, re-plan,
or correction of an invalid plan). Plan validity (cycles, unknown dependencies,
size) is the workflow's business (makima.dag); here the answer only has to
parse as a Plan.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.billing import every_try_billed
from activities.errors import expected_failure, translated_errors
from activities.heartbeat import Heartbeat
from makima.constants import MAX_TEXT_IN_HISTORY
from makima.contracts import ActivityName, PlanInput, PlanOutput
from makima.llm.client import LLMClient
from makima.llm.structured import structured_call
from makima.models import Plan
from makima.prompts.context import cached_context_block
from makima.prompts.planning import (
    PLAN_TOOL,
    PLAN_TOOL_DESCRIPTION,
    planning_request,
    planning_system,
)

PLAN_MAX_TOKENS = 16_000


def llm_not_configured(role: str) -> ApplicationError:
    return expected_failure(
        f"{role} needs an LLM but ANTHROPIC_API_KEY is not set on the worker. Set it in the "
        "worker's environment"
        + (" or give the directive a `plan`" if role == "planning" else
           " or use `evaluator: programmatic`") + ".",
        type="LLMNotConfigured",
        non_retryable=True,
    )


class PlanningActivities:
    """`llm` is None when no API key is configured; planning then fails with a
    message saying so (a directive with its own plan never calls it)."""

    def __init__(self, llm: LLMClient | None) -> None:
        self.llm = llm

    def activities(self) -> list[Callable[..., Any]]:
        return [self.plan_directive]

    @activity.defn(name=ActivityName.PLAN_DIRECTIVE.value)
    async def plan_directive(self, request: PlanInput) -> PlanOutput:
        if self.llm is None:
            raise llm_not_configured("planning")
        spec = request.spec
        model = spec.models.planner or self.llm.planner_model
        # a retried try also reports what the tries before it were billed; the heartbeats
        # bring a cancel of the directive, and the call in flight then says its bill
        with translated_errors(), every_try_billed() as earlier:
            async with Heartbeat():
                result = await structured_call(
                    self.llm,
                    output_type=Plan,
                    tool_name=PLAN_TOOL,
                    tool_description=PLAN_TOOL_DESCRIPTION,
                    model=model,
                    system=[
                        {"type": "text", "text": planning_system()},
                        cached_context_block(spec),
                    ],
                    messages=[{"role": "user", "content": planning_request(request)}],
                    max_tokens=PLAN_MAX_TOKENS,
                )
        return PlanOutput(plan=result.value, usage=earlier + result.usage,
                          raw_text=result.raw_text[:MAX_TEXT_IN_HISTORY])
