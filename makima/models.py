"""The domain model: what a user writes (DirectiveSpec), what the planner returns
(Plan), what an evaluation says (Evaluation), what money was spent (Usage), and
the snapshot the `status` query returns.

Pure pydantic: no I/O, safe to import from workflow code. Every field added
later gets a default so histories recorded before it still decode.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

STEP_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
STEP_NAME_RE = re.compile(STEP_NAME_PATTERN)


class Model(BaseModel):
    """Base for every makima model: unknown fields are refused so a typo in a
    spec or a signal is an error that names the field, not a silent default."""

    model_config = ConfigDict(extra="forbid", use_enum_values=False)


# --------------------------------------------------------------------------- enums


class StepStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    EVALUATING = "evaluating"
    AWAITING_APPROVAL = "awaiting_approval"
    REWORK = "rework"
    PASSED = "passed"
    FAILED = "failed"
    BLOCKED = "blocked"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STEP_STATUSES

    @property
    def is_active(self) -> bool:
        """Being worked on or waiting for a person: its work may still change (a step
        waiting for approval may have no workflow running, see HeldDecision)."""
        return self in ACTIVE_STEP_STATUSES


FINAL_STEP_STATUSES = frozenset(
    {StepStatus.PASSED, StepStatus.FAILED, StepStatus.BLOCKED, StepStatus.SKIPPED,
     StepStatus.CANCELLED}
)
ACTIVE_STEP_STATUSES = frozenset(
    {StepStatus.RUNNING, StepStatus.EVALUATING, StepStatus.AWAITING_APPROVAL, StepStatus.REWORK}
)
#: A step in one of these can never pass in this generation; its dependants are skipped.
DEAD_STEP_STATUSES = frozenset(
    {StepStatus.FAILED, StepStatus.BLOCKED, StepStatus.SKIPPED, StepStatus.CANCELLED}
)


class DirectiveStatus(StrEnum):
    PLANNING = "planning"
    ACTIVE = "active"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"

    @property
    def is_final(self) -> bool:
        return self in (DirectiveStatus.COMPLETED, DirectiveStatus.FAILED, DirectiveStatus.STOPPED)


class Confidence(StrEnum):
    GREEN = "green"
    YELLOW = "yellow"
    RED = "red"


class Autonomy(StrEnum):
    FULL_AUTO = "full_auto"
    GUARDED = "guarded"


class ExecutorKind(StrEnum):
    CLAUDE_CODE = "claude_code"
    ANTHROPIC = "anthropic"
    SHELL = "shell"


class EvaluatorKind(StrEnum):
    AUTO = "auto"  # the LLM judge when an API key is configured, else programmatic
    LLM = "llm"
    PROGRAMMATIC = "programmatic"


class PlannerKind(StrEnum):
    LLM = "llm"
    NONE = "none"


class Completion(StrEnum):
    BRANCH = "branch"  # leave the integration branch for review
    MERGE = "merge"  # fast-forward the base branch
    PR = "pr"  # push and open a pull request


# --------------------------------------------------------------------------- spec


_URL_USERINFO = re.compile(r"^(https?://)[^/@\s]*@", re.I)


class Repository(Model):
    """Where a directive works. A `url`'s credentials are never kept: an http(s)
    URL is stored without its userinfo (`https://user:token@host/x` becomes
    `https://host/x`), because a spec lands in workflow history, Postgres and the
    UI. Git gets credentials from the worker's environment instead
    (MAKIMA_GIT_USERNAME / MAKIMA_GIT_PASSWORD, see makima.git)."""

    path: str | None = None
    url: str | None = None
    base_branch: str = "main"

    @field_validator("url")
    @classmethod
    def _without_credentials(cls, value: str | None) -> str | None:
        return _URL_USERINFO.sub(r"\1", value) if value else value

    @model_validator(mode="after")
    def _one_location(self) -> Repository:
        if bool(self.path) == bool(self.url):
            raise ValueError("repository needs exactly one of 'path' or 'url'")
        return self

    @property
    def location(self) -> str:
        return self.path or self.url or ""


class Thresholds(Model):
    green: float = Field(0.8, ge=0.0, le=1.0)
    yellow: float = Field(0.5, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _ordered(self) -> Thresholds:
        if self.yellow > self.green:
            raise ValueError(
                f"thresholds out of order: yellow ({self.yellow}) must not exceed green ({self.green})"
            )
        return self


class Budgets(Model):
    max_rework_cycles: int = Field(3, ge=0, le=100)
    max_cost_usd: float | None = Field(None, ge=0.0)
    max_wall_time_minutes: float | None = Field(None, gt=0.0)
    max_chain_regenerations: int = Field(2, ge=0, le=100)
    max_failed_steps: int | None = Field(None, ge=1)


class BudgetRaise(Model):
    """Input of `raise_budget`: any budget field; unset fields stay as they are."""

    max_rework_cycles: int | None = Field(None, ge=0, le=100)
    max_cost_usd: float | None = Field(None, ge=0.0)
    max_wall_time_minutes: float | None = Field(None, gt=0.0)
    max_chain_regenerations: int | None = Field(None, ge=0, le=100)
    max_failed_steps: int | None = Field(None, ge=1)

    def applied_to(self, budgets: Budgets) -> Budgets:
        changes = self.model_dump(exclude_none=True)
        return budgets.model_copy(update=changes)


class ModelChoice(Model):
    """Model names per role; None means the worker's configured default."""

    planner: str | None = None
    evaluator: str | None = None
    executor: str | None = None


class PlannedStep(Model):
    name: str = Field(description="unique slug: lowercase letters, digits, '-' and '_'")
    description: str = ""
    task_plan: str = Field("", description="self-contained instructions for the agent")
    depends_on: list[str] = Field(default_factory=list)
    command: str | None = Field(None, description="shell executor: the command to run")
    verify: list[str] = Field(default_factory=list, description="commands that must exit 0")


class Plan(Model):
    steps: list[PlannedStep] = Field(default_factory=list)
    summary: str = ""

    def step(self, name: str) -> PlannedStep | None:
        return next((s for s in self.steps if s.name == name), None)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.steps]


class SandboxSettings(Model):
    """How a directive's agent commands and checks are confined (makima.sandbox)."""

    #: Network for agent commands, shell steps and checks (Claude Code always has it:
    #: it needs the model API). Off by default: not even the worker's loopback.
    network: bool = False
    #: Names of worker environment variables these processes may see, on top of
    #: the allow-list (makima.process.agent_environment).
    env: list[str] = Field(default_factory=list)


#: The goal, and the requirements, acceptance criteria and constraints together, each
#: fit in this many characters: every step and activity input carries them (the agent
#: and the judge read them), and Temporal refuses a payload over 2 MB.
MAX_SPEC_TEXT = 100_000


def _lists_fit(**lists: list[str] | None) -> None:
    total = sum(len(item) for items in lists.values() for item in items or [])
    if total > MAX_SPEC_TEXT:
        names = ", ".join(name for name, items in lists.items() if items)
        raise ValueError(f"{names} hold {total:,} characters together; at most "
                         f"{MAX_SPEC_TEXT:,} fit (put long material in the repository and "
                         "name the files)")


class DirectiveSpec(Model):
    title: str = Field(min_length=1, max_length=200)
    goal: str = Field(min_length=1, max_length=MAX_SPEC_TEXT)
    requirements: list[str] = Field(default_factory=list)
    acceptance_criteria: list[str] = Field(default_factory=list)
    constraints: list[str] = Field(default_factory=list)
    repository: Repository
    autonomy: Autonomy = Autonomy.GUARDED
    thresholds: Thresholds = Field(default_factory=Thresholds)
    budgets: Budgets = Field(default_factory=Budgets)
    executor: ExecutorKind = ExecutorKind.CLAUDE_CODE
    evaluator: EvaluatorKind = EvaluatorKind.AUTO
    planner: PlannerKind | None = Field(
        None, description="llm or none; unset means llm without a supplied plan, none with one"
    )
    models: ModelChoice = Field(default_factory=ModelChoice)
    completion: Completion = Completion.BRANCH
    max_parallel_steps: int = Field(20, ge=1, le=1000)
    owner: str = "anonymous"
    approvers: list[str] | None = None
    plan: Plan | None = None
    sandbox: SandboxSettings = Field(default_factory=SandboxSettings)
    #: Set by makima itself when a directive continues as new. A run that was not
    #: continued from another one refuses a spec that holds a carry (see DirectiveWorkflow).
    carry: DirectiveCarry | None = None

    @field_validator("title", "goal")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @model_validator(mode="after")
    def _text_fits(self) -> DirectiveSpec:
        _lists_fit(requirements=self.requirements, acceptance_criteria=self.acceptance_criteria,
                   constraints=self.constraints)
        return self

    @property
    def effective_planner(self) -> PlannerKind:
        if self.planner is not None:
            return self.planner
        return PlannerKind.NONE if self.plan is not None else PlannerKind.LLM


# --------------------------------------------------------------------------- usage, evaluation


class Usage(Model):
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost_usd: float = 0.0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cache_read_tokens=self.cache_read_tokens + other.cache_read_tokens,
            cache_write_tokens=self.cache_write_tokens + other.cache_write_tokens,
            cost_usd=round(self.cost_usd + other.cost_usd, 6),
        )


class CriterionResult(Model):
    criterion: str
    passed: bool
    score: float = Field(ge=0.0, le=1.0)
    evidence: str = ""


class CheckResult(Model):
    """One programmatic check: a verify command or an auto-detected test run."""

    command: str
    exit_code: int | None  # None: it did not finish (timeout) or could not start
    duration_seconds: float = 0.0
    output_tail: str = ""
    required: bool = True

    @property
    def passed(self) -> bool:
        return self.exit_code == 0


class Evaluation(Model):
    passed: bool
    score: float = Field(ge=0.0, le=1.0)
    confidence: Confidence
    criteria: list[CriterionResult] = Field(default_factory=list)
    checks: list[CheckResult] = Field(default_factory=list)
    summary: str = ""
    rework_instructions: str = ""
    evaluator: str = ""
    usage: Usage = Field(default_factory=Usage)


# --------------------------------------------------------------------------- status snapshot


class StepState(Model):
    """What the directive knows about one step of its current generation."""

    name: str
    status: StepStatus = StepStatus.PENDING
    depends_on: list[str] = Field(default_factory=list)
    description: str = ""
    attempts: int = 0
    rework_count: int = 0
    score: float | None = None
    confidence: Confidence | None = None
    summary: str = ""
    generation: int = 1  # the generation whose workflow ran it
    workflow_id: str | None = None
    branch: str | None = None
    commit: str | None = None
    cost_usd: float = 0.0
    reason: str = ""


class PendingApproval(Model):
    """A step waiting for a person: the attempt they decide on, and where its work is."""

    step: str
    attempt: int
    score: float
    summary: str = ""
    requested_at: datetime | None = None
    generation: int | None = None
    branch: str | None = None
    commit: str | None = None


class HeldDecision(Model):
    """A person's answer about a step that waits in the directive itself (no step
    workflow runs while a person decides). The directive acts on it once the step's
    last run has returned: `deny` blocks the step; `approve` merges the approved
    attempt and `reevaluate` evaluates the step branch again, both by a new run of the
    step (a re-evaluation only while the directive is not paused)."""

    step: str
    action: Literal["approve", "deny", "reevaluate"]
    by: str = ""
    comment: str = ""
    approval: PendingApproval | None = None  # what the person saw, for approve and deny


class EventSummary(Model):
    seq: int
    at: datetime
    type: str
    step: str | None = None
    message: str = ""


class DirectiveSnapshot(Model):
    """The `status` query's answer, and the directive workflow's result."""

    directive_id: str
    title: str
    status: DirectiveStatus
    generation: int
    steps: list[StepState]
    pending_approvals: list[PendingApproval] = Field(default_factory=list)
    cost_usd: float = 0.0
    elapsed_seconds: float = 0.0
    breaker: str | None = None
    reason: str = ""
    replans: int = 0
    budgets: Budgets = Field(default_factory=Budgets)
    integration_branch: str = ""
    owner: str = ""
    recent_events: list[EventSummary] = Field(default_factory=list)
    #: A goal change accepted and not yet planned, and what it waits for.
    pending_goal: str | None = None
    pending_goal_waits_for: str = ""


# --------------------------------------------------------------------------- continue-as-new carry


class DirectiveCarry(Model):
    """State a directive hands to its next run when it continues as new (at each
    new generation). Internal: users never write it."""

    generation: int
    started_at: datetime
    cost_usd: float = 0.0
    replans: int = 0
    failed_steps: int = 0
    event_seq: int = 0
    #: Every step of the generation that just ended; the passed ones are kept.
    previous_steps: list[StepState] = Field(default_factory=list)
    previous_plan: Plan | None = None  # no longer written (nothing read it); older carries
    replan_reason: str = ""
    user_plan: Plan | None = None  # a plan supplied with update_goal for this generation
    breaker: str | None = None
    #: The wall-time budget in force is spent: its timer fired (see DirectiveWorkflow).
    wall_time_spent: bool = False
    paused: bool = False
    integration_branch: str = ""
    #: Set when a run continues as new in the middle of a generation because its
    #: history grew large: the generation's plan and steps, taken up without re-planning.
    current_plan: Plan | None = None
    current_steps: list[StepState] = Field(default_factory=list)
    #: Per step: how many further runs it had in this generation (re-evaluations, and
    #: runs that merge an approved attempt); numbers their workflow ids.
    reevaluations: dict[str, int] = Field(default_factory=dict)
    #: What people changed that the next run must keep: an accepted stop, and a goal
    #: change not planned yet (budgets travel in the spec, pause in `paused`).
    stop_reason: str | None = None
    goal_update: GoalUpdate | None = None
    #: Steps that wait for a person in the directive itself, and answers not acted on
    #: yet (a run may continue as new while they wait).
    pending_approvals: list[PendingApproval] = Field(default_factory=list)
    held_decisions: list[HeldDecision] = Field(default_factory=list)


# --------------------------------------------------------------------------- messages (signals, updates)


class ApprovalDecision(Model):
    step: str
    by: str = "anonymous"
    comment: str = ""
    # The attempt the person saw. None (older clients) means "whatever waits now";
    # a named attempt that no longer waits is refused by the directive's validator.
    attempt: int | None = None
    # The generation the person saw, likewise.
    generation: int | None = None


class StopRequest(Model):
    reason: str = "stopped by request"


class GoalUpdate(Model):
    goal: str = Field(min_length=1, max_length=MAX_SPEC_TEXT)
    requirements: list[str] | None = None
    acceptance_criteria: list[str] | None = None
    plan: Plan | None = None

    @model_validator(mode="after")
    def _text_fits(self) -> GoalUpdate:
        _lists_fit(requirements=self.requirements, acceptance_criteria=self.acceptance_criteria)
        return self


class StepRef(Model):
    step: str


class Empty(Model):
    """Input of pause and resume: nothing, or `{}`."""


class UpdateAnswer(Model):
    accepted: bool = True
    message: str = ""


# the carry names GoalUpdate, defined with the messages below it
DirectiveCarry.model_rebuild()
DirectiveSpec.model_rebuild()
