"""An update that reaches a worker without the workflow in its cache, right after two
workflow tasks that scheduled nothing (issue 10; fuzz seeds 123349 and 232937, with
worker restarts: "Signal external WF machine does not handle this event:
ActivityTaskScheduled").

SDK Core (temporalio 1.35, its WFT chunking v1) takes a workflow task that completed
without commands, after one that also completed without any, and followed at once by
the next task's WorkflowTaskScheduled, for a "heartbeat", and runs it together with
that next task when it replays a workflow from its history to answer a task. An
update creates no history event before its task, so a cold worker gets the update
and the result the previous task already ran (here: an activity's) in one
activation. The SDK runs updates before results, and between the two it let the
workflow's main loop run (its legacy job order), so the workflow scheduled in the
order update, main loop, result. Every later replay sees the update's
acceptance in the history, runs the result in a task of its own first, and then the
update: result, update, main loop. Another order of the same commands, and the
workflow cannot be replayed again (temporalio/sdk-rust#1146 and #1606).

In the directive: a pause while a step's workflow had just been started, on a
restarted worker. The pause told the started step before it recorded its events
(`_relay_pause`) on replay, and after them (the step's `_child` finds the pause
changed once its start resolves) on the worker that ran it first.

The worker's runner (makima/query_guard.py) turns on the SDK's flag that applies every
job of an activation before any coroutine runs (PROCESS_WORKFLOW_ACTIVATION_JOBS_AS_
SINGLE_BATCH): the main loop then runs after the result was taken in both ways, and
the commands come out in one order. The flag is recorded in the history, so replays
run the same way, and histories without it replay as before.

The workflow below has the directive's shape in a few lines: a follower that acts on
a pause once what it waited for has come (the step's `_child`), an update that tells
the follower if it can (`_relay_pause`), and a main loop that writes what changed
(the event log's flush).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from temporalio import activity, workflow
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle
from temporalio.worker import Replayer, UnsandboxedWorkflowRunner, Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from makima.query_guard import QueryGuardRunner, WrappingRunner
from tests.stack_fixture import DevServer

TIMEOUT = timedelta(seconds=30)
GATE = asyncio.Event()


@activity.defn(name="fast")
async def fast() -> None:
    return None


@activity.defn(name="gated")
async def gated() -> None:
    await GATE.wait()


@activity.defn(name="note")
async def note() -> None:
    return None


@activity.defn(name="tell")
async def tell(by: str) -> None:
    return None


@workflow.defn(name="FollowsAPause")
class FollowsAPause:
    def __init__(self) -> None:
        self._paused = False
        self._arrived = False  # what the follower waited for has come
        self._changed = False

    @workflow.run
    async def run(self) -> None:
        first = workflow.start_activity(fast, start_to_close_timeout=TIMEOUT)
        follower = asyncio.create_task(self._follow())
        await first  # a task that schedules nothing
        while not self._paused:
            await workflow.wait_condition(lambda: self._changed)
            self._changed = False
            await workflow.start_activity(note, start_to_close_timeout=TIMEOUT)
        await follower

    async def _follow(self) -> None:
        await workflow.start_activity(gated, start_to_close_timeout=TIMEOUT)  # another
        self._arrived = True
        if self._paused:  # came while this was waited for
            await workflow.start_activity(tell, "the follower", start_to_close_timeout=TIMEOUT)

    @workflow.update
    def pause(self) -> None:
        self._paused = True
        self._changed = True
        if self._arrived:
            asyncio.create_task(self._tell())

    async def _tell(self) -> None:
        await workflow.start_activity(tell, "the update", start_to_close_timeout=TIMEOUT)


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[Client]:
    with DevServer(tmp_path / "temporal") as server:  # stopped by pid, also on failure
        yield await Client.connect(server.address)


def workflow_worker(client: Client, queue: str, older: bool = False) -> Worker:
    """The product's runner (sandboxed, this test module passed through), or with
    `older` one as before the flag (the sandbox alone, with the guard's wrapping). A
    stopped worker's sticky queue hands its task on after 1 s."""
    sandbox = SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules("tests"))
    return Worker(client, task_queue=queue, workflows=[FollowsAPause],
                  workflow_runner=WrappingRunner(sandbox) if older else QueryGuardRunner(sandbox),
                  sticky_queue_schedule_to_start_timeout=timedelta(seconds=1))


async def settled(handle: WorkflowHandle, after: str) -> None:
    """Until the history ends with a completed workflow task after `after`'s result."""
    for _ in range(300):
        events = [e async for e in handle.fetch_history_events()]
        done = [i for i, e in enumerate(events)
                if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED
                and events[e.activity_task_completed_event_attributes.scheduled_event_id - 1]
                .activity_task_scheduled_event_attributes.activity_type.name == after]
        if done and events[-1].event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED \
                and len(events) > done[0] + 1:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the workflow did not settle after {after}")


@pytest.mark.parametrize("begun_on", ["this worker", "an older worker"])
async def test_an_update_on_a_cold_worker_after_two_empty_tasks_replays(
        client: Client, task_queue: str, begun_on: str) -> None:
    """`an older worker`: the workflow was begun by a worker without the flag, as a
    directive in flight when makima is upgraded; the flag starts with the update."""
    GATE.clear()
    activities = Worker(client, task_queue=task_queue, activities=[fast, gated, note, tell])
    async with activities:
        first = workflow_worker(client, task_queue, older=begun_on == "an older worker")
        running = asyncio.create_task(first.run())
        handle = await client.start_workflow(FollowsAPause.run, id=f"cold-{task_queue}",
                                             task_queue=task_queue)
        await settled(handle, "fast")  # the task that ran `fast`'s result scheduled nothing
        GATE.set()
        await settled(handle, "gated")  # and so did the one that ran `gated`'s
        await first.shutdown()
        await running

        # the update waits for a worker; the next one has nothing cached
        update = asyncio.create_task(handle.execute_update(FollowsAPause.pause))
        await asyncio.sleep(0.5)
        second = workflow_worker(client, task_queue)
        async with second:
            await update
            await handle.result()

    history = await handle.fetch_history()
    scheduled = [e.activity_task_scheduled_event_attributes.activity_type.name
                 for e in history.events if e.HasField("activity_task_scheduled_event_attributes")]
    assert scheduled.count("tell") == 1, scheduled  # the pause was told once
    replayed = await Replayer(workflows=[FollowsAPause], workflow_runner=UnsandboxedWorkflowRunner()).replay_workflow(
        history, raise_on_replay_failure=False)
    assert replayed.replay_failure is None, replayed.replay_failure
