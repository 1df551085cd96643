"""The floor for dispatch latency: a bare Temporal chain with the same shape as a
makima chain (a parent starts one child workflow per level, each child runs one
no-op activity, the next level starts when the child returns), registered on the
same worker with the same settings. Nothing makima-specific happens in it.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import activity, workflow


@activity.defn(name="bench_noop")
async def noop(level: int) -> int:
    return level


@workflow.defn(name="BenchFloorLevel")
class FloorLevel:
    @workflow.run
    async def run(self, level: int) -> int:
        return await workflow.execute_activity(
            noop, level, start_to_close_timeout=timedelta(seconds=30))


@workflow.defn(name="BenchFloorChain")
class FloorChain:
    @workflow.run
    async def run(self, levels: int) -> int:
        for level in range(levels):
            await workflow.execute_child_workflow(
                FloorLevel.run, level, id=f"{workflow.info().workflow_id}/l{level}")
        return levels
