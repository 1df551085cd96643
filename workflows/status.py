"""What a directive shows: its status and the `status` query, the events of the
audit trail, and the Temporal UI's view (search attributes, current details).

A mixin of DirectiveWorkflow, over its state.
"""

from __future__ import annotations

from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from makima.contracts import GENERATION_ATTRIBUTE, STATUS_ATTRIBUTE, EventType, Severity
    from makima.models import DirectiveSnapshot, DirectiveStatus, StepState
    from workflows.history_gauge import UPSERT


class Phase:
    PLANNING = "planning"
    RUNNING = "running"
    DONE = "done"


class DirectiveStatusView:
    """What the directive shows, over `DirectiveWorkflow`'s state."""

    def _status_now(self) -> DirectiveStatus:
        if self._final is not None:
            return self._final
        if self._phase == Phase.PLANNING:
            return DirectiveStatus.PLANNING
        return DirectiveStatus.PAUSED if self._paused else DirectiveStatus.ACTIVE

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
            self._gauge.add(UPSERT)
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
