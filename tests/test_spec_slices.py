"""Steps and activities get the slice of the spec they need (issue 10): a step's run
gets the directive context and the policy it decides by, `execute_step` what the
agent needs, `evaluate_step` what the judge needs, `complete_directive` how to
complete; none of them the plan (the other steps), the budgets or the people.

The directive context (title, goal, requirements, acceptance criteria,
constraints, repository) goes with each step, because the agent's and the
judge's prompts are built from it (makima/prompts/context.py); it is bounded by
the spec's limits. Histories written before the slices hold the whole spec in
these inputs: they still decode, cut down to the slice.
"""

from __future__ import annotations

import json
from typing import Any

from temporalio.client import Client

from makima.contracts import (
    ActivityName,
    CheckoutInput,
    CompleteInput,
    EvaluateInput,
    ExecuteInput,
    StepInput,
)
from makima.models import DirectiveStatus, PlannedStep
from tests.standins import StandIns, spec_of, start
from worker import build_worker

GOAL_BYTES = 100_000
#: What a step's input may hold beyond its context and its own step: ids, branch,
#: flags, thresholds, models, sandbox.
SMALL = 3_000
#: Keys of the spec that no step or activity needs.
NOT_FOR_STEPS = {"plan", "carry", "budgets", "owner", "approvers", "planner",
                 "max_parallel_steps", "completion"}


def inputs(history: Any) -> dict[str, list[dict[str, Any]]]:
    """Each scheduled activity's and started child's input, by activity name
    (children under "StepWorkflow"), as the JSON stored in the history."""
    found: dict[str, list[dict[str, Any]]] = {}
    for event in history.events:
        if event.HasField("activity_task_scheduled_event_attributes"):
            attributes = event.activity_task_scheduled_event_attributes
            name = attributes.activity_type.name
        elif event.HasField("start_child_workflow_execution_initiated_event_attributes"):
            attributes = event.start_child_workflow_execution_initiated_event_attributes
            name = "StepWorkflow"
        else:
            continue
        payload = attributes.input.payloads[0].data
        found.setdefault(name, []).append({"size": len(payload), **json.loads(payload)})
    return found


async def test_a_step_and_its_activities_get_their_slice_of_a_big_spec(
        client: Client, task_queue: str) -> None:
    goal = ("Make the thing. " * (GOAL_BYTES // 16 + 1))[:GOAL_BYTES]
    criteria = [f"criterion {i}" for i in range(20)]
    spec = spec_of(("first", []), ("second", ["first"]), ("third", ["second"]),
                   goal=goal, acceptance_criteria=criteria, approvers=["ana"], owner="ana",
                   budgets={"max_rework_cycles": 1, "max_cost_usd": 5.0}, autonomy="full_auto")
    context = len(spec.model_dump_json(include={"title", "goal", "requirements",
                                                "acceptance_criteria", "constraints",
                                                "repository"}))
    stand = StandIns()
    async with build_worker(client, task_queue, stand.activities()):
        handle = await start(client, task_queue, spec)
        assert (await handle.result()).status is DirectiveStatus.COMPLETED
        directive = inputs(await handle.fetch_history())
        step_histories = [await client.get_workflow_handle(s.workflow_id).fetch_history()
                          for s in (await handle.result()).steps if s.workflow_id]

    assert len(directive["StepWorkflow"]) == 3
    for started in directive["StepWorkflow"]:
        own = started["step"]["name"]
        assert not NOT_FOR_STEPS & started["spec"].keys(), started["spec"].keys()
        assert started["spec"]["goal"] == goal  # the agent's and the judge's context
        assert started["spec"]["max_rework_cycles"] == 1
        others = {"first", "second", "third"} - {own}
        assert not any(f"step {other}" in json.dumps(started) for other in others)
        assert started["size"] < context + SMALL, started["size"]
    [complete] = directive[ActivityName.COMPLETE_DIRECTIVE.value]
    assert set(complete["spec"]) == {"title", "repository", "completion"}
    assert complete["size"] < SMALL

    for history in step_histories:
        step = inputs(history)
        [execute] = step[ActivityName.EXECUTE_STEP.value]
        assert set(execute["spec"]) == {"title", "goal", "requirements", "acceptance_criteria",
                                        "constraints", "repository", "executor", "models",
                                        "sandbox"}
        assert execute["size"] < context + SMALL
        [evaluate] = step[ActivityName.EVALUATE_STEP.value]
        assert set(evaluate["spec"]) == {"title", "goal", "requirements", "acceptance_criteria",
                                         "constraints", "repository", "evaluator", "thresholds",
                                         "autonomy", "models", "sandbox"}
        assert evaluate["spec"]["acceptance_criteria"] == criteria
        [merge] = step[ActivityName.MERGE_STEP.value]
        assert merge["size"] < SMALL


def test_inputs_written_with_the_whole_spec_still_decode_as_their_slice() -> None:
    spec = spec_of(("first", []), ("second", ["first"]), goal="the goal",
                   budgets={"max_rework_cycles": 2}, approvers=["ana"])
    whole = spec.model_dump(mode="json")
    step = PlannedStep(name="first", description="d").model_dump(mode="json")
    common = {"directive_id": "d-1", "generation": 1, "integration_branch": "makima/d-1"}

    started = StepInput.model_validate({**common, "spec": whole, "step": step})
    assert started.spec.max_rework_cycles == 2
    assert started.spec.goal == "the goal"
    assert "approvers" not in started.spec.model_dump()
    executed = ExecuteInput.model_validate({**common, "spec": whole, "step": step})
    assert executed.spec.executor is spec.executor
    evaluated = EvaluateInput.model_validate({**common, "spec": whole, "step": step, "attempt": 1,
                                              "execution": {"success": True}})
    assert evaluated.spec.thresholds == spec.thresholds
    checked_out = CheckoutInput.model_validate({**common, "spec": whole, "step": "first",
                                                "attempt": 2})
    assert checked_out.repository == spec.repository
    completed = CompleteInput.model_validate({"directive_id": "d-1", "spec": whole,
                                              "integration_branch": "makima/d-1"})
    assert completed.spec.completion is spec.completion


def test_a_slice_with_an_unknown_field_is_refused_naming_it() -> None:
    spec = spec_of(goal="the goal")
    data = {"directive_id": "d-1", "generation": 1, "integration_branch": "b",
            "step": PlannedStep(name="first").model_dump(mode="json"),
            "spec": {**spec.model_dump(mode="json", include={"title", "goal", "repository"}),
                     "goall": "typo"}}
    try:
        ExecuteInput.model_validate(data)
    except ValueError as err:
        assert "goall" in str(err)
    else:
        raise AssertionError("a slice with an unknown field decoded")
