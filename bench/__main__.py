"""`python -m bench` (or `make bench`): start a Temporal dev server, an embedded
Postgres and one in-process makima worker (every real activity; no LLM: plans
are supplied and evaluation is programmatic; the `shell` executor in real git
worktrees), run the scenarios, print one table each and write them all to
`bench/results/<date>.json` (a later run the same day replaces the scenarios it ran).

Scenarios (`--only NAME` runs one):
- chain: dispatch latency per level on a 20-level chain, against the floor (a
  bare child workflow + one no-op activity per level on the same worker);
- makespan: a 30-step random DAG (fixed seed) of `sleep 1..5` steps, against its
  critical path and a level-by-level barrier schedule;
- width: one directive of `--width` no-op steps (wide, and 20 per level);
- many: `--directives` directives of 10 no-op steps started at once.

Every time comes from Temporal's history timestamps, except wall times of the
bench itself and the worker's peak RSS (this process: the worker runs here).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from temporalio.client import Client, WorkflowHandle
from temporalio.worker import Worker

from activities.evaluation import EvaluationActivities
from activities.execution import ExecutionActivities
from activities.planning import PlanningActivities
from activities.record import RecordActivities
from bench.floor import FloorChain, FloorLevel, noop
from makima.connection import connect_temporal
from makima.constants import HEARTBEAT_THROTTLE
from makima.dag import critical_path_length, levels
from makima.models import DirectiveSpec, Plan, PlannedStep
from makima.store.embedded import start_embedded, stop_embedded
from makima.store.pool import create_pool
from tests.stack_fixture import DevServer
from workflows.directive import DirectiveWorkflow
from workflows.step import StepWorkflow

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- numbers


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": round(statistics.median(values), 4),
            "p95": round(percentile(values, 95), 4), "p99": round(percentile(values, 99), 4),
            "max": round(max(values), 4)}


def at(event: Any) -> float:
    return event.event_time.ToDatetime().replace(tzinfo=UTC).timestamp()


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# --------------------------------------------------------------------------- histories


async def run_histories(client: Client, workflow_id: str) -> list[Any]:
    """Every run of a workflow (continue-as-new chains), oldest first."""
    handle = client.get_workflow_handle(workflow_id)
    first = (await handle.describe()).raw_description.workflow_execution_info
    runs, run_id = [], first.first_run_id or first.execution.run_id
    while run_id:
        history = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
        runs.append(history)
        last = history.events[-1]
        run_id = (last.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
                  if last.HasField("workflow_execution_continued_as_new_event_attributes")
                  else None)
    return runs


async def children(client: Client, parents: list[Any]) -> dict[str, Any]:
    """The histories of every child started by these parent histories, by workflow id."""
    ids = [e.child_workflow_execution_started_event_attributes.workflow_execution
           for h in parents for e in h.events
           if e.HasField("child_workflow_execution_started_event_attributes")]
    out: dict[str, Any] = {}
    for chunk in range(0, len(ids), 50):
        batch = ids[chunk:chunk + 50]
        fetched = await asyncio.gather(*(
            client.get_workflow_handle(x.workflow_id, run_id=x.run_id).fetch_history()
            for x in batch))
        out.update({x.workflow_id: h for x, h in zip(batch, fetched, strict=True)})
    return out


def first_activity_start(history: Any, activity_type: str) -> float:
    scheduled = {e.event_id: e.activity_task_scheduled_event_attributes.activity_type.name
                 for e in history.events if e.HasField("activity_task_scheduled_event_attributes")}
    for e in history.events:
        if (e.HasField("activity_task_started_event_attributes")
                and scheduled.get(e.activity_task_started_event_attributes.scheduled_event_id)
                == activity_type):
            return at(e)
    raise ValueError(f"no {activity_type} started")


def activity_completed(history: Any, activity_type: str) -> float:
    """When the last run of an activity of this type completed."""
    scheduled = {e.event_id: e.activity_task_scheduled_event_attributes.activity_type.name
                 for e in history.events if e.HasField("activity_task_scheduled_event_attributes")}
    done = [at(e) for e in history.events
            if e.HasField("activity_task_completed_event_attributes")
            and scheduled.get(e.activity_task_completed_event_attributes.scheduled_event_id)
            == activity_type]
    return done[-1]


def completed_at(history: Any) -> float:
    return at(history.events[-1])


def schedule_to_start(histories: list[Any]) -> dict[str, list[float]]:
    """Seconds from scheduled to started of every activity, by activity type."""
    out: dict[str, list[float]] = {}
    for history in histories:
        scheduled = {e.event_id: (at(e), e.activity_task_scheduled_event_attributes
                                  .activity_type.name)
                     for e in history.events
                     if e.HasField("activity_task_scheduled_event_attributes")}
        for e in history.events:
            if e.HasField("activity_task_started_event_attributes"):
                when, name = scheduled[e.activity_task_started_event_attributes.scheduled_event_id]
                out.setdefault(name, []).append(at(e) - when)
    return out


def history_size(histories: list[Any]) -> tuple[int, int]:
    """(events, bytes) of the largest single run."""
    return (max(len(h.events) for h in histories),
            max(sum(e.ByteSize() for e in h.events) for h in histories))


# --------------------------------------------------------------------------- the stack


class Bench:
    def __init__(self, folder: Path, max_concurrent_activities: int | None = None) -> None:
        self.folder = folder
        self.max_concurrent_activities = max_concurrent_activities
        self.queue = f"bench-{uuid.uuid4().hex[:6]}"

    async def __aenter__(self) -> Bench:
        os.environ.update({"MAKIMA_HOME": str(self.folder / "home"), "MAKIMA_AUTO_CHECKS": "0",
                           "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
                           "GIT_COMMITTER_NAME": "bench",
                           "GIT_COMMITTER_EMAIL": "bench@localhost"})
        os.environ.pop("ANTHROPIC_API_KEY", None)
        self.server = DevServer(self.folder / "temporal").start()
        self.postgres = await start_embedded(self.folder)
        self.pool = await create_pool(self.postgres.url, min_size=2, max_size=10)
        self.client = await connect_temporal(self.server.address)
        self.worker = Worker(
            self.client, task_queue=self.queue,
            workflows=[DirectiveWorkflow, StepWorkflow, FloorChain, FloorLevel],
            activities=[*PlanningActivities(None).activities(),
                        *EvaluationActivities(None).activities(),
                        *ExecutionActivities().activities(),
                        *RecordActivities(self.pool).activities(), noop],
            # the same settings as worker.build_worker
            max_heartbeat_throttle_interval=HEARTBEAT_THROTTLE,
            default_heartbeat_throttle_interval=HEARTBEAT_THROTTLE,
            # a tuning knob to compare against the SDK's default (100)
            **({"max_concurrent_activities": self.max_concurrent_activities}
               if self.max_concurrent_activities else {}),
        )
        self._running = asyncio.create_task(self.worker.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.worker.shutdown()
            self._running.cancel()
        finally:
            await self.pool.close()
            self.server.stop()
            stop_embedded(self.postgres.pid)

    def repo(self) -> Path:
        path = self.folder / f"repo-{uuid.uuid4().hex[:6]}"
        path.mkdir()
        for args in (["init", "-q", "-b", "main"], ["commit", "-q", "--allow-empty", "-m", "i"]):
            subprocess.run(["git", *args], cwd=path, check=True, capture_output=True)
        return path

    async def directive(self, plan: Plan, *, wait: bool = True, **extra: Any) -> Any:
        spec = DirectiveSpec.model_validate({
            "title": "bench", "goal": "measure", "executor": "shell", "autonomy": "full_auto",
            "repository": {"path": str(self.repo())}, "plan": plan.model_dump(), **extra})
        handle = await self.client.start_workflow(
            DirectiveWorkflow.run, spec, id=f"directive-bench-{uuid.uuid4().hex[:8]}",
            task_queue=self.queue, execution_timeout=timedelta(hours=2))
        if wait:
            await handle.result()
        return handle


def step(name: str, deps: list[str], command: str = "true") -> PlannedStep:
    return PlannedStep(name=name, depends_on=deps, command=command)


# --------------------------------------------------------------------------- scenarios


async def chain(bench: Bench, depth: int, repeat: int) -> dict[str, Any]:
    makima, floor, gap, floor_gap = [], [], [], []
    for _ in range(repeat):
        names = [f"s{i:02d}" for i in range(depth)]
        plan = Plan(steps=[step(n, [names[i - 1]] if i else []) for i, n in enumerate(names)])
        handle: WorkflowHandle[Any, Any] = await bench.directive(plan)
        kids = await children(bench.client, await run_histories(bench.client, handle.id))
        for i in range(1, depth):
            done = completed_at(kids[f"{handle.id}/g1/{names[i - 1]}"])
            started = first_activity_start(kids[f"{handle.id}/g1/{names[i]}"], "execute_step")
            makima.append(started - done)
            gap.append(started - activity_completed(kids[f"{handle.id}/g1/{names[i - 1]}"],
                                                    "execute_step"))
        floor_id = f"bench-floor-{uuid.uuid4().hex[:8]}"
        await bench.client.execute_workflow(FloorChain.run, depth, id=floor_id,
                                            task_queue=bench.queue)
        kids = await children(bench.client, await run_histories(bench.client, floor_id))
        for i in range(1, depth):
            done = completed_at(kids[f"{floor_id}/l{i - 1}"])
            started = first_activity_start(kids[f"{floor_id}/l{i}"], "bench_noop")
            floor.append(started - done)
            floor_gap.append(started - activity_completed(kids[f"{floor_id}/l{i - 1}"],
                                                          "bench_noop"))
    m, f = summary(makima), summary(floor)
    return {"levels": depth, "runs": repeat, "makima_s": m, "floor_s": f,
            "ratio_p50": round(m["p50"] / f["p50"], 2),
            "makima_p99_over_p50": round(m["p99"] / m["p50"], 2),
            # what a user waits between one agent finishing and the next starting:
            # evaluation, merge, worktree cleanup and the event flush included
            "agent_to_agent_s": summary(gap), "floor_activity_to_activity_s": summary(floor_gap)}


def random_dag(count: int, seed: int) -> tuple[Plan, dict[str, float]]:
    rng = random.Random(seed)
    names = [f"t{i:02d}" for i in range(count)]
    steps, durations = [], {}
    for i, name in enumerate(names):
        window = names[max(0, i - 8):i]
        deps = rng.sample(window, k=min(len(window), rng.choice([0, 1, 1, 2, 2, 3])))
        durations[name] = float(rng.randint(1, 5))
        steps.append(step(name, sorted(deps), f"sleep {durations[name]:g}"))
    return Plan(steps=steps), durations


async def makespan(bench: Bench, count: int, seed: int) -> dict[str, Any]:
    plan, durations = random_dag(count, seed)
    started = time.monotonic()
    handle = await bench.directive(plan)
    wall = time.monotonic() - started
    kids = await children(bench.client, await run_histories(bench.client, handle.id))
    begin = min(first_activity_start(h, "execute_step") for h in kids.values())
    end = max(completed_at(h) for h in kids.values())
    critical = critical_path_length(plan, durations)
    by_level: dict[int, float] = {}
    for name, level in levels(plan).items():
        by_level[level] = max(by_level.get(level, 0.0), durations[name])
    barrier = sum(by_level.values())
    measured = end - begin
    return {"steps": count, "seed": seed, "levels": len(by_level),
            "critical_path_s": critical, "makima_makespan_s": round(measured, 2),
            "makima_ratio": round(measured / critical, 3),
            "barrier_ideal_s": barrier, "barrier_ratio": round(barrier / critical, 3),
            "directive_wall_s": round(wall, 2)}


async def width(bench: Bench, count: int, per_level: int | None) -> dict[str, Any]:
    names = [f"w{i:03d}" for i in range(count)]
    if per_level:
        steps = [step(n, [names[i - per_level]] if i >= per_level else [])
                 for i, n in enumerate(names)]
    else:
        steps = [step(n, []) for n in names]
    started = time.monotonic()
    handle = await bench.directive(Plan(steps=steps), max_parallel_steps=50)
    wall = time.monotonic() - started
    runs = await run_histories(bench.client, handle.id)
    kids = await children(bench.client, runs)
    events, size = history_size(runs + list(kids.values()))
    return {"steps": count, "shape": f"{per_level} per level" if per_level else "all independent",
            "wall_s": round(wall, 1), "steps_per_s": round(count / wall, 2),
            "directive_runs": len(runs), "max_history_events": events,
            "max_history_bytes": size, "peak_rss_mib": peak_rss_mib()}


async def many(bench: Bench, directives: int, steps_each: int) -> dict[str, Any]:
    names = [f"m{i}" for i in range(steps_each)]
    plan = Plan(steps=[step(n, [names[i - 2]] if i >= 2 else []) for i, n in enumerate(names)])
    started = time.monotonic()
    handles = await asyncio.gather(*(bench.directive(plan, wait=False)
                                     for _ in range(directives)))
    results = await asyncio.gather(*(h.result() for h in handles), return_exceptions=True)
    wall = time.monotonic() - started
    completed = sum(1 for r in results if not isinstance(r, BaseException)
                    and r.status.value == "completed")
    histories: list[Any] = []
    for handle in handles:
        runs = await run_histories(bench.client, handle.id)
        histories += runs + list((await children(bench.client, runs)).values())
    waits = schedule_to_start(histories)
    every = [w for values in waits.values() for w in values]
    return {"directives": directives, "steps_each": steps_each, "completed": completed,
            "wall_s": round(wall, 1), "steps_per_s": round(directives * steps_each / wall, 2),
            "schedule_to_start_s": summary(every),
            **{f"  {name}": {"n": len(v), "p50": round(statistics.median(v), 3),
                             "p95": round(percentile(v, 95), 3)}
               for name, v in sorted(waits.items())},
            "peak_rss_mib": peak_rss_mib()}


# --------------------------------------------------------------------------- output


def table(title: str, rows: dict[str, Any]) -> str:
    flat: list[tuple[str, str]] = []
    for key, value in rows.items():
        if isinstance(value, dict):
            flat.append((key, "  ".join(f"{k}={v}" for k, v in value.items())))
        else:
            flat.append((key, str(value)))
    width = max(len(k) for k, _ in flat)
    lines = [f"\n{title}", "-" * len(title)]
    lines += [f"{k.ljust(width)}  {v}" for k, v in flat]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    version = subprocess.run([str(Path(sys.executable).parent / "temporal"), "--version"],
                             capture_output=True, text=True).stdout.strip()
    return {"platform": platform.platform(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "temporal": version}


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["chain", "makespan", "width", "many"], action="append")
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3, help="chain runs")
    parser.add_argument("--dag-steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--directives", type=int, default=50)
    parser.add_argument("--max-concurrent-activities", type=int, default=None,
                        help="worker setting to try (default: the SDK's, 100)")
    parser.add_argument("--no-save", action="store_true",
                        help="print only; leave bench/results alone (tuning experiments)")
    args = parser.parse_args(argv)
    chosen = args.only or ["chain", "makespan", "width", "many"]
    folder = Path(tempfile.mkdtemp(prefix="mk-bench-"))
    results: dict[str, Any] = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
                               "machine": machine()}
    try:
        results["worker"] = {"max_concurrent_activities":
                             args.max_concurrent_activities or "sdk default (100)"}
        async with Bench(folder, args.max_concurrent_activities) as bench:
            if "chain" in chosen:
                results["chain"] = await chain(bench, args.depth, args.repeat)
                print(table("1. dispatch latency per level (s)", results["chain"]), flush=True)
            if "makespan" in chosen:
                results["makespan"] = await makespan(bench, args.dag_steps, args.seed)
                print(table("2. makespan", results["makespan"]), flush=True)
            if "width" in chosen:
                results["width_wide"] = await width(bench, args.width, None)
                print(table("3a. width: all independent", results["width_wide"]), flush=True)
                results["width_layered"] = await width(bench, args.width, 20)
                print(table("3b. width: 20 per level", results["width_layered"]), flush=True)
            if "many" in chosen:
                results["many"] = await many(bench, args.directives, 10)
                print(table("4. many directives at once", results["many"]), flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if args.no_save:
        return
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{datetime.now(UTC):%Y-%m-%d}.json"
    # one file a day: a run of some scenarios (--only) replaces only their entries
    earlier = json.loads(out.read_text()) if out.exists() else {}
    out.write_text(json.dumps({**earlier, **results}, indent=2) + "\n")
    print(f"\nwritten to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    asyncio.run(main())
