"""`python -m bench` (or `make bench`): start a Temporal dev server, an embedded
Postgres and one in-process makima worker built as worker.py builds it (every
real activity; no LLM: plans are supplied and evaluation is programmatic; the
`shell` executor in real git worktrees, in the sandbox), run the scenarios,
print one table each and write them all to `bench/results/<date>.json` (a later
run the same day replaces the scenarios it ran).

Scenarios (`--only NAME` runs one):
- chain: per level of a 20-level chain, from one agent's last instruction to the
  next agent's first (the commands stamp the time into their commit), split into
  its segments, against the floor (a bare child workflow + one no-op activity per
  level on the same worker): the floor's activity to activity, and child to child;
- makespan: a 30-step random DAG (fixed seed) of `sleep 1..5` steps, against its
  critical path and a level-by-level barrier schedule;
- width: one directive of `--width` no-op steps (wide, and 20 per level);
- many: `--directives` directives of 10 no-op steps started at once;
- workers: steps/s with 1 and 2 worker processes (`python worker.py`, own homes)
  on `url` repositories.

Every time comes from Temporal's history timestamps (and the chain's stamps, the
same clock), except wall times of the bench itself, the worker's peak RSS and the
chain's CPU per level (this process: the worker runs here; and the processes it
waited for: git, bubblewrap, the agents' commands). The machine's load average before the run
is kept with the results: the numbers move with it.
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

from bench.floor import FloorChain, FloorLevel, noop
from makima.connection import connect_temporal
from makima.constants import WORKER_ACTIVITY_SLOTS
from makima.contracts import integration_branch
from makima.dag import critical_path_length, levels
from makima.models import DirectiveSpec, Plan, PlannedStep
from makima.store.embedded import start_embedded, stop_embedded
from makima.store.pool import create_pool
from tests.stack_fixture import DevServer, WorkerProcess, worker_processes
from tests.standins import runs_of
from worker import all_activities, build_worker, worker_queue_name
from workflows.directive import DirectiveWorkflow

RESULTS = Path(__file__).parent / "results"
IDENTITY = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
            "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost"}
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


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds of this process, of the child processes it waited for)."""
    me, waited = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                      resource.RUSAGE_CHILDREN))
    return me.ru_utime + me.ru_stime, waited.ru_utime + waited.ru_stime


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# --------------------------------------------------------------------------- histories


async def run_histories(client: Client, workflow_id: str) -> list[Any]:
    """Every run of a workflow (continue-as-new chains), oldest first."""
    handle = client.get_workflow_handle(workflow_id)
    first = (await handle.describe()).raw_description.workflow_execution_info
    return await runs_of(client, workflow_id, first.first_run_id or first.execution.run_id)


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
    """The stack, and one worker in this process built as worker.py builds it: the
    shared task queue (workflows, any activity) and the worker's own (the
    activities of attempts whose worktree it holds)."""

    def __init__(self, folder: Path, max_concurrent_activities: int | None = None) -> None:
        self.folder = folder
        self.max_concurrent_activities = max_concurrent_activities
        self.queue = f"bench-{uuid.uuid4().hex[:6]}"

    async def __aenter__(self) -> Bench:
        os.environ.update({"MAKIMA_HOME": str(self.folder / "home"), "MAKIMA_AUTO_CHECKS": "0",
                           **IDENTITY})
        os.environ.pop("ANTHROPIC_API_KEY", None)
        self.server = DevServer(self.folder / "temporal").start()
        self.postgres = await start_embedded(self.folder)
        self.pool = await create_pool(self.postgres.url, min_size=2, max_size=10)
        self.client = await connect_temporal(self.server.address)
        own = worker_queue_name(self.queue)
        activities = [*all_activities(None, self.pool, worker_queue=own), noop]
        # a tuning knob to compare against WORKER_ACTIVITY_SLOTS
        slots = self.max_concurrent_activities or WORKER_ACTIVITY_SLOTS
        self.workers = [build_worker(self.client, self.queue, activities, activity_slots=slots,
                                     extra_workflows=[FloorChain, FloorLevel]),
                        build_worker(self.client, own, activities, activity_slots=slots,
                                     workflows=False)]
        self._running = [asyncio.create_task(w.run()) for w in self.workers]
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await asyncio.gather(*(w.shutdown() for w in self.workers))
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

    def remote(self) -> str:
        """A bare repository with one commit on main, for `url` directives."""
        bare = self.folder / f"remote-{uuid.uuid4().hex[:6]}.git"
        subprocess.run(["git", "clone", "-q", "--bare", str(self.repo()), str(bare)],
                       check=True, capture_output=True)
        return str(bare)

    async def directive(self, plan: Plan, *, wait: bool = True, repo: Path | None = None,
                        url: str | None = None, queue: str | None = None,
                        **extra: Any) -> Any:
        where = {"url": url} if url else {"path": str(repo or self.repo())}
        spec = DirectiveSpec.model_validate({
            "title": "bench", "goal": "measure", "executor": "shell", "autonomy": "full_auto",
            "repository": where, "plan": plan.model_dump(), **extra})
        handle = await self.client.start_workflow(
            DirectiveWorkflow.run, spec, id=f"directive-bench-{uuid.uuid4().hex[:8]}",
            task_queue=queue or self.queue, execution_timeout=timedelta(hours=2))
        if wait:
            await handle.result()
        return handle


def step(name: str, deps: list[str], command: str = "true") -> PlannedStep:
    return PlannedStep(name=name, depends_on=deps, command=command)


# --------------------------------------------------------------------------- scenarios


#: A chain step's command: stamps (wall clock, the same clock as the dev server's
#: history timestamps) of the agent's first and last instruction, committed with its
#: work, so the bench sees when the agent itself ran, not only its activity.
STAMPED = "date +%s.%N > {name}.start && date +%s.%N > {name}.end"

#: The segments of one level of a makima chain, in order: from one agent's last
#: instruction to the next agent's first. (label, from, to) over the points read
#: from the histories and the stamps; a segment whose points are missing (no
#: cleanup activity when the merge removed the worktrees) is left out.
SEGMENTS = [
    ("commit, push, describe (execute)", "agent_end", "execute_completed"),
    ("-> evaluate starts", "execute_completed", "evaluate_started"),
    ("evaluate", "evaluate_started", "evaluate_completed"),
    ("-> merge starts", "evaluate_completed", "merge_started"),
    ("merge", "merge_started", "merge_completed"),
    # on the worker holding the worktree, one activity evaluates and merges
    ("-> evaluate and merge starts", "execute_completed", "evaluate_and_merge_started"),
    ("evaluate and merge", "evaluate_and_merge_started", "evaluate_and_merge_completed"),
    ("-> cleanup starts", "merge_completed", "cleanup_started"),
    ("cleanup", "cleanup_started", "cleanup_completed"),
    ("-> step returns (events, signals)", "last_completed", "child_completed"),
    ("parent's workflow task", "child_completed", "next_child_initiated"),
    ("child workflow starts", "next_child_initiated", "next_child_started"),
    ("-> execute starts", "next_child_started", "next_execute_started"),
    ("lock, worktree, sandbox (execute)", "next_execute_started", "next_agent_start"),
]
#: The same for the floor: from one no-op activity's end to the next one's start.
FLOOR_SEGMENTS = [
    ("-> child returns", "activity_completed", "child_completed"),
    ("parent's workflow task", "child_completed", "next_child_initiated"),
    ("child workflow starts", "next_child_initiated", "next_child_started"),
    ("-> activity starts", "next_child_started", "next_activity_started"),
]


def activity_times(history: Any) -> dict[str, dict[str, float]]:
    """Scheduled, started and completed time of the last run of each activity type."""
    names = {e.event_id: e.activity_task_scheduled_event_attributes.activity_type.name
             for e in history.events if e.HasField("activity_task_scheduled_event_attributes")}
    out: dict[str, dict[str, float]] = {}
    for e in history.events:
        if e.HasField("activity_task_scheduled_event_attributes"):
            out[names[e.event_id]] = {"scheduled": at(e)}
        elif e.HasField("activity_task_started_event_attributes"):
            out[names[e.activity_task_started_event_attributes.scheduled_event_id]][
                "started"] = at(e)
        elif e.HasField("activity_task_completed_event_attributes"):
            out[names[e.activity_task_completed_event_attributes.scheduled_event_id]][
                "completed"] = at(e)
    return out


def parent_times(runs: list[Any]) -> dict[str, float]:
    """When the parent asked to start each child, by the child's workflow id."""
    return {e.start_child_workflow_execution_initiated_event_attributes.workflow_id: at(e)
            for h in runs for e in h.events
            if e.HasField("start_child_workflow_execution_initiated_event_attributes")}


def segments(points: dict[str, float], spec: list[tuple[str, str, str]]) -> dict[str, float]:
    return {label: points[b] - points[a] for label, a, b in spec
            if a in points and b in points}


def breakdown(rows: list[dict[str, float]]) -> dict[str, str]:
    """p50 of each segment over all levels, in milliseconds, with its share."""
    total = sum(statistics.median(r[label] for r in rows) for label in rows[0])
    return {label: f"{1000 * statistics.median(r[label] for r in rows):7.1f} ms "
                   f"({100 * statistics.median(r[label] for r in rows) / total:4.1f}%)"
            for label in rows[0]}


def stamps(repo: Path, branch: str, names: list[str]) -> dict[str, tuple[float, float]]:
    """(start, end) of each step's agent, as its command wrote them."""
    def read(name: str, which: str) -> float:
        return float(subprocess.run(["git", "show", f"{branch}:{name}.{which}"], cwd=repo,
                                    check=True, capture_output=True, text=True).stdout)
    return {name: (read(name, "start"), read(name, "end")) for name in names}


async def chain(bench: Bench, depth: int, repeat: int) -> dict[str, Any]:
    makima, floor, gap, history_gap, floor_gap = [], [], [], [], []
    cpu = {"worker": 0.0, "processes": 0.0}
    parts: list[dict[str, float]] = []
    floor_parts: list[dict[str, float]] = []
    for _ in range(repeat):
        names = [f"s{i:02d}" for i in range(depth)]
        plan = Plan(steps=[step(n, [names[i - 1]] if i else [], STAMPED.format(name=n))
                           for i, n in enumerate(names)])
        repo = bench.repo()
        before = cpu_seconds()
        handle: WorkflowHandle[Any, Any] = await bench.directive(plan, repo=repo)
        after = cpu_seconds()
        cpu["worker"] += after[0] - before[0]
        cpu["processes"] += after[1] - before[1]
        runs = await run_histories(bench.client, handle.id)
        kids = await children(bench.client, runs)
        agent = stamps(repo, integration_branch(handle.id), names)
        parent = parent_times(runs)
        for i in range(1, depth):
            before, after = kids[f"{handle.id}/g1/{names[i - 1]}"], kids[f"{handle.id}/g1/{names[i]}"]
            times = activity_times(before)
            points = {"agent_end": agent[names[i - 1]][1],
                      "child_completed": completed_at(before),
                      "next_child_started": at(after.events[0]),
                      "next_execute_started": activity_times(after)["execute_step"]["started"],
                      "next_agent_start": agent[names[i]][0]}
            for kind in ("execute", "evaluate", "merge", "evaluate_and_merge", "cleanup"):
                for moment in ("started", "completed"):
                    if moment in times.get(f"{kind}_step", {}):
                        points[f"{kind}_{moment}"] = times[f"{kind}_step"][moment]
            # the step's last activity before it returns
            points["last_completed"] = next(points[p] for p in (
                "cleanup_completed", "merge_completed", "evaluate_and_merge_completed")
                if p in points)
            points["next_child_initiated"] = parent[f"{handle.id}/g1/{names[i]}"]
            parts.append(segments(points, SEGMENTS))
            makima.append(points["next_execute_started"] - points["child_completed"])
            history_gap.append(points["next_execute_started"] - points["execute_completed"])
            gap.append(points["next_agent_start"] - points["agent_end"])
        floor_id = f"bench-floor-{uuid.uuid4().hex[:8]}"
        await bench.client.execute_workflow(FloorChain.run, depth, id=floor_id,
                                            task_queue=bench.queue)
        runs = await run_histories(bench.client, floor_id)
        kids = await children(bench.client, runs)
        parent = parent_times(runs)
        for i in range(1, depth):
            before, after = kids[f"{floor_id}/l{i - 1}"], kids[f"{floor_id}/l{i}"]
            points = {"activity_completed": activity_times(before)["bench_noop"]["completed"],
                      "next_child_initiated": parent[f"{floor_id}/l{i}"],
                      "child_completed": completed_at(before),
                      "next_child_started": at(after.events[0]),
                      "next_activity_started": activity_times(after)["bench_noop"]["started"]}
            floor_parts.append(segments(points, FLOOR_SEGMENTS))
            floor.append(points["next_activity_started"] - points["child_completed"])
            floor_gap.append(points["next_activity_started"] - points["activity_completed"])
    m, f = summary(makima), summary(floor)
    a, h, fa = summary(gap), summary(history_gap), summary(floor_gap)
    return {"levels": depth, "runs": repeat,
            # what a user waits between one agent's last instruction and the next
            # agent's first: commit and push, evaluation, merge, worktree cleanup, the
            # event flush, dispatch, worktree creation and the sandbox's start
            "agent_to_agent_s": a,
            "floor_activity_to_activity_s": fa,
            "ratio_agent_to_agent_p50": round(a["p50"] / fa["p50"], 2),
            "ratio_agent_to_agent_p95": round(a["p95"] / fa["p95"], 2),
            # the same from history alone (execute_step completed -> next started)
            "execute_to_execute_s": h,
            "ratio_execute_to_execute_p50": round(h["p50"] / fa["p50"], 2),
            "ratio_execute_to_execute_p95": round(h["p95"] / fa["p95"], 2),
            # dispatch alone: a step's workflow finished -> the next agent's activity started
            "child_to_child_s": m, "floor_child_to_child_s": f,
            "ratio_child_to_child_p50": round(m["p50"] / f["p50"], 2),
            "makima_p99_over_p50": round(m["p99"] / m["p50"], 2),
            # CPU per level, which moves less with the machine's load than the times
            # above: this process (the worker, its workflows and activities, and the
            # bench's client) and the processes it started and waited for (git,
            # bubblewrap, the agent's commands)
            "cpu_ms_per_level": {name: round(1000 * value / (depth * repeat), 1)
                                 for name, value in cpu.items()},
            "breakdown_p50": breakdown(parts),
            "floor_breakdown_p50": breakdown(floor_parts)}


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


async def workers(bench: Bench, counts: list[int], directives: int, depth: int,
                  width: int) -> dict[str, Any]:
    """Steps per second with N worker processes (`python worker.py`, each with its own
    MAKIMA_HOME, as on separate machines) on the one dev server and Postgres, with
    `directives` directives of `depth` levels × `width` steps started at once on a
    `url` repository (a bare one here), the multi-machine mode."""
    names = [[f"l{level}w{k}" for k in range(width)] for level in range(depth)]
    plan = Plan(steps=[step(name, [names[level - 1][k]] if level else [],
                            f"echo {name} > {name}.txt")
                       for level, row in enumerate(names) for k, name in enumerate(row)])
    out: dict[str, Any] = {"directives": directives, "steps_each": depth * width,
                           "shape": f"{depth} levels x {width}"}
    for count in counts:
        queue = f"fleet-{uuid.uuid4().hex[:6]}"
        env = {"TEMPORAL_ADDRESS": bench.server.address, "MAKIMA_TASK_QUEUE": queue,
               "DATABASE_URL": bench.postgres.url, "MAKIMA_AUTO_CHECKS": "0",
               "ANTHROPIC_API_KEY": "", **IDENTITY}
        folder = bench.folder / queue
        folder.mkdir()
        with worker_processes(folder, env) as fleet:
            for number in range(count):
                fleet.append(WorkerProcess(folder / f"worker-{number}.log", {
                    **env, "MAKIMA_HOME": str(folder / f"home-{number}")}).start())
            deadline = time.monotonic() + 120
            while not all("makima worker: task queue" in w.log() for w in fleet):
                if time.monotonic() > deadline or not all(w.alive() for w in fleet):
                    raise RuntimeError("a bench worker did not start: "
                                       + "\n".join(w.log()[-2000:] for w in fleet))
                await asyncio.sleep(0.2)
            urls = [bench.remote() for _ in range(directives)]
            started = time.monotonic()
            handles = await asyncio.gather(*(bench.directive(plan, wait=False, url=url,
                                                             queue=queue) for url in urls))
            results = await asyncio.gather(*(h.result() for h in handles))
            wall = time.monotonic() - started
        total = directives * depth * width
        completed = sum(1 for r in results if r.status.value == "completed")
        out[f"{count} worker{'s' if count > 1 else ''}"] = {
            "completed": f"{completed}/{directives}", "wall_s": round(wall, 1),
            "steps_per_s": round(total / wall, 2)}
    return out


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
    parser.add_argument("--only", choices=["chain", "makespan", "width", "many", "workers"],
                        action="append")
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3, help="chain runs")
    parser.add_argument("--dag-steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--directives", type=int, default=50)
    parser.add_argument("--max-concurrent-activities", type=int, default=None,
                        help="worker setting to try (default: WORKER_ACTIVITY_SLOTS)")
    parser.add_argument("--no-save", action="store_true",
                        help="print only; leave bench/results alone (tuning experiments)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="worker process counts of the workers scenario")
    parser.add_argument("--fleet-directives", type=int, default=6)
    args = parser.parse_args(argv)
    chosen = args.only or ["chain", "makespan", "width", "many", "workers"]
    folder = Path(tempfile.mkdtemp(prefix="mk-bench-"))
    results: dict[str, Any] = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
                               "machine": machine(), "load_before": os.getloadavg()}
    try:
        results["worker"] = {"max_concurrent_activities":
                             args.max_concurrent_activities or WORKER_ACTIVITY_SLOTS}
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
            if "workers" in chosen:
                results["workers"] = await workers(bench, args.workers, args.fleet_directives,
                                                   depth=4, width=5)
                print(table("5. steps/s by worker processes", results["workers"]), flush=True)
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
