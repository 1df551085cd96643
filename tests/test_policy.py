"""Unit tests of makima/policy.py: what a score means, what happens to an
evaluated attempt, which budget breaker trips and when, and the red evaluations
made for a failed execution or a merge conflict."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from makima.constants import MAX_TEXT_IN_HISTORY
from makima.models import Autonomy, BudgetRaise, Budgets, Confidence, Thresholds
from makima.policy import (
    BreakerKind,
    BudgetLedger,
    Decision,
    budget_lowering,
    confidence_for,
    decide,
    failed_execution_evaluation,
    merge_conflict_evaluation,
    replan_refusal,
    seconds_until_wall_time,
    tripped_breaker,
)

DEFAULT = Thresholds()  # green 0.8, yellow 0.5

# --------------------------------------------------------------------------- confidence


@pytest.mark.parametrize(
    ("score", "expected"),
    [
        (1.0, Confidence.GREEN),
        (0.8, Confidence.GREEN),
        (0.7999, Confidence.YELLOW),
        (0.5, Confidence.YELLOW),
        (0.4999, Confidence.RED),
        (0.0, Confidence.RED),
    ],
)
def test_confidence_at_and_around_the_default_thresholds(
    score: float, expected: Confidence
) -> None:
    assert confidence_for(score, DEFAULT) is expected


def test_confidence_with_custom_thresholds() -> None:
    strict = Thresholds(green=0.95, yellow=0.9)
    assert confidence_for(0.94, strict) is Confidence.YELLOW
    assert confidence_for(0.89, strict) is Confidence.RED
    no_yellow = Thresholds(green=0.6, yellow=0.6)
    assert confidence_for(0.6, no_yellow) is Confidence.GREEN
    assert confidence_for(0.59, no_yellow) is Confidence.RED


@settings(max_examples=150, deadline=None)
@given(
    st.floats(0.0, 1.0),
    st.floats(0.0, 1.0),
    st.floats(0.0, 1.0),
)
def test_confidence_is_monotonic_in_the_score(a: float, b: float, score: float) -> None:
    thresholds = Thresholds(green=max(a, b), yellow=min(a, b))
    rank = {Confidence.RED: 0, Confidence.YELLOW: 1, Confidence.GREEN: 2}
    low, high = sorted([score, a])
    assert rank[confidence_for(low, thresholds)] <= rank[confidence_for(high, thresholds)]
    expected = (
        Confidence.GREEN
        if score >= thresholds.green
        else Confidence.YELLOW
        if score >= thresholds.yellow
        else Confidence.RED
    )
    assert confidence_for(score, thresholds) is expected


# --------------------------------------------------------------------------- decide


def expected_decision(
    confidence: Confidence, autonomy: Autonomy, rework_count: int, max_rework: int
) -> Decision:
    table = {
        (Confidence.GREEN, Autonomy.GUARDED): Decision.PASS,
        (Confidence.GREEN, Autonomy.FULL_AUTO): Decision.PASS,
        (Confidence.YELLOW, Autonomy.GUARDED): Decision.AWAIT_APPROVAL,
        (Confidence.YELLOW, Autonomy.FULL_AUTO): Decision.PASS,
    }
    if confidence is Confidence.RED:
        return Decision.REWORK if rework_count < max_rework else Decision.BLOCK
    return table[(confidence, autonomy)]


@pytest.mark.parametrize(
    ("confidence", "autonomy", "rework_count", "max_rework"),
    list(itertools.product(Confidence, Autonomy, [0, 1, 2, 3, 4], [0, 1, 3])),
)
def test_decide_table(
    confidence: Confidence, autonomy: Autonomy, rework_count: int, max_rework: int
) -> None:
    assert decide(confidence, autonomy, rework_count, max_rework) is expected_decision(
        confidence, autonomy, rework_count, max_rework
    )


def test_decide_red_reworks_until_the_budget_is_spent() -> None:
    outcomes = [decide(Confidence.RED, Autonomy.GUARDED, n, 3) for n in range(5)]
    assert outcomes == [Decision.REWORK] * 3 + [Decision.BLOCK] * 2
    # no rework budget: the first red blocks, even under full autonomy
    assert decide(Confidence.RED, Autonomy.FULL_AUTO, 0, 0) is Decision.BLOCK


def test_decide_green_and_yellow_ignore_a_spent_rework_budget() -> None:
    assert decide(Confidence.GREEN, Autonomy.GUARDED, 10, 3) is Decision.PASS
    assert decide(Confidence.YELLOW, Autonomy.GUARDED, 10, 3) is Decision.AWAIT_APPROVAL
    assert decide(Confidence.YELLOW, Autonomy.FULL_AUTO, 10, 3) is Decision.PASS


# --------------------------------------------------------------------------- breakers


def test_no_budgets_never_trip() -> None:
    assert tripped_breaker(Budgets(), cost_usd=1e9, elapsed_seconds=1e9) is None
    assert seconds_until_wall_time(Budgets(), 1e9) is None


def test_cost_breaker_trips_at_the_limit() -> None:
    budgets = Budgets(max_cost_usd=2.0)
    assert tripped_breaker(budgets, cost_usd=1.9999, elapsed_seconds=0) is None
    breaker = tripped_breaker(budgets, cost_usd=2.0, elapsed_seconds=0)
    assert breaker is not None
    assert breaker.kind is BreakerKind.COST
    assert "cost budget spent" in breaker.reason
    assert "$2.0000 of $2.0000" in breaker.reason
    over = tripped_breaker(budgets, cost_usd=3.5, elapsed_seconds=0)
    assert over is not None and "$3.5000" in over.reason


def test_zero_cost_budget_trips_immediately() -> None:
    breaker = tripped_breaker(Budgets(max_cost_usd=0.0), cost_usd=0.0, elapsed_seconds=0)
    assert breaker is not None and breaker.kind is BreakerKind.COST


def test_wall_time_breaker_trips_at_the_limit() -> None:
    budgets = Budgets(max_wall_time_minutes=10)
    assert tripped_breaker(budgets, cost_usd=0, elapsed_seconds=599.9) is None
    breaker = tripped_breaker(budgets, cost_usd=0, elapsed_seconds=600)
    assert breaker is not None
    assert breaker.kind is BreakerKind.WALL_TIME
    assert breaker.reason == "wall-time budget spent: 10.0 of 10 minutes"


def test_a_workflow_says_when_the_wall_time_is_spent_and_the_clock_only_words_it() -> None:
    # the directive knows from its timer; its clock may show one task early
    budgets = Budgets(max_wall_time_minutes=10)
    early = tripped_breaker(budgets, cost_usd=0, elapsed_seconds=599.0, wall_time_spent=True)
    assert early is not None and early.kind is BreakerKind.WALL_TIME
    assert early.reason == "wall-time budget spent: 10.0 of 10 minutes"
    assert tripped_breaker(budgets, cost_usd=0, elapsed_seconds=900,
                           wall_time_spent=False) is None
    assert tripped_breaker(Budgets(), cost_usd=0, elapsed_seconds=900,
                           wall_time_spent=True) is None  # no such budget


def test_cost_is_reported_before_wall_time() -> None:
    budgets = Budgets(max_cost_usd=1.0, max_wall_time_minutes=1)
    breaker = tripped_breaker(budgets, cost_usd=5.0, elapsed_seconds=3600)
    assert breaker is not None and breaker.kind is BreakerKind.COST
    breaker = tripped_breaker(budgets, cost_usd=0.5, elapsed_seconds=3600)
    assert breaker is not None and breaker.kind is BreakerKind.WALL_TIME


def test_seconds_until_wall_time() -> None:
    budgets = Budgets(max_wall_time_minutes=2)
    assert seconds_until_wall_time(budgets, 0) == 120.0
    assert seconds_until_wall_time(budgets, 100) == 20.0
    assert seconds_until_wall_time(budgets, 120) == 0.0
    assert seconds_until_wall_time(budgets, 500) == 0.0  # never negative: a timer needs >= 0


def test_replan_refusal_by_replans() -> None:
    budgets = Budgets(max_chain_regenerations=2)
    assert replan_refusal(budgets, replans=0, failed_steps=5) is None
    assert replan_refusal(budgets, replans=1, failed_steps=5) is None
    refusal = replan_refusal(budgets, replans=2, failed_steps=5)
    assert refusal is not None
    assert refusal.kind is BreakerKind.REPLANS
    assert refusal.reason == "re-plan budget spent: 2 of 2 re-plans used"


def test_no_replans_allowed() -> None:
    refusal = replan_refusal(Budgets(max_chain_regenerations=0), replans=0, failed_steps=1)
    assert refusal is not None and refusal.kind is BreakerKind.REPLANS


def test_replan_refusal_by_failed_steps_comes_first() -> None:
    budgets = Budgets(max_failed_steps=2, max_chain_regenerations=5)
    assert replan_refusal(budgets, replans=0, failed_steps=1) is None
    refusal = replan_refusal(budgets, replans=5, failed_steps=2)
    assert refusal is not None
    assert refusal.kind is BreakerKind.FAILED_STEPS
    assert "2 steps failed or were blocked" in refusal.reason
    assert "allows 2" in refusal.reason


# --------------------------------------------------------------------------- made-up red evaluations


def test_failed_execution_is_red_with_the_output_in_the_instructions() -> None:
    evaluation = failed_execution_evaluation(2, "Traceback...\nNameError: name 'x' is not defined")
    assert evaluation.passed is False
    assert evaluation.confidence is Confidence.RED
    assert evaluation.score == 0.0
    assert "exited with code 2" in evaluation.summary
    assert "exited with code 2" in evaluation.rework_instructions
    assert "NameError: name 'x' is not defined" in evaluation.rework_instructions
    assert evaluation.evaluator == "execution"
    # red by the same rule the workflow applies to a score
    assert confidence_for(evaluation.score, Thresholds()) is evaluation.confidence


def test_failed_execution_that_did_not_finish() -> None:
    evaluation = failed_execution_evaluation(None, "killed", summary="the agent timed out")
    assert evaluation.summary == "the agent timed out"
    assert "did not finish" in evaluation.rework_instructions
    assert "killed" in evaluation.rework_instructions


def test_failed_execution_keeps_only_the_tail_of_a_long_output() -> None:
    output = "HEAD-MARKER\n" + "x" * (MAX_TEXT_IN_HISTORY * 3) + "\nTAIL-MARKER"
    evaluation = failed_execution_evaluation(1, output)
    assert "TAIL-MARKER" in evaluation.rework_instructions
    assert "HEAD-MARKER" not in evaluation.rework_instructions
    assert len(evaluation.rework_instructions) < MAX_TEXT_IN_HISTORY + 500


def test_merge_conflict_is_red_and_names_the_files() -> None:
    evaluation = merge_conflict_evaluation(
        ["src/app.py", "README.md"], "CONFLICT (content): Merge conflict in src/app.py"
    )
    assert evaluation.passed is False
    assert evaluation.confidence is Confidence.RED
    assert evaluation.score == 0.0
    assert "src/app.py, README.md" in evaluation.summary
    assert "src/app.py, README.md" in evaluation.rework_instructions
    assert "CONFLICT (content)" in evaluation.rework_instructions
    assert evaluation.evaluator == "merge"


def test_merge_conflict_without_file_names() -> None:
    evaluation = merge_conflict_evaluation([], "")
    assert "(unknown files)" in evaluation.summary
    assert evaluation.rework_instructions.endswith("make the checks pass again.")


def test_budget_lowering_names_each_current_value() -> None:
    budgets = Budgets(max_wall_time_minutes=1.0, max_rework_cycles=3)
    assert budget_lowering(budgets, BudgetRaise(max_wall_time_minutes=2, max_rework_cycles=3)) is None
    problem = budget_lowering(budgets, BudgetRaise(max_wall_time_minutes=0.2,
                                                   max_rework_cycles=1, max_cost_usd=5))
    assert problem is not None
    assert "max_wall_time_minutes is 1.0 now; 0.2 would lower it" in problem
    assert "max_rework_cycles is 3 now; 1 would lower it" in problem
    assert "max_cost_usd has no limit now; 5.0 would lower it" in problem


# --------------------------------------------------------------------------- the ledger


def test_ledger_spends_to_micro_dollars_and_trips_the_cost_breaker() -> None:
    ledger = BudgetLedger(Budgets(max_cost_usd=1.0))
    ledger = ledger.spend(0.1).spend(0.2)
    assert ledger.cost_usd == 0.3  # not 0.30000000000000004
    assert ledger.breaker(elapsed_seconds=0) is None
    spent = ledger.spend(0.7)
    breaker = spent.breaker(elapsed_seconds=0)
    assert breaker is not None and breaker.kind is BreakerKind.COST
    assert ledger.cost_usd == 0.3, "spending returns a new ledger"


def test_ledger_wall_time_breaker_and_time_left() -> None:
    ledger = BudgetLedger(Budgets(max_wall_time_minutes=2.0))
    assert ledger.seconds_left(30) == 90
    assert ledger.breaker(119.9) is None
    breaker = ledger.breaker(120)
    assert breaker is not None and breaker.kind is BreakerKind.WALL_TIME
    assert BudgetLedger(Budgets()).seconds_left(10_000) is None


def test_ledger_refuses_an_empty_raise_and_any_lowering() -> None:
    ledger = BudgetLedger(Budgets(max_wall_time_minutes=1.0, max_cost_usd=2.0))
    assert ledger.raise_problem(BudgetRaise()) == "name at least one budget to raise"
    lowering = ledger.raise_problem(BudgetRaise(max_wall_time_minutes=0.2))
    assert lowering is not None
    assert "max_wall_time_minutes is 1.0 now; 0.2 would lower it" in lowering
    assert ledger.raise_problem(BudgetRaise(max_cost_usd=2.0)) is None  # equal is no lowering
    assert ledger.raise_problem(BudgetRaise(max_cost_usd=3.0, max_rework_cycles=5)) is None


def test_a_raise_clears_the_breaker_it_lifts_and_keeps_the_spend() -> None:
    ledger = BudgetLedger(Budgets(max_cost_usd=1.0), cost_usd=1.0)
    assert ledger.breaker(0) is not None
    raised = ledger.raised(BudgetRaise(max_cost_usd=5.0))
    assert raised.cost_usd == 1.0
    assert raised.budgets.max_cost_usd == 5.0
    assert raised.budgets.max_rework_cycles == ledger.budgets.max_rework_cycles
    assert raised.breaker(0) is None
    assert raised.raised(BudgetRaise(max_cost_usd=5.0)).breaker(0) is None
