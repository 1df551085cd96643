"""The interleaving fuzzer (issue 10): random directives steered by random
commands at random moments (approve/deny with right and stale attempts, pause,
resume, stop, raise_budget, update_goal, reevaluate, cancel or terminate of a
step's workflow, a pause sent with the start), on a real Temporal dev server,
with stand-in activities whose timing the script controls. After every example
the invariants below are checked against what the stand-ins saw and against
the workflow histories, and every history is replayed against the code.

Worker restarts (FUZZ_RESTARTS=1): the workflow worker is shut down and a new
one started, its cache empty, every RESTART_EVERY seconds, so directives and
steps are cut off at random points (mid-activity, mid-child-start, mid-drain,
mid-continue-as-new) and replayed from history. They used to stall batches for
minutes (19 of the first 30 examples failed). Their histories showed why: a
workflow task sent to the sticky queue of a worker that had just been stopped
waits there for the sticky schedule-to-start timeout (the SDK's default, 10 s)
before it moves to the normal queue (20 such timeouts), and with a restart every
1-4 s nearly every task of every workflow crossed one. Tasks also waited behind
queries: the driver asked every directive for its `status` every 0.1 s (300
queries a second for a batch of 30), each one a task for the workflow worker, a
whole replay right after a restart (3.5 s median from a workflow task's start to
its completion; 18 timed out after 10 s). Now the fuzzer's workflow workers move
such tasks after STICKY_TIMEOUT and the driver asks every POLL_SECONDS.

With restarts the fuzzer found histories that did not replay ("Update machine does
not handle this event: ActivityTaskScheduled"): a status query that met an
activity's result before its workflow task made SDK Core run the result for the
query (see makima/query_guard.py, the worker's workaround, and
tests/test_restart_queries.py), and an update that met, on a restarted worker, a
result Core ran with it although an earlier task had run it (seeds 123349 and
232937; tests/test_cold_worker_update.py). `make test` runs
test_every_accepted_command_holds_across_worker_restarts with RESTART_EXAMPLES
examples (`make fuzz` with 500) beside the plain run, and FUZZ_RESTARTS=1 adds
restarts to the plain run too.

The dev server rather than the time-skipping one: the fuzzer needs no timers,
and the time-skipping server mishandles a cancel that races an activity's
completion ("ACTIVITY_UNKNOWN"; the cancelled workflow then never closes),
which is exactly the race the fuzzer provokes. It also reports a terminated
child to its parent, which the time-skipping server does not.

Half the examples (even seeds) run as on a real worker, where an attempt's
evaluation and merge go to the worker holding its worktree (here the activity
worker's own queue): an attempt that passes without a person is then evaluated
and merged by one activity, which a stop cancels before its merge and waits for
once the merge began. The other half evaluate and merge in two activities.

Each example is a seed. `make test` runs FUZZ_EXAMPLES (default 250), FUZZ_BATCH of
them at once (the next starts when one ends), `make fuzz` thousands. Every history is
replayed by one replay worker shared by the whole run. A failing example prints its seed;
`MAKIMA_FUZZ_SEED=<seed> .venv/bin/pytest tests/test_fuzz_commands.py` runs that
script again (alone, so its timing differs from the batch it failed in).

Invariants:
  (a) an accepted stop ends the directive stopped, no step child is started after
      the stop was accepted, and no merge finishes after the stop's answer (the
      answer waits until every step workflow has ended; a merge under way then
      runs to its end, before the answer);
  (b) while an accepted pause is in force, no step child is started (but the run
      that merges an attempt a person approved, which starts no attempt);
  (c) no accepted budget raise or goal change is lost;
  (d) every directive ends, or waits for a person, within a bounded time;
  (e) spend equals what the stand-ins billed, failed tries included (an agent that
      fails after billing, for good or once and retried by Temporal) and what a
      stop or a cancelled step cut off mid-way (an agent at work is billed as it
      goes, or waited for a retry), unless a step was terminated (README, known
      limits);
  (f) no workflow task failed in any run of the directive or its steps, and
      every history replays against the workflow code;
  (g) the audit log agrees: one decision event per accepted decision, the last
      status event is the final status, event numbers are unique and gapless.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import traceback
import uuid
from collections import deque
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio.api.enums.v1 import WorkflowTaskFailedCause
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowHistory,
    WorkflowQueryFailedError,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Replayer, UnsandboxedWorkflowRunner, Worker

import makima.constants
from makima.cli.commands import UPDATE_ABORTED_BY_CLOSE
from makima.contracts import EventType, PlanInput
from makima.models import (
    ApprovalDecision,
    BudgetRaise,
    DirectiveSnapshot,
    DirectiveStatus,
    GoalUpdate,
    Plan,
    PlannedStep,
    StepRef,
    StepStatus,
    StopRequest,
)
from makima.query_guard import TASK_RETRY_MESSAGE
from tests.stack_fixture import DevServer
from tests.standins import StandIns, runs_of, spec_of
from worker import build_worker
from workflows.directive import DirectiveWorkflow
from workflows.step import StepWorkflow

ARTIFACTS = Path(__file__).parent / "artifacts"
#: About 0.8 s of CPU each, half of it the dev server's (README "Tests": where it goes).
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "250"))
#: Examples in flight at once.
BATCH = int(os.environ.get("FUZZ_BATCH", "40"))
SEED = os.environ.get("MAKIMA_FUZZ_SEED")
RESTARTS = os.environ.get("FUZZ_RESTARTS", "0") == "1"
#: Seconds between two status queries of one directive by the driver. Each query is
#: a task for the workflow worker (a whole replay right after a restart).
POLL_SECONDS = 0.5
#: Seconds between two restarts of the workflow worker, drawn uniformly.
RESTART_EVERY = (2.0, 6.0)
#: How long a workflow task waits on a stopped worker's sticky queue (see workflow_worker).
STICKY_TIMEOUT = timedelta(seconds=1)
SCORES = (0.95, 0.95, 0.6, 0.2)  # green is likelier, so most directives get somewhere
ACTIONS = ("approve", "approve-stale", "deny", "pause", "resume", "stop", "raise", "goal",
           "reevaluate", "cancel-step", "terminate-step", "noise")
#: The fuzzer's directives continue as new after this many history events (instead of
#: 5,000), so approvals, decisions and every other command meet checkpoints often.
CHECKPOINT_EVENTS = 80
#: "noise": refused messages (decisions about an attempt nobody saw) that only grow the
#: history, so a directive waiting for a person reaches a checkpoint.
NOISE = 25
#: Workflow task failures the server causes (a workflow terminated or signalled while
#: its task ran), not workflow code.
NOT_WORKFLOW_CODE = {
    WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_FORCE_CLOSE_COMMAND,
    WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_UNHANDLED_COMMAND,
    WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_RESET_STICKY_TASK_QUEUE,
}
#: Real seconds for a directive to end once people stop interfering. A failing agent
#: alone is retried after 5 s and 10 s (EXECUTE_RETRY_POLICY), and a batch of 30
#: directives shares 2 cores with whatever else runs: 60 s was missed once under a
#: load average of 7 (seed 761079, which passes alone in 7 s). A hang still fails.
END_WITHIN = 180.0


@dataclass
class Script:
    """Everything random about one example, drawn from its seed."""

    seed: int
    prefix: str
    steps: list[tuple[str, list[str]]]
    scores: dict[str, list[float]]
    delays: dict[str, float]
    max_rework_cycles: int
    max_cost_usd: float | None
    pause_at_start: bool
    actions: list[tuple[float, str]]
    replan_scores: list[float]
    failing: dict[str, float]  # steps whose agent fails after spending this much
    flaky: dict[str, float]  # steps whose agent's first try fails after spending this much
    #: A wall-time budget short enough to run out during the example (drawn last, so a
    #: seed's other choices stay as they were before it existed).
    max_wall_time_minutes: float | None = None

    @classmethod
    def from_seed(cls, seed: int) -> Script:
        rng = random.Random(seed)
        prefix = f"z{seed}"
        names = [f"{prefix}-{i}" for i in range(rng.randint(1, 3))]
        steps = [(n, [d for d in names[:i] if rng.random() < 0.5]) for i, n in enumerate(names)]
        return cls(
            seed=seed, prefix=prefix, steps=steps,
            scores={n: [rng.choice(SCORES) for _ in range(3)] for n in names},
            delays={n: rng.choice((0.0, 0.0, 0.05, 0.2)) for n in names},
            max_rework_cycles=rng.choice((0, 1)),
            max_cost_usd=rng.choice((None, None, 0.05)),
            pause_at_start=rng.random() < 0.2,
            actions=[(rng.choice((0.0, 0.01, 0.05, 0.2, 0.5)), rng.choice(ACTIONS))
                     for _ in range(rng.randint(0, 6))],
            replan_scores=[rng.choice(SCORES) for _ in range(4)],
            failing={n: 0.03 for n in names if rng.random() < 0.1},
            flaky={n: 0.004 for n in names if rng.random() < 0.1},
            max_wall_time_minutes=rng.choice((None, None, None, 0.01, 0.03)),
        )


class SharedReplayer:
    """One replay worker for every history of the run, replaying them one at a time in
    the order they are asked for. `Replayer.replay_workflow` builds, and validates the
    workflows of, a new replay worker per history: two sandboxed workflow instances
    for each history replayed, about a third of what replaying an example cost.

    It replays outside the workflow sandbox. The question here is whether the recorded
    commands come out again; the sandbox adds nothing to that answer (it refuses
    nondeterministic calls, which the sandboxed workflow worker would already have
    failed a task on, and (f) fails the example then), while it doubled the replay's
    CPU: a module import per instance and an `exec` per payload for its serialization
    context (the 424 histories of 100 examples: 9.4 s of CPU sandboxed, 4.5 s without).
    The workers that run the examples stay sandboxed, and so does their replay from
    history after a restart."""

    def __init__(self) -> None:
        self._asked: asyncio.Queue[tuple[WorkflowHistory, asyncio.Future[Exception | None]]] = (
            asyncio.Queue())

    async def replay(self, history: WorkflowHistory) -> Exception | None:
        """The replay failure of `history`, None when it replays."""
        answer: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        await self._asked.put((history, answer))
        return await answer

    async def run(self) -> None:
        """Replay what is asked until cancelled."""
        replayer = Replayer(workflows=[DirectiveWorkflow, StepWorkflow],
                            data_converter=pydantic_data_converter,
                            workflow_runner=UnsandboxedWorkflowRunner())
        answers: deque[asyncio.Future[Exception | None]] = deque()

        async def histories() -> AsyncIterator[WorkflowHistory]:
            while True:
                history, answer = await self._asked.get()
                answers.append(answer)
                yield history

        async with replayer.workflow_replay_iterator(histories()) as results:
            async for result in results:
                answers.popleft().set_result(result.replay_failure)


@dataclass
class Outcome:
    """What the driver was told was accepted."""

    decisions: int = 0
    stop: bool = False
    raised_to: float | None = None
    raised_wall_to: float | None = None
    goal: str | None = None
    terminated_a_step: bool = False
    cancelled_a_step: bool = False
    notes: list[str] = field(default_factory=list)


class Fuzz:
    def __init__(self, client: Client, task_queue: str) -> None:
        self.client = client
        self.task_queue = task_queue
        self.stand = StandIns(execute_cost=0.01, evaluate_cost=0.002, plan_cost=0.01,
                              worker_queue_of=self._worker_queue)
        self.stand.planner = self._plan
        #: directives whose attempts live on "the worker holding the worktree"
        self.routed: set[str] = set()
        self.replans: dict[str, list[float]] = {}
        self.directive_ids: dict[int, str] = {}
        self.replayer = SharedReplayer()
        #: What stopped and why, when a worker the examples need ended with an error.
        self.broken: asyncio.Future[tuple[str, BaseException]] = (
            asyncio.get_running_loop().create_future())

    def watch(self, what: str, runs: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run a worker; should it fail, `broken` says so and the run ends at once."""
        task = asyncio.create_task(runs)

        def ended(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and task.exception() is not None and not self.broken.done():
                self.broken.set_result((what, task.exception()))

        task.add_done_callback(ended)
        return task

    def _worker_queue(self, directive_id: str) -> str:
        return self.task_queue if directive_id in self.routed else ""

    def _plan(self, input: PlanInput) -> Plan:
        prefix = input.directive_id.rsplit("-", 1)[-1]
        name = f"{prefix}-g{input.generation}-{len(input.existing_steps)}"
        scores = self.replans.get(input.directive_id, [0.95])
        self.stand.scores[name] = scores
        return Plan(steps=[PlannedStep(name=name, description="re-planned", command="true")])

    async def example(self, script: Script) -> None:
        for name, scores in script.scores.items():
            self.stand.scores[name] = scores
        self.stand.delays.update(script.delays)
        self.stand.failing_executes.update(script.failing)
        self.stand.flaky_executes.update(script.flaky)
        directive_id = f"fuzz-{uuid.uuid4().hex[:6]}-{script.prefix}"
        self.directive_ids[script.seed] = directive_id
        if script.seed % 2 == 0:
            self.routed.add(directive_id)
        self.replans[directive_id] = script.replan_scores
        spec = spec_of(*script.steps, planner="llm", budgets={
            "max_rework_cycles": script.max_rework_cycles,
            "max_cost_usd": script.max_cost_usd,
            "max_wall_time_minutes": script.max_wall_time_minutes})
        kwargs: dict[str, Any] = {"start_signal": "pause"} if script.pause_at_start else {}
        handle = await self.client.start_workflow(
            DirectiveWorkflow.run, spec, id=directive_id, task_queue=self.task_queue, **kwargs)
        outcome = Outcome()
        rng = random.Random(script.seed + 1)
        for delay, action in script.actions:
            await asyncio.sleep(delay)
            await self._act(handle, action, outcome, rng)
        final = await self._drive_to_an_end(handle, outcome)
        await self._check(handle, script, outcome, final)

    async def _update(self, handle: WorkflowHandle[Any, Any], update: Any, arg: Any,
                      outcome: Outcome) -> bool:
        """True when accepted. An update whose RPC timed out (no workflow worker while
        it restarts) is sent again under the same id: Temporal runs it once."""
        update_id = str(uuid.uuid4())
        for _ in range(10):
            try:
                await handle.execute_update(update, arg, id=update_id)
                return True
            except WorkflowUpdateFailedError as err:
                outcome.notes.append(f"refused {update.__name__}: {err.cause}")
                return False
            except (WorkflowUpdateRPCTimeoutOrCancelledError, RPCError) as err:
                if (isinstance(err, RPCError) and UPDATE_ABORTED_BY_CLOSE in err.message
                        and (await handle.describe()).status
                        is not WorkflowExecutionStatus.RUNNING):
                    # the directive ended before it took the command: not accepted
                    outcome.notes.append(f"refused {update.__name__}: {err}")
                    return False
                outcome.notes.append(f"{update.__name__} sent again after: {err}")
                # e.g. aborted by a continue-as-new: the next run takes it, give it time
                await asyncio.sleep(POLL_SECONDS)
        raise AssertionError(f"{update.__name__} never got an answer: {outcome.notes[-1]}")

    @staticmethod
    async def _status(handle: WorkflowHandle[Any, Any]) -> DirectiveSnapshot:
        """The status query; retried while no workflow worker answers (a restart), and
        when the worker's guard refused it (makima/query_guard.py: ask again)."""
        for attempt in range(10):
            try:
                return await handle.query(DirectiveWorkflow.status)
            except (RPCError, WorkflowQueryFailedError) as err:
                if isinstance(err, WorkflowQueryFailedError) and str(err) != TASK_RETRY_MESSAGE:
                    raise
                if attempt == 9:
                    raise
                await asyncio.sleep(POLL_SECONDS)
        raise AssertionError("unreachable")

    async def _act(self, handle: WorkflowHandle[Any, Any], action: str, outcome: Outcome,
                   rng: random.Random) -> None:
        snap: DirectiveSnapshot = await self._status(handle)
        if snap.status.is_final:
            return
        if action in ("approve", "approve-stale", "deny"):
            if not snap.pending_approvals:
                return
            pending = rng.choice(snap.pending_approvals)
            attempt = pending.attempt + (rng.choice((1, -1)) if action == "approve-stale" else 0)
            update = DirectiveWorkflow.deny_step if action == "deny" else DirectiveWorkflow.approve_step
            accepted = await self._update(handle, update, ApprovalDecision(
                step=pending.step, by="fuzz", attempt=attempt), outcome)
            assert not (accepted and action == "approve-stale"), "a stale attempt was accepted"
            outcome.decisions += accepted
        elif action == "pause":
            await self._update(handle, DirectiveWorkflow.pause_directive, None, outcome)
        elif action == "resume":
            await self._update(handle, DirectiveWorkflow.resume_directive, None, outcome)
        elif action == "stop":
            outcome.stop |= await self._update(handle, DirectiveWorkflow.stop_directive,
                                               StopRequest(reason="fuzz stop"), outcome)
        elif action == "raise":
            # a small raise of the wall time: it may run out again
            await self._raise(handle, snap, outcome, wall_minutes=0.01)
        elif action == "goal":
            goal = f"goal {rng.randint(0, 10**6)}"
            if await self._update(handle, DirectiveWorkflow.update_directive_goal,
                                  GoalUpdate(goal=goal), outcome):
                outcome.goal = goal
        elif action == "reevaluate":
            if snap.steps and snap.status is not DirectiveStatus.PAUSED:
                step = rng.choice(snap.steps).name
                await self._update(handle, DirectiveWorkflow.reevaluate_step, StepRef(step=step),
                                   outcome)
        elif action == "noise":
            for _ in range(NOISE):
                try:
                    await handle.signal(DirectiveWorkflow.approve, ApprovalDecision(
                        step=snap.steps[0].name if snap.steps else "none", by="fuzz", attempt=99))
                except RPCError as err:  # the directive ended meanwhile: nothing left to refuse
                    if err.status is not RPCStatusCode.NOT_FOUND:
                        raise
                    outcome.notes.append(f"noise after the end: {err}")
                    break
        elif action in ("cancel-step", "terminate-step"):
            running = [s for s in snap.steps if s.status.is_active and s.workflow_id]
            if running:
                with_id = rng.choice(running).workflow_id
                assert with_id is not None
                try:
                    step_handle = self.client.get_workflow_handle(with_id)
                    await (step_handle.cancel() if action == "cancel-step"
                           else step_handle.terminate("fuzz"))
                    outcome.terminated_a_step |= action == "terminate-step"
                    outcome.cancelled_a_step |= action == "cancel-step"
                except Exception as err:  # it ended meanwhile
                    outcome.notes.append(f"cancel of {with_id}: {err}")

    async def _drive_to_an_end(self, handle: WorkflowHandle[Any, Any],
                               outcome: Outcome) -> DirectiveSnapshot:
        """Act like a patient person: approve what waits, raise and resume what is paused."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + END_WITHIN
        while True:
            snap: DirectiveSnapshot = await self._status(handle)
            if snap.status.is_final:
                # the workflow closes once its events are written
                with contextlib.suppress(WorkflowFailureError):
                    await asyncio.wait_for(handle.result(), END_WITHIN)
                return snap
            if loop.time() > deadline:
                raise AssertionError(
                    f"(d) the directive neither ended nor waited for a person within "
                    f"{END_WITHIN}s: {snap.model_dump_json()}; "
                    f"{await self._pending_work(snap)}")
            if snap.pending_approvals:
                pending = snap.pending_approvals[0]
                outcome.decisions += await self._update(
                    handle, DirectiveWorkflow.approve_step,
                    ApprovalDecision(step=pending.step, by="fuzz", attempt=pending.attempt),
                    outcome)
            elif snap.status is DirectiveStatus.PAUSED:
                if snap.breaker:
                    await self._raise(handle, snap, outcome, wall_minutes=60.0)
                await self._update(handle, DirectiveWorkflow.resume_directive, None, outcome)
            await asyncio.sleep(POLL_SECONDS)

    async def _raise(self, handle: WorkflowHandle[Any, Any], snap: DirectiveSnapshot,
                     outcome: Outcome, wall_minutes: float) -> None:
        """Raise the budgets the directive has: cost by $1, wall time by `wall_minutes`."""
        budgets = snap.budgets
        cost = None if budgets.max_cost_usd is None else round(budgets.max_cost_usd + 1.0, 2)
        wall = (None if budgets.max_wall_time_minutes is None
                else round(budgets.max_wall_time_minutes + wall_minutes, 4))
        if (cost is not None or wall is not None) and await self._update(
                handle, DirectiveWorkflow.raise_directive_budget,
                BudgetRaise(max_cost_usd=cost, max_wall_time_minutes=wall), outcome):
            if cost is not None:
                outcome.raised_to = max(outcome.raised_to or 0.0, cost)
            if wall is not None:
                outcome.raised_wall_to = max(outcome.raised_wall_to or 0.0, wall)

    async def _pending_work(self, snap: DirectiveSnapshot) -> str:
        """Which step holds the directive up and why, for a failure message: an active
        step whose workflow has ended (the directive lost its end), or what its running
        workflow waits on."""
        lines = []
        for step in snap.steps:
            if not step.status.is_active:
                continue
            if step.status is StepStatus.AWAITING_APPROVAL and snap.pending_approvals:
                lines.append(f"step {step.name} waits for a person")
                continue
            if not step.workflow_id:
                lines.append(f"step {step.name} is {step.status.value} with no workflow")
                continue
            described = await self.client.get_workflow_handle(step.workflow_id).describe()
            state = described.status.name if described.status else "?"
            if described.close_time is not None:
                lines.append(f"step {step.name} is {step.status.value} in the directive, but "
                             f"its workflow {step.workflow_id} ended {state}: the directive "
                             "lost its end")
                continue
            pending = [(a.activity_type.name, a.attempt, a.state, a.last_failure.message)
                       for a in described.raw_description.pending_activities]
            lines.append(f"step {step.name} is {step.status.value}; its workflow "
                         f"{step.workflow_id} is {state}, waiting on activities {pending}")
        return "; ".join(lines) or "no step is active"

    async def replay(self, runs: list[Any], children: list[Any]) -> dict[str, Exception]:
        not_replayed = {}
        for history in [*runs, *children]:
            failure = await self.replayer.replay(history)
            if failure is not None:
                not_replayed[history.workflow_id] = failure
        return not_replayed

    async def keep(self, seed: int) -> Path:
        """Write every history of the example's directive to tests/artifacts/fuzz-<seed>/."""
        directive_id = self.directive_ids[seed]
        # the first run: walk back from the latest along the continue-as-new chain
        history = await self.client.get_workflow_handle(directive_id).fetch_history()
        while True:
            started = history.events[0].workflow_execution_started_event_attributes
            if not started.continued_execution_run_id:
                break
            history = await self.client.get_workflow_handle(
                directive_id, run_id=started.continued_execution_run_id).fetch_history()
        handle = self.client.get_workflow_handle(directive_id, first_execution_run_id=None,
                                                 run_id=history.run_id)
        runs, children = await self._histories(handle)
        kept = ARTIFACTS / f"fuzz-{seed}"
        kept.mkdir(parents=True, exist_ok=True)
        for number, history in enumerate([*runs, *children]):
            (kept / f"{number}.json").write_text(json.dumps(
                {"workflow_id": history.workflow_id, "history": history.to_json_dict()}))
        return kept

    async def _histories(self, handle: WorkflowHandle[Any, Any]) -> tuple[list[Any], list[Any]]:
        """Every run of the directive, in order, and every step child's history."""
        children = []
        runs = await runs_of(self.client, handle.id, handle.first_execution_run_id or handle.run_id)
        for history in runs:
            for event in history.events:
                if event.HasField("child_workflow_execution_started_event_attributes"):
                    started = event.child_workflow_execution_started_event_attributes
                    children.append(await self.client.get_workflow_handle(
                        started.workflow_execution.workflow_id,
                        run_id=started.workflow_execution.run_id).fetch_history())
        return runs, children

    async def _check(self, handle: WorkflowHandle[Any, Any], script: Script, outcome: Outcome,
                     final: DirectiveSnapshot) -> None:
        runs, children = await self._histories(handle)
        events = [e for run in runs for e in run.events]
        # (f) every history replays against the workflow code (a restarted worker does so)
        not_replayed = await self.replay(runs, children)
        if not_replayed:
            raise AssertionError(f"(f) histories do not replay (kept in "
                                 f"{await self.keep(script.seed)}): {not_replayed}")
        # (f) no workflow task failed, in the directive or any step
        for history in [*runs, *children]:
            failed = [e for e in history.events
                      if e.HasField("workflow_task_failed_event_attributes")
                      and e.workflow_task_failed_event_attributes.cause not in NOT_WORKFLOW_CODE
                      # the worker's guard: a query ran history events (makima/query_guard.py)
                      and e.workflow_task_failed_event_attributes.failure.message
                      != TASK_RETRY_MESSAGE]
            assert not failed, f"(f) a workflow task failed in {history.workflow_id}: {failed[0]}"
        # (a), (b): where in the directive's history children were started
        paused = script.pause_at_start
        stopped = False
        for event in events:
            if event.HasField("workflow_execution_update_accepted_event_attributes"):
                name = event.workflow_execution_update_accepted_event_attributes.accepted_request.input.name
                if name == "pause_directive":
                    paused = True
                elif name == "resume_directive":
                    paused = False
                elif name == "stop_directive":
                    stopped = True
            if event.HasField("start_child_workflow_execution_initiated_event_attributes"):
                started = event.start_child_workflow_execution_initiated_event_attributes
                child = started.workflow_id
                assert not stopped, f"(a) step {child} was started after an accepted stop"
                # the run that merges an approved attempt is no new attempt: it may start
                # while paused (a rework after a conflict then waits for the resume)
                merges = json.loads(started.input.payloads[0].data).get("approved") is not None
                assert not paused or merges, (
                    f"(b) step {child} was started while a pause was in force")
        if outcome.stop:
            assert final.status is DirectiveStatus.STOPPED, f"(a) stop accepted, ended {final.status}"
            answered = stop_answered_at(runs)
            assert answered is not None, "(a) the accepted stop has no answer in the history"
            late = [t for t in merges_finished_at(children) if t > answered]
            assert not late, f"(a) a merge finished at {late[0]}, after the stop's answer at {answered}"
        # (c) accepted changes are kept
        if outcome.raised_to is not None:
            assert (final.budgets.max_cost_usd or 0) >= outcome.raised_to, "(c) a raise was lost"
        if outcome.raised_wall_to is not None:
            assert (final.budgets.max_wall_time_minutes or 0) >= outcome.raised_wall_to, (
                "(c) a raise of the wall time was lost")
        if outcome.goal is not None and final.status is DirectiveStatus.COMPLETED:
            plans = [p for n, p in self.stand.calls
                     if n == "plan_directive" and p.directive_id == handle.id]
            assert plans and plans[-1].spec.goal == outcome.goal, "(c) the goal change was lost"
        # (e) spend
        if not outcome.terminated_a_step:
            billed = self.stand.billed.get(handle.id, 0.0)
            assert abs(final.cost_usd - billed) < 1e-6 or cancel_met_a_failing_try(
                final.cost_usd, billed, script, outcome), (
                f"(e) spend {final.cost_usd} but the stand-ins billed {billed}")
        # (g) the audit log
        mine = [e for e in self.stand.events if e.directive_id == handle.id]
        decided = [e for e in mine if e.type is EventType.APPROVAL_DECIDED]
        assert len(decided) == outcome.decisions, (
            f"(g) {outcome.decisions} decisions accepted, {len(decided)} recorded")
        statuses = sorted((e for e in mine if e.type is EventType.DIRECTIVE_STATUS
                           and e.source == handle.id), key=lambda e: e.seq)
        assert statuses and statuses[-1].data["status"] == final.status.value, "(g) last status"
        seqs = sorted(e.seq for e in mine if e.source == handle.id)
        assert seqs == list(range(1, len(seqs) + 1)), f"(g) directive event numbers: {seqs}"


def cancel_met_a_failing_try(reported: float, billed: float, script: Script,
                             outcome: Outcome) -> bool:
    """The known gap of README "Known limits" (seeds 656389, 737447, found once 250
    examples ran): a stop's cancel that reaches a billing activity just after a try
    failed, and after the step asked the server what its tries were billed, loses
    that failed try's spend; so does the cancel of a step's workflow from outside
    (seeds 579515, 320020). Only that deficit is let pass: a stop was accepted or a
    step cancelled, and what is missing is what flaky first tries (the only tries
    that fail and retry here) were billed, once per step at most."""
    missing = round(billed - reported, 6)
    return (outcome.stop or outcome.cancelled_a_step) and any(
        abs(missing - sum(amounts)) < 1e-6
        for amounts in _subsets(list(script.flaky.values())) if amounts)


def _subsets(values: list[float]) -> list[list[float]]:
    subsets: list[list[float]] = [[]]
    for value in values:
        subsets += [subset + [value] for subset in subsets]
    return subsets


def stop_answered_at(runs: list[Any]) -> datetime | None:
    """When the directive answered the accepted stop_directive update."""
    stops: set[str] = set()
    for event in (e for run in runs for e in run.events):
        if event.HasField("workflow_execution_update_accepted_event_attributes"):
            request = event.workflow_execution_update_accepted_event_attributes.accepted_request
            if request.input.name == "stop_directive":
                stops.add(request.meta.update_id)
        if event.HasField("workflow_execution_update_completed_event_attributes"):
            completed = event.workflow_execution_update_completed_event_attributes
            if completed.meta.update_id in stops and completed.outcome.HasField("success"):
                return event.event_time.ToDatetime()
    return None


def merges_finished_at(children: list[Any]) -> list[datetime]:
    """When each merge of the step workflows completed: a merge_step activity, or an
    evaluate_and_merge_step that merged."""
    finished = []
    for history in children:
        merges = {e.event_id: e.activity_task_scheduled_event_attributes.activity_type.name
                  for e in history.events
                  if e.HasField("activity_task_scheduled_event_attributes")
                  and e.activity_task_scheduled_event_attributes.activity_type.name
                  in ("merge_step", "evaluate_and_merge_step")}
        for e in history.events:
            if not e.HasField("activity_task_completed_event_attributes"):
                continue
            done = e.activity_task_completed_event_attributes
            kind = merges.get(done.scheduled_event_id)
            if kind == "merge_step" or (kind is not None and json.loads(
                    done.result.payloads[0].data).get("merge") is not None):
                finished.append(e.event_time.ToDatetime())
    return finished


def workflow_worker(fuzz: Fuzz, restarts: bool) -> Worker:
    """The product's workflow worker (worker.build_worker), but a task sent to the
    sticky queue of a worker that was just stopped moves to the normal queue after
    STICKY_TIMEOUT rather than the SDK's 10 s: restarts come every few seconds here."""
    options = {"sticky_queue_schedule_to_start_timeout": STICKY_TIMEOUT} if restarts else {}
    return build_worker(fuzz.client, fuzz.task_queue, [], graceful_seconds=5, **options)


async def restart_workflow_worker_now_and_then(fuzz: Fuzz, holder: list[Worker],
                                               restarts: bool, done: asyncio.Event,
                                               rng: random.Random) -> None:
    """Shut the workflow worker down and start a new one (its cache empty: every
    directive and step is replayed from its history) at random moments. Activities
    run on a worker of their own that stays: an activity task lost with a dying
    worker waits out its heartbeat timeout (a minute), which is retry policy, not
    what is fuzzed here."""
    while restarts and not done.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), rng.uniform(*RESTART_EVERY))
            return
        await holder[0].shutdown()
        holder[0] = workflow_worker(fuzz, restarts)
        fuzz.watch("the workflow worker", holder[0].run())


async def run_examples(client: Client, task_queue: str, seeds: list[int],
                       restarts: bool = RESTARTS) -> None:
    fuzz = Fuzz(client, task_queue)
    activities = Worker(client, task_queue=task_queue, activities=fuzz.stand.activities(),
                        graceful_shutdown_timeout=timedelta(seconds=5))
    holder = [workflow_worker(fuzz, restarts)]
    done = asyncio.Event()
    failures: list[str] = []

    async def one(seed: int) -> None:
        try:
            await fuzz.example(Script.from_seed(seed))
        except Exception as err:  # an invariant, or the driver itself: say where, with the seed
            kept = await fuzz.keep(seed) if seed in fuzz.directive_ids else None
            where = "" if isinstance(err, AssertionError) else "".join(
                traceback.format_exception(err)[-6:])
            failures.append(f"MAKIMA_FUZZ_SEED={seed}: {type(err).__name__}: {err} "
                            f"(histories in {kept})\n{where}")

    # BATCH examples run at once, and the next starts as soon as one ends: waiting for
    # a whole batch to end left the cores idle behind its slowest example (an agent
    # retried after 5 s and 10 s). No example starts once one has failed.
    slots = asyncio.Semaphore(BATCH)

    async def one_in_a_slot(seed: int) -> None:
        async with slots:
            if not failures:
                await one(seed)

    async with activities:
        fuzz.watch("the workflow worker", holder[0].run())
        replays = fuzz.watch("the replay worker", fuzz.replayer.run())
        restarts = asyncio.create_task(
            restart_workflow_worker_now_and_then(fuzz, holder, restarts, done,
                                                 random.Random(seeds[0])))
        examples = asyncio.ensure_future(asyncio.gather(*(one_in_a_slot(s) for s in seeds)))
        try:
            await asyncio.wait({examples, fuzz.broken}, return_when=asyncio.FIRST_COMPLETED)
            if fuzz.broken.done():
                # every example would wait for it forever (it happened once, at load 10)
                what, err = fuzz.broken.result()
                examples.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await examples
                raise AssertionError(f"{what} stopped under the examples: {err!r}; "
                                     + "\n".join(failures)) from err
            await examples
            assert not failures, "\n".join(failures)
        finally:
            done.set()
            await restarts
            replays.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await replays
            await holder[0].shutdown()


@pytest.fixture
async def dev_client(tmp_path: Path) -> AsyncIterator[Client]:
    with DevServer(tmp_path / "temporal") as server:  # stopped by pid, also on failure
        yield await Client.connect(server.address, data_converter=pydantic_data_converter)


async def test_every_accepted_command_holds_under_random_interleavings(
        dev_client: Client, task_queue: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(makima.constants, "HISTORY_CHECKPOINT_EVENTS", CHECKPOINT_EVENTS)
    if SEED is not None:
        seeds = [int(SEED)]
    else:
        base = random.SystemRandom().randrange(10**6)
        seeds = [base + i for i in range(EXAMPLES)]
    await run_examples(dev_client, task_queue, seeds)


#: Examples with worker restarts in `make test` (`make fuzz`: 500).
RESTART_EXAMPLES = int(os.environ.get("FUZZ_RESTART_EXAMPLES", "50"))


async def test_every_accepted_command_holds_across_worker_restarts(
        dev_client: Client, task_queue: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same, with the workflow worker restarted every 2-6 s (a cold cache: every
    workflow replays from its history, and status queries meet new history events;
    makima/query_guard.py keeps those histories replayable)."""
    monkeypatch.setattr(makima.constants, "HISTORY_CHECKPOINT_EVENTS", CHECKPOINT_EVENTS)
    base = random.SystemRandom().randrange(10**6)
    seeds = [int(SEED)] if SEED is not None else [base + i for i in range(RESTART_EXAMPLES)]
    await run_examples(dev_client, task_queue, seeds, restarts=True)
