"""How a directive gets the plan of a generation: prepare the repository, take the
supplied plan or ask the planner, check it with the pure DAG rules (feeding the
problems back while the re-plan budget lasts) and install its steps.

A mixin of DirectiveWorkflow, over its state; nothing here starts a step.
"""

from __future__ import annotations

import asyncio

from temporalio import workflow
from temporalio.exceptions import ActivityError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from makima import constants as c
    from makima.contracts import (
        ActivityName,
        EventType,
        PlanInput,
        PlanOutput,
        PrepareInput,
        PrepareOutput,
        Severity,
    )
    from makima.dag import validate_plan
    from makima.models import DirectiveStatus, Plan, PlannedStep, PlannerKind, StepState, StepStatus
    from makima.policy import replan_refusal
    from workflows.history_gauge import ACTIVITY
    from workflows.usage import COUNT_FAILED_TRIES_PATCH, billed_usage, cause_of


def cancel_reason() -> str:
    """The stop reason of a directive cancelled from outside makima."""
    why = workflow.cancellation_reason()
    return ("its workflow was cancelled from outside makima (temporal workflow cancel)"
            + (f": {why}" if why else ""))


#: The planner hears a cancel of the directive (it heartbeats), and the directive waits
#: for its end, which says what the call in flight was billed, and counts it.
PLANNER_CANCEL_COUNTED_PATCH = "directive-planner-cancel-counted"


class DirectivePlanning:
    """Planning, over `DirectiveWorkflow`'s state."""

    async def _prepare(self) -> bool:
        self._gauge.add(ACTIVITY)
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
            self._stop_if_cancelled(err)
            self._end(DirectiveStatus.FAILED, f"the repository could not be prepared: {cause_of(err)}")
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
                waits = self._patched(PLANNER_CANCEL_COUNTED_PATCH)
                try:
                    planned = await self._ask_planner(candidate, errors, waits)
                except ActivityError as err:
                    self._stop_if_cancelled(err, waited=waits)
                    if self._patched(COUNT_FAILED_TRIES_PATCH):  # e.g. an invalid answer
                        self._cost = round(self._cost + billed_usage(err).cost_usd, 6)
                    self._event(EventType.PLAN_FAILED, cause_of(err), severity=Severity.ERROR,
                                data={"error": cause_of(err)})
                    self._end(DirectiveStatus.FAILED, f"planning failed: {cause_of(err)}")
                    return None
                self._cost = round(self._cost + planned.usage.cost_usd, 6)
                if waits:  # the answer came before the planner heard of the cancel
                    self._stop_if_cancelled(None)
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

    def _stop_if_cancelled(self, err: ActivityError | None, *, waited: bool = False) -> None:
        """The directive was cancelled while an activity ran: its failure (`err`), or
        its result (None), is not what counts, the cancel is: a stop (DirectiveWorkflow.run
        takes it from here). `waited`: the activity was asked to stop and its end
        waited for, which carries what it was billed; counted here."""
        if not self._cancel_stops or workflow.cancellation_reason() is None:
            return
        if err is not None and waited:
            self._cost = round(self._cost + billed_usage(err).cost_usd, 6)
        elif err is not None and not is_cancelled_exception(err):
            return
        raise asyncio.CancelledError(cancel_reason()) from err

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

    async def _ask_planner(self, previous: Plan | None, errors: list[str],
                           waits: bool) -> PlanOutput:
        self._log.flush()
        asked = PlanInput(directive_id=self._id, spec=self._spec, generation=self._generation,
                          reason=self._replan_reason, existing_steps=self._previous,
                          previous_plan=previous, validation_errors=errors)
        self._gauge.add(ACTIVITY, asked)
        return await workflow.execute_activity(
            ActivityName.PLAN_DIRECTIVE.value,
            asked,
            result_type=PlanOutput,
            start_to_close_timeout=c.PLAN_TIMEOUT,
            heartbeat_timeout=c.PLAN_HEARTBEAT_TIMEOUT if waits else None,
            retry_policy=c.PLAN_RETRY_POLICY,
            cancellation_type=(workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED
                               if waits else workflow.ActivityCancellationType.TRY_CANCEL),
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
