"""What a directive decides does not hang on the clock or the history length its
activation shows (issue 10).

A status query that reads the history between an activity's result and its
workflow task makes SDK Core run the result for the query (makima/query_guard.py).
When the real task then brings nothing new, Core completes it with the commands
that activation made, and the guard cannot undo them. That activation showed the
workflow the previous task's clock and history size and a shorter history; every
replay runs the same result at the real task's time and length. So a checkpoint
decided on `get_current_history_length()`, or a wall-time breaker decided on
`workflow.now()`, could decide otherwise on replay (fuzz seed 396238: "No command
scheduled for event 156, WorkflowExecutionContinuedAsNew"), and the directive would
be stuck at its next replay.

Here every activation shows the workflow the clock, history length and size of the
activation before it (a query's view, at its stalest). The directive checkpoints
several times and its wall-time breaker trips; the histories it leaves must replay
with the real values.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType as HistoryEvent
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer, WorkflowInstance

import makima.constants
from makima.models import ApprovalDecision, BudgetRaise, Budgets, DirectiveStatus
from makima.query_guard import ForwardingInstance, QueryGuardRunner, WrappingRunner
from tests.standins import StandIns, runs_of, save_history, spec_of, wait_until
from worker import build_worker
from workflows.directive import DirectiveWorkflow
from workflows.step import StepWorkflow

#: Long enough for s0..s4 to pass on a loaded machine, short for a test.
WALL_MINUTES = 0.15
STEPS = [(f"s{i}", [f"s{i - 1}"] if i else []) for i in range(8)]


class _Stale(ForwardingInstance):
    """Shows the workflow the clock, history length and size of its previous activation."""

    def __init__(self, inner: WorkflowInstance) -> None:
        super().__init__(inner)
        self._before: tuple[Any, ...] | None = None

    def activate(self, act: Any) -> Any:
        now = (act.timestamp.ToNanoseconds(), act.history_length, act.history_size_bytes,
               act.continue_as_new_suggested)
        if self._before is not None and not act.is_replaying and now[1] != self._before[1]:
            nanos, act.history_length, act.history_size_bytes, \
                act.continue_as_new_suggested = self._before
            act.timestamp.FromNanoseconds(nanos)
        if now[1] != (self._before or (None, None))[1]:
            self._before = now
        return self._inner.activate(act)


class StaleRunner(WrappingRunner):
    def wrap(self, instance: WorkflowInstance) -> WorkflowInstance:
        return _Stale(instance)


async def test_checkpoints_and_the_wall_time_breaker_replay_from_stale_activations(
        dev_client: Client, task_queue: str, monkeypatch: pytest.MonkeyPatch) -> None:
    client = dev_client
    monkeypatch.setattr(makima.constants, "HISTORY_CHECKPOINT_EVENTS", 40)
    stand = StandIns()
    held = stand.gate("s5")
    spec = spec_of(*STEPS, budgets=Budgets(max_wall_time_minutes=WALL_MINUTES))
    # the guard sees the real activations (as in production); the workflow the stale ones
    worker = build_worker(client, task_queue, stand.activities(),
                          workflow_runner=QueryGuardRunner(StaleRunner()))
    async with worker:
        handle = await client.start_workflow(
            DirectiveWorkflow.run, spec, id=f"stale-{uuid.uuid4().hex[:8]}",
            task_queue=task_queue, execution_timeout=timedelta(hours=6))
        # the wall-time budget runs out while s5 works
        tripped = await wait_until(handle, lambda s: s.breaker is not None)
        assert held.reached.is_set()
        assert "wall-time budget spent" in tripped.breaker
        held.opened.set()
        # later, past the budget, a message that changes nothing: the workflow's next
        # activation shows its time
        await asyncio.sleep(1)
        await handle.signal(DirectiveWorkflow.approve, ApprovalDecision(step="s0"))
        await asyncio.sleep(0.5)
        # not enough: the breaker trips again, and a resume is refused
        answer = await handle.execute_update(DirectiveWorkflow.raise_directive_budget,
                                             BudgetRaise(max_wall_time_minutes=WALL_MINUTES * 1.01))
        assert "still spent" in answer.message
        await wait_until(handle, lambda s: s.breaker is not None)
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await handle.execute_update(DirectiveWorkflow.resume_directive)
        assert "raise the budget first" in str(refused.value.cause)
        await handle.signal(DirectiveWorkflow.raise_budget,
                            BudgetRaise(max_wall_time_minutes=600))
        await wait_until(handle, lambda s: s.breaker is None)
        await handle.signal(DirectiveWorkflow.resume)
        final = await handle.result()
    assert final.status is DirectiveStatus.COMPLETED
    assert [s.status.value for s in final.steps] == ["passed"] * len(STEPS)

    # the replay gate (tests/test_replay.py) keeps these: checkpoints counted, the
    # wall-time breaker on its timer, an update answered by the clock
    await save_history(handle, client, "checkpoint-counted")
    runs = await runs_of(client, handle.id, handle.first_execution_run_id)
    assert len(runs) >= 3, "the directive should have continued as new more than once"
    replayer = Replayer(workflows=[DirectiveWorkflow, StepWorkflow],
                        data_converter=pydantic_data_converter)
    failures = []
    for index, history in enumerate(runs):
        replayed = await replayer.replay_workflow(history, raise_on_replay_failure=False)
        if replayed.replay_failure is not None:
            failures.append(f"run {index}: {replayed.replay_failure}")
    assert not failures, "\n".join(failures)
    assert any(e.event_type == HistoryEvent.EVENT_TYPE_TIMER_FIRED
               for history in runs for e in history.events)
