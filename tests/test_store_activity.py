"""The `record_events` activity in a real worker on the Temporal test server:
a retry after a write that already landed leaves no duplicate, and a batch
Postgres refuses fails at once instead of retrying forever."""

from __future__ import annotations

from datetime import timedelta

import asyncpg
import pytest
from temporalio import activity, workflow
from temporalio.client import Client, WorkflowFailureError
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from activities.record import RecordActivities
from makima.contracts import ActivityName, EventType, RecordInput, RecordOutput
from makima.store import reads
from tests.postgres_fixture import (  # noqa: F401
    Emitter,
    directive_status,
    pg_pool,
    postgres,
    started,
    step_status,
    unique_id,
)

FLAKY = "record_events_then_fail_once"


class FlakyRecord:
    """Runs the real activity, then fails its first attempt: the write landed but
    Temporal sees a failure and retries the whole batch."""

    def __init__(self, real: RecordActivities) -> None:
        self.real = real
        self.results: list[int] = []

    @activity.defn(name=FLAKY)
    async def record(self, batch: RecordInput) -> RecordOutput:
        out = await self.real.record_events(batch)
        self.results.append(out.written)
        if activity.info().attempt == 1:
            raise RuntimeError("worker lost after the commit")
        return out


@workflow.defn(sandboxed=False)
class RecordTwiceWorkflow:
    """Sends its batch through the flaky activity, then once more through the
    real one (as a replayed or re-sent batch would)."""

    @workflow.run
    async def run(self, batch: RecordInput) -> list[int]:
        retry = RetryPolicy(initial_interval=timedelta(milliseconds=10), maximum_attempts=3)
        first = await workflow.execute_activity(
            FLAKY, batch, result_type=RecordOutput,
            start_to_close_timeout=timedelta(seconds=30), retry_policy=retry,
        )
        again = await workflow.execute_activity(
            ActivityName.RECORD_EVENTS.value, batch, result_type=RecordOutput,
            start_to_close_timeout=timedelta(seconds=30), retry_policy=retry,
        )
        return [first.written, again.written]


async def test_a_retried_record_after_a_landed_write_leaves_no_duplicate(
    client: Client, task_queue: str, pg_pool: asyncpg.Pool  # noqa: F811
) -> None:
    d = unique_id()
    emit = Emitter(d)
    batch = RecordInput(events=[started(emit), directive_status(emit, "active"),
                                step_status(emit, "build", "running", attempts=1)])
    real = RecordActivities(pg_pool)
    flaky = FlakyRecord(real)
    async with Worker(client, task_queue=task_queue, workflows=[RecordTwiceWorkflow],
                      activities=[*real.activities(), flaky.record],
                      workflow_runner=UnsandboxedWorkflowRunner()):
        result = await client.execute_workflow(
            RecordTwiceWorkflow.run, batch, id=f"record-{d}", task_queue=task_queue
        )
    assert flaky.results == [3, 0]  # the retry found everything already written
    assert result == [0, 0]
    state = await reads.directive_state(pg_pool, d)
    assert [e.seq for e in state.events] == [1, 2, 3]
    assert [(s.name, s.status, s.attempts) for s in state.steps] == [("build", "running", 1)]


@workflow.defn(sandboxed=False)
class RecordOnceWorkflow:
    @workflow.run
    async def run(self, batch: RecordInput) -> int:
        out = await workflow.execute_activity(
            ActivityName.RECORD_EVENTS.value, batch, result_type=RecordOutput,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=RetryPolicy(initial_interval=timedelta(milliseconds=10), maximum_attempts=5),
        )
        return out.written


async def test_a_batch_postgres_refuses_fails_without_retrying(
    client: Client, task_queue: str, pg_pool: asyncpg.Pool  # noqa: F811
) -> None:
    d = unique_id()
    emit = Emitter(d)
    # Postgres text cannot hold a NUL character: no retry can ever store this.
    batch = RecordInput(events=[emit(EventType.MERGED, {}, message="bad\x00byte")])
    async with Worker(client, task_queue=task_queue, workflows=[RecordOnceWorkflow],
                      activities=RecordActivities(pg_pool).activities(),
                      workflow_runner=UnsandboxedWorkflowRunner()):
        with pytest.raises(WorkflowFailureError) as raised:
            await client.execute_workflow(
                RecordOnceWorkflow.run, batch, id=f"record-{d}", task_queue=task_queue
            )
    activity_error = raised.value.cause
    assert isinstance(activity_error, ActivityError)
    cause = activity_error.cause
    assert isinstance(cause, ApplicationError)
    assert cause.type == "StoreError" and cause.non_retryable
    assert "Postgres refused the event batch" in cause.message
    assert activity_error.retry_state is not None and activity_error.retry_state.name == "NON_RETRYABLE_FAILURE"
