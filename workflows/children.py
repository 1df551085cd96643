"""The directive's step children: start one, hear its progress, take its result.

A mixin of DirectiveWorkflow, over its state; which step starts when is decided
in directive.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from temporalio import workflow
from temporalio.exceptions import (
    CancelledError,
    ChildWorkflowError,
    TerminatedError,
    WorkflowAlreadyStartedError,
)

with workflow.unsafe.imports_passed_through():
    from makima.contracts import (
        EventType,
        PauseState,
        StepInput,
        StepProgress,
        StepResult,
        StepSpec,
        step_workflow_id,
    )
    from makima.models import PendingApproval, StepStatus
    from makima.policy import denial_reason
    from workflows.history_gauge import CHILD, SENT, SIGNAL
    from workflows.step import PROGRESS_SIGNAL, StepWorkflow
    from workflows.usage import cause_of

#: A report that arrives after a later one (a step sends two at once at a rework, and
#: they may arrive in either order) still counts its spend; only its status is stale.
#: Dropped, it was only made up for by the step's result, which a cancelled step has not
#: (fuzz seed 454083).
LATE_REPORTS_COUNT_PATCH = "directive-late-reports-count"
#: A result that repeats the status the step's last report gave (a step that returns to
#: wait for a person reported "awaiting_approval" first) records no second step_status
#: event: the audit trail said the step waited again, after the decision had come.
ONE_STATUS_EVENT_PATCH = "directive-result-repeats-no-status-event"


class DirectiveChildren:
    """The StepWorkflow children, over `DirectiveWorkflow`'s state."""

    def _start_step(self, name: str, *, reevaluate: bool = False,
                    approved: PendingApproval | None = None) -> None:
        """Start a run of step `name`: its next attempt, a re-evaluation of its branch,
        or (`approved`) the merge of the attempt a person approved."""
        state = self._steps[name]
        run = self._reevaluations.get(name, 0)
        wf_id = step_workflow_id(self._id, self._generation, name, run)
        attempts = approved.attempt if approved is not None else state.attempts + 1
        step_input = StepInput(
            directive_id=self._id,
            generation=self._generation,
            spec=StepSpec.of(self._spec),
            step=self._planned[name],
            integration_branch=self._branch,
            paused=self._paused,
            reevaluate=reevaluate,
            first_attempt=attempts,
            rework_count=state.rework_count,
            park_for_decision=self._parks_approvals,
            approved=approved,
        )
        self._progress_seq[name] = 0
        self._run_cost[name] = 0.0
        self._set_step(name, status=StepStatus.EVALUATING if reevaluate else StepStatus.RUNNING,
                       attempts=max(state.attempts, attempts), workflow_id=wf_id, reason="")
        self._launching += 1
        self._starting.add(name)
        self._gauge.add(CHILD, step_input)
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
                self._starting.discard(name)
            self._children[name] = handle
            if self._cancelling and self._commands_hold:
                # the stop was accepted while this child was being started
                await self._cancel_child(handle.id)
            elif self._paused != step_input.paused:  # changed while the child was starting
                if self._keeps_every_step:
                    await self._tell_paused(handle, self._paused)
                else:  # a run begun on older code: a failed signal left the step running
                    self._gauge.add(SENT)
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
                self._set_step(name, status=StepStatus.FAILED, reason=cause_of(err))
        finally:
            self._children.pop(name, None)
            if not self._parked(name):
                self._pending.pop(name, None)
                self._decided.discard(name)
                self._held.pop(name, None)
            self._changed = True

    def _tell_paused(self, handle: workflow.ChildWorkflowHandle[Any, StepResult],
                     paused: bool) -> Coroutine[Any, Any, None]:
        """The signal that tells a step's run whether the directive is paused, counted
        as undelivered from now (also before a task created with it first runs)."""
        self._telling += 1
        return self._signal_paused(handle, paused)

    async def _signal_paused(self, handle: workflow.ChildWorkflowHandle[Any, StepResult],
                             paused: bool) -> None:
        """Tell a step's run whether the directive is paused. A run that has ended
        meanwhile (cancelled or terminated from outside) cannot be told; its end reaches
        the directive as the child's result, so the refused signal is only logged."""
        self._gauge.add(SENT)
        try:
            await handle.signal("set_paused", PauseState(paused=paused))
        except Exception as err:  # e.g. "external workflow not found": it has ended
            workflow.logger.info("could not tell %s paused=%s: %s", handle.id, paused, err)
        finally:
            self._telling -= 1

    def _end_orphans(self) -> None:
        """A step the directive holds as active has a run that is starting or running, or
        (parked) waits here for a person. One that has neither (its run's end was lost,
        or an older run carried it so) fails, so the generation ends and re-plans
        instead of waiting for it forever."""
        for name, state in list(self._steps.items()):
            if (state.status.is_active and name not in self._children
                    and name not in self._starting and not self._parked(name)):
                self._failed_steps += 1
                self._set_step(name, status=StepStatus.FAILED,
                               reason=f"its workflow {state.workflow_id} ended without a "
                                      f"result while the step was {state.status.value}")

    # ------------------------------------------------------------------ steps that wait for a person

    def _parked(self, name: str) -> bool:
        """The step's run returned to wait for a person in the directive (see HeldDecision)."""
        state = self._steps.get(name)
        return (self._parks_approvals and state is not None
                and state.status is StepStatus.AWAITING_APPROVAL and name not in self._children)

    def _act_on_held(self) -> None:
        """Act on the answers people gave about parked steps: deny blocks the step now;
        approve starts the run that merges the approved attempt (also while paused: a
        merge is no new attempt, and a rework after a conflict waits for the resume);
        re-evaluate starts a run that evaluates the step branch again, once resumed."""
        for name, held in list(self._held.items()):
            if not self._parked(name):
                continue  # its run is still returning; acted on once it has
            if held.action == "deny":
                del self._held[name]
                self._decided.discard(name)
                self._failed_steps += 1
                self._set_step(name, status=StepStatus.BLOCKED,
                               reason=denial_reason(held.by, held.comment))
            elif held.action == "approve" or not self._paused:
                del self._held[name]
                self._reevaluations[name] = self._reevaluations.get(name, 0) + 1
                self._start_step(name, reevaluate=held.action == "reevaluate",
                                 approved=held.approval if held.action == "approve" else None)

    def _cancel_parked(self) -> None:
        """On stop: parked steps end cancelled, their approvals and answers void."""
        for name in [n for n in self._steps if self._parked(n)]:
            self._pending.pop(name, None)
            self._held.pop(name, None)
            self._set_step(name, status=StepStatus.CANCELLED,
                           reason="the directive stopped while the step waited for a decision")
    def _on_result(self, result: StepResult) -> None:
        self._gauge.add(0, result)
        self._log.forward(result.unrecorded)  # written with the next batch
        state = self._steps[result.name]
        # what the run spent that its progress reports did not carry
        extra = max(0.0, round(result.usage.cost_usd - self._run_cost.get(result.name, 0.0), 6))
        self._cost = round(self._cost + extra, 6)
        if result.status in (StepStatus.FAILED, StepStatus.BLOCKED):
            self._failed_steps += 1
        changes = dict(
            status=result.status, attempts=max(state.attempts, result.attempts),
            rework_count=result.rework_count, score=result.score, confidence=result.confidence,
            summary=result.summary, reason=result.reason, branch=result.branch,
            commit=result.commit, cost_usd=round(state.cost_usd + extra, 6))
        if result.status is state.status and self._patched(ONE_STATUS_EVENT_PATCH):
            self._steps[result.name] = state.model_copy(update=changes)
            self._changed = True
        else:
            self._set_step(result.name, **changes)

    def _count_spend(self, name: str, spent: float) -> float:
        """Add what step `name`'s current run reported it spent; the step's new spend."""
        self._cost = round(self._cost + spent, 6)
        self._run_cost[name] = self._run_cost.get(name, 0.0) + spent
        return round(self._steps[name].cost_usd + spent, 6)

    @workflow.signal(name=PROGRESS_SIGNAL, description="From a step child: status and spend.")
    def step_progress(self, progress: StepProgress) -> None:
        """From a running StepWorkflow: its status changed or it spent money."""
        self._gauge.add(SIGNAL, progress)
        state = self._steps.get(progress.name)
        if state is None or progress.generation != self._generation:
            return
        spent = progress.usage.cost_usd
        if progress.seq <= self._progress_seq.get(progress.name, 0):
            # an older report arriving late: its status is stale, its spend is not
            if spent and self._patched(LATE_REPORTS_COUNT_PATCH):
                self._steps[progress.name] = state.model_copy(
                    update={"cost_usd": self._count_spend(progress.name, spent)})
                self._changed = True
            return
        self._progress_seq[progress.name] = progress.seq
        changes: dict[str, Any] = {
            "status": progress.status,
            "attempts": max(state.attempts, progress.attempt),
            "cost_usd": self._count_spend(progress.name, spent),
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
