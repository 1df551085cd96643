"""Start a makima worker: the directive and step workflows and every activity,
connected to Temporal (see makima/connection.py) and Postgres (DATABASE_URL, or
the embedded server under MAKIMA_HOME).

    python worker.py [--task-queue makima]

SIGTERM or Ctrl-C stops polling and lets running activities finish for up to
--graceful-seconds; what is still running then is cancelled and Temporal
retries it on another worker.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from temporalio.client import Client
from temporalio.worker import Worker

from activities.evaluation import EvaluationActivities
from activities.execution import ExecutionActivities
from activities.planning import PlanningActivities
from activities.record import RecordActivities
from makima.connection import connect_temporal, task_queue
from makima.constants import HEARTBEAT_THROTTLE
from makima.llm.client import LLMClient, llm_from_env
from makima.store import create_pool
from workflows.directive import DirectiveWorkflow
from workflows.step import StepWorkflow

log = logging.getLogger("makima.worker")


def all_activities(llm: LLMClient | None, pool: Any) -> list[Callable[..., Any]]:
    return [
        *PlanningActivities(llm).activities(),
        *EvaluationActivities(llm).activities(),
        *ExecutionActivities().activities(),
        *RecordActivities(pool).activities(),
    ]


def build_worker(client: Client, queue: str, activities: list[Callable[..., Any]], *,
                 graceful_seconds: float = 30.0) -> Worker:
    return Worker(
        client,
        task_queue=queue,
        workflows=[DirectiveWorkflow, StepWorkflow],
        activities=activities,
        max_heartbeat_throttle_interval=HEARTBEAT_THROTTLE,
        default_heartbeat_throttle_interval=HEARTBEAT_THROTTLE,
        graceful_shutdown_timeout=timedelta(seconds=graceful_seconds),
    )


async def run(queue: str, graceful_seconds: float) -> None:
    client = await connect_temporal()
    pool = await create_pool()
    llm = llm_from_env()
    worker = build_worker(client, queue, all_activities(llm, pool),
                          graceful_seconds=graceful_seconds)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("makima worker: task queue %s, LLM %s", queue,
             "configured" if llm else "not configured (plans must be supplied)")
    try:
        async with worker:
            await stop.wait()
            log.info("makima worker: stopping")
    finally:
        await pool.close()
        if llm is not None:
            await llm.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run a makima worker.")
    parser.add_argument("--task-queue", default=task_queue())
    parser.add_argument("--graceful-seconds", type=float, default=30.0,
                        help="how long running activities may finish after SIGTERM")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(run(args.task_queue, args.graceful_seconds))


if __name__ == "__main__":
    main()
