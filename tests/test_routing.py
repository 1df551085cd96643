"""An attempt's evaluate, merge and cleanup go to the worker that holds its
worktree (that worker's own task queue; there one activity evaluates and, when
the attempt passes without a person, merges), and when that worker is gone the
attempt's commit is checked out on another worker instead. A merge there also
removes the worktrees, so no cleanup runs between a step and its dependants. The real Temporal test server
with stand-in activities; tests/test_faults.py runs it with worker processes."""

from __future__ import annotations

import pytest
from temporalio.testing import WorkflowEnvironment

from makima.contracts import ActivityName
from makima.models import DirectiveStatus
from tests.standins import StandIns, save_history, spec_of, start
from worker import build_worker

EVALUATE, MERGE, CLEANUP = (ActivityName.EVALUATE_STEP.value, ActivityName.MERGE_STEP.value,
                            ActivityName.CLEANUP_STEP.value)
#: evaluate and, when the attempt passes without a person, merge: one activity
EVALUATE_AND_MERGE = ActivityName.EVALUATE_AND_MERGE_STEP.value


async def test_evaluate_and_merge_run_on_the_worker_that_holds_the_worktree(
        temporal_env: WorkflowEnvironment, task_queue: str) -> None:
    own = f"{task_queue}@worker-a"
    standins = StandIns(worker_queues=[own])
    activities = standins.activities()
    async with build_worker(temporal_env.client, task_queue, activities), \
            build_worker(temporal_env.client, own, activities, workflows=False):
        handle = await start(temporal_env.client, task_queue, spec_of(("one", [])))
        result = await handle.result()

    assert result.status is DirectiveStatus.COMPLETED
    # evaluated and merged there by one activity, which removed the worktrees: no cleanup
    assert standins.ran_on == [(EVALUATE_AND_MERGE, own)]
    assert [f.merge.remove_worktrees
            for f in standins.called(ActivityName.EVALUATE_AND_MERGE_STEP)] == [True]


async def test_worktrees_the_merge_did_not_remove_are_cleaned_up_where_they_are(
        temporal_env: WorkflowEnvironment, task_queue: str) -> None:
    # attempt 1 (red) on worker a, attempt 2 (green) on worker b: b's merge removes
    # b's worktrees, and only a still needs a cleanup
    a, b = f"{task_queue}@worker-a", f"{task_queue}@worker-b"
    standins = StandIns(worker_queues=[a, b], scores={"one": [0.2, 0.9]})
    activities = standins.activities()
    async with build_worker(temporal_env.client, task_queue, activities), \
            build_worker(temporal_env.client, a, activities, workflows=False), \
            build_worker(temporal_env.client, b, activities, workflows=False):
        handle = await start(temporal_env.client, task_queue, spec_of(("one", [])))
        result = await handle.result()
        await save_history(handle, temporal_env.client, "routed")

    assert result.status is DirectiveStatus.COMPLETED
    assert standins.ran_on == [(EVALUATE_AND_MERGE, a), (EVALUATE_AND_MERGE, b), (CLEANUP, a)]
    assert standins.merged == ["one"]


async def test_a_merge_that_could_not_remove_the_worktrees_leaves_them_to_cleanup(
        temporal_env: WorkflowEnvironment, task_queue: str) -> None:
    own = f"{task_queue}@worker-a"
    standins = StandIns(worker_queues=[own], merge_keeps_worktrees=True)
    activities = standins.activities()
    async with build_worker(temporal_env.client, task_queue, activities), \
            build_worker(temporal_env.client, own, activities, workflows=False):
        handle = await start(temporal_env.client, task_queue, spec_of(("one", [])))
        result = await handle.result()

    assert result.status is DirectiveStatus.COMPLETED
    assert standins.ran_on == [(EVALUATE_AND_MERGE, own), (CLEANUP, own)]


@pytest.mark.faults  # waits out WORKTREE_SCHEDULE_TO_START (60 s): the test server does not skip it
async def test_a_gone_worker_s_attempt_is_checked_out_and_evaluated_elsewhere(
        fresh_temporal_env: WorkflowEnvironment, task_queue: str) -> None:
    gone = f"{task_queue}@worker-that-died"  # nobody polls it any more
    standins = StandIns(worker_queues=[gone])
    async with build_worker(fresh_temporal_env.client, task_queue, standins.activities()):
        handle = await start(fresh_temporal_env.client, task_queue, spec_of(("one", [])))
        result = await handle.result()

    assert result.status is DirectiveStatus.COMPLETED
    assert [s.status.value for s in result.steps] == ["passed"]
    assert len(standins.called(ActivityName.CHECKOUT_STEP)) == 1
    assert len(standins.called(ActivityName.EXECUTE_STEP)) == 1, "the agent ran once"
    assert standins.ran_on[0] == (EVALUATE, task_queue)
    assert any("worktree is gone" in e.message for e in standins.events)
    assert (CLEANUP, gone) not in standins.ran_on
