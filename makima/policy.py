"""The decision policy: what a score means, what to do with an evaluated attempt,
and which budget breaker has tripped.

Pure functions; the workflows call them so the rules live in one place that
unit tests can cover without Temporal.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from makima.constants import MAX_TEXT_IN_HISTORY
from makima.models import Autonomy, BudgetRaise, Budgets, Confidence, Evaluation, Thresholds


class Decision(StrEnum):
    PASS = "pass"
    AWAIT_APPROVAL = "await_approval"
    REWORK = "rework"
    BLOCK = "block"


def confidence_for(score: float, thresholds: Thresholds) -> Confidence:
    """green at or above the green threshold, yellow at or above yellow, else red."""
    if score >= thresholds.green:
        return Confidence.GREEN
    if score >= thresholds.yellow:
        return Confidence.YELLOW
    return Confidence.RED


def decide(
    confidence: Confidence,
    autonomy: Autonomy,
    rework_count: int,
    max_rework_cycles: int,
) -> Decision:
    """green passes; yellow passes under full autonomy and otherwise waits for a
    person; red is reworked while rework cycles remain, then blocked."""
    if confidence is Confidence.GREEN:
        return Decision.PASS
    if confidence is Confidence.YELLOW:
        return Decision.PASS if autonomy is Autonomy.FULL_AUTO else Decision.AWAIT_APPROVAL
    if rework_count < max_rework_cycles:
        return Decision.REWORK
    return Decision.BLOCK


def passes_without_a_person(score: float, thresholds: Thresholds, autonomy: Autonomy) -> bool:
    """Whether an attempt with this score merges with nobody asked (what `decide`
    says for green, and for yellow under full autonomy): the evaluation activity may
    then merge it at once (activities/evaluate_merge.py)."""
    return decide(confidence_for(score, thresholds), autonomy, 0, 0) is Decision.PASS


class BreakerKind(StrEnum):
    COST = "cost"
    WALL_TIME = "wall_time"
    REPLANS = "replans"
    FAILED_STEPS = "failed_steps"


@dataclass(frozen=True)
class Breaker:
    kind: BreakerKind
    reason: str


def tripped_breaker(
    budgets: Budgets,
    *,
    cost_usd: float,
    elapsed_seconds: float,
    wall_time_spent: bool | None = None,
) -> Breaker | None:
    """The first spending breaker that has tripped (cost, then wall time), or
    None. These pause a directive until the budget is raised. `wall_time_spent`,
    when given, says whether the wall-time budget is spent (a workflow knows it from
    its timer, not its clock); `elapsed_seconds` then only goes into the reason."""
    if budgets.max_cost_usd is not None and cost_usd >= budgets.max_cost_usd:
        return Breaker(
            BreakerKind.COST,
            f"cost budget spent: ${cost_usd:.4f} of ${budgets.max_cost_usd:.4f}",
        )
    if budgets.max_wall_time_minutes is not None:
        limit = budgets.max_wall_time_minutes * 60
        if wall_time_spent is None:
            wall_time_spent = elapsed_seconds >= limit
        if wall_time_spent:
            return Breaker(
                BreakerKind.WALL_TIME,
                f"wall-time budget spent: {elapsed_seconds / 60:.1f} of "
                f"{budgets.max_wall_time_minutes:g} minutes",
            )
    return None


def seconds_until_wall_time(budgets: Budgets, elapsed_seconds: float) -> float | None:
    """How long the directive may still run before the wall-time breaker trips."""
    if budgets.max_wall_time_minutes is None:
        return None
    return max(0.0, budgets.max_wall_time_minutes * 60 - elapsed_seconds)


def replan_refusal(budgets: Budgets, *, replans: int, failed_steps: int) -> Breaker | None:
    """Why no further re-plan may run (the directive then fails), or None."""
    if budgets.max_failed_steps is not None and failed_steps >= budgets.max_failed_steps:
        return Breaker(
            BreakerKind.FAILED_STEPS,
            f"{failed_steps} steps failed or were blocked; the budget allows "
            f"{budgets.max_failed_steps}",
        )
    if replans >= budgets.max_chain_regenerations:
        return Breaker(
            BreakerKind.REPLANS,
            f"re-plan budget spent: {replans} of {budgets.max_chain_regenerations} re-plans used",
        )
    return None


def budget_lowering(budgets: Budgets, request: BudgetRaise) -> str | None:
    """Why `request` is not a raise of `budgets` (naming each current value), or None.

    A budget without a limit (None) cannot be raised: setting one would lower it.
    """
    problems = []
    for name, wanted in request.model_dump(exclude_none=True).items():
        current = getattr(budgets, name)
        if current is None:
            problems.append(f"{name} has no limit now; {wanted} would lower it")
        elif wanted < current:
            problems.append(f"{name} is {current} now; {wanted} would lower it")
    if not problems:
        return None
    return "raise_budget only raises budgets: " + "; ".join(problems)


@dataclass(frozen=True)
class BudgetLedger:
    """A directive's spend held against its budgets: which breaker trips, how long
    it may still run, and what a raise may change. Pure: the workflow hands in the
    elapsed time and keeps the ledger each change gives back."""

    budgets: Budgets
    cost_usd: float = 0.0

    def spend(self, cost_usd: float) -> BudgetLedger:
        """The ledger after `cost_usd` more was billed (kept to micro-dollars)."""
        return replace(self, cost_usd=round(self.cost_usd + cost_usd, 6))

    def breaker(self, elapsed_seconds: float,
                wall_time_spent: bool | None = None) -> Breaker | None:
        """The spending breaker that has tripped (cost, then wall time), or None."""
        return tripped_breaker(self.budgets, cost_usd=self.cost_usd,
                               elapsed_seconds=elapsed_seconds,
                               wall_time_spent=wall_time_spent)

    def seconds_left(self, elapsed_seconds: float) -> float | None:
        """How long until the wall-time breaker trips; None without that budget."""
        return seconds_until_wall_time(self.budgets, elapsed_seconds)

    def raise_problem(self, request: BudgetRaise) -> str | None:
        """Why `raise_budget` may not accept `request`, or None."""
        if not request.model_dump(exclude_none=True):
            return "name at least one budget to raise"
        return budget_lowering(self.budgets, request)

    def raised(self, request: BudgetRaise) -> BudgetLedger:
        """The ledger under the raised budgets (check `raise_problem` first)."""
        return replace(self, budgets=request.applied_to(self.budgets))


def failed_execution_evaluation(
    exit_code: int | None, output_tail: str, summary: str = ""
) -> Evaluation:
    """The red evaluation of an attempt whose agent did not finish successfully:
    its output becomes the evidence and the rework instructions."""
    tail = output_tail[-MAX_TEXT_IN_HISTORY:]
    code = "did not finish" if exit_code is None else f"exited with code {exit_code}"
    what = summary or f"The step's command {code}."
    return Evaluation(
        passed=False,
        score=0.0,
        confidence=Confidence.RED,
        summary=what,
        rework_instructions=(
            f"The previous attempt failed: the agent {code}. Read the output below, fix the "
            f"cause and try again.\n\nOutput (last lines):\n{tail}"
        ),
        evaluator="execution",
    )


def merge_conflict_evaluation(files: list[str], message: str) -> Evaluation:
    """A passing attempt that could not be merged is sent back red, naming the files."""
    listed = ", ".join(files) if files else "(unknown files)"
    return Evaluation(
        passed=False,
        score=0.0,
        confidence=Confidence.RED,
        summary=f"merge conflict with the integration branch in {listed}",
        rework_instructions=(
            f"Your work conflicts with work merged meanwhile into the integration branch, in: "
            f"{listed}. The next attempt's worktree holds your work with the integration branch "
            f"merged in, conflict markers included: resolve the conflicts in those files "
            f"keeping both intents, and make the checks pass again. {message}"
        ).strip(),
        evaluator="merge",
    )


def denial_reason(by: str, comment: str) -> str:
    """Why a denied step is blocked, in the audit log and the status."""
    return f"denied by {by}" + (f": {comment}" if comment else "")
