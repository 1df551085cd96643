"""Start a makima worker: the directive and step workflows and every activity,
connected to Temporal (see makima/connection.py) and Postgres (DATABASE_URL, or
the embedded server under MAKIMA_HOME).

    python worker.py [--task-queue makima] [--max-concurrent-steps N]

`--max-concurrent-steps N` bounds how many agent runs (`execute_step`) this
worker does at once; other activities (evaluation, git, records) are not held
back by it. A step beyond the bound waits inside its activity for a slot,
heartbeating (with the previous attempt's details, so a retried attempt still
finds its agent session) so Temporal does not time it out meanwhile.
Each directive or step state change is logged as one line.

SIGTERM or Ctrl-C stops polling and lets running activities finish for up to
--graceful-seconds; what is still running then is cancelled (a running agent's
process group is killed) and Temporal retries it on another worker. The worker
logs both moments.

A worker started before its Temporal server answers waits for it, logging a
line every few seconds, for up to MAKIMA_TEMPORAL_WAIT_SECONDS (default 120),
then exits with status 2 and the last error.

Agents die with their worker even when it is killed outright (see
makima/lifeline.py); a worker starting on a MAKIMA_HOME reaps the agent process
groups an earlier, dead worker on that home left behind, and removes the folders
it left of directives that have ended (makima/leftovers.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any

from temporalio import activity
from temporalio.client import Client
from temporalio.service import RPCError
from temporalio.worker import Worker

from activities.billing import BillingActivities
from activities.evaluate_merge import EvaluateMergeActivities
from activities.evaluation import EvaluationActivities
from activities.execution import ExecutionActivities
from activities.heartbeat import Heartbeat
from activities.notify import NotifyActivities
from activities.planning import PlanningActivities
from activities.record import RecordActivities
from makima.connection import (
    TemporalUnavailable,
    connect_temporal_when_ready,
    task_queue,
    temporal_wait_seconds,
)
from makima.constants import HEARTBEAT_THROTTLE, WORKER_ACTIVITY_SLOTS
from makima.contracts import (
    ActivityName,
    EventType,
    ExecuteInput,
    ExecuteOutput,
    RecordInput,
    RecordOutput,
)
from makima.errors import SpecError
from makima.executors.base import ExecutorSetupError
from makima.executors.claude_code import claude_code_preflight
from makima.git import makima_home
from makima.leftovers import reap_ended_directives
from makima.lifeline import reap_orphans
from makima.llm.client import LLMClient, llm_from_env
from makima.query_guard import QueryGuardRunner
from makima.report import pull_request_report
from makima.sandbox import SandboxUnavailable, require_sandbox
from makima.store import create_pool
from workflows.directive import DirectiveWorkflow
from workflows.notify import NotifyWorkflow
from workflows.step import StepWorkflow

log = logging.getLogger("makima.worker")


def all_activities(llm: LLMClient | None, pool: Any, *,
                   max_concurrent_steps: int | None = None,
                   worker_queue: str = "") -> list[Callable[..., Any]]:
    execution = ExecutionActivities(worker_queue=worker_queue,
                                    reports=functools.partial(pull_request_report, pool))
    execution_activities = execution.activities()
    if max_concurrent_steps is not None:
        execution_activities = [
            bounded_execute_step(a, max_concurrent_steps)
            if a == execution.execute_step else a
            for a in execution_activities
        ]
    record = RecordActivities(pool)
    evaluation = EvaluationActivities(llm)
    return [
        *BillingActivities().activities(),
        *PlanningActivities(llm).activities(),
        *evaluation.activities(),
        *execution_activities,
        *EvaluateMergeActivities(evaluation, execution).activities(),
        logged_record_events(record.record_events),
        *NotifyActivities().activities(),
    ]


def bounded_execute_step(execute: Callable[[ExecuteInput], Awaitable[ExecuteOutput]],
                         limit: int) -> Callable[..., Any]:
    """`execute_step` that runs at most `limit` at once on this worker."""
    if limit < 1:
        raise ValueError(f"--max-concurrent-steps must be at least 1, got {limit}")
    slots = asyncio.Semaphore(limit)

    @activity.defn(name=ActivityName.EXECUTE_STEP.value)
    async def execute_step(input: ExecuteInput) -> ExecuteOutput:
        # waiting, it heartbeats the previous try's details: the try that gets the slot
        # still finds its session
        earlier = list(activity.info().heartbeat_details)
        async with Heartbeat(lambda: earlier):
            await slots.acquire()
        try:
            return await execute(input)
        finally:
            slots.release()

    return execute_step


def logged_record_events(record: Callable[[RecordInput], Awaitable[RecordOutput]]
                         ) -> Callable[..., Any]:
    """`record_events` that also logs one line per directive or step state change."""

    @activity.defn(name=ActivityName.RECORD_EVENTS.value)
    async def record_events(batch: RecordInput) -> RecordOutput:
        written = await record(batch)
        for event in batch.events:
            if event.type is EventType.DIRECTIVE_STATUS:
                log.info("%s: %s%s", event.directive_id, event.data.get("status"),
                         f" ({event.data['reason']})" if event.data.get("reason") else "")
            elif event.type is EventType.STEP_STATUS:
                log.info("%s: step %s %s (attempt %s)", event.directive_id, event.step,
                         event.data.get("status"), event.data.get("attempts"))
        return written

    return record_events


def worker_queue_name(queue: str) -> str:
    """This worker's own task queue: unique per worker process, so an activity sent
    there reaches the worker that holds an attempt's worktree, or nobody."""
    return f"{queue}@{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def build_worker(client: Client, queue: str, activities: list[Callable[..., Any]], *,
                 graceful_seconds: float = 30.0, workflows: bool = True,
                 extra_workflows: Sequence[type] = (),
                 activity_slots: int = WORKER_ACTIVITY_SLOTS, **options: Any) -> Worker:
    """makima's worker on `queue`; `options` are further `Worker` options.
    `extra_workflows` and `activity_slots`: for the benchmarks (the floor registered
    beside makima's workflows; another number of activity slots). Workflows run in
    the SDK's sandbox, guarded against what a query made them run (makima/query_guard.py)."""
    options.setdefault("workflow_runner", QueryGuardRunner())
    return Worker(
        client,
        task_queue=queue,
        workflows=[DirectiveWorkflow, StepWorkflow, NotifyWorkflow, *extra_workflows]
        if workflows else [],
        activities=activities,
        max_concurrent_activities=activity_slots,
        max_heartbeat_throttle_interval=HEARTBEAT_THROTTLE,
        default_heartbeat_throttle_interval=HEARTBEAT_THROTTLE,
        graceful_shutdown_timeout=timedelta(seconds=graceful_seconds),
        **options,
    )


async def run(queue: str, graceful_seconds: float, max_concurrent_steps: int | None = None) -> None:
    # Before anything else: a worker that cannot confine its agents does not start
    # (SandboxUnavailable names the fix), unless MAKIMA_SANDBOX=off says so (logged).
    await asyncio.to_thread(require_sandbox)
    claude_code_preflight()
    home = makima_home()
    reaped = reap_orphans(home)
    if reaped:
        log.warning("makima worker: killed %d agent process group(s) an earlier worker on %s "
                    "left running: %s", len(reaped), home, ", ".join(map(str, reaped)))
    client = await connect_temporal_when_ready(temporal_wait_seconds(), log)
    try:
        ended = await reap_ended_directives(client, home)
    except (RPCError, OSError) as err:  # housekeeping: the worker can work without it
        log.warning("makima worker: could not look for folders of ended directives on %s: %s",
                    home, err)
    else:
        if ended:
            log.info("makima worker: removed the folders an earlier worker on %s left of %d "
                     "ended directive(s): %s", home, len(ended), ", ".join(ended))
    pool = await create_pool()
    llm = llm_from_env()
    own_queue = worker_queue_name(queue)
    activities = all_activities(llm, pool, max_concurrent_steps=max_concurrent_steps,
                                worker_queue=own_queue)
    # the shared queue (workflows, any activity) and this worker's own (the activities
    # of attempts whose worktree it holds)
    workers = [build_worker(client, queue, activities, graceful_seconds=graceful_seconds),
               build_worker(client, own_queue, activities, graceful_seconds=graceful_seconds,
                            workflows=False)]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("makima worker: task queue %s (own queue %s), LLM %s, at most %s steps at once",
             queue, own_queue,
             "configured" if llm else "not configured (plans must be supplied)",
             max_concurrent_steps or "any number of")
    try:
        async with contextlib.AsyncExitStack() as running:
            for worker in workers:
                await running.enter_async_context(worker)
            await stop.wait()
            log.info("makima worker: stopping; running activities may finish for %g s, "
                     "then running agents are cancelled", graceful_seconds)
            shutdown = asyncio.ensure_future(asyncio.gather(*(w.shutdown() for w in workers)))
            done, _ = await asyncio.wait({shutdown}, timeout=graceful_seconds)
            if not done:
                log.warning("makima worker: graceful time (%g s) is over; cancelling running "
                            "agents", graceful_seconds)
            await shutdown
    finally:
        await pool.close()
        if llm is not None:
            await llm.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run a makima worker.")
    parser.add_argument("--task-queue", default=task_queue())
    parser.add_argument("--graceful-seconds", type=float, default=30.0,
                        help="how long running activities may finish after SIGTERM")
    parser.add_argument("--max-concurrent-steps", type=int, default=None,
                        help="at most this many agent runs (execute_step) at once on this worker")
    args = parser.parse_args(argv)
    if args.max_concurrent_steps is not None and args.max_concurrent_steps < 1:
        parser.error("--max-concurrent-steps must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        asyncio.run(run(args.task_queue, args.graceful_seconds, args.max_concurrent_steps))
    except (SandboxUnavailable, ExecutorSetupError, TemporalUnavailable, SpecError) as exc:
        parser.exit(2, f"makima worker: cannot start: {exc}\n")


if __name__ == "__main__":
    main()
