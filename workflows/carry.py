"""What one run of a directive hands the next: the carry restored in `__init__`, and
the carry built once nothing is in flight, at a checkpoint or for the next
generation (a re-plan or a goal change).

A mixin of DirectiveWorkflow, over its state.
"""

from __future__ import annotations

from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from makima import constants as c
    from makima.contracts import integration_branch
    from makima.models import (
        DirectiveCarry,
        DirectiveSnapshot,
        DirectiveSpec,
        DirectiveStatus,
        PlannerKind,
    )
    from makima.policy import replan_refusal
    from workflows.event_log import EventLog


class DirectiveCarrying:
    """Restoring and building the carry, over `DirectiveWorkflow`'s state."""

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
        self._replan_reason = carry.replan_reason
        self._user_plan = carry.user_plan if spec.carry else spec.plan
        self._breaker = carry.breaker
        self._wall_time_spent = carry.wall_time_spent
        self._user_paused = carry.paused
        self._stop_reason = carry.stop_reason
        self._goal_update = carry.goal_update
        self._branch = carry.integration_branch or integration_branch(self._id)
        self._log = EventLog(self._id, self._id, carry.event_seq, gauge=self._gauge,
                             keeps_batches=self._cancel_stops)
        if carry.current_plan is not None:
            self._plan_model = carry.current_plan
            self._planned = {s.name: s for s in carry.current_plan.steps}
            self._steps = {s.name: s for s in carry.current_steps}
            self._reevaluations = dict(carry.reevaluations)
            self._pending = {p.step: p for p in carry.pending_approvals}
            self._held = {h.step: h for h in carry.held_decisions}
            self._decided = {h.step for h in carry.held_decisions if h.action != "reevaluate"}

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
            previous_steps=list(self._steps.values()),
            replan_reason=reason[: c.MAX_TEXT_IN_HISTORY], user_plan=user_plan,
            pending_approvals=[], held_decisions=[]))

    def _carry(self, **fields: Any) -> DirectiveCarry:
        """What the next run needs; `fields` say what differs from this run."""
        base: dict[str, Any] = {
            "generation": self._generation, "started_at": self._started_at,
            "cost_usd": self._cost, "replans": self._replans,
            "failed_steps": self._failed_steps, "event_seq": self._log.seq,
            "breaker": self._breaker, "wall_time_spent": self._wall_time_spent,
            "paused": self._user_paused,
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
