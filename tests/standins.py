"""Stand-in activities for workflow tests, registered under the real activity
names, scripted per test, and recording every call so a test can assert which
activities ran, in which order and how often.

Scores are scripted per step (a list consumed per evaluation, the last value
repeating); an execute can be held at a gate until the test opens it.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from temporalio import activity
from temporalio.client import Client, WorkflowHandle
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from activities.billing import BillingActivities, cancelled_after, every_try_billed, usage_detail
from activities.errors import translated_errors
from activities.evaluate_merge import merge_evaluated
from makima.constants import EXECUTE_RETRY_POLICY
from makima.contracts import (
    ActivityName,
    CheckoutInput,
    CleanupInput,
    CleanupOutput,
    CompleteInput,
    CompleteOutput,
    EvaluateInput,
    EvaluateMergeInput,
    EvaluateMergeOutput,
    Event,
    ExecuteInput,
    ExecuteOutput,
    MergeInput,
    MergeOutput,
    PlanInput,
    PlanOutput,
    PrepareInput,
    PrepareOutput,
    RecordInput,
    RecordOutput,
)
from makima.errors import ExecutorError, MakimaError
from makima.models import (
    Confidence,
    DirectiveSnapshot,
    DirectiveSpec,
    Evaluation,
    Plan,
    PlannedStep,
    Repository,
    Usage,
)
from makima.policy import passes_without_a_person
from workflows.directive import DirectiveWorkflow

HISTORIES = Path(__file__).parent / "histories"
#: The gate name that holds the completion activity (step names cannot contain '<').
COMPLETION_GATE = "<completion>"
#: The gate name that holds the planning activity.
PLAN_GATE = "<plan>"


def evaluate_gate(step: str) -> str:
    """The gate that holds the evaluation of `step` in `evaluate_and_merge_step`."""
    return f"<evaluate {step}>"


def merge_gate(step: str) -> str:
    """The gate name that holds the merge of `step` (it merges once the gate opens)."""
    return f"<merge {step}>"


def plan_of(*steps: tuple[str, list[str]]) -> Plan:
    return Plan(steps=[
        PlannedStep(name=name, description=f"step {name}", task_plan=f"do {name}",
                    command=f"echo {name}", depends_on=deps)
        for name, deps in steps
    ])


def spec_of(*steps: tuple[str, list[str]], **overrides: Any) -> DirectiveSpec:
    fields: dict[str, Any] = {
        "title": "test directive",
        "goal": "prove the engine",
        "repository": Repository(path="/tmp/not-used-by-stand-ins"),
        "executor": "shell",
    }
    if steps:
        fields["plan"] = plan_of(*steps)
    fields.update(overrides)
    return DirectiveSpec(**fields)


@dataclass
class Gate:
    """Holds an activity until the test opens it; says when it was reached."""

    reached: asyncio.Event = field(default_factory=asyncio.Event)
    opened: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class StandIns:
    scores: dict[str, list[float]] = field(default_factory=dict)
    default_score: float = 0.95
    plans: list[Plan | Exception] = field(default_factory=list)
    execute_cost: float = 0.0
    gates: dict[str, Gate] = field(default_factory=dict)
    conflicts: dict[str, int] = field(default_factory=dict)
    calls: list[tuple[str, Any]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    running: set[str] = field(default_factory=set)
    overlaps: set[frozenset[str]] = field(default_factory=set)
    #: While set, batches of events the directive itself records wait (its drain is held).
    hold_directive_records: bool = False
    #: While set, batches a step workflow sends itself wait.
    hold_step_records: bool = False
    #: (the workflow id of the record_events call, the event), in the order written.
    recorded_by: list[tuple[str, Event]] = field(default_factory=list)
    plan_cost: float = 0.01
    evaluate_cost: float = 0.0
    #: Per step name: seconds its execute takes (heartbeating), for timing-controlled tests.
    delays: dict[str, float] = field(default_factory=dict)
    #: When set, answers every plan request (instead of `plans`), e.g. per directive.
    planner: Callable[[PlanInput], Plan] | None = None
    #: Per step name: the execute fails after billing this much (the agent's failed turns).
    failing_executes: dict[str, float] = field(default_factory=dict)
    #: Per step name: the first try of each execute fails after billing this much (an
    #: agent's turns before a 529) and Temporal retries it; the carry of activities/billing.py
    #: brings that spend to the try that returns.
    flaky_executes: dict[str, float] = field(default_factory=dict)
    #: Per step name: every try of each execute bills this much and fails; the tries
    #: before the last one raise (Temporal retries them), the last one heartbeats what
    #: all tries were billed and hangs, as if its worker died, until it times out.
    stalled_executes: dict[str, float] = field(default_factory=dict)
    #: Per directive id: what the stand-ins billed in calls that returned, and in failed
    #: tries whose error or heartbeat carried it.
    billed: dict[str, float] = field(default_factory=dict)
    #: The worker queue each execute reports (consumed in order; then none).
    worker_queues: list[str] = field(default_factory=list)
    #: Once `worker_queues` is used up: the worker queue an execute reports, by
    #: directive id ("" for none).
    worker_queue_of: Callable[[str], str] | None = None
    #: Steps whose merge ran to its end, in order.
    merged: list[str] = field(default_factory=list)
    #: The task queue each evaluate, merge and cleanup ran on.
    ran_on: list[tuple[str, str]] = field(default_factory=list)
    #: A merge asked to remove the worktrees says it could not.
    merge_keeps_worktrees: bool = False
    #: Per step name: its merge fails with this error (as git's failures reach the merge).
    failing_merges: dict[str, MakimaError] = field(default_factory=dict)

    def bill(self, directive_id: str, cost: float) -> Usage:
        self.billed[directive_id] = round(self.billed.get(directive_id, 0.0) + cost, 6)
        return Usage(cost_usd=cost)

    def gate(self, step: str) -> Gate:
        return self.gates.setdefault(step, Gate())

    def called(self, name: ActivityName | str, step: str | None = None) -> list[Any]:
        """Inputs of the calls of one activity (for one step, when given)."""
        wanted = name.value if isinstance(name, ActivityName) else name
        out = []
        for called, payload in self.calls:
            if called != wanted:
                continue
            step_name = getattr(payload, "step", None)
            step_name = getattr(step_name, "name", step_name)
            if step is None or step_name == step:
                out.append(payload)
        return out

    def order(self, name: ActivityName) -> list[str]:
        return [getattr(p.step, "name", p.step) for p in self.called(name)]

    def activities(self) -> list[Callable[..., Any]]:
        s = self

        @activity.defn(name=ActivityName.PREPARE_REPOSITORY.value)
        async def prepare_repository(input: PrepareInput) -> PrepareOutput:
            s.calls.append((ActivityName.PREPARE_REPOSITORY.value, input))
            return PrepareOutput(integration_branch=f"makima/{input.directive_id}",
                                 base_commit="0" * 40, repository_path=input.repository.location)

        @activity.defn(name=ActivityName.PLAN_DIRECTIVE.value)
        async def plan_directive(input: PlanInput) -> PlanOutput:
            s.calls.append((ActivityName.PLAN_DIRECTIVE.value, input))
            gate = s.gates.get(PLAN_GATE)
            if gate is not None:  # heartbeating, as the planner does: a cancel reaches it
                gate.reached.set()
                while not gate.opened.is_set():
                    activity.heartbeat("waiting at the gate")
                    await asyncio.sleep(0.05)
            if s.planner is not None:
                return PlanOutput(plan=s.planner(input), usage=s.bill(input.directive_id,
                                                                      s.plan_cost))
            if not s.plans:
                raise ApplicationError("stand-in planner has no plan left", non_retryable=True)
            reply = s.plans.pop(0)
            if isinstance(reply, ApplicationError) and reply.details:
                s.bill(input.directive_id, reply.details[0]["usage"]["cost_usd"])
            if isinstance(reply, Exception):
                raise reply
            return PlanOutput(plan=reply, usage=s.bill(input.directive_id, s.plan_cost))

        @activity.defn(name=ActivityName.EXECUTE_STEP.value)
        async def execute_step(input: ExecuteInput) -> ExecuteOutput:
            name = input.step.name
            s.calls.append((ActivityName.EXECUTE_STEP.value, input))
            for other in s.running:
                s.overlaps.add(frozenset({name, other}))
            s.running.add(name)
            try:
                with translated_errors(), every_try_billed() as earlier:
                    if name in s.flaky_executes and activity.info().attempt == 1:
                        error = ExecutorError("the agent's API call failed (529)")
                        error.usage = s.bill(input.directive_id, s.flaky_executes[name])
                        raise error
                    last = activity.info().attempt >= (EXECUTE_RETRY_POLICY.maximum_attempts or 1)
                    if name in s.stalled_executes and not last:
                        error = ExecutorError("the agent's API call failed")
                        error.usage = s.bill(input.directive_id, s.stalled_executes[name])
                        raise error
                if name in s.stalled_executes:
                    total = earlier + s.bill(input.directive_id, s.stalled_executes[name])
                    activity.heartbeat(usage_detail(total))
                    await asyncio.Event().wait()  # no more heartbeats: the try times out
                delay = s.delays.get(name, 0.0)
                cost = s.execute_cost
                if delay > 0:
                    # an agent that works a while is billed as it goes (its first turn
                    # now); a stop mid-way reports that, as activities/execution.py does
                    earlier, cost = earlier + s.bill(input.directive_id, cost), 0.0
                    with translated_errors():
                        try:
                            while delay > 0:
                                activity.heartbeat("working", usage_detail(earlier))
                                await asyncio.sleep(min(delay, 0.05))
                                delay -= 0.05
                        except asyncio.CancelledError:
                            stopped = cancelled_after(earlier)
                            if stopped is None:
                                raise
                            s.cancelled.append(name)
                            raise stopped from None
                if name in s.failing_executes:
                    # what this try and the ones before it were billed
                    billed = earlier + s.bill(input.directive_id, s.failing_executes[name])
                    raise ApplicationError("the agent failed", {"usage": billed.model_dump()},
                                           type="AgentError", non_retryable=True)
                gate = s.gates.get(name)
                if gate is not None:
                    gate.reached.set()
                    while not gate.opened.is_set():
                        activity.heartbeat("waiting at the gate")
                        try:
                            await asyncio.wait_for(gate.opened.wait(), 0.1)
                        except TimeoutError:
                            pass
            except asyncio.CancelledError:
                s.cancelled.append(name)
                raise
            finally:
                s.running.discard(name)
            return ExecuteOutput(
                success=True, exit_code=0, branch=f"makima/{input.directive_id}--steps/{name}",
                commit=uuid.uuid4().hex + "00000000", worktree="/tmp/none",
                changed_files=[f"{name}.txt"], output_tail=f"did {name}",
                usage=earlier + s.bill(input.directive_id, cost),
                worker_queue=(s.worker_queues.pop(0) if s.worker_queues
                              else s.worker_queue_of(input.directive_id) if s.worker_queue_of
                              else ""))

        @activity.defn(name=ActivityName.CHECKOUT_STEP.value)
        async def checkout_step(input: CheckoutInput) -> ExecuteOutput:
            s.calls.append((ActivityName.CHECKOUT_STEP.value, input))
            return ExecuteOutput(success=True, exit_code=0, commit="f" * 40,
                                 branch=f"makima/{input.directive_id}--steps/{input.step}")

        @activity.defn(name=ActivityName.EVALUATE_STEP.value)
        async def evaluate_step(input: EvaluateInput) -> Evaluation:
            s.calls.append((ActivityName.EVALUATE_STEP.value, input))
            s.ran_on.append((ActivityName.EVALUATE_STEP.value, activity.info().task_queue))
            return evaluation_of(input)

        def evaluation_of(input: EvaluateInput) -> Evaluation:
            queue = s.scores.get(input.step.name)
            score = (queue.pop(0) if len(queue) > 1 else queue[0]) if queue else s.default_score
            green = score >= input.spec.thresholds.green
            return Evaluation(
                passed=green, score=score,
                confidence=Confidence.GREEN if green else Confidence.RED,
                summary=f"{input.step.name} scored {score}",
                rework_instructions="" if green else f"fix {input.step.name} (was {score})",
                evaluator="stand-in", usage=s.bill(input.directive_id, s.evaluate_cost))

        @activity.defn(name=ActivityName.EVALUATE_AND_MERGE_STEP.value)
        async def evaluate_and_merge_step(input: EvaluateMergeInput) -> EvaluateMergeOutput:
            # as activities/evaluate_merge.py: a cancel ends the evaluation; a merge
            # under way runs to its end
            s.calls.append((ActivityName.EVALUATE_AND_MERGE_STEP.value, input))
            s.ran_on.append((ActivityName.EVALUATE_AND_MERGE_STEP.value,
                             activity.info().task_queue))
            try:
                gate = s.gates.get(evaluate_gate(input.evaluate.step.name))
                await wait_at(gate)
            except asyncio.CancelledError:
                s.cancelled.append(input.evaluate.step.name)
                raise
            evaluation = evaluation_of(input.evaluate)
            spec = input.evaluate.spec
            if not passes_without_a_person(evaluation.score, spec.thresholds, spec.autonomy):
                return EvaluateMergeOutput(evaluation=evaluation)
            return EvaluateMergeOutput(evaluation=evaluation,
                                       merge=await merge_evaluated(merged(input.merge),
                                                                   evaluation))

        async def wait_at(gate: Gate | None) -> None:
            if gate is not None:
                gate.reached.set()
                while not gate.opened.is_set():
                    activity.heartbeat("waiting at the gate")
                    await asyncio.sleep(0.05)

        @activity.defn(name=ActivityName.MERGE_STEP.value)
        async def merge_step(input: MergeInput) -> MergeOutput:
            s.calls.append((ActivityName.MERGE_STEP.value, input))
            s.ran_on.append((ActivityName.MERGE_STEP.value, activity.info().task_queue))
            with translated_errors():
                return await merged(input)

        async def merged(input: MergeInput) -> MergeOutput:
            gate = s.gates.get(merge_gate(input.step))
            if gate is not None:
                gate.reached.set()
                while not gate.opened.is_set():
                    activity.heartbeat("waiting at the gate")
                    await asyncio.sleep(0.05)
            if input.step in s.failing_merges:
                raise s.failing_merges[input.step]
            if s.conflicts.get(input.step, 0) > 0:
                s.conflicts[input.step] -= 1
                return MergeOutput(merged=False, conflict_files=["shared.txt"],
                                   message="conflict in shared.txt")
            s.merged.append(input.step)
            return MergeOutput(merged=True, commit="a" * 40, message=f"merged {input.step}",
                               removed_worktrees=input.remove_worktrees
                               and not s.merge_keeps_worktrees)

        @activity.defn(name=ActivityName.CLEANUP_STEP.value)
        async def cleanup_step(input: CleanupInput) -> CleanupOutput:
            s.calls.append((ActivityName.CLEANUP_STEP.value, input))
            s.ran_on.append((ActivityName.CLEANUP_STEP.value, activity.info().task_queue))
            return CleanupOutput(removed=True)

        @activity.defn(name=ActivityName.COMPLETE_DIRECTIVE.value)
        async def complete_directive(input: CompleteInput) -> CompleteOutput:
            s.calls.append((ActivityName.COMPLETE_DIRECTIVE.value, input))
            gate = s.gates.get(COMPLETION_GATE)
            if gate is not None:
                gate.reached.set()
                while not gate.opened.is_set():
                    activity.heartbeat("waiting at the gate")
                    await asyncio.sleep(0.05)
            return CompleteOutput(completion="branch", message="left for review")

        @activity.defn(name=ActivityName.RECORD_EVENTS.value)
        async def record_events(input: RecordInput) -> RecordOutput:
            sender = activity.info().workflow_id
            while ((s.hold_directive_records
                    and input.events[0].source == input.events[0].directive_id)
                   or (s.hold_step_records and sender != input.events[0].directive_id)):
                activity.heartbeat("held")
                await asyncio.sleep(0.05)
            s.events.extend(input.events)
            s.recorded_by.extend((sender, e) for e in input.events)
            return RecordOutput(written=len(input.events))

        return [prepare_repository, plan_directive, execute_step, checkout_step, evaluate_step,
                evaluate_and_merge_step, merge_step, cleanup_step, complete_directive,
                record_events, *BillingActivities().activities()]


async def start(client: Client, task_queue: str, spec: DirectiveSpec,
                directive_id: str | None = None) -> WorkflowHandle[Any, Any]:
    return await client.start_workflow(
        DirectiveWorkflow.run, spec, id=directive_id or f"directive-test-{uuid.uuid4().hex[:8]}",
        task_queue=task_queue, execution_timeout=timedelta(hours=6))


async def status(handle: WorkflowHandle[Any, Any]) -> DirectiveSnapshot:
    """The status query. The time-skipping test server's continue-as-new is not atomic
    (temporalio/sdk-java#1537): a query that reaches a directive while it continues as
    new may go unanswered until its deadline. Such a query is sent again, twice; a
    workflow that never answers still fails the test."""
    for attempt in range(3):
        try:
            return await handle.query(DirectiveWorkflow.status,
                                      rpc_timeout=timedelta(seconds=10))
        except RPCError as err:
            lost = err.status in (RPCStatusCode.CANCELLED, RPCStatusCode.DEADLINE_EXCEEDED)
            if not lost or attempt == 2:
                raise
    raise AssertionError("unreachable")


async def wait_until(handle: WorkflowHandle[Any, Any],
                     predicate: Callable[[DirectiveSnapshot], bool],
                     timeout: float = 30.0) -> DirectiveSnapshot:
    """Poll the status query (which never skips time) until the predicate holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        snapshot = await status(handle)
        if predicate(snapshot):
            return snapshot
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not reached in {timeout}s; last status: "
                                 f"{snapshot.model_dump_json(indent=1)}")
        await asyncio.sleep(0.05)


def step_status(snapshot: DirectiveSnapshot, name: str) -> str:
    return next(s.status.value for s in snapshot.steps if s.name == name)


async def runs_of(client: Client, workflow_id: str, run_id: str | None) -> list[Any]:
    """Every run of a workflow from `run_id` on, along its continue-as-new chain."""
    runs = []
    while run_id:
        history = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
        runs.append(history)
        last = history.events[-1]
        run_id = (last.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
                  if last.HasField("workflow_execution_continued_as_new_event_attributes") else None)
    return runs


async def save_history(handle: WorkflowHandle[Any, Any], client: Client, name: str) -> None:
    """With MAKIMA_RECORD_HISTORIES=1, keep the run's history as replay fixtures in
    tests/histories/: every run of a continued-as-new chain, and every step child."""
    if os.environ.get("MAKIMA_RECORD_HISTORIES") != "1":
        return
    HISTORIES.mkdir(exist_ok=True)
    children: list[tuple[str, str]] = []
    runs = await runs_of(client, handle.id, handle.first_execution_run_id or handle.result_run_id)
    for index, history in enumerate(runs):
        fixture = {"workflow_id": handle.id, "history": history.to_json_dict()}
        (HISTORIES / f"{name}-{index}.json").write_text(json.dumps(fixture))
        for event in history.events:
            if event.HasField("child_workflow_execution_started_event_attributes"):
                started = event.child_workflow_execution_started_event_attributes
                children.append((started.workflow_execution.workflow_id,
                                 started.workflow_execution.run_id))
    for number, (child_id, child_run) in enumerate(children):
        history = await client.get_workflow_handle(child_id, run_id=child_run).fetch_history()
        fixture = {"workflow_id": child_id, "history": history.to_json_dict()}
        (HISTORIES / f"{name}-step{number}.json").write_text(json.dumps(fixture))
