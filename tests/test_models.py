"""Unit tests of makima/models.py: what a user may write in a DirectiveSpec, the
defaults they get, the messages bad input earns, and the small behaviours of
the models (budget raises, usage sums, the effective planner, status sets)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from makima.models import (
    ACTIVE_STEP_STATUSES,
    DEAD_STEP_STATUSES,
    FINAL_STEP_STATUSES,
    Autonomy,
    BudgetRaise,
    Budgets,
    Completion,
    DirectiveCarry,
    DirectiveSpec,
    DirectiveStatus,
    EvaluatorKind,
    ExecutorKind,
    Plan,
    PlannedStep,
    PlannerKind,
    Repository,
    StepState,
    StepStatus,
    Thresholds,
    Usage,
)

#: The example input of issue 2, verbatim in shape.
ISSUE_EXAMPLE = {
    "title": "...",
    "goal": "...",
    "repository": {"path": "/abs/repo", "base_branch": "main"},
    "autonomy": "guarded",
    "executor": "shell",
    "plan": {
        "steps": [
            {
                "name": "a",
                "description": "...",
                "task_plan": "...",
                "command": "...",
                "verify": ["..."],
                "depends_on": [],
            }
        ]
    },
}


def minimal_spec(**overrides: object) -> DirectiveSpec:
    data: dict[str, object] = {"title": "t", "goal": "g", "repository": {"path": "/repo"}}
    data.update(overrides)
    return DirectiveSpec.model_validate(data)


def error_text(excinfo: pytest.ExceptionInfo[ValidationError]) -> str:
    return str(excinfo.value)


# --------------------------------------------------------------------------- defaults


def test_only_title_goal_and_repository_are_required() -> None:
    with pytest.raises(ValidationError) as excinfo:
        DirectiveSpec.model_validate({})
    missing = {err["loc"][0] for err in excinfo.value.errors() if err["type"] == "missing"}
    assert missing == {"title", "goal", "repository"}


def test_spec_defaults_match_the_design() -> None:
    spec = minimal_spec()
    assert spec.autonomy is Autonomy.GUARDED
    assert spec.thresholds.green == 0.8
    assert spec.thresholds.yellow == 0.5
    assert spec.budgets.max_rework_cycles == 3
    assert spec.budgets.max_chain_regenerations == 2
    assert spec.budgets.max_cost_usd is None
    assert spec.budgets.max_wall_time_minutes is None
    assert spec.budgets.max_failed_steps is None
    assert spec.executor is ExecutorKind.CLAUDE_CODE
    assert spec.evaluator is EvaluatorKind.AUTO
    assert spec.completion is Completion.BRANCH
    assert spec.repository.base_branch == "main"
    assert spec.requirements == [] and spec.acceptance_criteria == [] and spec.constraints == []
    assert spec.models.planner is None and spec.models.executor is None
    assert spec.approvers is None
    assert spec.plan is None
    assert spec.carry is None


def test_issue_example_parses() -> None:
    spec = DirectiveSpec.model_validate_json(json.dumps(ISSUE_EXAMPLE))
    assert spec.repository.path == "/abs/repo"
    assert spec.repository.location == "/abs/repo"
    assert spec.executor is ExecutorKind.SHELL
    assert spec.plan is not None
    step = spec.plan.steps[0]
    assert (step.name, step.command, step.verify, step.depends_on) == ("a", "...", ["..."], [])


# --------------------------------------------------------------------------- bad input


def test_unknown_field_is_refused_and_named() -> None:
    with pytest.raises(ValidationError) as excinfo:
        minimal_spec(autonomyy="full_auto")
    assert "autonomyy" in error_text(excinfo)
    assert excinfo.value.errors()[0]["type"] == "extra_forbidden"


def test_unknown_nested_field_is_refused_and_named() -> None:
    with pytest.raises(ValidationError) as excinfo:
        minimal_spec(budgets={"max_rework_cycle": 5})
    assert "max_rework_cycle" in error_text(excinfo)


@pytest.mark.parametrize(
    "repository",
    [
        {},
        {"base_branch": "dev"},
        {"path": "/a", "url": "https://example.invalid/r.git"},
        {"path": ""},
    ],
)
def test_repository_needs_exactly_one_location(repository: dict[str, str]) -> None:
    with pytest.raises(ValidationError) as excinfo:
        minimal_spec(repository=repository)
    assert "exactly one of 'path' or 'url'" in error_text(excinfo)


def test_repository_by_url() -> None:
    repo = Repository(url="https://example.invalid/r.git", base_branch="dev")
    assert repo.location == "https://example.invalid/r.git"


def test_thresholds_out_of_order_are_refused_with_both_values() -> None:
    with pytest.raises(ValidationError) as excinfo:
        minimal_spec(thresholds={"green": 0.4, "yellow": 0.6})
    text = error_text(excinfo)
    assert "thresholds out of order" in text
    assert "0.6" in text and "0.4" in text


def test_equal_thresholds_are_allowed() -> None:
    assert Thresholds(green=0.7, yellow=0.7).green == 0.7


@pytest.mark.parametrize("field", ["green", "yellow"])
@pytest.mark.parametrize("value", [-0.1, 1.1])
def test_thresholds_outside_unit_interval_are_refused(field: str, value: float) -> None:
    with pytest.raises(ValidationError) as excinfo:
        Thresholds.model_validate({field: value, **({"green": 1.0} if field == "yellow" else {})})
    assert field in error_text(excinfo)


@pytest.mark.parametrize(
    "budgets",
    [
        {"max_rework_cycles": -1},
        {"max_cost_usd": -0.01},
        {"max_wall_time_minutes": -5},
        {"max_wall_time_minutes": 0},
        {"max_chain_regenerations": -1},
        {"max_failed_steps": 0},
    ],
)
def test_negative_or_zero_budgets_are_refused(budgets: dict[str, float]) -> None:
    with pytest.raises(ValidationError) as excinfo:
        minimal_spec(budgets=budgets)
    (field,) = budgets
    assert field in error_text(excinfo)


@pytest.mark.parametrize("field", ["title", "goal"])
def test_blank_title_or_goal_is_refused(field: str) -> None:
    with pytest.raises(ValidationError) as excinfo:
        minimal_spec(**{field: "   "})
    assert field in error_text(excinfo)


def test_invalid_enum_value_names_the_field() -> None:
    with pytest.raises(ValidationError) as excinfo:
        minimal_spec(executor="emacs")
    assert "executor" in error_text(excinfo)


# --------------------------------------------------------------------------- behaviour


def test_budget_raise_changes_only_given_fields() -> None:
    budgets = Budgets(max_rework_cycles=1, max_cost_usd=2.0, max_wall_time_minutes=30)
    raised = BudgetRaise(max_cost_usd=10.0).applied_to(budgets)
    assert raised.max_cost_usd == 10.0
    assert raised.max_rework_cycles == 1
    assert raised.max_wall_time_minutes == 30
    assert raised.max_chain_regenerations == 2
    assert raised.max_failed_steps is None
    # the original is untouched: the workflow keeps its own copy
    assert budgets.max_cost_usd == 2.0


def test_empty_budget_raise_changes_nothing() -> None:
    budgets = Budgets(max_cost_usd=1.0)
    assert BudgetRaise().applied_to(budgets) == budgets
    assert BudgetRaise.model_validate({}).applied_to(budgets) == budgets


def test_budget_raise_refuses_negative_values_and_unknown_fields() -> None:
    with pytest.raises(ValidationError):
        BudgetRaise(max_cost_usd=-1)
    with pytest.raises(ValidationError) as excinfo:
        BudgetRaise.model_validate({"max_dollars": 5})
    assert "max_dollars" in error_text(excinfo)


def test_usage_addition_sums_every_field() -> None:
    a = Usage(
        input_tokens=10, output_tokens=5, cache_read_tokens=1, cache_write_tokens=2, cost_usd=0.1
    )
    b = Usage(
        input_tokens=1, output_tokens=2, cache_read_tokens=3, cache_write_tokens=4, cost_usd=0.2
    )
    total = a + b
    assert total == Usage(
        input_tokens=11, output_tokens=7, cache_read_tokens=4, cache_write_tokens=6, cost_usd=0.3
    )
    assert Usage() + Usage() == Usage()


def test_usage_sum_of_many_does_not_drift() -> None:
    total = Usage()
    for _ in range(1000):
        total = total + Usage(cost_usd=0.001)
    assert total.cost_usd == 1.0


def test_effective_planner() -> None:
    plan = {"steps": [{"name": "a"}]}
    assert minimal_spec().effective_planner is PlannerKind.LLM
    assert minimal_spec(plan=plan).effective_planner is PlannerKind.NONE
    assert minimal_spec(plan=plan, planner="llm").effective_planner is PlannerKind.LLM
    assert minimal_spec(planner="none").effective_planner is PlannerKind.NONE


def test_step_status_sets() -> None:
    assert FINAL_STEP_STATUSES == {
        StepStatus.PASSED,
        StepStatus.FAILED,
        StepStatus.BLOCKED,
        StepStatus.SKIPPED,
        StepStatus.CANCELLED,
    }
    assert ACTIVE_STEP_STATUSES == {
        StepStatus.RUNNING,
        StepStatus.EVALUATING,
        StepStatus.AWAITING_APPROVAL,
        StepStatus.REWORK,
    }
    # every status is exactly one of pending, active or final
    for status in StepStatus:
        kinds = [status is StepStatus.PENDING, status.is_active, status.is_final]
        assert kinds.count(True) == 1, status
    # a dead step is final but never passed
    assert DEAD_STEP_STATUSES == FINAL_STEP_STATUSES - {StepStatus.PASSED}


def test_statuses_are_spelled_as_the_design_says() -> None:
    assert {s.value for s in StepStatus} == {
        "pending", "running", "evaluating", "awaiting_approval", "rework",
        "passed", "failed", "blocked", "skipped", "cancelled",
    }  # fmt: skip
    assert {s.value for s in DirectiveStatus} == {
        "planning", "active", "paused", "completed", "failed", "stopped",
    }  # fmt: skip
    assert {s for s in DirectiveStatus if s.is_final} == {
        DirectiveStatus.COMPLETED,
        DirectiveStatus.FAILED,
        DirectiveStatus.STOPPED,
    }


def test_plan_lookup() -> None:
    plan = Plan(steps=[PlannedStep(name="a"), PlannedStep(name="b", depends_on=["a"])])
    assert plan.names == ["a", "b"]
    assert plan.step("b") is plan.steps[1]
    assert plan.step("zz") is None


# --------------------------------------------------------------------------- round trip


def test_spec_round_trips_through_json_with_carry() -> None:
    spec = minimal_spec(
        autonomy="full_auto",
        thresholds={"green": 0.9, "yellow": 0.3},
        budgets={"max_cost_usd": 1.5, "max_wall_time_minutes": 20, "max_failed_steps": 2},
        approvers=["ann"],
        plan={"steps": [{"name": "a", "verify": ["true"]}, {"name": "b", "depends_on": ["a"]}]},
        carry=DirectiveCarry(
            generation=3,
            started_at=datetime(2024, 5, 1, 12, 30, tzinfo=UTC),
            cost_usd=0.25,
            replans=1,
            previous_steps=[
                StepState(name="a", status=StepStatus.PASSED, attempts=2, score=0.9, commit="abc")
            ],
            previous_plan=Plan(steps=[PlannedStep(name="a")]),
            replan_reason="step 'b' failed",
            breaker="cost budget spent",
            paused=True,
        ),
    )
    text = spec.model_dump_json()
    back = DirectiveSpec.model_validate_json(text)
    assert back == spec
    assert back.carry is not None
    assert back.carry.previous_steps[0].status is StepStatus.PASSED
    assert back.carry.started_at == datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
    # enums are written as their values, as users and the CLI read them
    raw = json.loads(text)
    assert raw["autonomy"] == "full_auto"
    assert raw["carry"]["previous_steps"][0]["status"] == "passed"
