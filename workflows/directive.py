"""DirectiveWorkflow: one directive, from plan to merged work.

Each run of this workflow is one *generation*: it plans (or takes the supplied
plan), validates the plan with the pure DAG rules (feeding problems back to
the planner while the re-plan budget lasts), then starts a StepWorkflow child
for every step whose dependencies have passed (the ready frontier). When a step
ends failed or blocked, or the goal changes, it stops launching, lets running
steps finish, and continues as new with the next generation, which keeps every
passed step. Budgets on cost and wall time pause it; `raise_budget` and
`resume` continue it. Users steer it with signals, or with updates that answer
whether the action was accepted; the `status` query shows everything.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import SearchAttributeKey
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    CancelledError,
    ChildWorkflowError,
    TerminatedError,
    WorkflowAlreadyStartedError,
)

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    from makima import constants as c
    from makima.contracts import (
        ActivityName,
        CompleteInput,
        CompleteOutput,
        EventType,
        PauseState,
        PlanInput,
        PlanOutput,
        PrepareInput,
        PrepareOutput,
        Severity,
        StepDecision,
        StepInput,
        StepProgress,
        StepResult,
        integration_branch,
        step_workflow_id,
    )
    from makima.dag import ready_steps, steps_to_skip, validate_plan
    from makima.models import (
        ApprovalDecision,
        BudgetRaise,
        DirectiveCarry,
        DirectiveSnapshot,
        DirectiveSpec,
        DirectiveStatus,
        Empty,
        GoalUpdate,
        PendingApproval,
        Plan,
        PlannedStep,
        PlannerKind,
        StepRef,
        StepState,
        StepStatus,
        StopRequest,
        UpdateAnswer,
    )
    from makima.policy import (
        budget_lowering,
        replan_refusal,
        seconds_until_wall_time,
        tripped_breaker,
    )
    from workflows.event_log import EventLog
    from workflows.step import PROGRESS_SIGNAL, StepWorkflow
    from workflows.usage import COUNT_FAILED_TRIES_PATCH, billed_usage

#: Kept current only when the directive was started with them (the starter sets
#: them on clusters where they are registered; see README, "Temporal UI").
STATUS_ATTRIBUTE = SearchAttributeKey.for_keyword("MakimaStatus")
OWNER_ATTRIBUTE = SearchAttributeKey.for_keyword("MakimaOwner")
GENERATION_ATTRIBUTE = SearchAttributeKey.for_int("MakimaGeneration")

REEVALUABLE = (StepStatus.BLOCKED, StepStatus.FAILED, StepStatus.AWAITING_APPROVAL)

#: Every change of this issue that running directives would replay differently
#: (the carry built last, stop reaching starting children, a step cancelled from
#: outside ending the generation). Decided once per run, in `__init__`: a run that
#: started on older code keeps the older behaviour until it continues as new.
COMMANDS_HOLD_PATCH = "directive-commands-hold"
#: A decision is recorded only once the step has it, and no command is accepted while the
#: directive completes (added after COMMANDS_HOLD_PATCH had shipped).
DELIVERED_DECISIONS_PATCH = "directive-decisions-delivered"
#: Once every step passed and the completion runs, a command can no longer change the end.
COMPLETING = "the directive is completing: every step passed"


def _cause(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    return str(err) or type(err).__name__


class _Phase:
    PLANNING = "planning"
    RUNNING = "running"
    DONE = "done"


# A spec that does not decode (wrong types, missing fields: `temporal workflow start
# --input` checks nothing) fails the workflow with pydantic's message naming each
# problem; as a plain task failure it would be retried forever. Updates whose payload
# does not decode are rejected with that message too.
@workflow.defn(name="DirectiveWorkflow", failure_exception_types=[ValidationError])
class DirectiveWorkflow:
    @workflow.init
    def __init__(self, spec: DirectiveSpec) -> None:
        # Everything a handler reads is set here, from the input: a signal or update
        # may arrive before run() (signal-with-start, or while no worker runs).
        self._phase = _Phase.PLANNING
        self._final: DirectiveStatus | None = None
        self._reason = ""
        self._steps: dict[str, StepState] = {}
        self._planned: dict[str, PlannedStep] = {}
        self._children: dict[str, workflow.ChildWorkflowHandle[Any, StepResult]] = {}
        self._progress_seq: dict[str, int] = {}
        self._run_cost: dict[str, float] = {}  # per step: spend reported by its current run
        self._reevaluations: dict[str, int] = {}
        self._decided: set[str] = set()  # decided, not yet reported back by the child
        self._pending: dict[str, PendingApproval] = {}
        self._user_paused = False
        self._breaker: str | None = None
        self._stop_reason: str | None = None
        self._goal_update: GoalUpdate | None = None
        self._changed = False
        self._checkpoint = False
        self._launching = 0
        self._last_status: DirectiveStatus | None = None
        self._last_visible = ""
        self._cancelling = False
        self._completing = False
        self._commands_hold = workflow.patched(COMMANDS_HOLD_PATCH)
        self._delivered_decisions = workflow.patched(DELIVERED_DECISIONS_PATCH)
        # a carry is only taken from the run this one continues; a start from outside
        # (the `temporal` CLI, any client) must not skip preparing and plan checks
        self._refusal = ""
        if spec.carry is not None and workflow.info().continued_run_id is None:
            self._refusal = ("the directive's input holds a 'carry', which only makima sets "
                             "when a directive continues as new; start it without one")
            spec = spec.model_copy(update={"carry": None})
        self._restore(spec)

    # ================================================================== run

    @workflow.run
    async def run(self, spec: DirectiveSpec) -> DirectiveSnapshot:
        if self._refusal:
            raise ApplicationError(self._refusal, type="InvalidSpec", non_retryable=True)
        try:
            if spec.carry is None:
                self._event(EventType.DIRECTIVE_STARTED, spec.title, data={
                    "spec": spec.model_dump(mode="json", exclude={"carry"}),
                    "title": spec.title, "owner": spec.owner,
                    "integration_branch": self._branch,
                })
            if self._stop_reason is not None and self._commands_hold:
                # stopped before it began (signal-with-start), or while the last run ended
                self._end(DirectiveStatus.STOPPED, self._stop_reason)
                return await self._finish()
            if spec.carry is None:
                # a supplied plan is checked before anything is written to the repository
                if workflow.patched("validate-supplied-plan-first") and not self._plan_ok():
                    return await self._finish()
                if not await self._prepare():
                    return await self._finish()
            if not self._steps:  # a new generation (not one taken up after a checkpoint)
                self._event(EventType.GENERATION_STARTED, self._replan_reason or "first plan",
                            data={"generation": self._generation, "reason": self._replan_reason})
                self._publish()
                plan = await self._plan()
                if plan is None:
                    return await self._finish()
                self._install(plan)
            self._phase = _Phase.RUNNING
            self._publish()
            while True:
                await self._run_steps()
                if self._final is not None:
                    return await self._finish()
                # the carry is built from the state as it is once nothing is in flight;
                # whatever arrived meanwhile is looked at again first
                if await self._settled():
                    break
            if self._checkpoint:
                return await self._continue(self._spec, self._carry(
                    generation=self._generation, current_plan=self._plan_model,
                    current_steps=list(self._steps.values()), previous_steps=self._previous,
                    previous_plan=self._previous_plan, replan_reason=self._replan_reason,
                    reevaluations=self._reevaluations, goal_update=self._goal_update))
            return await self._next_generation()
        except asyncio.CancelledError:
            # cancelled from outside (e.g. `temporal workflow cancel`): same as stop
            self._stop_reason = self._stop_reason or "the workflow was cancelled"
            await self._cancel_children()
            self._end(DirectiveStatus.STOPPED, self._stop_reason)
            await self._log.drain()
            raise

    def _restore(self, spec: DirectiveSpec) -> None:
        info = workflow.info()
        self._id = info.workflow_id
        carry = spec.carry or DirectiveCarry(generation=1, started_at=workflow.now(),
                                             integration_branch=integration_branch(self._id))
        self._spec = spec.model_copy(update={"carry": None})
        self._generation = carry.generation
        self._started_at = carry.started_at
        self._cost = carry.cost_usd
        self._replans = carry.replans
        self._failed_steps = carry.failed_steps
        self._previous = carry.previous_steps
        self._previous_plan = carry.previous_plan
        self._replan_reason = carry.replan_reason
        self._user_plan = carry.user_plan if spec.carry else spec.plan
        self._breaker = carry.breaker
        self._user_paused = carry.paused
        self._stop_reason = carry.stop_reason
        self._goal_update = carry.goal_update
        self._branch = carry.integration_branch or integration_branch(self._id)
        self._log = EventLog(self._id, self._id, carry.event_seq)
        if carry.current_plan is not None:
            self._plan_model = carry.current_plan
            self._planned = {s.name: s for s in carry.current_plan.steps}
            self._steps = {s.name: s for s in carry.current_steps}
            self._reevaluations = dict(carry.reevaluations)

    # ================================================================== planning

    async def _prepare(self) -> bool:
        try:
            prepared = await workflow.execute_activity(
                ActivityName.PREPARE_REPOSITORY.value,
                PrepareInput(directive_id=self._id, repository=self._spec.repository),
                result_type=PrepareOutput,
                start_to_close_timeout=c.GIT_TIMEOUT,
                heartbeat_timeout=c.GIT_HEARTBEAT_TIMEOUT,
                retry_policy=c.GIT_RETRY_POLICY,
                summary=f"prepare {self._spec.repository.location}"[:200],
            )
        except ActivityError as err:
            self._end(DirectiveStatus.FAILED, f"the repository could not be prepared: {_cause(err)}")
            return False
        self._branch = prepared.integration_branch
        return True

    async def _plan(self) -> Plan | None:
        """A valid plan for this generation, or None after failing the directive."""
        kept = [s.name for s in self._previous if s.status is StepStatus.PASSED]
        candidate: Plan | None = None
        errors: list[str] = []
        while True:
            from_user = self._user_plan is not None
            if self._user_plan is not None:
                candidate, self._user_plan = self._user_plan, None
            else:
                if self._spec.effective_planner is PlannerKind.NONE:
                    self._end(DirectiveStatus.FAILED,
                              "no plan was supplied and the directive has no planner")
                    return None
                try:
                    planned = await self._ask_planner(candidate, errors)
                except ActivityError as err:
                    if workflow.patched(COUNT_FAILED_TRIES_PATCH):  # e.g. an invalid answer
                        self._cost = round(self._cost + billed_usage(err).cost_usd, 6)
                    self._event(EventType.PLAN_FAILED, _cause(err), severity=Severity.ERROR,
                                data={"error": _cause(err)})
                    self._end(DirectiveStatus.FAILED, f"planning failed: {_cause(err)}")
                    return None
                self._cost = round(self._cost + planned.usage.cost_usd, 6)
                candidate = planned.plan
            errors = validate_plan(candidate, kept=kept)
            if not errors:
                self._event(EventType.PLAN_READY, f"{len(candidate.steps)} steps",
                            data={"plan": candidate.model_dump(mode="json")})
                return candidate
            self._event(EventType.PLAN_INVALID, "; ".join(errors), severity=Severity.WARNING,
                        data={"errors": errors})
            if from_user:
                self._end(DirectiveStatus.FAILED, "the supplied plan is invalid: " + "; ".join(errors))
                return None
            refusal = replan_refusal(self._spec.budgets, replans=self._replans,
                                     failed_steps=self._failed_steps)
            if refusal is not None:
                self._end(DirectiveStatus.FAILED,
                          f"the planner's plan is still invalid ({'; '.join(errors)}) and "
                          f"{refusal.reason}")
                return None
            self._replans += 1

    def _plan_ok(self) -> bool:
        """False (and the directive failed) when the supplied first plan is invalid."""
        if self._user_plan is None:
            return True
        errors = validate_plan(self._user_plan)
        if not errors:
            return True
        self._event(EventType.PLAN_INVALID, "; ".join(errors), severity=Severity.WARNING,
                    data={"errors": errors})
        self._end(DirectiveStatus.FAILED, "the supplied plan is invalid: " + "; ".join(errors))
        return False

    async def _ask_planner(self, previous: Plan | None, errors: list[str]) -> PlanOutput:
        self._log.flush()
        return await workflow.execute_activity(
            ActivityName.PLAN_DIRECTIVE.value,
            PlanInput(directive_id=self._id, spec=self._spec, generation=self._generation,
                      reason=self._replan_reason, existing_steps=self._previous,
                      previous_plan=previous, validation_errors=errors),
            result_type=PlanOutput,
            start_to_close_timeout=c.PLAN_TIMEOUT,
            retry_policy=c.PLAN_RETRY_POLICY,
            summary=f"plan generation {self._generation}",
        )

    def _install(self, plan: Plan) -> None:
        """The generation's steps: every passed step kept from before, then the new ones
        (a new step named like a kept step is that step)."""
        for kept in self._previous:
            if kept.status is StepStatus.PASSED:
                self._steps[kept.name] = kept
                self._planned[kept.name] = PlannedStep(
                    name=kept.name, description=kept.description, depends_on=kept.depends_on)
        for step in plan.steps:
            if step.name in self._steps:
                continue
            self._planned[step.name] = step
            self._steps[step.name] = StepState(
                name=step.name, depends_on=step.depends_on, description=step.description,
                generation=self._generation)
        self._plan_model = Plan(steps=list(self._planned.values()), summary=plan.summary)
        for state in self._steps.values():
            self._step_event(state)

    # ================================================================== the DAG

    async def _run_steps(self) -> None:
        while True:
            self._check_breakers()
            if self._stop_reason is not None:
                await self._cancel_children()
                self._end(DirectiveStatus.STOPPED, self._stop_reason)
                return
            for name in steps_to_skip(self._plan_model, self._statuses()):
                self._set_step(name, status=StepStatus.SKIPPED,
                               reason="a dependency can never pass")
            all_passed = all(s.status is StepStatus.PASSED for s in self._steps.values())
            if all_passed and self._goal_update is None:
                await self._complete()
                return
            ending = self._ending_reason()
            running = any(s.status.is_active for s in self._steps.values())
            if ending and not running and not self._paused:
                return  # the caller moves to the next generation or fails
            # a long generation continues as new once no step is running
            self._checkpoint = not ending and self._history_is_large()
            if self._checkpoint and not running:
                return
            if not ending and not self._checkpoint and not self._paused:
                self._launch_ready()
            self._publish()
            self._changed = False
            self._log.flush()
            # a timeout means the wall-time budget ran out: the next turn trips the breaker
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(lambda: self._changed,
                                              timeout=self._wall_time_left())

    def _history_is_large(self) -> bool:
        info = workflow.info()
        return (info.get_current_history_length() >= c.HISTORY_CHECKPOINT_EVENTS
                or info.is_continue_as_new_suggested())

    def _statuses(self) -> dict[str, StepStatus]:
        return {name: s.status for name, s in self._steps.items()}

    def _ending_reason(self) -> str:
        ending = (StepStatus.FAILED, StepStatus.BLOCKED)
        if self._commands_hold:
            ending += (StepStatus.CANCELLED,)
        for state in self._steps.values():
            if state.status in ending:
                return f"step {state.name!r} {state.status.value}: {state.reason}"
        if self._goal_update is not None:
            return "the goal changed"
        return ""

    def _launch_ready(self) -> None:
        running = sum(1 for s in self._steps.values() if s.status.is_active)
        room = self._spec.max_parallel_steps - running
        for name in ready_steps(self._plan_model, self._statuses())[: max(room, 0)]:
            self._start_step(name)

    def _start_step(self, name: str, *, reevaluate: bool = False) -> None:
        state = self._steps[name]
        run = self._reevaluations.get(name, 0)
        wf_id = step_workflow_id(self._id, self._generation, name, run)
        step_input = StepInput(
            directive_id=self._id,
            generation=self._generation,
            spec=self._spec.model_copy(update={"plan": None}),
            step=self._planned[name],
            integration_branch=self._branch,
            paused=self._paused,
            reevaluate=reevaluate,
            first_attempt=state.attempts + 1,
            rework_count=state.rework_count,
        )
        self._progress_seq[name] = 0
        self._run_cost[name] = 0.0
        self._set_step(name, status=StepStatus.EVALUATING if reevaluate else StepStatus.RUNNING,
                       attempts=state.attempts + 1, workflow_id=wf_id, reason="")
        self._launching += 1
        asyncio.create_task(self._child(name, wf_id, step_input))

    async def _child(self, name: str, wf_id: str, step_input: StepInput) -> None:
        try:
            try:
                handle = await workflow.start_child_workflow(
                    StepWorkflow.run,
                    step_input,
                    id=wf_id,
                    task_queue=workflow.info().task_queue,
                    parent_close_policy=workflow.ParentClosePolicy.REQUEST_CANCEL,
                    static_summary=f"{name}: {step_input.step.description}"[:200],
                )
            finally:
                self._launching -= 1
            self._children[name] = handle
            if self._cancelling and self._commands_hold:
                # the stop was accepted while this child was being started
                await self._cancel_child(handle.id)
            elif self._paused != step_input.paused:  # changed while the child was starting
                await handle.signal("set_paused", PauseState(paused=self._paused))
            self._on_result(await handle)
        except WorkflowAlreadyStartedError:  # ids are unique per run; say so if not
            self._failed_steps += 1
            self._set_step(name, status=StepStatus.FAILED, reason=f"workflow {wf_id} already exists")
        except ChildWorkflowError as err:
            ended_from_outside = isinstance(err.cause, (CancelledError, TerminatedError))
            if ended_from_outside and self._commands_hold and not self._cancelling:
                # not our doing (`temporal workflow cancel/terminate` of the step): the
                # generation ends as after a failed step
                self._failed_steps += 1
                what = "cancelled" if isinstance(err.cause, CancelledError) else "terminated"
                self._set_step(name, status=StepStatus.CANCELLED,
                               reason=f"its workflow {wf_id} was {what} from outside makima")
            elif isinstance(err.cause, CancelledError):
                self._set_step(name, status=StepStatus.CANCELLED, reason="cancelled")
            else:
                self._failed_steps += 1
                self._set_step(name, status=StepStatus.FAILED, reason=_cause(err))
        finally:
            self._children.pop(name, None)
            self._pending.pop(name, None)
            self._decided.discard(name)
            self._changed = True

    def _on_result(self, result: StepResult) -> None:
        state = self._steps[result.name]
        # what the run spent that its progress reports did not carry
        extra = max(0.0, round(result.usage.cost_usd - self._run_cost.get(result.name, 0.0), 6))
        self._cost = round(self._cost + extra, 6)
        if result.status in (StepStatus.FAILED, StepStatus.BLOCKED):
            self._failed_steps += 1
        self._set_step(
            result.name, status=result.status, attempts=max(state.attempts, result.attempts),
            rework_count=result.rework_count, score=result.score, confidence=result.confidence,
            summary=result.summary, reason=result.reason, branch=result.branch,
            commit=result.commit, cost_usd=round(state.cost_usd + extra, 6))

    @workflow.signal(name=PROGRESS_SIGNAL, description="From a step child: status and spend.")
    def step_progress(self, progress: StepProgress) -> None:
        """From a running StepWorkflow: its status changed or it spent money."""
        state = self._steps.get(progress.name)
        if state is None or progress.generation != self._generation:
            return
        if progress.seq <= self._progress_seq.get(progress.name, 0):
            return  # an older report arriving late
        self._progress_seq[progress.name] = progress.seq
        spent = progress.usage.cost_usd
        self._cost = round(self._cost + spent, 6)
        self._run_cost[progress.name] = self._run_cost.get(progress.name, 0.0) + spent
        changes: dict[str, Any] = {
            "status": progress.status,
            "attempts": max(state.attempts, progress.attempt),
            "cost_usd": round(state.cost_usd + spent, 6),
        }
        if progress.score is not None:
            changes.update(score=progress.score, confidence=progress.confidence,
                           summary=progress.summary)
        if progress.status is StepStatus.REWORK:
            changes["rework_count"] = state.rework_count + 1
        self._set_step(progress.name, **changes)
        if progress.status is StepStatus.AWAITING_APPROVAL:
            self._decided.discard(progress.name)
            self._pending[progress.name] = PendingApproval(
                step=progress.name, attempt=progress.attempt, score=progress.score or 0.0,
                summary=progress.summary, requested_at=progress.at,
                generation=self._generation, branch=progress.branch, commit=progress.commit)
            self._event(EventType.APPROVAL_REQUESTED, f"{progress.name} waits for a decision",
                        step=progress.name, attempt=progress.attempt,
                        data={"score": progress.score, "summary": progress.summary})
        self._changed = True

    # ================================================================== ends of a generation

    async def _complete(self) -> None:
        self._completing = self._delivered_decisions
        self._log.flush()
        try:
            done = await workflow.execute_activity(
                ActivityName.COMPLETE_DIRECTIVE.value,
                CompleteInput(directive_id=self._id, spec=self._spec,
                              integration_branch=self._branch, steps=list(self._steps.values())),
                result_type=CompleteOutput,
                start_to_close_timeout=c.GIT_TIMEOUT,
                heartbeat_timeout=c.GIT_HEARTBEAT_TIMEOUT,
                retry_policy=c.GIT_RETRY_POLICY,
                summary=f"completion: {self._spec.completion.value}",
            )
            self._event(EventType.COMPLETION, done.message,
                        severity=Severity.INFO if done.done else Severity.WARNING,
                        data=done.model_dump(mode="json"))
        except ActivityError as err:  # the work is merged; only the hand-over failed
            self._event(EventType.COMPLETION, f"completion failed: {_cause(err)}",
                        severity=Severity.ERROR, data={"error": _cause(err)})
        self._end(DirectiveStatus.COMPLETED, f"all {len(self._steps)} steps passed")

    async def _next_generation(self) -> DirectiveSnapshot:
        reason = self._ending_reason()
        update = self._goal_update
        spec = self._spec
        user_plan = None
        if update is None:
            if spec.effective_planner is PlannerKind.NONE:
                self._end(DirectiveStatus.FAILED,
                          f"{reason}; the directive has a supplied plan and no planner, so it "
                          "cannot re-plan")
                return await self._finish()
            refusal = replan_refusal(spec.budgets, replans=self._replans,
                                     failed_steps=self._failed_steps)
            if refusal is not None:
                self._end(DirectiveStatus.FAILED, f"{reason}; {refusal.reason}")
                return await self._finish()
            replans = self._replans + 1
        else:
            changes: dict[str, Any] = {"goal": update.goal}
            if update.requirements is not None:
                changes["requirements"] = update.requirements
            if update.acceptance_criteria is not None:
                changes["acceptance_criteria"] = update.acceptance_criteria
            spec = spec.model_copy(update=changes)
            user_plan = update.plan
            reason = f"the goal changed: {update.goal}"
            replans = self._replans  # a person's change of goal is not a failure
        return await self._continue(spec, self._carry(
            generation=self._generation + 1, replans=replans, goal_update=None,
            previous_steps=list(self._steps.values()), previous_plan=self._plan_model,
            replan_reason=reason[: c.MAX_TEXT_IN_HISTORY], user_plan=user_plan))

    def _carry(self, **fields: Any) -> DirectiveCarry:
        """What the next run needs; `fields` say what differs from this run."""
        base: dict[str, Any] = {
            "generation": self._generation, "started_at": self._started_at,
            "cost_usd": self._cost, "replans": self._replans,
            "failed_steps": self._failed_steps, "event_seq": self._log.seq,
            "breaker": self._breaker, "paused": self._user_paused,
            "integration_branch": self._branch, "stop_reason": self._stop_reason,
            "goal_update": self._goal_update,
        }
        return DirectiveCarry(**(base | fields))

    async def _settled(self) -> bool:
        """Wait until nothing is in flight (handlers, the event drain, children being
        started); True when nothing changed meanwhile, so a carry built now holds it all."""
        if not self._commands_hold:
            return True  # a run begun on older code waits in _continue, as it did
        self._changed = False
        await workflow.wait_condition(
            lambda: workflow.all_handlers_finished() and not self._launching)
        await self._log.drain()
        return (not self._changed and self._log.idle and workflow.all_handlers_finished()
                and not self._children and not self._launching)

    async def _continue(self, spec: DirectiveSpec, carry: DirectiveCarry) -> DirectiveSnapshot:
        if not self._commands_hold:
            await workflow.wait_condition(workflow.all_handlers_finished)
            await self._log.drain()
        # no await between _settled() and here: no handler can change what the carry holds
        workflow.continue_as_new(spec.model_copy(update={"carry": carry}))

    async def _finish(self) -> DirectiveSnapshot:
        await workflow.wait_condition(workflow.all_handlers_finished)
        await self._log.drain()
        snapshot = self.status()
        if self._final is DirectiveStatus.FAILED:
            raise ApplicationError(self._reason, snapshot, type="DirectiveFailed",
                                   non_retryable=True)
        return snapshot

    async def _cancel_children(self) -> None:
        """Cancel every step that runs or is being started, and wait until each has
        ended (a cancelled child cancels its running activity and removes its
        worktree first). A child still starting is cancelled once it has started."""
        self._cancelling = True
        for handle in list(self._children.values()):
            await self._cancel_child(handle.id)
        await workflow.wait_condition(lambda: not self._children and not self._launching)

    @staticmethod
    async def _cancel_child(workflow_id: str) -> None:
        try:
            await workflow.get_external_workflow_handle(workflow_id).cancel()
        except Exception as err:  # it finished meanwhile
            workflow.logger.info("cancel of %s: %s", workflow_id, err)

    # ================================================================== state changes

    @property
    def _paused(self) -> bool:
        return self._user_paused or self._breaker is not None

    def _status_now(self) -> DirectiveStatus:
        if self._final is not None:
            return self._final
        if self._phase == _Phase.PLANNING:
            return DirectiveStatus.PLANNING
        return DirectiveStatus.PAUSED if self._paused else DirectiveStatus.ACTIVE

    def _elapsed(self) -> float:
        return (workflow.now() - self._started_at).total_seconds()

    def _wall_time_left(self) -> timedelta | None:
        if self._breaker is not None:
            return None
        left = seconds_until_wall_time(self._spec.budgets, self._elapsed())
        return None if left is None else timedelta(seconds=max(left, 0.001))

    def _check_breakers(self) -> None:
        if self._breaker is not None:
            return
        breaker = tripped_breaker(self._spec.budgets, cost_usd=self._cost,
                                  elapsed_seconds=self._elapsed())
        if breaker is None:
            return
        self._breaker = breaker.reason
        self._event(EventType.BREAKER_TRIPPED, breaker.reason, severity=Severity.WARNING,
                    data={"breaker": breaker.reason, "kind": breaker.kind.value})
        self._relay_pause()

    def _relay_pause(self) -> None:
        for handle in self._children.values():
            asyncio.create_task(handle.signal("set_paused", PauseState(paused=self._paused)))
        self._changed = True

    def _end(self, status: DirectiveStatus, reason: str) -> None:
        self._final = status
        self._reason = reason
        self._phase = _Phase.DONE
        self._publish()

    def _set_step(self, name: str, **changes: Any) -> None:
        state = self._steps[name].model_copy(update=changes)
        self._steps[name] = state
        self._step_event(state)
        self._changed = True

    def _step_event(self, state: StepState) -> None:
        self._event(EventType.STEP_STATUS, state.status.value, step=state.name,
                    attempt=state.attempts or None, data={
                        "status": state.status.value, "attempts": state.attempts,
                        "score": state.score,
                        "confidence": state.confidence.value if state.confidence else None,
                        "depends_on": state.depends_on, "description": state.description,
                        "summary": state.summary[:2000], "reason": state.reason[:2000],
                        "workflow_id": state.workflow_id,
                    })

    def _event(self, type: EventType, message: str = "", *, step: str | None = None,
               attempt: int | None = None, data: dict[str, Any] | None = None,
               severity: Severity = Severity.INFO, actor: str = "makima") -> None:
        self._log.add(type, message[:2000], generation=self._generation, step=step,
                      attempt=attempt, data=data, severity=severity, actor=actor)

    def _publish(self) -> None:
        """Record a directive status change, and keep the UI's view current."""
        status = self._status_now()
        if status != self._last_status:
            self._last_status = status
            self._event(EventType.DIRECTIVE_STATUS, self._reason or status.value, data={
                "status": status.value, "reason": self._reason, "generation": self._generation,
                "cost_usd": self._cost, "breaker": self._breaker,
            }, severity=Severity.ERROR if status is DirectiveStatus.FAILED else Severity.INFO)
        # the list view's status also tells when a person is needed
        visible = "awaiting_approval" if self._pending and not status.is_final else status.value
        if (visible != self._last_visible
                and workflow.info().typed_search_attributes.get(STATUS_ATTRIBUTE) is not None):
            workflow.upsert_search_attributes([
                STATUS_ATTRIBUTE.value_set(visible),
                GENERATION_ATTRIBUTE.value_set(self._generation),
            ])
        self._last_visible = visible
        workflow.set_current_details(self._details_markdown(status))

    def _details_markdown(self, status: DirectiveStatus) -> str:
        counts: dict[str, int] = {}
        for state in self._steps.values():
            counts[state.status.value] = counts.get(state.status.value, 0) + 1
        progress = ", ".join(f"{n} {s}" for s, n in counts.items()) or "no steps yet"
        lines = [
            f"**{self._spec.title}** — {status.value}, generation {self._generation}",
            f"Steps: {progress}",
            f"Spend: ${self._cost:.4f}" + (f" of ${self._spec.budgets.max_cost_usd:.2f}"
                                           if self._spec.budgets.max_cost_usd is not None else ""),
        ]
        if self._pending:
            lines.append("Waiting for approval: " + ", ".join(self._pending))
        if self._goal_update is not None and not status.is_final:
            lines.append(f"Goal change pending: planned {self._goal_waits_for()}")
        if self._breaker:
            lines.append(f"Paused: {self._breaker}")
        if self._reason:
            lines.append(f"Reason: {self._reason}")
        return "\n\n".join(lines)

    # ================================================================== query

    @workflow.query(name="status", description="The directive as it is now: steps, approvals, spend.")
    def status(self) -> DirectiveSnapshot:
        return DirectiveSnapshot(
            directive_id=self._id,
            title=self._spec.title,
            status=self._status_now(),
            generation=self._generation,
            steps=list(self._steps.values()),
            pending_approvals=list(self._pending.values()),
            cost_usd=self._cost,
            elapsed_seconds=round(self._elapsed(), 3),
            breaker=self._breaker,
            reason=self._reason,
            replans=self._replans,
            budgets=self._spec.budgets,
            integration_branch=self._branch,
            owner=self._spec.owner,
            recent_events=list(self._log.recent),
            pending_goal=self._goal_update.goal[:2000] if self._goal_update else None,
            pending_goal_waits_for=self._goal_waits_for(),
        )

    # ================================================================== approvals

    def _approval_problem(self, decision: ApprovalDecision) -> str | None:
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

    def _unknown_step(self, name: str) -> str:
        known = ", ".join(self._steps) or "none yet"
        return f"unknown step {name!r}; this generation's steps are: {known}"

    async def _decide(self, decision: ApprovalDecision, approved: bool) -> None:
        # checked again here: two decisions may pass validation in one workflow task
        self._reject_if(self._approval_problem(decision))
        if self._delivered_decisions:
            await self._relay_decision(decision, approved)
            return
        pending = self._pending.pop(decision.step)
        self._decided.add(decision.step)
        self._event(EventType.APPROVAL_DECIDED,
                    f"{decision.step} {'approved' if approved else 'denied'} by {decision.by}",
                    step=decision.step, attempt=pending.attempt, actor=decision.by,
                    data={"approved": approved, "by": decision.by, "comment": decision.comment})
        self._changed = True
        handle = self._children.get(decision.step)
        if handle is not None:
            await handle.signal("decide", StepDecision(approved=approved, by=decision.by,
                                                       comment=decision.comment))

    async def _relay_decision(self, decision: ApprovalDecision, approved: bool) -> None:
        """Hand the decision to the waiting step, and record it only once the step has
        it: a step that ended meanwhile (stopped, cancelled) refuses the decision."""
        # from now on a second decision, or a re-evaluation, of this step is refused
        pending = self._pending.pop(decision.step)
        self._decided.add(decision.step)
        handle = self._children.get(decision.step)
        try:
            if handle is None:
                raise ApplicationError("its workflow is not running")
            await handle.signal("decide", StepDecision(approved=approved, by=decision.by,
                                                       comment=decision.comment))
        except ApplicationError as err:
            self._decided.discard(decision.step)
            raise ApplicationError(
                f"step {decision.step!r} ended before the decision reached it ({err.message})",
                type="Rejected", non_retryable=True) from err
        self._event(EventType.APPROVAL_DECIDED,
                    f"{decision.step} {'approved' if approved else 'denied'} by {decision.by}",
                    step=decision.step, attempt=pending.attempt, actor=decision.by,
                    data={"approved": approved, "by": decision.by, "comment": decision.comment})
        self._changed = True

    @workflow.signal(name="approve", description="Approve a step that waits (ApprovalDecision).")
    async def approve(self, decision: ApprovalDecision) -> None:
        problem = self._approval_problem(decision)
        if problem:
            workflow.logger.warning("approve signal ignored: %s", problem)
            return
        try:
            await self._decide(decision, True)
        except ApplicationError as err:
            workflow.logger.warning("approve signal ignored: %s", err)

    @workflow.signal(name="deny", description="Deny a step that waits: it is blocked.")
    async def deny(self, decision: ApprovalDecision) -> None:
        problem = self._approval_problem(decision)
        if problem:
            workflow.logger.warning("deny signal ignored: %s", problem)
            return
        try:
            await self._decide(decision, False)
        except ApplicationError as err:
            workflow.logger.warning("deny signal ignored: %s", err)

    @workflow.update(name="approve_step", description="Approve a waiting step; says if refused.")
    async def approve_step(self, decision: ApprovalDecision) -> UpdateAnswer:
        await self._decide(decision, True)
        return UpdateAnswer(message=f"step {decision.step!r} approved by {decision.by}")

    @approve_step.validator
    def _validate_approve(self, decision: ApprovalDecision) -> None:
        self._reject_if(self._approval_problem(decision))

    @workflow.update(name="deny_step", description="Deny a waiting step; says if refused.")
    async def deny_step(self, decision: ApprovalDecision) -> UpdateAnswer:
        await self._decide(decision, False)
        return UpdateAnswer(message=f"step {decision.step!r} denied by {decision.by}")

    @deny_step.validator
    def _validate_deny(self, decision: ApprovalDecision) -> None:
        self._reject_if(self._approval_problem(decision))

    @staticmethod
    def _reject_if(problem: str | None) -> None:
        if problem:
            raise ApplicationError(problem, type="Rejected", non_retryable=True)

    # ================================================================== pause, resume, stop

    def _pause_problem(self) -> str | None:
        if self._completing:
            return COMPLETING
        if self._final is not None:
            return f"the directive is {self._final.value}"
        if self._user_paused:
            return "the directive is already paused"
        return None

    def _resume_problem(self) -> str | None:
        if self._completing:
            return COMPLETING
        if self._final is not None:
            return f"the directive is {self._final.value}"
        if not self._paused:
            return "the directive is not paused"
        if self._breaker is not None:
            still = tripped_breaker(self._spec.budgets, cost_usd=self._cost,
                                    elapsed_seconds=self._elapsed())
            if still is not None:
                return f"cannot resume: {still.reason}; raise the budget first"
        return None

    def _do_pause(self) -> None:
        self._user_paused = True
        self._publish()
        self._relay_pause()

    def _do_resume(self) -> None:
        self._user_paused = False
        if self._breaker is not None and tripped_breaker(
                self._spec.budgets, cost_usd=self._cost, elapsed_seconds=self._elapsed()) is None:
            self._breaker = None
        self._publish()
        self._relay_pause()

    @workflow.signal(name="pause", description="No new step or attempt starts until resumed.")
    def pause(self, request: Empty | None = None) -> None:
        problem = self._pause_problem()
        if problem:
            workflow.logger.warning("pause signal ignored: %s", problem)
            return
        self._do_pause()

    @workflow.signal(name="resume", description="Continue a paused directive.")
    def resume(self, request: Empty | None = None) -> None:
        problem = self._resume_problem()
        if problem:
            workflow.logger.warning("resume signal ignored: %s", problem)
            return
        self._do_resume()

    @workflow.update(name="pause_directive", description="Pause; says if refused.")
    def pause_directive(self, request: Empty | None = None) -> UpdateAnswer:
        self._do_pause()
        return UpdateAnswer(message="paused: no new step or attempt starts until resumed")

    @pause_directive.validator
    def _validate_pause(self, request: Empty | None = None) -> None:
        self._reject_if(self._pause_problem())

    @workflow.update(name="resume_directive", description="Resume; says if refused.")
    def resume_directive(self, request: Empty | None = None) -> UpdateAnswer:
        self._do_resume()
        return UpdateAnswer(message="resumed")

    @resume_directive.validator
    def _validate_resume(self, request: Empty | None = None) -> None:
        self._reject_if(self._resume_problem())

    def _stop_problem(self) -> str | None:
        if self._completing:
            return COMPLETING
        if self._final is not None:
            return f"the directive is already {self._final.value}"
        if self._stop_reason is not None:
            return "the directive is already stopping"
        return None

    @workflow.signal(name="stop", description="Cancel running steps and end stopped.")
    def stop(self, request: StopRequest | None = None) -> None:
        problem = self._stop_problem()
        if problem:
            workflow.logger.warning("stop signal ignored: %s", problem)
            return
        self._stop_reason = (request or StopRequest()).reason
        self._changed = True

    @workflow.update(name="stop_directive", description="Stop; says if refused.")
    def stop_directive(self, request: StopRequest | None = None) -> UpdateAnswer:
        self._stop_reason = (request or StopRequest()).reason
        self._changed = True
        return UpdateAnswer(message="stopping: running steps are cancelled")

    @stop_directive.validator
    def _validate_stop(self, request: StopRequest | None = None) -> None:
        self._reject_if(self._stop_problem())

    # ================================================================== goal and budget

    def _goal_problem(self, update: GoalUpdate) -> str | None:
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

    def _apply_goal(self, update: GoalUpdate) -> None:
        self._goal_update = update
        self._event(EventType.GOAL_UPDATED, update.goal[:200], data={
            "goal": update.goal, "requirements": update.requirements,
            "plan_supplied": update.plan is not None})
        self._changed = True

    @workflow.signal(name="update_goal", description="Change the goal: a new generation.")
    def update_goal(self, update: GoalUpdate) -> None:
        problem = self._goal_problem(update)
        if problem:
            workflow.logger.warning("update_goal signal ignored: %s", problem)
            return
        self._apply_goal(update)

    @workflow.update(name="update_directive_goal",
                     description="Change the goal: the next generation is planned for it.")
    def update_directive_goal(self, update: GoalUpdate) -> UpdateAnswer:
        self._apply_goal(update)
        return UpdateAnswer(message="goal updated: the next generation is planned "
                                    + self._goal_waits_for())

    def _goal_waits_for(self) -> str:
        """When a goal change turns into a plan: what it still waits for."""
        if self._goal_update is None:
            return ""
        running = [n for n, s in self._steps.items()
                   if s.status.is_active and n not in self._pending]
        waits = []
        if running:
            waits.append(f"running steps finish ({', '.join(running)})")
        if self._pending:
            waits.append("a person decides on " + ", ".join(
                f"step {n!r} (attempt {p.attempt})" for n, p in self._pending.items()))
        if self._paused:
            waits.append("the directive is resumed")
        return "once " + " and ".join(waits) if waits else "now"

    @update_directive_goal.validator
    def _validate_goal(self, update: GoalUpdate) -> None:
        self._reject_if(self._goal_problem(update))

    def _budget_problem(self, request: BudgetRaise) -> str | None:
        if self._completing:
            return COMPLETING
        if self._final is not None:
            return f"the directive is {self._final.value}"
        if not request.model_dump(exclude_none=True):
            return "name at least one budget to raise"
        return budget_lowering(self._spec.budgets, request)

    def _apply_budget(self, request: BudgetRaise) -> None:
        budgets = request.applied_to(self._spec.budgets)
        self._spec = self._spec.model_copy(update={"budgets": budgets})
        if self._breaker is not None and tripped_breaker(
                budgets, cost_usd=self._cost, elapsed_seconds=self._elapsed()) is None:
            self._breaker = None
            self._user_paused = True  # stays paused until a person resumes
        self._event(EventType.BUDGET_RAISED, "budgets raised",
                    data={"budgets": budgets.model_dump(mode="json")})
        self._publish()
        self._changed = True

    @workflow.signal(name="raise_budget", description="Raise budgets (never lowers).")
    def raise_budget(self, request: BudgetRaise) -> None:
        problem = self._budget_problem(request)
        if problem:
            workflow.logger.warning("raise_budget signal ignored: %s", problem)
            return
        self._apply_budget(request)

    @workflow.update(name="raise_directive_budget", description="Raise budgets; says if refused.")
    def raise_directive_budget(self, request: BudgetRaise) -> UpdateAnswer:
        self._apply_budget(request)
        return UpdateAnswer(message="budgets raised" + (
            "; resume to continue" if self._paused else ""))

    @raise_directive_budget.validator
    def _validate_budget(self, request: BudgetRaise) -> None:
        self._reject_if(self._budget_problem(request))

    # ================================================================== re-evaluation

    def _reevaluate_problem(self, ref: StepRef) -> str | None:
        if self._completing:
            return COMPLETING
        if self._final is not None:
            return f"the directive is {self._final.value}"
        if self._stop_reason is not None:
            return "the directive is stopping"
        state = self._steps.get(ref.step)
        if state is None:
            return self._unknown_step(ref.step)
        if ref.step in self._decided:
            return (f"step {ref.step!r} was already approved or denied; that decision stands "
                    "and the step is no longer re-evaluated")
        if state.status not in REEVALUABLE:
            return (f"step {ref.step!r} is {state.status.value}; only blocked, failed or "
                    "awaiting_approval steps can be re-evaluated")
        return None

    @workflow.update(name="reevaluate_step", description="Evaluate a step's branch again.")
    async def reevaluate_step(self, ref: StepRef) -> UpdateAnswer:
        self._reject_if(self._reevaluate_problem(ref))
        state = self._steps[ref.step]
        if state.status is StepStatus.AWAITING_APPROVAL:
            self._pending.pop(ref.step, None)
            handle = self._children.get(ref.step)
            if handle is not None:
                await handle.signal("reevaluate")
        else:
            self._reevaluations[ref.step] = self._reevaluations.get(ref.step, 0) + 1
            self._start_step(ref.step, reevaluate=True)
        self._changed = True
        return UpdateAnswer(message=f"step {ref.step!r} is being evaluated again")

    @reevaluate_step.validator
    def _validate_reevaluate(self, ref: StepRef) -> None:
        self._reject_if(self._reevaluate_problem(ref))
