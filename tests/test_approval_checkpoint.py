"""A step that waits for a person waits in the directive, not in a running step
workflow (issue 10): the step's run returns "awaiting approval" with its attempt,
branch and commit, the directive keeps the pending approval (a carry field), and
the merge (or the block, or the re-evaluation) runs after the decision. So a long
generation continues as new while a person takes their time, and a stop accepted
meanwhile merges nothing. A real Temporal dev server (the time-skipping server's
continue-as-new is not atomic, temporalio/sdk-java#1537: queries and signals that
raced it went unanswered), stand-in activities.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType as HistoryEventType
from temporalio.client import (
    Client,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)

import makima.constants
from makima.contracts import ActivityName, EventType
from makima.models import ApprovalDecision, DirectiveStatus, StepRef, StopRequest
from tests.standins import (
    StandIns,
    merge_gate,
    runs_of,
    save_history,
    spec_of,
    start,
    status,
    step_status,
    wait_until,
)
from worker import build_worker
from workflows.directive import DirectiveWorkflow

MERGE = ActivityName.MERGE_STEP
#: Enough refused messages to pass the (lowered) checkpoint threshold twice over.
NOISE = 30


@pytest.fixture
def client(dev_client: Client) -> Client:
    return dev_client


@pytest.fixture
def low_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    # the replay gate replays `checkpoint-*` histories with the same threshold
    monkeypatch.setattr(makima.constants, "HISTORY_CHECKPOINT_EVENTS", 40)


async def refused_noise(handle: WorkflowHandle[Any, Any], step: str) -> None:
    """Messages that change nothing (a decision about an attempt nobody saw) but grow
    the history, as a client retrying a stale approval would."""
    for _ in range(NOISE):
        await handle.signal(DirectiveWorkflow.approve, ApprovalDecision(step=step, attempt=99))


async def waits_across_a_checkpoint(client: Client, handle: WorkflowHandle[Any, Any],
                                    step: str) -> int:
    """Wait until `step` waits for a person, make the history long, and wait until a
    later run holds the approval; the number of runs so far."""
    await wait_until(handle, lambda s: bool(s.pending_approvals))
    await refused_noise(handle, step)
    deadline = asyncio.get_running_loop().time() + 60
    while asyncio.get_running_loop().time() < deadline:
        runs = await runs_of(client, handle.id, handle.first_execution_run_id)
        if len(runs) > 1 and (await status(handle)).pending_approvals:
            return len(runs)
        await asyncio.sleep(0.1)
    raise AssertionError("the directive never continued as new while the approval waited")


def child_starts(history: Any) -> list[str]:
    return [e.start_child_workflow_execution_initiated_event_attributes.workflow_id
            for e in history.events
            if e.event_type is HistoryEventType.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED]


async def test_an_approval_waits_across_a_checkpoint_and_binds_to_the_attempt(
        client: Client, task_queue: str, low_checkpoint: None) -> None:
    stand = StandIns(scores={"a": [0.6]})
    async with build_worker(client, task_queue, stand.activities()):
        handle = await start(client, task_queue, spec_of(("a", []), ("b", ["a"]),
                                                        approvers=["al"]))
        runs = await waits_across_a_checkpoint(client, handle, "a")
        waiting = await status(handle)
        (pending,) = waiting.pending_approvals
        # no step workflow runs while the person decides: the step's run has returned
        (child,) = [s.workflow_id for s in waiting.steps if s.name == "a"]
        assert child is not None
        described = await client.get_workflow_handle(child).describe()
        assert described.status is not None and described.status.name == "COMPLETED"
        assert (pending.attempt, pending.generation, waiting.generation) == (1, 1, 1)
        assert pending.branch and pending.branch.endswith("--steps/a") and pending.commit
        assert step_status(waiting, "a") == "awaiting_approval"
        with pytest.raises(WorkflowUpdateFailedError) as stale:
            await handle.execute_update(DirectiveWorkflow.approve_step,
                                        ApprovalDecision(step="a", by="al", attempt=2))
        with pytest.raises(WorkflowUpdateFailedError) as outsider:
            await handle.execute_update(DirectiveWorkflow.approve_step,
                                        ApprovalDecision(step="a", by="eve", attempt=1))
        assert stand.merged == [], "nothing merges before the decision"
        await handle.execute_update(DirectiveWorkflow.approve_step, ApprovalDecision(
            step="a", by="al", attempt=1, generation=1, comment="fine"))
        with pytest.raises(WorkflowUpdateFailedError) as twice:
            await handle.execute_update(DirectiveWorkflow.deny_step,
                                        ApprovalDecision(step="a", by="al", attempt=1))
        result = await handle.result()
        await save_history(handle, client, "checkpoint-approve")
    assert "attempt 1 is the one waiting" in str(stale.value.cause)
    assert "not an approver" in str(outsider.value.cause)
    assert "nothing is pending approval" in str(twice.value.cause)
    assert runs > 1 and result.generation == 1
    assert result.status is DirectiveStatus.COMPLETED
    assert stand.merged == ["a", "b"], "the approved attempt merged once, after the decision"
    (merge_a,) = stand.called(MERGE, "a")
    assert (merge_a.attempt, merge_a.commit) == (1, pending.commit)
    assert len(stand.called(ActivityName.EXECUTE_STEP, "a")) == 1, "the agent ran once"
    a = next(s for s in result.steps if s.name == "a")
    assert (a.attempts, a.status.value, a.score) == (1, "passed", 0.6)
    decided = [e for e in stand.events if e.type is EventType.APPROVAL_DECIDED]
    assert [(e.attempt, e.actor, e.data["approved"], e.data["comment"]) for e in decided] == [
        (1, "al", True, "fine")]
    assert len([e for e in stand.events if e.type is EventType.APPROVAL_REQUESTED]) == 1


async def test_a_denial_across_a_checkpoint_blocks_the_step(
        client: Client, task_queue: str, low_checkpoint: None) -> None:
    stand = StandIns(scores={"a": [0.6]})
    async with build_worker(client, task_queue, stand.activities()):
        handle = await start(client, task_queue, spec_of(("a", []), ("b", ["a"])))
        runs = await waits_across_a_checkpoint(client, handle, "a")
        await handle.signal(DirectiveWorkflow.deny, ApprovalDecision(
            step="a", by="bo", attempt=1, comment="wrong file"))
        with pytest.raises(WorkflowFailureError) as failure:
            await handle.result()
        final = await status(handle)
        await save_history(handle, client, "checkpoint-deny")
    assert runs > 1
    assert "denied by bo: wrong file" in str(failure.value.cause)
    assert step_status(final, "a") == "blocked" and step_status(final, "b") == "skipped"
    assert stand.called(MERGE) == [] and final.pending_approvals == []
    decided = [e for e in stand.events if e.type is EventType.APPROVAL_DECIDED]
    assert [(e.attempt, e.data["approved"]) for e in decided] == [(1, False)]


async def test_a_stop_while_an_approval_waits_merges_nothing(
        client: Client, task_queue: str) -> None:
    stand = StandIns(scores={"a": [0.6]})
    async with build_worker(client, task_queue, stand.activities()):
        handle = await start(client, task_queue, spec_of(("a", [])))
        await wait_until(handle, lambda s: bool(s.pending_approvals))
        answer = await handle.execute_update(DirectiveWorkflow.stop_directive,
                                             StopRequest(reason="enough"))
        result = await handle.result()
    assert "nothing merges after this" in answer.message
    assert (result.status, result.reason) == (DirectiveStatus.STOPPED, "enough")
    assert stand.called(MERGE) == [] and result.pending_approvals == []
    assert step_status(result, "a") == "cancelled"


async def test_a_reevaluation_asked_while_paused_waits_and_a_stop_voids_it(
        client: Client, task_queue: str) -> None:
    stand = StandIns(scores={"a": [0.6]})
    async with build_worker(client, task_queue, stand.activities()):
        handle = await start(client, task_queue, spec_of(("a", [])))
        await wait_until(handle, lambda s: bool(s.pending_approvals))
        await handle.execute_update(DirectiveWorkflow.pause_directive)
        await handle.execute_update(DirectiveWorkflow.reevaluate_step, StepRef(step="a"))
        with pytest.raises(WorkflowUpdateFailedError) as again:
            await handle.execute_update(DirectiveWorkflow.reevaluate_step, StepRef(step="a"))
        await asyncio.sleep(0.5)
        await handle.execute_update(DirectiveWorkflow.stop_directive, StopRequest())
        result = await handle.result()
    assert "once the directive is resumed" in str(again.value.cause)
    assert stand.called(ActivityName.CHECKOUT_STEP) == [], "nothing started while paused"
    assert result.status is DirectiveStatus.STOPPED and step_status(result, "a") == "cancelled"
    assert stand.called(MERGE) == []


async def test_a_waiting_step_is_evaluated_again_on_request(
        client: Client, task_queue: str, low_checkpoint: None) -> None:
    stand = StandIns(scores={"a": [0.6, 0.95]})
    async with build_worker(client, task_queue, stand.activities()):
        handle = await start(client, task_queue, spec_of(("a", [])))
        await waits_across_a_checkpoint(client, handle, "a")
        await handle.execute_update(DirectiveWorkflow.reevaluate_step, StepRef(step="a"))
        with pytest.raises(WorkflowUpdateFailedError) as decided:
            await handle.execute_update(DirectiveWorkflow.approve_step,
                                        ApprovalDecision(step="a", attempt=1))
        result = await handle.result()
    assert "nothing is pending approval" in str(decided.value.cause)
    assert result.status is DirectiveStatus.COMPLETED
    (checkout,) = stand.called(ActivityName.CHECKOUT_STEP)
    assert checkout.attempt == 2
    assert [m.attempt for m in stand.called(MERGE)] == [2]


async def test_a_stop_answers_after_a_merge_under_way_and_nothing_merges_later(
        client: Client, task_queue: str) -> None:
    stand = StandIns()
    gate = stand.gate(merge_gate("a"))
    async with build_worker(client, task_queue, stand.activities()):
        handle = await start(client, task_queue, spec_of(("a", []), ("b", ["a"])))
        await asyncio.wait_for(gate.reached.wait(), 20)
        stopping = asyncio.create_task(handle.execute_update(
            DirectiveWorkflow.stop_directive, StopRequest(reason="halt"),
            id=f"stop-{uuid.uuid4().hex[:6]}"))
        await asyncio.sleep(1.0)
        assert not stopping.done(), "the stop answered while a merge was under way"
        gate.opened.set()
        answer = await asyncio.wait_for(stopping, 30)
        merged_when_answered = list(stand.merged)
        result = await handle.result()
        await save_history(handle, client, "stop-during-merge")
    assert merged_when_answered == ["a"], "the merge under way finished before the answer"
    assert stand.merged == ["a"], "nothing merged after the stop was answered"
    assert "every step has ended" in answer.message
    assert result.status is DirectiveStatus.STOPPED
    # the merge was not cut off: the step is what it is, passed and merged
    assert step_status(result, "a") == "passed" and step_status(result, "b") == "pending"
