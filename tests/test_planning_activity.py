"""The planning activity with the real SDK against the loopback Messages API:
the plan that comes back, what the planner is told (first plan, re-plan,
correction of a rejected plan), the one corrective turn for an answer that does
not validate, prompt caching of the directive context, and cost."""

from __future__ import annotations

import json

import pytest
from temporalio.exceptions import ApplicationError

from activities.planning import PlanningActivities
from makima.contracts import PlanInput
from makima.llm.client import LLMClient, llm_from_env
from makima.llm.pricing import PRICES
from makima.models import (
    DirectiveSpec,
    ModelChoice,
    Plan,
    PlannedStep,
    Repository,
    StepState,
    StepStatus,
)
from tests.messages_server import MessagesServer, error_reply, text_reply, tool_reply, usage

PLANNER_MODEL = "claude-sonnet-5-5"

GOOD_PLAN = {
    "summary": "model first, then the API on top of it",
    "steps": [
        {"name": "todo-model", "description": "the Todo model",
         "task_plan": "Add todo.py with a Todo dataclass (title, done).",
         "verify": ["python -c 'import todo'"]},
        {"name": "todo-api", "description": "HTTP API", "depends_on": ["todo-model"],
         "task_plan": "Add api.py exposing GET /todos using todo.Todo."},
    ],
}


def make_spec(**fields) -> DirectiveSpec:
    return DirectiveSpec(
        title="Todo service",
        goal="Build a small todo service",
        requirements=["store todos in memory"],
        acceptance_criteria=["GET /todos lists todos"],
        constraints=["standard library only"],
        repository=Repository(path="/srv/todo", base_branch="trunk"),
        **fields,
    )


@pytest.fixture
def llm(messages_server: MessagesServer, monkeypatch: pytest.MonkeyPatch) -> LLMClient:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", messages_server.base_url)
    monkeypatch.setenv("MAKIMA_PLANNER_MODEL", PLANNER_MODEL)
    client = llm_from_env()
    assert client is not None
    return client


def user_text(body: dict) -> str:
    """Every text of the request's messages, joined."""
    parts = []
    for message in body["messages"]:
        content = message["content"]
        if isinstance(content, str):
            parts.append(content)
            continue
        for block in content:
            if block.get("type") == "text":
                parts.append(block["text"])
            elif block.get("type") == "tool_result":
                parts.append(json.dumps(block.get("content")))
    return "\n".join(parts)


async def test_plan_is_returned_validated_and_costed(
    llm: LLMClient, messages_server: MessagesServer,
) -> None:
    messages_server.script(tool_reply("submit_plan", GOOD_PLAN,
                                      used=usage(1200, 300, cache_read=0, cache_write=900)))

    output = await PlanningActivities(llm).plan_directive(
        PlanInput(directive_id="d-1", spec=make_spec()))

    assert isinstance(output.plan, Plan)
    assert output.plan.names == ["todo-model", "todo-api"]
    assert output.plan.step("todo-api").depends_on == ["todo-model"]
    assert output.plan.step("todo-model").verify == ["python -c 'import todo'"]
    price = PRICES[PLANNER_MODEL]
    assert output.usage.input_tokens == 1200
    assert output.usage.cache_write_tokens == 900
    assert output.usage.cost_usd == pytest.approx(
        (1200 * price.input + 300 * price.output + 900 * price.cache_write) / 1e6)
    assert "todo-model" in output.raw_text

    body = messages_server.requests[0].body
    assert body["model"] == PLANNER_MODEL
    tool = body["tools"][0]
    assert tool["name"] == "submit_plan"
    assert "steps" in tool["input_schema"]["properties"]
    assert "$ref" not in json.dumps(tool["input_schema"])  # self-contained schema
    prompt = messages_server.requests[0].text
    for fact in ("Todo service", "Build a small todo service", "store todos in memory",
                 "GET /todos lists todos", "standard library only", "/srv/todo", "trunk",
                 "depends_on", "self-contained", "parallel", "lowercase"):
        assert fact in prompt, fact


async def test_directive_context_is_a_cached_prefix(
    llm: LLMClient, messages_server: MessagesServer,
) -> None:
    messages_server.script(tool_reply("submit_plan", GOOD_PLAN))

    await PlanningActivities(llm).plan_directive(PlanInput(directive_id="d-1", spec=make_spec()))

    system = messages_server.requests[0].body["system"]
    cached = [block for block in system if "cache_control" in block]
    assert len(cached) == 1
    assert cached[0]["cache_control"] == {"type": "ephemeral"}
    assert "Build a small todo service" in cached[0]["text"]
    assert system[-1] == cached[0]  # the breakpoint ends the shared prefix


async def test_spec_model_choice_overrides_the_worker_default(
    llm: LLMClient, messages_server: MessagesServer,
) -> None:
    messages_server.script(tool_reply("submit_plan", GOOD_PLAN))

    await PlanningActivities(llm).plan_directive(PlanInput(
        directive_id="d-1", spec=make_spec(models=ModelChoice(planner="claude-opus-4-7"))))

    assert messages_server.requests[0].body["model"] == "claude-opus-4-7"


async def test_replan_prompt_carries_existing_steps_statuses_and_reason(
    llm: LLMClient, messages_server: MessagesServer,
) -> None:
    messages_server.script(tool_reply("submit_plan", {"steps": [
        {"name": "todo-api-v2", "depends_on": ["todo-model"], "task_plan": "Retry the API."}]}))
    request = PlanInput(
        directive_id="d-1",
        spec=make_spec(),
        generation=3,
        reason="step 'todo-api' was blocked: rework budget spent, tests kept failing",
        existing_steps=[
            StepState(name="todo-model", status=StepStatus.PASSED, attempts=1, score=0.92),
            StepState(name="todo-api", status=StepStatus.BLOCKED, depends_on=["todo-model"],
                      attempts=4, score=0.3, reason="GET /todos returned 500"),
        ],
    )

    output = await PlanningActivities(llm).plan_directive(request)

    assert output.plan.names == ["todo-api-v2"]
    prompt = user_text(messages_server.requests[0].body)
    assert "generation 3" in prompt
    assert "rework budget spent, tests kept failing" in prompt
    assert "`todo-model`: passed" in prompt
    assert "`todo-api`: blocked" in prompt
    assert "GET /todos returned 500" in prompt
    assert "new name" in prompt  # how to redo the work of a passed step
    assert "may depend on passed steps by name (todo-model)" in prompt


async def test_rejected_plan_and_its_errors_go_back_to_the_planner(
    llm: LLMClient, messages_server: MessagesServer,
) -> None:
    cyclic = Plan(steps=[PlannedStep(name="a", depends_on=["b"]),
                         PlannedStep(name="b", depends_on=["a"])])
    messages_server.script(tool_reply("submit_plan", GOOD_PLAN))

    output = await PlanningActivities(llm).plan_directive(PlanInput(
        directive_id="d-1", spec=make_spec(), previous_plan=cyclic,
        validation_errors=["the plan has a cycle: a -> b -> a"]))

    assert output.plan.names == ["todo-model", "todo-api"]
    prompt = user_text(messages_server.requests[0].body)
    assert "the plan has a cycle: a -> b -> a" in prompt
    assert '"name": "a"' in prompt  # the rejected plan itself is shown


async def test_malformed_plan_gets_one_correction_and_the_corrected_plan_is_used(
    llm: LLMClient, messages_server: MessagesServer,
) -> None:
    malformed = {"steps": [{"name": "todo-model", "depends_on": "nothing", "extra": 1}]}
    messages_server.script(
        tool_reply("submit_plan", malformed, tool_id="toolu_bad", used=usage(1000, 100)),
        tool_reply("submit_plan", GOOD_PLAN, used=usage(1500, 200)),
    )

    output = await PlanningActivities(llm).plan_directive(
        PlanInput(directive_id="d-1", spec=make_spec()))

    assert output.plan.names == ["todo-model", "todo-api"]
    assert len(messages_server.requests) == 2
    second = messages_server.requests[1].body["messages"]
    assert second[1]["role"] == "assistant"
    assert second[1]["content"][-1]["id"] == "toolu_bad"  # the bad call is shown back
    result = second[2]["content"][0]
    assert result["type"] == "tool_result"
    assert result["tool_use_id"] == "toolu_bad"
    assert result["is_error"] is True
    assert "steps.0.depends_on" in result["content"]
    assert "steps.0.extra" in result["content"]
    assert output.usage.input_tokens == 2500  # both calls are paid for


async def test_call_of_an_unknown_tool_is_answered_and_corrected(
    llm: LLMClient, messages_server: MessagesServer,
) -> None:
    messages_server.script(tool_reply("make_plan", GOOD_PLAN, tool_id="toolu_wrong"),
                           tool_reply("submit_plan", GOOD_PLAN))

    output = await PlanningActivities(llm).plan_directive(
        PlanInput(directive_id="d-1", spec=make_spec()))

    assert output.plan.names == ["todo-model", "todo-api"]
    answer = messages_server.requests[1].body["messages"][2]["content"]
    assert [b["tool_use_id"] for b in answer] == ["toolu_wrong"]
    assert "submit_plan" in answer[0]["content"]


async def test_plan_in_plain_text_json_is_accepted(
    llm: LLMClient, messages_server: MessagesServer,
) -> None:
    messages_server.script(text_reply("Here is the plan:\n```json\n" + json.dumps(GOOD_PLAN)
                                      + "\n```"))

    output = await PlanningActivities(llm).plan_directive(
        PlanInput(directive_id="d-1", spec=make_spec()))

    assert output.plan.names == ["todo-model", "todo-api"]


async def test_answer_that_never_validates_is_non_retryable_with_raw_text(
    llm: LLMClient, messages_server: MessagesServer,
) -> None:
    messages_server.script(text_reply("I would rather not plan today."),
                           text_reply("Still no plan, sorry."))

    with pytest.raises(ApplicationError) as caught:
        await PlanningActivities(llm).plan_directive(
            PlanInput(directive_id="d-1", spec=make_spec()))

    assert caught.value.non_retryable
    assert caught.value.type == "LLMOutputInvalid"
    assert "submit_plan" in caught.value.message
    detail = caught.value.details[0]
    assert detail["raw_text"] == "Still no plan, sorry."
    assert detail["usage"]["input_tokens"] == 200  # both calls at the default usage
    assert len(messages_server.requests) == 2
    correction = user_text(messages_server.requests[1].body)
    assert "no tool call" in correction


async def test_planning_without_an_api_key_says_so() -> None:
    with pytest.raises(ApplicationError) as caught:
        await PlanningActivities(None).plan_directive(
            PlanInput(directive_id="d-1", spec=make_spec()))

    assert caught.value.non_retryable
    assert "ANTHROPIC_API_KEY" in caught.value.message
    assert "plan" in caught.value.message


async def test_a_failing_correction_call_keeps_the_bill_of_the_first_answer(
    llm: LLMClient, messages_server: MessagesServer,
) -> None:
    malformed = {"steps": [{"name": "todo-model", "depends_on": "nothing"}]}
    messages_server.script(
        tool_reply("submit_plan", malformed, used=usage(1000, 100)),
        error_reply(529, "overloaded"),
    )

    with pytest.raises(ApplicationError) as caught:
        await PlanningActivities(llm).plan_directive(
            PlanInput(directive_id="d-1", spec=make_spec()))

    assert not caught.value.non_retryable  # overloaded: Temporal retries
    detail = caught.value.details[0]
    assert detail["usage"]["input_tokens"] == 1000 and detail["usage"]["cost_usd"] > 0
