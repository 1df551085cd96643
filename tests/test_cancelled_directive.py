"""A directive cancelled from outside makima (`temporal workflow cancel`, or any
client's `cancel()`) is stopped by another name, wherever the cancel finds it:
while it plans, while its steps run, while a generation ends. It ends `stopped`
with a reason that names the cancel, its running steps are cancelled, the audit
trail says so, and nothing merges after. Temporal shows the workflow Canceled.
Real time-skipping server, stand-in activities whose timing the test controls.
"""

from __future__ import annotations

import asyncio

import pytest
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import CancelledError

from makima.contracts import ActivityName, EventType
from makima.models import DirectiveStatus
from tests.standins import (
    COMPLETION_GATE,
    PLAN_GATE,
    Gate,
    StandIns,
    plan_of,
    save_history,
    spec_of,
    start,
    status,
    step_status,
    wait_until,
)
from worker import build_worker

EXECUTE = ActivityName.EXECUTE_STEP
PLAN = ActivityName.PLAN_DIRECTIVE


async def cancelled(handle) -> None:  # type: ignore[no-untyped-def]
    """Wait for the end of a directive that was cancelled: Temporal says Canceled."""
    with pytest.raises(WorkflowFailureError) as failure:
        await asyncio.wait_for(handle.result(), 30)
    assert isinstance(failure.value.cause, CancelledError), failure.value


def directive_statuses(stand: StandIns) -> list[tuple[str, str]]:
    """(status, reason) of every directive_status event the audit trail holds."""
    return [(e.data["status"], e.data["reason"]) for e in stand.events
            if e.type is EventType.DIRECTIVE_STATUS]


def planning_stand() -> tuple[StandIns, Gate]:
    """Stand-ins whose planner waits at its gate and then plans one step."""
    stand = StandIns()
    stand.plans = [plan_of(("a", []))]
    return stand, stand.gate(PLAN_GATE)


async def test_a_directive_cancelled_while_it_plans_ends_stopped(
        client: Client, task_queue: str) -> None:
    stand, gate = planning_stand()
    async with build_worker(client, task_queue, stand.activities()):
        handle = await start(client, task_queue, spec_of())
        await asyncio.wait_for(gate.reached.wait(), 20)
        await handle.cancel()
        await cancelled(handle)
        gate.opened.set()  # the planner's answer comes after the end: nobody reads it
        final = await status(handle)
        await save_history(handle, client, "cancelled-while-planning")
    assert final.status is DirectiveStatus.STOPPED, final.reason
    assert "cancelled" in final.reason and "temporal workflow cancel" in final.reason
    assert final.steps == [] and stand.called(EXECUTE) == []
    assert directive_statuses(stand)[-1] == ("stopped", final.reason)
    assert not [e for e in stand.events if e.type is EventType.PLAN_FAILED]


async def test_a_plan_that_comes_with_the_cancel_is_paid_for_and_not_run(
        client: Client, task_queue: str) -> None:
    # the planner answers before it hears of the cancel (it hears it with a heartbeat's
    # answer, about a second later): its answer is counted, its plan not run
    stand, gate = planning_stand()
    async with build_worker(client, task_queue, stand.activities()):
        handle = await start(client, task_queue, spec_of())
        await asyncio.wait_for(gate.reached.wait(), 20)
        await handle.cancel()
        gate.opened.set()
        await cancelled(handle)
        final = await status(handle)
        await save_history(handle, client, "cancelled-as-the-plan-came")
    assert final.status is DirectiveStatus.STOPPED and final.steps == []
    assert stand.called(EXECUTE) == []
    assert final.cost_usd == stand.billed.get(handle.id, 0.0), "what the planner billed"


async def test_a_directive_cancelled_while_steps_run_cancels_them_and_ends_stopped(
        client: Client, task_queue: str) -> None:
    stand = StandIns()
    gate = stand.gate("a")  # never opened: only the cancel ends a's agent
    async with build_worker(client, task_queue, stand.activities()):
        handle = await start(client, task_queue, spec_of(("a", []), ("b", [])))
        await asyncio.wait_for(gate.reached.wait(), 20)
        await wait_until(handle, lambda s: step_status(s, "b") == "passed")
        await handle.cancel()
        await cancelled(handle)
        final = await status(handle)
        await save_history(handle, client, "cancelled-while-running")
    assert final.status is DirectiveStatus.STOPPED, final.reason
    assert "temporal workflow cancel" in final.reason
    assert (step_status(final, "a"), step_status(final, "b")) == ("cancelled", "passed")
    assert stand.cancelled == ["a"] and stand.merged == ["b"], "nothing merges after"
    assert directive_statuses(stand)[-1] == ("stopped", final.reason)
    a_events = [e.data["status"] for e in stand.events
                if e.type is EventType.STEP_STATUS and e.step == "a"]
    assert a_events[-1] == "cancelled"


async def test_a_directive_cancelled_while_a_generation_ends_is_not_continued(
        client: Client, task_queue: str) -> None:
    # x is blocked, so generation 1 ends, and the directive waits for its events to be
    # written before it continues as new; the cancel comes while that write is held
    stand = StandIns(scores={"x": [0.1]})
    stand.plans = [plan_of(("x", [])), plan_of(("y", []))]
    gate = stand.gate("x")
    spec = spec_of(budgets={"max_rework_cycles": 0})
    async with build_worker(client, task_queue, stand.activities()):
        handle = await start(client, task_queue, spec)
        await asyncio.wait_for(gate.reached.wait(), 20)
        stand.hold_directive_records = True
        gate.opened.set()
        await wait_until(handle, lambda s: step_status(s, "x") == "blocked")
        await asyncio.sleep(0.5)
        await handle.cancel()
        await asyncio.sleep(0.5)
        stand.hold_directive_records = False
        await cancelled(handle)
        final = await status(handle)
        await save_history(handle, client, "cancelled-while-a-generation-ends")
    assert final.status is DirectiveStatus.STOPPED and final.generation == 1, final.reason
    assert len(stand.called(PLAN)) == 1, "no generation is planned after the cancel"
    assert stand.called(EXECUTE, "y") == []
    assert directive_statuses(stand)[-1] == ("stopped", final.reason)


async def test_a_cancel_during_the_completion_cuts_off_only_the_hand_over(
        client: Client, task_queue: str) -> None:
    # every step passed and is merged: as a stop is refused then, the directive is
    # completed; the cancel ends the completion activity, and the audit trail says so
    stand = StandIns()
    gate = stand.gate(COMPLETION_GATE)  # never opened: only the cancel ends it
    async with build_worker(client, task_queue, stand.activities()):
        handle = await start(client, task_queue, spec_of(("a", [])))
        await asyncio.wait_for(gate.reached.wait(), 20)
        await handle.cancel()
        result = await asyncio.wait_for(handle.result(), 30)
    assert result.status is DirectiveStatus.COMPLETED and stand.merged == ["a"]
    (completion,) = [e for e in stand.events if e.type is EventType.COMPLETION]
    assert completion.message.startswith("completion failed") and "ancel" in completion.message
