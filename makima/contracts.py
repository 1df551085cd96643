"""The contract between the workflows and the outside world: activity names and
their input/output models, the messages a StepWorkflow and its parent send
each other, the event log's record, and the naming of ids and branches.

Pure: imported by workflow code. Activities in `activities/` implement these
names; the workflows call them by name so they never import activity code.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import Field, model_validator
from temporalio.common import SearchAttributeKey

from makima.models import (
    Autonomy,
    Completion,
    Confidence,
    DirectiveSpec,
    Evaluation,
    EvaluatorKind,
    ExecutorKind,
    Model,
    ModelChoice,
    PendingApproval,
    Plan,
    PlannedStep,
    Repository,
    SandboxSettings,
    StepState,
    StepStatus,
    Thresholds,
    Usage,
)

# --------------------------------------------------------------------------- activity names


class ActivityName(StrEnum):
    PREPARE_REPOSITORY = "prepare_repository"
    PLAN_DIRECTIVE = "plan_directive"
    EXECUTE_STEP = "execute_step"
    CHECKOUT_STEP = "checkout_step"
    EVALUATE_STEP = "evaluate_step"
    MERGE_STEP = "merge_step"
    EVALUATE_AND_MERGE_STEP = "evaluate_and_merge_step"
    CLEANUP_STEP = "cleanup_step"
    COMPLETE_DIRECTIVE = "complete_directive"
    RECORD_EVENTS = "record_events"
    BILLED_SO_FAR = "billed_so_far"
    DELIVER_NOTIFICATION = "deliver_notification"


# --------------------------------------------------------------------------- search attributes

#: What Temporal's visibility indexes of a directive. The dev server registers
#: them at start (other clusters by hand: README, "Temporal UI"); the starter
#: sets them only where they are registered, and the workflow keeps them current
#: only when it was started with them.
STATUS_ATTRIBUTE = SearchAttributeKey.for_keyword("MakimaStatus")
OWNER_ATTRIBUTE = SearchAttributeKey.for_keyword("MakimaOwner")
GENERATION_ATTRIBUTE = SearchAttributeKey.for_int("MakimaGeneration")
SEARCH_ATTRIBUTES = (STATUS_ATTRIBUTE, OWNER_ATTRIBUTE, GENERATION_ATTRIBUTE)

# --------------------------------------------------------------------------- naming


def directive_slug(title: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
    return slug[:40].strip("-") or "directive"


def new_directive_id(title: str, short_id: str) -> str:
    """`directive-<slug>-<short id>`; the caller supplies the random part."""
    return f"directive-{directive_slug(title)}-{short_id[:8]}"


def step_workflow_id(directive_id: str, generation: int, step: str, run: int = 0) -> str:
    """`<directive id>/g<generation>/<step>`; a re-evaluation run gets `/r<n>`."""
    base = f"{directive_id}/g{generation}/{step}"
    return f"{base}/r{run}" if run else base


def integration_branch(directive_id: str) -> str:
    return f"makima/{directive_id}"


def step_branch(directive_id: str, step: str) -> str:
    # git cannot hold both `makima/<id>` and `makima/<id>/<step>` (a ref cannot be
    # both a file and a folder), so step branches live beside the integration branch.
    return f"makima/{directive_id}--steps/{step}"


# --------------------------------------------------------------------------- slices of the spec


class SpecSlice(Model):
    """The part of a directive's spec that one consumer needs: a step's run and its
    activities get their slice, not the spec with its plan, budgets and people.

    Histories and activity tasks written before slices existed hold the whole spec
    here; it still decodes, cut down to the slice."""

    @classmethod
    def of(cls, source: DirectiveSpec | SpecSlice) -> Any:
        """This slice of a spec, or of a larger slice."""
        return cls.model_validate({name: getattr(source, name) for name in cls.model_fields
                                   if hasattr(source, name)} | cls._derived(source))

    @classmethod
    def _derived(cls, source: DirectiveSpec | SpecSlice) -> dict[str, Any]:
        return {}

    @model_validator(mode="before")
    @classmethod
    def _from_a_whole_spec(cls, data: Any) -> Any:
        if isinstance(data, DirectiveSpec):
            return cls.of(data).__dict__
        if isinstance(data, dict) and not data.keys() <= cls.model_fields.keys():
            # a whole spec (older histories); anything else fails there, named
            return cls.of(DirectiveSpec.model_validate(data)).__dict__
        return data


class DirectiveContext(SpecSlice):
    """What every model call about the directive is told (makima/prompts/context.py,
    the agent's task prompt): the same for all its steps."""

    title: str
    goal: str
    requirements: list[str] = Field(default_factory=list)
    acceptance_criteria: list[str] = Field(default_factory=list)
    constraints: list[str] = Field(default_factory=list)
    repository: Repository


class ExecutionSpec(DirectiveContext):
    """What `execute_step` needs: the context for the agent, which agent, its model
    and its confinement."""

    executor: ExecutorKind = ExecutorKind.CLAUDE_CODE
    models: ModelChoice = Field(default_factory=ModelChoice)
    sandbox: SandboxSettings = Field(default_factory=SandboxSettings)


class EvaluationSpec(DirectiveContext):
    """What `evaluate_step` needs: the context (acceptance criteria among it) for the
    judge, which judge and model, the thresholds, and the checks' confinement; and
    the autonomy by which `evaluate_and_merge_step` decides to merge at once."""

    evaluator: EvaluatorKind = EvaluatorKind.AUTO
    thresholds: Thresholds = Field(default_factory=Thresholds)
    autonomy: Autonomy = Autonomy.GUARDED
    models: ModelChoice = Field(default_factory=ModelChoice)
    sandbox: SandboxSettings = Field(default_factory=SandboxSettings)


class StepSpec(DirectiveContext):
    """What a step's run needs: its activities' slices and the policy it decides by
    (autonomy, thresholds, rework cycles). Not the plan, not the other budgets."""

    autonomy: Autonomy = Autonomy.GUARDED
    thresholds: Thresholds = Field(default_factory=Thresholds)
    max_rework_cycles: int = Field(3, ge=0, le=100)
    executor: ExecutorKind = ExecutorKind.CLAUDE_CODE
    evaluator: EvaluatorKind = EvaluatorKind.AUTO
    models: ModelChoice = Field(default_factory=ModelChoice)
    sandbox: SandboxSettings = Field(default_factory=SandboxSettings)

    @classmethod
    def _derived(cls, source: DirectiveSpec | SpecSlice) -> dict[str, Any]:
        if isinstance(source, DirectiveSpec):
            return {"max_rework_cycles": source.budgets.max_rework_cycles}
        return {}


class CompletionSpec(SpecSlice):
    """What `complete_directive` needs: how to complete, where, and the PR's title."""

    title: str
    repository: Repository
    completion: Completion = Completion.BRANCH


# --------------------------------------------------------------------------- repository


class PrepareInput(Model):
    directive_id: str
    repository: Repository


class PrepareOutput(Model):
    integration_branch: str
    base_commit: str
    repository_path: str  # where the worker keeps the checkout (the path itself, or its clone)


# --------------------------------------------------------------------------- planning


class PlanInput(Model):
    directive_id: str
    spec: DirectiveSpec
    generation: int = 1
    reason: str = ""  # why this plan is asked for: empty for the first, else failure / goal change
    existing_steps: list[StepState] = Field(default_factory=list)
    previous_plan: Plan | None = None  # the plan that failed validation, when retrying
    validation_errors: list[str] = Field(default_factory=list)


class PlanOutput(Model):
    plan: Plan
    usage: Usage = Field(default_factory=Usage)
    raw_text: str = ""  # what the model said, trimmed, for the event log


# --------------------------------------------------------------------------- execution


class ReworkContext(Model):
    """Why the previous attempt was sent back, given to the next attempt."""

    attempt: int  # the attempt about to run (2, 3, ...)
    score: float | None = None
    feedback: str = ""
    instructions: str = ""


class ExecuteInput(Model):
    directive_id: str
    generation: int
    spec: ExecutionSpec
    step: PlannedStep
    attempt: int = 1
    integration_branch: str
    rework: ReworkContext | None = None


class ExecuteOutput(Model):
    success: bool
    exit_code: int | None = None
    branch: str = ""
    commit: str | None = None  # None: the attempt changed nothing
    worktree: str = ""
    changed_files: list[str] = Field(default_factory=list)
    diff_stat: str = ""
    output_tail: str = ""
    summary: str = ""
    session_id: str | None = None
    duration_seconds: float = 0.0
    usage: Usage = Field(default_factory=Usage)
    #: The task queue of the one worker that holds `worktree` (see worker.py); its
    #: evaluation and cleanup go there. Empty: any worker (older histories).
    worker_queue: str = ""
    #: The result an earlier try recorded on the step branch, taken over by a retry
    #: whose report of it to Temporal was lost: the agent did not run again.
    adopted: bool = False


class CheckoutInput(Model):
    """Re-evaluation of a step whose branch a person may have fixed by hand: put the
    step branch's current head in a worktree and describe it like an attempt."""

    directive_id: str
    generation: int
    repository: Repository
    step: str
    attempt: int
    integration_branch: str

    @model_validator(mode="before")
    @classmethod
    def _from_a_whole_spec(cls, data: Any) -> Any:
        # older histories hold the whole spec; the checkout needs its repository
        if isinstance(data, dict) and "spec" in data and "repository" not in data:
            data = {**data, "repository": data["spec"]["repository"]}
            del data["spec"]
        return data


class EvaluateInput(Model):
    directive_id: str
    generation: int
    spec: EvaluationSpec
    step: PlannedStep
    attempt: int
    integration_branch: str
    execution: ExecuteOutput


class MergeInput(Model):
    directive_id: str
    repository: Repository
    integration_branch: str
    step: str
    attempt: int
    branch: str
    commit: str | None = None
    #: Once merged, also remove the step's worktrees on the worker that merges (as
    #: cleanup_step does): the workflow then sends the merge to the worker holding
    #: them and needs no cleanup activity on the way to the dependants.
    remove_worktrees: bool = False


class MergeOutput(Model):
    merged: bool
    commit: str | None = None  # the integration branch's head after the merge
    conflict_files: list[str] = Field(default_factory=list)
    message: str = ""
    #: The step's worktrees on this worker are gone (asked for, merged, and removed).
    removed_worktrees: bool = False


class EvaluateMergeInput(Model):
    """Evaluate an attempt and, when the policy passes it without a person (green, or
    yellow under full autonomy), merge it in the same activity, on the worker that
    holds its worktree: no workflow task and no second activity between the two."""

    evaluate: EvaluateInput
    merge: MergeInput


#: What `evaluate_and_merge_step` was doing when it failed, when it was the merge: the
#: `stage` detail of its error, and the first detail of its heartbeats while it merges
#: (a try that timed out then). The step then says the merge failed, not the evaluation.
MERGING = "merging"


class EvaluateMergeOutput(Model):
    evaluation: Evaluation
    #: None when the policy did not pass the attempt (red, or yellow for a person)
    merge: MergeOutput | None = None


class BilledSoFarInput(Model):
    """Which pending activity of which workflow run (activities/billing.py)."""

    workflow_id: str
    run_id: str
    activity_type: str


class CleanupInput(Model):
    directive_id: str
    repository: Repository
    step: str
    worktree: str = ""


class CleanupOutput(Model):
    removed: bool = False


class CompleteInput(Model):
    directive_id: str
    spec: CompletionSpec
    integration_branch: str
    steps: list[StepState] = Field(default_factory=list)


class CompleteOutput(Model):
    completion: str = "branch"
    done: bool = True
    message: str = ""
    url: str | None = None


# --------------------------------------------------------------------------- events


class EventType(StrEnum):
    DIRECTIVE_STARTED = "directive_started"
    DIRECTIVE_STATUS = "directive_status"  # every directive transition
    GENERATION_STARTED = "generation_started"
    PLAN_READY = "plan_ready"
    PLAN_INVALID = "plan_invalid"
    PLAN_FAILED = "plan_failed"
    STEP_STATUS = "step_status"  # every step transition
    ATTEMPT_STARTED = "attempt_started"
    ATTEMPT_FINISHED = "attempt_finished"
    EVALUATION = "evaluation"
    APPROVAL_REQUESTED = "approval_requested"
    APPROVAL_DECIDED = "approval_decided"
    MERGED = "merged"
    MERGE_CONFLICT = "merge_conflict"
    BREAKER_TRIPPED = "breaker_tripped"
    BUDGET_RAISED = "budget_raised"
    GOAL_UPDATED = "goal_updated"
    COMPLETION = "completion"
    ACTIVITY_FAILED = "activity_failed"


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class Event(Model):
    """One row of the audit trail. `(source, seq)` is its natural key: `source` is
    the workflow id that emitted it (a directive or a step workflow) and `seq`
    counts that workflow's events from 1, across continue-as-new."""

    directive_id: str
    source: str
    seq: int
    at: datetime
    type: EventType
    severity: Severity = Severity.INFO
    generation: int = 1
    step: str | None = None
    attempt: int | None = None
    actor: str = "makima"
    message: str = ""
    data: dict[str, Any] = Field(default_factory=dict)


class RecordInput(Model):
    events: list[Event]


class RecordOutput(Model):
    written: int = 0


class NotifyInput(Model):
    """One notification for one receiver (makima/notify.py). The receiver is named
    by a hash of its URL: webhook URLs are secrets of the workers."""

    receiver: str
    payload: dict[str, Any]


class NotifyOutput(Model):
    status: int  # what the receiver answered


# --------------------------------------------------------------------------- step workflow


class StepInput(Model):
    directive_id: str
    generation: int
    spec: StepSpec
    step: PlannedStep
    integration_branch: str
    paused: bool = False
    #: Re-evaluation (after a person fixed the step branch by hand): the first
    #: attempt, numbered `first_attempt`, checks the branch out instead of running the agent.
    reevaluate: bool = False
    first_attempt: int = 1
    rework_count: int = 0
    #: The directive keeps approvals (its carry: HeldDecision): at yellow the step
    #: returns `awaiting_approval` with its attempt, branch and commit instead of
    #: waiting, so no step workflow runs while a person decides.
    park_for_decision: bool = False
    #: A run that merges the attempt a person approved (numbered `first_attempt`);
    #: a merge conflict sends it to rework like any red result.
    approved: PendingApproval | None = None


class StepResult(Model):
    name: str
    status: StepStatus
    attempts: int = 0
    rework_count: int = 0
    score: float | None = None
    confidence: Confidence | None = None
    summary: str = ""
    reason: str = ""
    branch: str = ""
    commit: str | None = None
    usage: Usage = Field(default_factory=Usage)  # the step run's whole spend
    #: The step's events not yet written when it returned: its directive records
    #: them (the step does not wait for Postgres on the way to its dependants).
    unrecorded: list[Event] = Field(default_factory=list)


class StepProgress(Model):
    """Child → parent: the step's status changed or it spent money."""

    name: str
    generation: int
    status: StepStatus
    attempt: int
    score: float | None = None
    confidence: Confidence | None = None
    summary: str = ""
    usage: Usage = Field(default_factory=Usage)  # spent since the last progress report
    seq: int = 0  # orders reports of one step run; signals may arrive out of order
    at: datetime | None = None
    #: Where the attempt's work is (set when it waits for approval).
    branch: str | None = None
    commit: str | None = None


class StepDecision(Model):
    """Parent → child: a person's decision on a step awaiting approval."""

    approved: bool
    by: str = "anonymous"
    comment: str = ""


class PauseState(Model):
    paused: bool
