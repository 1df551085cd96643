"""What a person may ask of a directive, as a table.

Each command is one row: its input, its *problem* (why it cannot be accepted now,
or None), its *apply* (the change of state) and its *answer*. From each row come
the handlers Temporal sees: a signal that applies the command or logs why it was
ignored, and an update whose validator rejects with the problem and whose answer
says what was done. The rules live in `DirectiveCommands`, which
`DirectiveWorkflow` inherits; the orchestration itself lives in `directive.py`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, get_args

from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from makima.contracts import EventType, StepDecision
    from makima.dag import steps_to_revive, validate_plan
    from makima.models import (
        ApprovalDecision,
        BudgetRaise,
        Empty,
        GoalUpdate,
        HeldDecision,
        PlannerKind,
        StepRef,
        StepStatus,
        StopRequest,
        UpdateAnswer,
    )
    from workflows.history_gauge import SENT, SIGNAL, UPDATE

if TYPE_CHECKING:
    from workflows.directive import DirectiveWorkflow

REEVALUABLE = (StepStatus.BLOCKED, StepStatus.FAILED, StepStatus.AWAITING_APPROVAL)

#: A failed or blocked step that is re-evaluated gives the dependants it had skipped
#: back (pending): before, they stayed skipped and the directive waited for good
#: once the step passed (fuzz seed 752639).
REVIVES_DEPENDANTS_PATCH = "directive-reevaluate-revives-dependants"

#: `pause_directive` answers once every running step has heard of the pause: answered
#: before, a step whose agent finished just after the answer could start its
#: evaluation before the signal reached it.
PAUSE_ANSWERS_WHEN_TOLD_PATCH = "directive-pause-answers-when-steps-told"

#: Once every step passed and the completion runs, a command can no longer change the end.
COMPLETING = "the directive is completing: every step passed"


def reject_if(problem: str | None) -> None:
    if problem:
        raise ApplicationError(problem, type="Rejected", non_retryable=True)


class DirectiveCommands:
    """The problem and apply of every command, over `DirectiveWorkflow`'s state."""

    # ------------------------------------------------------------------ approvals

    def _approval_problem(self: DirectiveWorkflow, decision: ApprovalDecision) -> str | None:
        if self._completing:
            return COMPLETING
        if self._final is not None:
            return f"the directive is {self._final.value}; nothing can be approved"
        state = self._steps.get(decision.step)
        if state is None:
            return self._unknown_step(decision.step)
        if decision.step not in self._pending:
            return (f"step {decision.step!r} is {state.status.value}; nothing is pending "
                    "approval for it")
        pending = self._pending[decision.step]
        if decision.generation is not None and decision.generation != self._generation:
            return (f"the decision names generation {decision.generation}, but step "
                    f"{decision.step!r} waits in generation {self._generation}, attempt "
                    f"{pending.attempt}; look at that attempt and decide again")
        if decision.attempt is not None and decision.attempt != pending.attempt:
            return (f"the decision names attempt {decision.attempt} of step {decision.step!r}, "
                    f"but attempt {pending.attempt} is the one waiting; look at it and "
                    "decide again")
        approvers = self._spec.approvers
        if approvers is not None and decision.by not in approvers:
            return (f"{decision.by!r} is not an approver of this directive "
                    f"(approvers: {', '.join(approvers) or 'none'})")
        return None

    def _unknown_step(self: DirectiveWorkflow, name: str) -> str:
        known = ", ".join(self._steps) or "none yet"
        return f"unknown step {name!r}; this generation's steps are: {known}"

    async def _approve(self: DirectiveWorkflow, decision: ApprovalDecision) -> None:
        await self._decide(decision, True)

    async def _deny(self: DirectiveWorkflow, decision: ApprovalDecision) -> None:
        await self._decide(decision, False)

    async def _decide(self: DirectiveWorkflow, decision: ApprovalDecision, approved: bool) -> None:
        if self._parks_approvals:
            self._hold_decision(decision, approved)
            return
        if self._delivered_decisions:
            await self._relay_decision(decision, approved)
            return
        pending = self._pending.pop(decision.step)
        self._decided.add(decision.step)
        self._decision_event(decision, approved, pending.attempt)
        self._changed = True
        handle = self._children.get(decision.step)
        if handle is not None:
            self._gauge.add(SENT)
            await handle.signal("decide", StepDecision(approved=approved, by=decision.by,
                                                       comment=decision.comment))

    def _hold_decision(self: DirectiveWorkflow, decision: ApprovalDecision,
                       approved: bool) -> None:
        """The step waits in the directive: the decision is kept here, recorded now, and
        acted on by the run loop (`_act_on_held`)."""
        pending = self._pending.pop(decision.step)
        self._decided.add(decision.step)
        self._held[decision.step] = HeldDecision(
            step=decision.step, action="approve" if approved else "deny", by=decision.by,
            comment=decision.comment, approval=pending)
        self._decision_event(decision, approved, pending.attempt)
        self._changed = True

    def _decision_event(self: DirectiveWorkflow, decision: ApprovalDecision, approved: bool,
                        attempt: int) -> None:
        self._event(EventType.APPROVAL_DECIDED,
                    f"{decision.step} {'approved' if approved else 'denied'} by {decision.by}",
                    step=decision.step, attempt=attempt, actor=decision.by,
                    data={"approved": approved, "by": decision.by, "comment": decision.comment})

    async def _relay_decision(self: DirectiveWorkflow, decision: ApprovalDecision,
                              approved: bool) -> None:
        """Hand the decision to the waiting step, and record it only once the step has
        it: a step that ended meanwhile (stopped, cancelled) refuses the decision."""
        # from now on a second decision, or a re-evaluation, of this step is refused
        pending = self._pending.pop(decision.step)
        self._decided.add(decision.step)
        handle = self._children.get(decision.step)
        try:
            if handle is None:
                raise ApplicationError("its workflow is not running")
            self._gauge.add(SENT)
            await handle.signal("decide", StepDecision(approved=approved, by=decision.by,
                                                       comment=decision.comment))
        except ApplicationError as err:
            self._decided.discard(decision.step)
            raise ApplicationError(
                f"step {decision.step!r} ended before the decision reached it ({err.message})",
                type="Rejected", non_retryable=True) from err
        self._decision_event(decision, approved, pending.attempt)
        self._changed = True

    # ------------------------------------------------------------------ pause, resume, stop

    def _pause_problem(self: DirectiveWorkflow, request: Empty | None = None) -> str | None:
        if self._completing:
            return COMPLETING
        if self._final is not None:
            return f"the directive is {self._final.value}"
        if self._user_paused:
            return "the directive is already paused"
        return None

    def _resume_problem(self: DirectiveWorkflow, request: Empty | None = None) -> str | None:
        if self._completing:
            return COMPLETING
        if self._final is not None:
            return f"the directive is {self._final.value}"
        if not self._paused:
            return "the directive is not paused"
        if self._breaker is not None:
            still = self._tripped()
            if still is not None:
                return f"cannot resume: {still.reason}; raise the budget first"
        return None

    def _pause(self: DirectiveWorkflow, request: Empty | None = None) -> None:
        self._user_paused = True
        self._publish()
        self._relay_pause()

    async def _steps_told(self: DirectiveWorkflow) -> None:
        """Every step that runs or is being started has been told of the pause."""
        if self._patched(PAUSE_ANSWERS_WHEN_TOLD_PATCH):
            await workflow.wait_condition(lambda: not self._telling and not self._launching)

    def _resume(self: DirectiveWorkflow, request: Empty | None = None) -> None:
        self._user_paused = False
        if self._breaker is not None and self._tripped() is None:
            self._breaker = None
        self._publish()
        self._relay_pause()

    def _stop_problem(self: DirectiveWorkflow, request: StopRequest | None = None) -> str | None:
        if self._completing:
            return COMPLETING
        if self._final is not None:
            return f"the directive is already {self._final.value}"
        if self._stop_reason is not None:
            return "the directive is already stopping"
        return None

    async def _stop(self: DirectiveWorkflow, request: StopRequest | None = None) -> None:
        self._stop_reason = (request or StopRequest()).reason
        self._changed = True
        if self._stop_waits:
            # The answer comes once every step workflow has ended (a merge already under
            # way finishes first, see StepWorkflow._merge): whatever merged, merged before
            # the person was told "stopped", and nothing merges after it.
            await workflow.wait_condition(lambda: not self._children and not self._launching)

    # ------------------------------------------------------------------ goal and budget

    def _goal_problem(self: DirectiveWorkflow, update: GoalUpdate) -> str | None:
        if self._completing:
            return COMPLETING
        if self._final is not None:
            return f"the directive is {self._final.value}"
        if update.plan is None and self._spec.effective_planner is PlannerKind.NONE:
            return ("this directive has no planner: send the new goal together with a plan "
                    "for the next generation")
        if update.plan is not None:
            kept = [n for n, s in self._steps.items() if s.status is StepStatus.PASSED]
            errors = validate_plan(update.plan, kept=kept)
            if errors:
                return "the supplied plan is invalid: " + "; ".join(errors)
        return None

    def _update_goal(self: DirectiveWorkflow, update: GoalUpdate) -> None:
        self._goal_update = update
        self._event(EventType.GOAL_UPDATED, update.goal[:200], data={
            "goal": update.goal, "requirements": update.requirements,
            "plan_supplied": update.plan is not None})
        self._changed = True

    def _goal_waits_for(self: DirectiveWorkflow) -> str:
        """When a goal change turns into a plan: what it still waits for."""
        if self._goal_update is None:
            return ""
        running = [n for n, s in self._steps.items()
                   if s.status.is_active and n not in self._pending and n not in self._held]
        waits = []
        if running:
            waits.append(f"running steps finish ({', '.join(running)})")
        if self._pending:
            waits.append("a person decides on " + ", ".join(
                f"step {n!r} (attempt {p.attempt})" for n, p in self._pending.items()))
        if self._paused:
            waits.append("the directive is resumed")
        return "once " + " and ".join(waits) if waits else "now"

    def _budget_problem(self: DirectiveWorkflow, request: BudgetRaise) -> str | None:
        if self._completing:
            return COMPLETING
        if self._final is not None:
            return f"the directive is {self._final.value}"
        return self._ledger.raise_problem(request)

    def _raise_budget(self: DirectiveWorkflow, request: BudgetRaise) -> None:
        ledger = self._ledger.raised(request)
        self._spec = self._spec.model_copy(update={"budgets": ledger.budgets})
        if request.max_wall_time_minutes is not None:
            # spent again only when the timer for the new budget fires (at once if the
            # new budget is spent too: the breaker then trips again)
            self._wall_time_spent = False
        if self._breaker is not None and self._tripped(ledger) is None:
            self._breaker = None
            self._user_paused = True  # stays paused until a person resumes
        self._event(EventType.BUDGET_RAISED, "budgets raised",
                    data={"budgets": ledger.budgets.model_dump(mode="json")})
        self._publish()
        self._changed = True

    def _raise_answer(self: DirectiveWorkflow) -> str:
        # by the clock: only what the person reads (the breaker trips when its timer fires)
        elapsed = self._elapsed()
        left = self._ledger.seconds_left(elapsed)
        if left is not None and left <= 0:
            return (f"budgets raised, but the wall-time budget is still spent "
                    f"({elapsed / 60:.1f} of {self._spec.budgets.max_wall_time_minutes:g} "
                    "minutes): the directive stays paused; raise it further")
        return "budgets raised" + ("; resume to continue" if self._paused else "")

    # ------------------------------------------------------------------ re-evaluation

    def _reevaluate_problem(self: DirectiveWorkflow, ref: StepRef) -> str | None:
        if self._completing:
            return COMPLETING
        if self._final is not None:
            return f"the directive is {self._final.value}"
        if self._stop_reason is not None:
            return "the directive is stopping"
        state = self._steps.get(ref.step)
        if state is None:
            return self._unknown_step(ref.step)
        held = self._held.get(ref.step)
        if held is not None and held.action == "reevaluate":
            return (f"a re-evaluation of step {ref.step!r} was already asked; it starts "
                    + ("once the directive is resumed" if self._paused else "now"))
        if ref.step in self._decided:
            return (f"step {ref.step!r} was already approved or denied; that decision stands "
                    "and the step is no longer re-evaluated")
        if state.status not in REEVALUABLE:
            return (f"step {ref.step!r} is {state.status.value}; only blocked, failed or "
                    "awaiting_approval steps can be re-evaluated")
        return None

    async def _reevaluate(self: DirectiveWorkflow, ref: StepRef) -> None:
        state = self._steps[ref.step]
        if state.status is StepStatus.AWAITING_APPROVAL and self._parks_approvals:
            # the step waits in the directive: the run loop starts the re-evaluation
            self._pending.pop(ref.step, None)
            self._held[ref.step] = HeldDecision(step=ref.step, action="reevaluate")
        elif state.status is StepStatus.AWAITING_APPROVAL:
            self._pending.pop(ref.step, None)
            handle = self._children.get(ref.step)
            if handle is not None:
                self._gauge.add(SENT)
                await handle.signal("reevaluate")
        else:
            self._reevaluations[ref.step] = self._reevaluations.get(ref.step, 0) + 1
            self._start_step(ref.step, reevaluate=True)
            if self._patched(REVIVES_DEPENDANTS_PATCH):
                for name in steps_to_revive(self._plan_model, self._statuses()):
                    self._set_step(name, status=StepStatus.PENDING, reason="")
        self._changed = True


# ====================================================================== the table


@dataclass(frozen=True)
class Handler:
    """How Temporal (and a client, as `DirectiveWorkflow.<name>`) sees one handler."""

    name: str
    description: str


@dataclass(frozen=True)
class Command:
    input: Any  # the message's type; `X | None` ones may be sent without a payload
    problem: Callable[..., str | None]
    apply: Callable[..., Awaitable[None] | None]
    answer: Callable[[Any, Any], str]  # (workflow, input), once applied
    update: Handler
    signal: Handler | None = None
    is_async: bool = False  # apply awaits (relays to a child): a handler may interleave
    #: what the update waits for after a sync apply, before it answers
    settle: Callable[[Any], Awaitable[None]] | None = None

    @property
    def optional(self) -> bool:
        """Sent without a payload too (`pause`, `stop`...)."""
        return type(None) in get_args(self.input)


D = DirectiveCommands
COMMANDS = (
    Command(ApprovalDecision, D._approval_problem, D._approve, is_async=True,
            answer=lambda wf, d: f"step {d.step!r} approved by {d.by}",
            signal=Handler("approve", "Approve a step that waits (ApprovalDecision)."),
            update=Handler("approve_step", "Approve a waiting step; says if refused.")),
    Command(ApprovalDecision, D._approval_problem, D._deny, is_async=True,
            answer=lambda wf, d: f"step {d.step!r} denied by {d.by}",
            signal=Handler("deny", "Deny a step that waits: it is blocked."),
            update=Handler("deny_step", "Deny a waiting step; says if refused.")),
    Command(Empty | None, D._pause_problem, D._pause, settle=D._steps_told,
            answer=lambda wf, _: "paused: no new step or attempt starts until resumed",
            signal=Handler("pause", "No new step or attempt starts until resumed."),
            update=Handler("pause_directive", "Pause; says if refused.")),
    Command(Empty | None, D._resume_problem, D._resume,
            answer=lambda wf, _: "resumed",
            signal=Handler("resume", "Continue a paused directive."),
            update=Handler("resume_directive", "Resume; says if refused.")),
    Command(StopRequest | None, D._stop_problem, D._stop, is_async=True,
            answer=lambda wf, _: ("stopped: every step has ended, nothing merges after this"
                                  if wf._stop_waits else "stopping: running steps are cancelled"),
            signal=Handler("stop", "Cancel running steps and end stopped."),
            update=Handler("stop_directive", "Stop; says if refused.")),
    Command(GoalUpdate, D._goal_problem, D._update_goal,
            answer=lambda wf, _: "goal updated: the next generation is planned "
            + wf._goal_waits_for(),
            signal=Handler("update_goal", "Change the goal: a new generation."),
            update=Handler("update_directive_goal", "Change the goal: the next generation is planned for it.")),
    Command(BudgetRaise, D._budget_problem, D._raise_budget,
            answer=lambda wf, _: wf._raise_answer(),
            signal=Handler("raise_budget", "Raise budgets (never lowers)."),
            update=Handler("raise_directive_budget", "Raise budgets; says if refused.")),
    Command(StepRef, D._reevaluate_problem, D._reevaluate, is_async=True,
            answer=lambda wf, ref: f"step {ref.step!r} is being evaluated again",
            update=Handler("reevaluate_step", "Evaluate a step's branch again.")),
)


def _typed(fn: Callable[..., Any], command: Command, returns: Any) -> Callable[..., Any]:
    """Give a generated handler the signature Temporal decodes its payload by."""
    fn.__annotations__ = {"arg": command.input, "return": returns}
    if command.optional:
        fn.__defaults__ = (None,)
    return fn


def _signal(command: Command, handler: Handler) -> Callable[..., Any]:
    def ignored(problem: object) -> None:
        workflow.logger.warning("%s signal ignored: %s", handler.name, problem)

    if command.is_async:
        async def signal(self, arg):  # type: ignore[no-untyped-def]
            self._gauge.add(SIGNAL, arg)
            problem = command.problem(self, arg)
            if problem:
                return ignored(problem)
            try:
                await command.apply(self, arg)
            except ApplicationError as err:  # e.g. the step ended before it got the decision
                ignored(err)
    else:
        def signal(self, arg):  # type: ignore[no-untyped-def]
            self._gauge.add(SIGNAL, arg)
            problem = command.problem(self, arg)
            if problem:
                return ignored(problem)
            command.apply(self, arg)

    signal.__name__ = signal.__qualname__ = handler.name
    return workflow.signal(name=handler.name, description=handler.description)(
        _typed(signal, command, None))


def _update(command: Command, handler: Handler) -> Any:
    if command.is_async:
        async def update(self, arg):  # type: ignore[no-untyped-def]
            self._gauge.add(UPDATE, arg)
            # checked again: two updates may pass validation in one workflow task
            reject_if(command.problem(self, arg))
            await command.apply(self, arg)
            return UpdateAnswer(message=command.answer(self, arg))
    elif command.settle is not None:
        settle = command.settle

        async def update(self, arg):  # type: ignore[no-untyped-def]
            self._gauge.add(UPDATE, arg)
            command.apply(self, arg)
            await settle(self)
            return UpdateAnswer(message=command.answer(self, arg))
    else:
        def update(self, arg):  # type: ignore[no-untyped-def]
            self._gauge.add(UPDATE, arg)
            command.apply(self, arg)
            return UpdateAnswer(message=command.answer(self, arg))

    def validate(self, arg):  # type: ignore[no-untyped-def]
        reject_if(command.problem(self, arg))

    update.__name__ = update.__qualname__ = handler.name
    validate.__name__ = validate.__qualname__ = f"_validate_{handler.name}"
    method = workflow.update(name=handler.name, description=handler.description)(
        _typed(update, command, UpdateAnswer))
    method.validator(_typed(validate, command, None))
    return method


def with_commands(cls: type) -> type:
    """Give `cls` the signal and update (with its validator) of every command."""
    for command in COMMANDS:
        setattr(cls, command.update.name, _update(command, command.update))
        if command.signal is not None:
            setattr(cls, command.signal.name, _signal(command, command.signal))
    return cls
