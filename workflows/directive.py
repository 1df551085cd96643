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
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    from makima import constants as c
    from makima.contracts import (
        ActivityName,
        CompleteInput,
        CompleteOutput,
        CompletionSpec,
        EventType,
        Severity,
        StepResult,
    )
    from makima.dag import ready_steps, steps_to_skip
    from makima.models import (
        DirectiveSnapshot,
        DirectiveSpec,
        DirectiveStatus,
        GoalUpdate,
        HeldDecision,
        PendingApproval,
        PlannedStep,
        StepState,
        StepStatus,
    )
    from makima.policy import Breaker, BudgetLedger
    from workflows.carry import DirectiveCarrying
    from workflows.children import DirectiveChildren
    from workflows.commands import DirectiveCommands, with_commands
    from workflows.history_gauge import ACTIVITY, SENT, TASK, TIMER, HistoryGauge
    from workflows.planning import DirectivePlanning, cancel_reason
    from workflows.status import DirectiveStatusView, Phase
    from workflows.usage import cause_of

#: Every change of this issue that running directives would replay differently
#: (the carry built last, stop reaching starting children, a step cancelled from
#: outside ending the generation). Decided once per run, in `__init__`: a run that
#: started on older code keeps the older behaviour until it continues as new.
COMMANDS_HOLD_PATCH = "directive-commands-hold"
#: A decision is recorded only once the step has it, and no command is accepted while the
#: directive completes (added after COMMANDS_HOLD_PATCH had shipped).
DELIVERED_DECISIONS_PATCH = "directive-decisions-delivered"
#: A step waiting for a person waits in the directive, not in a running step workflow
#: (see HeldDecision), so a long generation can continue as new while it waits.
PARKED_APPROVALS_PATCH = "directive-approvals-parked"
#: A stop answers once every step has ended: nothing merges after the answer.
STOP_WAITS_PATCH = "directive-stop-answers-when-steps-ended"
#: No step is left active without a run: a step whose run ended before the directive
#: could tell it of a pause (a refused signal) still ends, and a step held as active
#: with no run fails (fuzz seed 468784: it hung the directive, across a checkpoint).
KEEPS_EVERY_STEP_PATCH = "directive-no-step-without-a-run"
#: A checkpoint is decided on what the run counts it added to its history, and the
#: wall-time breaker trips when its timer fires: never on the history length or the
#: clock an activation shows, which a status query can make one task early (see
#: workflows/history_gauge.py; tests/test_stale_activations.py).
COUNTS_NOT_CLOCK_PATCH = "directive-decides-on-counts-and-timers"
#: A cancel from outside (`temporal workflow cancel`) is a stop wherever it finds the
#: directive: while it prepares or plans it ended "failed", and while its events were
#: written it was swallowed and the directive continued as new.
CANCEL_IS_A_STOP_PATCH = "directive-cancel-is-a-stop"


# A spec that does not decode (wrong types, missing fields: `temporal workflow start
# --input` checks nothing) fails the workflow with pydantic's message naming each
# problem; as a plain task failure it would be retried forever. Updates whose payload
# does not decode are rejected with that message too.
@workflow.defn(name="DirectiveWorkflow", failure_exception_types=[ValidationError])
@with_commands  # approve, deny, pause, resume, stop, update_goal, raise_budget, reevaluate
class DirectiveWorkflow(DirectivePlanning, DirectiveChildren, DirectiveCarrying,
                        DirectiveStatusView, DirectiveCommands):
    @workflow.init
    def __init__(self, spec: DirectiveSpec) -> None:
        # Everything a handler reads is set here, from the input: a signal or update
        # may arrive before run() (signal-with-start, or while no worker runs).
        self._phase = Phase.PLANNING
        self._final: DirectiveStatus | None = None
        self._reason = ""
        self._steps: dict[str, StepState] = {}
        self._planned: dict[str, PlannedStep] = {}
        self._children: dict[str, workflow.ChildWorkflowHandle[Any, StepResult]] = {}
        self._progress_seq: dict[str, int] = {}
        self._run_cost: dict[str, float] = {}  # per step: spend reported by its current run
        self._reevaluations: dict[str, int] = {}
        # steps a person approved or denied whose decision is not yet acted on: held
        # here until its run merges (or the deny blocks it), or relayed to a waiting child
        # until it reports back; a second decision or a re-evaluation is refused meanwhile
        self._decided: set[str] = set()
        self._pending: dict[str, PendingApproval] = {}
        self._held: dict[str, HeldDecision] = {}
        self._user_paused = False
        self._breaker: str | None = None
        self._stop_reason: str | None = None
        self._goal_update: GoalUpdate | None = None
        self._changed = False
        self._checkpoint = False
        self._launching = 0
        self._starting: set[str] = set()  # steps whose child is being started
        self._telling = 0  # pause or resume signals to steps not yet delivered
        self._last_status: DirectiveStatus | None = None
        self._last_visible = ""
        self._cancelling = False
        self._completing = False
        self._gauge = HistoryGauge()
        self._gauge.add(1 + TASK, spec)  # started (with the input), the first task
        self._commands_hold = self._patched(COMMANDS_HOLD_PATCH)
        self._delivered_decisions = self._patched(DELIVERED_DECISIONS_PATCH)
        self._parks_approvals = self._patched(PARKED_APPROVALS_PATCH)
        self._stop_waits = self._patched(STOP_WAITS_PATCH)
        self._keeps_every_step = self._patched(KEEPS_EVERY_STEP_PATCH)
        self._counts = self._patched(COUNTS_NOT_CLOCK_PATCH)
        self._cancel_stops = self._patched(CANCEL_IS_A_STOP_PATCH)
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
                if self._patched("validate-supplied-plan-first") and not self._plan_ok():
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
            self._phase = Phase.RUNNING
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
                # the generation's plan and steps, once: the previous generation's were only
                # needed to plan this one
                return await self._continue(self._spec, self._carry(
                    generation=self._generation, current_plan=self._plan_model,
                    current_steps=list(self._steps.values()), replan_reason=self._replan_reason,
                    reevaluations=self._reevaluations, goal_update=self._goal_update,
                    pending_approvals=list(self._pending.values()),
                    held_decisions=list(self._held.values())))
            return await self._next_generation()
        except asyncio.CancelledError:
            if self._final is not None and self._cancel_stops:
                return await self._finish()  # it had ended before the cancel came
            # cancelled from outside (e.g. `temporal workflow cancel`): same as stop
            self._stop_reason = self._stop_reason or cancel_reason()
            await self._cancel_children()
            self._cancel_parked()
            self._end(DirectiveStatus.STOPPED, self._stop_reason)
            await self._log.drain()
            raise

    # ================================================================== the DAG

    async def _run_steps(self) -> None:
        while True:
            self._check_breakers()
            if self._stop_reason is not None:
                await self._cancel_children()
                self._cancel_parked()
                self._end(DirectiveStatus.STOPPED, self._stop_reason)
                return
            if self._parks_approvals:
                self._act_on_held()
            if self._keeps_every_step:
                self._end_orphans()
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
            # A long generation continues as new once no step workflow runs (a step that
            # waits for a person waits here, in the carry, when approvals are parked).
            busy = (bool(self._children) or self._launching > 0) if self._parks_approvals else running
            may_checkpoint = self._parks_approvals or not ending
            self._checkpoint = may_checkpoint and self._history_is_large()
            if self._checkpoint and not busy:
                return
            if not ending and not self._checkpoint and not self._paused:
                self._launch_ready()
            self._publish()
            self._changed = False
            self._log.flush()
            # messages that change nothing (refused signals) still grow the history
            grows = self._parks_approvals and may_checkpoint and not self._checkpoint
            timeout = self._wall_time_left()
            if timeout is not None:
                self._gauge.add(TIMER)
            try:
                await workflow.wait_condition(
                    lambda grows=grows: self._changed or (grows and self._history_is_large()),
                    timeout=timeout)
            except TimeoutError:  # the wall-time budget is spent: the next turn trips
                self._wall_time_spent = True
                self._gauge.add(TASK)

    def _patched(self, patch: str) -> bool:
        """`workflow.patched`, counting the marker event a patch that is on records
        (once per run: the SDK remembers the answer)."""
        on = workflow.patched(patch)
        if on and patch not in self._gauge.patches:
            self._gauge.patches.add(patch)
            self._gauge.add(1)
        return on

    def _history_is_large(self) -> bool:
        if self._counts:
            return self._gauge.full(c.HISTORY_CHECKPOINT_EVENTS, c.HISTORY_CHECKPOINT_BYTES)
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

    # ================================================================== ends of a generation

    async def _complete(self) -> None:
        self._completing = self._delivered_decisions
        self._log.flush()
        completion = CompleteInput(directive_id=self._id, spec=CompletionSpec.of(self._spec),
                                   integration_branch=self._branch,
                                   steps=list(self._steps.values()))
        self._gauge.add(ACTIVITY, completion)
        try:
            done = await workflow.execute_activity(
                ActivityName.COMPLETE_DIRECTIVE.value,
                completion,
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
            self._event(EventType.COMPLETION, f"completion failed: {cause_of(err)}",
                        severity=Severity.ERROR, data={"error": cause_of(err)})
        self._end(DirectiveStatus.COMPLETED, f"all {len(self._steps)} steps passed")

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

    async def _cancel_child(self, workflow_id: str) -> None:
        self._gauge.add(SENT)
        try:
            await workflow.get_external_workflow_handle(workflow_id).cancel()
        except Exception as err:  # it finished meanwhile
            workflow.logger.info("cancel of %s: %s", workflow_id, err)

    # ================================================================== state changes

    @property
    def _paused(self) -> bool:
        return self._user_paused or self._breaker is not None

    @property
    def _ledger(self) -> BudgetLedger:
        return BudgetLedger(self._spec.budgets, self._cost)

    def _elapsed(self) -> float:
        """Seconds since the directive started, by the clock (for what people read; a
        decision asks `_tripped`)."""
        return (workflow.now() - self._started_at).total_seconds()

    def _tripped(self, ledger: BudgetLedger | None = None) -> Breaker | None:
        """The breaker that has tripped under `ledger` (this run's by default). The
        wall-time budget is spent once its timer fired, not when the clock says so."""
        return (ledger or self._ledger).breaker(
            self._elapsed(), self._wall_time_spent if self._counts else None)

    def _wall_time_left(self) -> timedelta | None:
        if self._breaker is not None:
            return None
        left = self._ledger.seconds_left(self._elapsed())
        return None if left is None else timedelta(seconds=max(left, 0.001))

    def _check_breakers(self) -> None:
        if self._breaker is not None:
            return
        breaker = self._tripped()
        if breaker is None:
            return
        self._breaker = breaker.reason
        self._event(EventType.BREAKER_TRIPPED, breaker.reason, severity=Severity.WARNING,
                    data={"breaker": breaker.reason, "kind": breaker.kind.value})
        self._relay_pause()

    def _relay_pause(self) -> None:
        for handle in self._children.values():
            asyncio.create_task(self._tell_paused(handle, self._paused))
        self._changed = True

    def _end(self, status: DirectiveStatus, reason: str) -> None:
        self._final = status
        self._reason = reason
        self._phase = Phase.DONE
        self._publish()

    def _set_step(self, name: str, **changes: Any) -> None:
        state = self._steps[name].model_copy(update=changes)
        self._steps[name] = state
        self._step_event(state)
        self._changed = True
