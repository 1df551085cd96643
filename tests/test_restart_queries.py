"""Status queries racing new history events right after a worker restart (issue 10).

The fuzzer with worker restarts found histories that did not replay ("Update
machine does not handle this event: ActivityTaskScheduled"). The cause, shown
here: a query that reaches a freshly restarted worker as a "legacy query" whose
history already holds an activity's result (the next workflow task scheduled, not
started) made the workflow run that result for the query; the real task then
carried only the update, and the history recorded the activity scheduled for the
result before the update's acceptance, the reverse of what every replay does.
Without makima/query_guard.py 4 of 6 rounds of this test left such a history
(and 5 of 5 rounds of the experiment it came from); with it, none in 16 rounds.

Each round: a directive paused from its start waits in its first activity; the
workflow worker is replaced by a new one (its cache empty); six clients ask for
the status as fast as they can; the activity completes and an update follows at
once. Every history must replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import timedelta
from typing import Any

import pytest
from temporalio import activity
from temporalio.client import Client, WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer, Worker

from makima.contracts import ActivityName, PrepareInput, PrepareOutput
from makima.models import GoalUpdate
from tests.standins import StandIns, spec_of
from worker import build_worker
from workflows.directive import DirectiveWorkflow
from workflows.step import StepWorkflow

pytestmark = pytest.mark.faults

ROUNDS = 6
QUERYING_CLIENTS = 6


def workflow_worker(client: Client, queue: str) -> Worker:
    # a stopped worker's sticky queue hands its tasks on after 1 s, not 10 s
    return build_worker(client, queue, [], graceful_seconds=5,
                        sticky_queue_schedule_to_start_timeout=timedelta(seconds=1))


async def ask_status_until(handle: WorkflowHandle[Any, Any], done: asyncio.Event) -> None:
    while not done.is_set():
        # a query may wait for the workflow worker or time out; only the race matters
        with contextlib.suppress(Exception):
            await asyncio.wait_for(handle.query(DirectiveWorkflow.status), 5)
        await asyncio.sleep(0.005)


async def update_until_answered(handle: WorkflowHandle[Any, Any]) -> None:
    """Sent again under the same id while a failed workflow task refuses it."""
    update_id = str(uuid.uuid4())
    for _ in range(10):
        try:
            await handle.execute_update(DirectiveWorkflow.update_directive_goal,
                                        GoalUpdate(goal="a new goal"), id=update_id)
            return
        except Exception:  # e.g. "Workflow Task in failed state": Temporal runs it once
            await asyncio.sleep(0.2)
    raise AssertionError("the update never got an answer")


async def test_status_queries_after_a_restart_leave_histories_that_replay(
        dev_client: Client, task_queue: str) -> None:
    client = dev_client
    stand = StandIns()
    reached: dict[str, asyncio.Event] = {}
    opened: dict[str, asyncio.Event] = {}
    others = [a for a in stand.activities()
              if a.__temporal_activity_definition.name != ActivityName.PREPARE_REPOSITORY.value]

    @activity.defn(name=ActivityName.PREPARE_REPOSITORY.value)
    async def prepare_repository(input: PrepareInput) -> PrepareOutput:
        reached[input.directive_id].set()
        await opened[input.directive_id].wait()
        return PrepareOutput(integration_branch=f"makima/{input.directive_id}",
                             base_commit="0" * 40, repository_path=input.repository.location)

    replayer = Replayer(workflows=[DirectiveWorkflow, StepWorkflow],
                        data_converter=pydantic_data_converter)
    not_replayed: list[str] = []
    async with Worker(client, task_queue=task_queue, activities=[*others, prepare_repository],
                      graceful_shutdown_timeout=timedelta(seconds=5)):
        worker = workflow_worker(client, task_queue)
        running = asyncio.create_task(worker.run())
        try:
            for round_ in range(ROUNDS):
                directive_id = f"restart-queries-{uuid.uuid4().hex[:6]}"
                reached[directive_id], opened[directive_id] = asyncio.Event(), asyncio.Event()
                handle = await client.start_workflow(
                    DirectiveWorkflow.run, spec_of(("a", []), planner="llm"), id=directive_id,
                    task_queue=task_queue, start_signal="pause")
                await asyncio.wait_for(reached[directive_id].wait(), 30)
                await asyncio.sleep(0.3)
                await worker.shutdown()
                await running
                worker = workflow_worker(client, task_queue)
                running = asyncio.create_task(worker.run())
                done = asyncio.Event()
                asking = [asyncio.create_task(ask_status_until(handle, done))
                          for _ in range(QUERYING_CLIENTS)]
                await asyncio.sleep(0.2 + 0.05 * (round_ % 5))
                opened[directive_id].set()
                await asyncio.sleep(0.01 * (round_ % 7))
                await update_until_answered(handle)
                await asyncio.sleep(0.5)
                done.set()
                await asyncio.gather(*asking)
                replayed = await replayer.replay_workflow(await handle.fetch_history(),
                                                          raise_on_replay_failure=False)
                if replayed.replay_failure is not None:
                    not_replayed.append(f"{directive_id}: {replayed.replay_failure}")
                await handle.terminate("the round is over")
        finally:
            await worker.shutdown()
            await running
    assert not not_replayed, "\n".join(not_replayed)
