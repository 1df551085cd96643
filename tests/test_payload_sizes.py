"""History and payload sizes of a big directive (issue 10): a 100-step plan and a
100 KB goal, one step waiting for a person while 6,000 signals arrive. No event
(and so no payload) in any history is over 256 KB, and no run of the directive
is over 10,240 events (Temporal warns there; it refuses at 51,200), because a
step that waits for a person does not hold the checkpoint. A real Temporal dev
server (see `dev_client`), stand-in activities.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from temporalio.client import Client

from makima.models import ApprovalDecision, DirectiveStatus
from tests.standins import StandIns, runs_of, spec_of, start, status, wait_until
from worker import build_worker
from workflows.directive import DirectiveWorkflow

STEPS = 100
GOAL_BYTES = 100_000
SIGNALS = 6_000
MAX_EVENT_BYTES = 256 * 1024
MAX_RUN_EVENTS = 10_240

pytestmark = pytest.mark.faults  # 30-60 s on 2 cores: run by `make test-faults`


def biggest_event(histories: list[Any]) -> tuple[int, str]:
    size, where = 0, ""
    for history in histories:
        for event in history.events:
            if event.ByteSize() > size:
                size, where = event.ByteSize(), f"{history.workflow_id}: {event.event_type}"
    return size, where


async def signal_storm(handle: Any, step: str) -> None:
    """6,000 decisions about an attempt nobody saw (refused: they change nothing but
    the history), 20 at a time, as a client retrying a stale approval would."""
    noise = ApprovalDecision(step=step, by="retrying-client", attempt=99)
    for first in range(0, SIGNALS, 20):
        await asyncio.gather(*(handle.signal(DirectiveWorkflow.approve, noise)
                               for _ in range(min(20, SIGNALS - first))))


async def test_a_big_directive_stays_within_history_and_payload_limits(
        dev_client: Client, task_queue: str) -> None:
    client = dev_client
    root = "s000"
    steps = [(root, [])] + [(f"s{i:03d}", [root]) for i in range(1, STEPS)]
    goal = ("Make the thing. " * (GOAL_BYTES // 16 + 1))[:GOAL_BYTES]
    stand = StandIns(scores={root: [0.6]})
    spec = spec_of(*steps, goal=goal, requirements=[f"requirement {i}" for i in range(50)])
    async with build_worker(client, task_queue, stand.activities()):
        handle = await start(client, task_queue, spec)
        await wait_until(handle, lambda s: bool(s.pending_approvals), timeout=60)
        await signal_storm(handle, root)
        waiting = await status(handle)
        while_waiting = await runs_of(client, handle.id, handle.first_execution_run_id)
        (pending,) = waiting.pending_approvals
        await handle.execute_update(DirectiveWorkflow.approve_step, ApprovalDecision(
            step=root, by="al", attempt=pending.attempt))
        result = await handle.result()
        runs = await runs_of(client, handle.id, handle.first_execution_run_id)
        children = [await client.get_workflow_handle(s.workflow_id).fetch_history()
                    for s in result.steps if s.workflow_id]
    assert result.status is DirectiveStatus.COMPLETED
    assert len(result.steps) == STEPS and len(stand.merged) == STEPS
    longest = max(len(run.events) for run in runs)
    assert len(while_waiting) > 1, "6,000 signals while a step waited reached no checkpoint"
    assert longest <= MAX_RUN_EVENTS, f"a run of the directive has {longest} events"
    size, where = biggest_event(runs + children)
    assert size <= MAX_EVENT_BYTES, f"an event of {size} bytes in {where}"
