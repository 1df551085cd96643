"""A step's run that ends from outside before the directive heard it started (issue
10, fuzz seed 468784). The directive started step a's child; a pause came while the
child was starting; the child was terminated before its first workflow task. The
directive then told the child of the pause, the signal failed ("external workflow
not found"), and step a stayed "running" with no run: the directive waited forever,
also across a checkpoint. Now the step ends cancelled ("terminated from outside")
and the directive treats it like a failed step.

The moment is made exact, on a real dev server (the time-skipping server does not
tell a parent that its child was terminated): the workflow worker is shut down just
as the directive's task that starts the child completes (a workflow runner that
wraps the SDK's sandboxed one sees the command go out), so the child's start, the
pause and the termination all wait in history for the next worker, which gets them
in one task.

The histories of the hung directive the fuzzer found are replay fixtures
(tests/histories/fuzz-468784-*.json): runs begun on the older code keep
replaying as they ran.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType as HistoryEvent
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.worker import WorkflowInstance

from makima.models import DirectiveStatus
from makima.query_guard import ForwardingInstance, WrappingRunner
from tests.standins import StandIns, save_history, spec_of, status, step_status, wait_until
from worker import build_worker
from workflows.directive import DirectiveWorkflow


class _Watched(ForwardingInstance):
    """A workflow instance that shows every activation's completion to `seen`."""

    def __init__(self, inner: WorkflowInstance, seen: Callable[[Any, Any], None]) -> None:
        super().__init__(inner)
        self._seen = seen

    def activate(self, act: Any) -> Any:
        completion = self._inner.activate(act)
        self._seen(self._inner.get_info(), completion)
        return completion


class WatchingRunner(WrappingRunner):
    """The SDK's sandboxed runner, with every completion shown to `seen` (in the
    worker's activation thread, before the completion goes to the server)."""

    def __init__(self, seen: Callable[[Any, Any], None]) -> None:
        super().__init__()
        self._seen = seen

    def wrap(self, instance: WorkflowInstance) -> WorkflowInstance:
        return _Watched(instance, self._seen)


async def _wait_for_event(handle: WorkflowHandle[Any, Any], kind: int,
                          timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await _events(handle, kind):
        assert asyncio.get_running_loop().time() < deadline, f"no {HistoryEvent.Name(kind)}"
        await asyncio.sleep(0.1)


async def _events(handle: WorkflowHandle[Any, Any], kind: int) -> list[Any]:
    return [e async for e in handle.fetch_history_events() if e.event_type == kind]


@pytest.mark.parametrize("pause", [True, False])
async def test_a_step_terminated_before_it_ran_while_a_pause_came_ends_the_generation(
        dev_client: Client, task_queue: str, pause: bool) -> None:
    client = dev_client
    stand = StandIns()
    loop = asyncio.get_running_loop()
    started_a = asyncio.Event()
    go_on = threading.Event()

    def seen(info: Any, completion: Any) -> None:
        commands = completion.successful.commands if completion.HasField("successful") else []
        if info.workflow_type == "DirectiveWorkflow" and any(
                c.HasField("start_child_workflow_execution")
                and c.start_child_workflow_execution.workflow_id.endswith("/a")
                for c in commands) and not go_on.is_set():
            loop.call_soon_threadsafe(started_a.set)
            go_on.wait(1.5)  # until the worker's shutdown has begun (< the deadlock check)

    activities = build_worker(client, task_queue, stand.activities(), workflows=False)
    first = build_worker(client, task_queue, [], graceful_seconds=5,
                         workflow_runner=WatchingRunner(seen),
                         sticky_queue_schedule_to_start_timeout=timedelta(seconds=1))
    async with activities:
        running = asyncio.create_task(first.run())
        handle = await client.start_workflow(
            DirectiveWorkflow.run, spec_of(("a", []), ("b", ["a"])),
            id=f"directive-test-{uuid.uuid4().hex[:8]}", task_queue=task_queue)
        try:
            await asyncio.wait_for(started_a.wait(), 30)
            stopping = asyncio.create_task(first.shutdown())
            await asyncio.sleep(0.3)
        finally:
            go_on.set()
        await stopping
        await running
        # no workflow worker: a's start, the pause and a's termination wait in history
        await _wait_for_event(handle, HistoryEvent.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_STARTED)
        if pause:
            await handle.signal(DirectiveWorkflow.pause)
        await client.get_workflow_handle(f"{handle.id}/g1/a").terminate("from outside")
        await _wait_for_event(handle, HistoryEvent.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_TERMINATED)
        async with build_worker(client, task_queue, []):
            if pause:
                held = await wait_until(handle, lambda s: step_status(s, "a") != "running")
                await handle.signal(DirectiveWorkflow.resume)
            with pytest.raises(WorkflowFailureError) as failure:
                await asyncio.wait_for(handle.result(), 30)
            final = await status(handle)
            if pause:
                await save_history(handle, client, "step-terminated-while-starting")
        told = await _events(
            handle, HistoryEvent.EVENT_TYPE_SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_FAILED)
    # the moment the fuzzer found: the pause could not be told to the ended child
    assert bool(told) == pause
    if pause:
        assert step_status(held, "a") == "cancelled"
        assert held.status is DirectiveStatus.PAUSED
    assert final.status is DirectiveStatus.FAILED
    assert "'a' cancelled" in str(failure.value.cause)
    assert "terminated from outside" in str(failure.value.cause)
    assert (step_status(final, "a"), step_status(final, "b")) == ("cancelled", "skipped")
