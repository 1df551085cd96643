"""`python -m bench.status_query`: what one `status` query of a directive costs the
worker, for a small directive and a large one (200 steps with long descriptions,
every one passed but the last, which runs; its events past the recent ones).

The worker runs in this process, on the time-skipping test server, with the
suite's stand-in activities (no git, no LLM). For each directive the script sends
`--queries` status queries one after another and prints the CPU time this process
spent per query (worker and client together: `time.process_time()`), the wall
time per query, and the size of the answer. The difference between the two
directives is what the directive's size adds to a query: building the snapshot
and encoding it, on the workflow's thread (where the SDK's deadlock detector
fires after 2 s), plus decoding it in the client. `encode ms` is the encoding of
the answer alone, timed on one thread (`time.thread_time()`).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from typing import Any

from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from makima.models import Plan, PlannedStep
from tests.conftest import installed_binary
from tests.standins import StandIns, spec_of, start, wait_until
from worker import build_worker
from workflows.directive import DirectiveWorkflow


def plan(steps: int, description: int) -> Plan:
    text = ("lorem ipsum dolor sit amet " * (description // 27 + 1))[:description]
    names = [f"s{i:03d}" for i in range(steps - 1)]
    return Plan(steps=[
        *(PlannedStep(name=n, description=f"{n}: {text}", task_plan=f"do {n}",
                      command=f"echo {n}") for n in names),
        PlannedStep(name="last", description=f"last: {text}", task_plan="do last",
                    command="echo last", depends_on=[]),
    ])


async def measure(env: WorkflowEnvironment, steps: int, queries: int) -> dict[str, Any]:
    stand = StandIns()
    gate = stand.gate("last")  # never opened: the directive stays open
    queue = f"bench-{uuid.uuid4()}"
    spec = spec_of(plan=plan(steps, 1000), max_parallel_steps=20)
    async with build_worker(env.client, queue, stand.activities()):
        handle = await start(env.client, queue, spec)
        await wait_until(handle, lambda s: sum(x.status.value == "passed" for x in s.steps)
                         == steps - 1 and gate.reached.is_set(), timeout=600)
        snapshot = await handle.query(DirectiveWorkflow.status)
        size = len(snapshot.model_dump_json())
        # the workflow thread's part: encoding the answer (building it is a list copy)
        encode = pydantic_data_converter.payload_converter.to_payloads
        t0 = time.thread_time()
        for _ in range(queries):
            encode([snapshot])
        encode_ms = 1000 * (time.thread_time() - t0) / queries
        walls = []
        cpu0 = time.process_time()
        for _ in range(queries):
            t0 = time.perf_counter()
            await handle.query(DirectiveWorkflow.status)
            walls.append(time.perf_counter() - t0)
        cpu = time.process_time() - cpu0
        await handle.terminate("bench done")
    return {"steps": steps, "answer_bytes": size, "cpu_ms_per_query": 1000 * cpu / queries,
            "wall_ms_p50": 1000 * statistics.median(walls), "encode_ms": encode_ms}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--queries", type=int, default=300)
    args = parser.parse_args()
    env = await WorkflowEnvironment.start_time_skipping(
        data_converter=pydantic_data_converter,
        test_server_existing_path=installed_binary("temporal-test-server"))
    try:
        rows = [await measure(env, 1, args.queries),
                await measure(env, args.steps, args.queries)]
    finally:
        await env.shutdown()
    print(f"{'steps':>6} {'answer bytes':>13} {'CPU ms/query':>13} {'wall ms p50':>12} "
          f"{'encode ms':>10}")
    for row in rows:
        print(f"{row['steps']:>6} {row['answer_bytes']:>13} {row['cpu_ms_per_query']:>13.2f} "
              f"{row['wall_ms_p50']:>12.2f} {row['encode_ms']:>10.3f}")


if __name__ == "__main__":
    asyncio.run(main())
