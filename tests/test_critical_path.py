"""What sits between one step's agent and the next one's: no worktree cleanup
(the merge removes the worktrees, tests/test_routing.py), no wait for the
step's last events to be written (a step hands them to its directive, which
records them after the dependants started), and no workflow task between the
evaluation and the merge of an attempt that passes without a person (one
activity does both; a stop still merges nothing once accepted). The real
Temporal test server with stand-in activities."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from temporalio.client import Client, WorkflowFailureError

from makima.contracts import ActivityName
from makima.git import MissingBranch
from makima.models import ApprovalDecision, DirectiveStatus, StopRequest
from tests.standins import (
    StandIns,
    evaluate_gate,
    merge_gate,
    save_history,
    spec_of,
    start,
    status,
    step_status,
)
from worker import build_worker
from workflows.directive import DirectiveWorkflow


async def test_dependants_start_while_a_steps_own_records_are_stuck_and_nothing_is_lost(
        client: Client, task_queue: str) -> None:
    # every batch a step sends itself hangs (a slow or unreachable Postgres); the
    # chain still runs through, and its directive writes each step's events
    stand = StandIns(hold_step_records=True)
    spec = spec_of(("a", []), ("b", ["a"]), ("c", ["b"]), autonomy="full_auto")
    try:
        async with build_worker(client, task_queue, stand.activities()):
            handle = await start(client, task_queue, spec)
            result = await asyncio.wait_for(handle.result(), 60)
            stand.hold_step_records = False  # let the abandoned batches end
    finally:
        stand.hold_step_records = False

    assert result.status is DirectiveStatus.COMPLETED
    assert [s.status.value for s in result.steps] == ["passed"] * 3
    for name in ("a", "b", "c"):
        source = f"{handle.id}/g1/{name}"
        # the directive wrote all of them (the step's own batches were stuck)
        seqs = {e.seq for by, e in stand.recorded_by if e.source == source and by == handle.id}
        assert seqs and seqs == set(range(1, max(seqs) + 1)), f"{name} lost events: {seqs}"
        assert any(e.type.value == "merged" for _, e in stand.recorded_by if e.source == source)


# ---------------------------------------------------------------------- evaluate and merge
# On the worker holding the worktree, an attempt that passes without a person is
# evaluated and merged by one activity: no workflow task and no second activity
# between the two.

EVALUATE_AND_MERGE = ActivityName.EVALUATE_AND_MERGE_STEP.value


def routed_stand(own: str, **kwargs: Any) -> StandIns:
    """Stand-ins whose every attempt lives on the worker polling `own`."""
    return StandIns(worker_queue_of=lambda _directive: own, **kwargs)


def activity_types(history: Any) -> list[str]:
    return [e.activity_task_scheduled_event_attributes.activity_type.name
            for e in history.events if e.HasField("activity_task_scheduled_event_attributes")
            and e.activity_task_scheduled_event_attributes.activity_type.name != "record_events"]


async def test_a_passing_attempt_is_evaluated_and_merged_by_one_activity(
        client: Client, task_queue: str) -> None:
    own = f"{task_queue}@worker-a"
    stand = routed_stand(own)
    activities = stand.activities()
    async with build_worker(client, task_queue, activities), \
            build_worker(client, own, activities, workflows=False):
        handle = await start(client, task_queue,
                             spec_of(("a", []), ("b", ["a"]), autonomy="full_auto"))
        result = await asyncio.wait_for(handle.result(), 60)
        step_a = await client.get_workflow_handle(f"{handle.id}/g1/a").fetch_history()
        await save_history(handle, client, "evaluate-and-merge")

    assert result.status is DirectiveStatus.COMPLETED
    assert stand.ran_on == [(EVALUATE_AND_MERGE, own)] * 2
    assert stand.merged == ["a", "b"]
    assert activity_types(step_a) == ["execute_step", EVALUATE_AND_MERGE]
    # what a person reads is as before: the evaluation, then the merge
    kinds = [e.type.value for e in stand.events if e.source == f"{handle.id}/g1/a"]
    assert kinds.index("evaluation") < kinds.index("merged")
    fused = stand.called(ActivityName.EVALUATE_AND_MERGE_STEP)
    assert [(f.merge.step, f.merge.attempt, f.merge.remove_worktrees) for f in fused] == [
        ("a", 1, True), ("b", 1, True)]


async def test_a_yellow_attempt_merges_at_once_only_under_full_autonomy(
        client: Client, task_queue: str) -> None:
    own = f"{task_queue}@worker-a"
    stand = routed_stand(own, scores={"auto": [0.6], "guarded": [0.6]})
    activities = stand.activities()
    async with build_worker(client, task_queue, activities), \
            build_worker(client, own, activities, workflows=False):
        auto = await start(client, task_queue, spec_of(("auto", []), autonomy="full_auto"))
        assert (await asyncio.wait_for(auto.result(), 60)).status is DirectiveStatus.COMPLETED
        assert stand.merged == ["auto"]

        guarded = await start(client, task_queue, spec_of(("guarded", []), autonomy="guarded"))
        for _ in range(200):
            if (await status(guarded)).pending_approvals:
                break
            await asyncio.sleep(0.05)
        snapshot = await status(guarded)
        assert [p.step for p in snapshot.pending_approvals] == ["guarded"]
        assert stand.merged == ["auto"], "a yellow attempt waiting for a person merged"
        await guarded.execute_update(DirectiveWorkflow.approve_step,
                                     ApprovalDecision(step="guarded", by="ana", attempt=1))
        result = await asyncio.wait_for(guarded.result(), 60)
    assert result.status is DirectiveStatus.COMPLETED
    assert stand.merged == ["auto", "guarded"]
    # the approved attempt is merged by the run that follows the decision
    assert [m.step for m in stand.called(ActivityName.MERGE_STEP)] == ["guarded"]


async def test_a_stop_while_the_attempt_is_evaluated_merges_nothing(
        client: Client, task_queue: str) -> None:
    own = f"{task_queue}@worker-a"
    stand = routed_stand(own)
    gate = stand.gate(evaluate_gate("a"))
    activities = stand.activities()
    async with build_worker(client, task_queue, activities), \
            build_worker(client, own, activities, workflows=False):
        handle = await start(client, task_queue, spec_of(("a", []), ("b", ["a"])))
        await asyncio.wait_for(gate.reached.wait(), 20)
        answer = await asyncio.wait_for(handle.execute_update(
            DirectiveWorkflow.stop_directive, StopRequest(reason="halt")), 30)
        result = await asyncio.wait_for(handle.result(), 30)
    assert "every step has ended" in answer.message
    assert result.status is DirectiveStatus.STOPPED
    assert stand.merged == [] and "a" in stand.cancelled
    assert step_status(result, "a") == "cancelled" and step_status(result, "b") == "pending"


async def test_a_stop_while_the_evaluation_merges_answers_once_the_merge_ended(
        client: Client, task_queue: str) -> None:
    own = f"{task_queue}@worker-a"
    stand = routed_stand(own)
    gate = stand.gate(merge_gate("a"))
    activities = stand.activities()
    async with build_worker(client, task_queue, activities), \
            build_worker(client, own, activities, workflows=False):
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
        result = await asyncio.wait_for(handle.result(), 30)
        await save_history(handle, client, "stop-during-evaluate-and-merge")
    assert merged_when_answered == ["a"], "the merge under way finished before the answer"
    assert stand.merged == ["a"], "nothing merged after the stop was answered"
    assert "every step has ended" in answer.message
    assert result.status is DirectiveStatus.STOPPED
    assert step_status(result, "a") == "passed" and step_status(result, "b") == "pending"


async def test_a_merge_that_fails_after_the_evaluation_says_the_merge_failed(
        client: Client, task_queue: str) -> None:
    # the attempt was evaluated green in the fused activity, then git refused the merge:
    # the step's reason names the merge and git's message, not the evaluation
    own = f"{task_queue}@worker-a"
    refused = MissingBranch("commit 1234abcd of step a is not in the repository")
    stand = routed_stand(own, failing_merges={"a": refused}, evaluate_cost=0.25)
    activities = stand.activities()
    async with build_worker(client, task_queue, activities), \
            build_worker(client, own, activities, workflows=False):
        handle = await start(client, task_queue, spec_of(("a", []), autonomy="full_auto",
                                                         budgets={"max_chain_regenerations": 0}))
        with pytest.raises(WorkflowFailureError):
            await asyncio.wait_for(handle.result(), 60)
        result = await status(handle)

    assert result.status is DirectiveStatus.FAILED
    step = next(s for s in result.steps if s.name == "a")
    assert step.reason.startswith(f"merging attempt 1 into makima/{handle.id} failed: ")
    assert "commit 1234abcd of step a is not in the repository" in step.reason
    assert "evaluation" not in step.reason
    failed = [e for e in stand.events if e.type.value == "activity_failed"]
    assert [e.data["activity"] for e in failed] == ["merge_step"]
    assert stand.merged == []
    # what the evaluation was billed still counts
    assert result.cost_usd == pytest.approx(0.25)
