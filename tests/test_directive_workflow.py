"""DirectiveWorkflow and StepWorkflow on the real Temporal test server, with the
activities replaced by stand-ins registered under the same names.

Each test is one scenario of the orchestration contract (issue 2) and asserts
what a user would see: the final status, which activities ran and how often,
what the `status` query says on the way.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import pytest
from temporalio.client import Client, WorkflowFailureError, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from makima.contracts import ActivityName, EventType, PauseState, StepInput, StepSpec
from makima.models import (
    ApprovalDecision,
    BudgetRaise,
    DirectiveStatus,
    GoalUpdate,
    StepRef,
    StepStatus,
    StopRequest,
)
from tests.standins import (
    StandIns,
    plan_of,
    runs_of,
    save_history,
    spec_of,
    start,
    status,
    step_status,
    wait_until,
)
from worker import build_worker
from workflows.directive import DirectiveWorkflow
from workflows.step import StepWorkflow

EXECUTE = ActivityName.EXECUTE_STEP
EVALUATE = ActivityName.EVALUATE_STEP
PLAN = ActivityName.PLAN_DIRECTIVE
MERGE = ActivityName.MERGE_STEP


async def test_independent_steps_run_in_parallel_and_dependants_wait(
        client: Client, task_queue: str) -> None:
    stand = StandIns()
    # each of a and b is held until both are running: only a parallel fan-out passes
    stand.gate("a")
    stand.gate("b")
    spec = spec_of(("a", []), ("b", []), ("c", ["a", "b"]), autonomy="full_auto")
    async with build_worker(client, task_queue, stand.activities()):
        handle = await start(client, task_queue, spec)
        await asyncio.wait_for(stand.gates["a"].reached.wait(), 20)
        await asyncio.wait_for(stand.gates["b"].reached.wait(), 20)
        mid = await status(handle)
        assert step_status(mid, "c") == "pending"
        assert frozenset({"a", "b"}) in stand.overlaps
        stand.gates["a"].opened.set()
        stand.gates["b"].opened.set()
        result = await handle.result()
        await save_history(handle, client, "fanout")

    assert result.status is DirectiveStatus.COMPLETED
    assert [s.status.value for s in result.steps] == ["passed"] * 3
    order = [name for name, _ in stand.calls if name in (EXECUTE.value, MERGE.value)]
    merges_before_c = stand.order(MERGE)[:2]
    assert sorted(merges_before_c) == ["a", "b"]
    c_started = next(i for i, (n, p) in enumerate(stand.calls)
                     if n == EXECUTE.value and p.step.name == "c")
    last_merge_ab = max(i for i, (n, p) in enumerate(stand.calls)
                        if n == MERGE.value and p.step in ("a", "b"))
    assert c_started > last_merge_ab, order
    assert [s.depends_on for s in result.steps] == [[], [], ["a", "b"]]


async def test_red_attempts_are_reworked_with_instructions_until_green(
        client: Client, task_queue: str) -> None:
    stand = StandIns(scores={"a": [0.2, 0.3, 0.9]})
    spec = spec_of(("a", []))
    async with build_worker(client, task_queue, stand.activities()):
        handle = await start(client, task_queue, spec)
        result = await handle.result()
        await save_history(handle, client, "rework")

    assert result.status is DirectiveStatus.COMPLETED
    executes = stand.called(EXECUTE, "a")
    assert [e.attempt for e in executes] == [1, 2, 3]
    assert executes[0].rework is None
    assert executes[1].rework is not None and "fix a (was 0.2)" in executes[1].rework.instructions
    assert executes[2].rework.instructions == "fix a (was 0.3)"
    (a,) = result.steps
    assert (a.status.value, a.attempts, a.score) == ("passed", 3, 0.9)
    assert len(stand.called(MERGE, "a")) == 1


async def test_blocked_step_triggers_a_replan_that_keeps_passed_work(
        client: Client, task_queue: str) -> None:
    stand = StandIns(scores={"b": [0.1]})
    stand.plans = [plan_of(("a", []), ("b", ["a"])), plan_of(("b2", ["a"]))]
    spec = spec_of(budgets={"max_rework_cycles": 1})
    async with build_worker(client, task_queue, stand.activities()):
        handle = await start(client, task_queue, spec)
        result = await handle.result()
        await save_history(handle, client, "replan")

    assert result.status is DirectiveStatus.COMPLETED
    assert result.generation == 2
    assert {s.name: s.status.value for s in result.steps} == {"a": "passed", "b2": "passed"}
    assert len(stand.called(EXECUTE, "a")) == 1, "a passed step must not run again"
    assert len(stand.called(EXECUTE, "b")) == 2  # first attempt + one rework
    replan = stand.called(PLAN)[1]
    assert replan.generation == 2
    assert "'b' blocked" in replan.reason and "rework budget spent" in replan.reason
    assert {s.name: s.status.value for s in replan.existing_steps} == {
        "a": "passed", "b": "blocked"}
    assert result.replans == 1


async def test_replan_budget_spent_fails_the_directive_with_the_reason(
        client: Client, task_queue: str) -> None:
    stand = StandIns(scores={"x": [0.1]})
    stand.plans = [plan_of(("x", [])), plan_of(("x", []))]
    spec = spec_of(budgets={"max_rework_cycles": 0, "max_chain_regenerations": 1})
    async with build_worker(client, task_queue, stand.activities()):
        handle = await start(client, task_queue, spec)
        with pytest.raises(WorkflowFailureError) as failure:
            await handle.result()
        final = await status(handle)
        await save_history(handle, client, "replan-budget")

    cause = failure.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "DirectiveFailed"
    assert "re-plan budget spent: 1 of 1" in cause.message
    assert final.status is DirectiveStatus.FAILED
    assert final.generation == 2
    assert "re-plan budget spent" in final.reason
    assert len(stand.called(PLAN)) == 2


async def test_yellow_waits_for_approval_and_approve_passes_it(
        client: Client, task_queue: str) -> None:
    stand = StandIns(scores={"a": [0.6]})
    spec = spec_of(("a", []), ("b", ["a"]))
    async with build_worker(client, task_queue, stand.activities()):
        handle = await start(client, task_queue, spec)
        waiting = await wait_until(handle, lambda s: bool(s.pending_approvals))
        assert [p.step for p in waiting.pending_approvals] == ["a"]
        assert step_status(waiting, "a") == "awaiting_approval"
        assert step_status(waiting, "b") == "pending"
        assert stand.called(MERGE) == []
        answer = await handle.execute_update(
            DirectiveWorkflow.approve_step,
            ApprovalDecision(step="a", by="alice", comment="looks fine"))
        assert answer.accepted and "approved by alice" in answer.message
        result = await handle.result()
        await save_history(handle, client, "approval-once")

    assert result.status is DirectiveStatus.COMPLETED
    assert result.pending_approvals == []
    assert [s.status.value for s in result.steps] == ["passed", "passed"]
    decided = [e for e in stand.events if e.type is EventType.APPROVAL_DECIDED]
    assert [(e.step, e.actor, e.data["approved"]) for e in decided] == [("a", "alice", True)]
    # the audit trail says once when the step began to wait, and who decided
    a_trail = [(e.type.value, e.data.get("status")) for e in stand.events if e.step == "a"
               and e.type in (EventType.STEP_STATUS, EventType.APPROVAL_REQUESTED,
                              EventType.APPROVAL_DECIDED)]
    waits = a_trail.index(("step_status", "awaiting_approval"))
    assert a_trail[waits:waits + 4] == [
        ("step_status", "awaiting_approval"), ("approval_requested", None),
        ("approval_decided", None), ("step_status", "running")], a_trail


async def test_deny_blocks_the_step(client: Client, task_queue: str) -> None:
    stand = StandIns(scores={"a": [0.6]})
    spec = spec_of(("a", []), ("b", ["a"]))
    async with build_worker(client, task_queue, stand.activities()):
        handle = await start(client, task_queue, spec)
        await wait_until(handle, lambda s: bool(s.pending_approvals))
        await handle.signal(DirectiveWorkflow.deny,
                            ApprovalDecision(step="a", by="bob", comment="wrong approach"))
        with pytest.raises(WorkflowFailureError) as failure:
            await handle.result()
        final = await status(handle)
        await save_history(handle, client, "deny")

    assert step_status(final, "a") == "blocked"
    assert step_status(final, "b") == "skipped"
    a = final.steps[0]
    assert a.reason == "denied by bob: wrong approach"
    assert "no planner" in str(failure.value.cause)
    assert stand.called(MERGE) == []


async def test_full_auto_passes_yellow_without_a_person(client: Client, task_queue: str) -> None:
    stand = StandIns(scores={"a": [0.6]})
    spec = spec_of(("a", []), autonomy="full_auto")
    async with build_worker(client, task_queue, stand.activities()):
        result = await (await start(client, task_queue, spec)).result()
    assert result.status is DirectiveStatus.COMPLETED
    assert (result.steps[0].confidence.value, result.steps[0].status.value) == ("yellow", "passed")
    assert not [e for e in stand.events if e.type is EventType.APPROVAL_REQUESTED]


async def answered_after_the_step_was_told(handle: Any, update: str) -> bool:
    """The directive's history records the answer to `update` after the
    `set_paused` signal it sent a running step was delivered."""
    history = await handle.fetch_history()
    told = answered = name = None
    for index, event in enumerate(history.events):
        if event.HasField("external_workflow_execution_signaled_event_attributes"):
            told = index if told is None else told
        if event.HasField("workflow_execution_update_accepted_event_attributes"):
            accepted = event.workflow_execution_update_accepted_event_attributes
            name = accepted.accepted_request.input.name
        if (event.HasField("workflow_execution_update_completed_event_attributes")
                and name == update):
            answered = index
    assert told is not None and answered is not None, "no signal, or no answer"
    return told < answered


async def test_pause_holds_new_launches_and_resume_continues(
        client: Client, task_queue: str) -> None:
    stand = StandIns()
    gate = stand.gate("a")
    spec = spec_of(("a", []), ("b", ["a"]))
    async with build_worker(client, task_queue, stand.activities()):
        handle = await start(client, task_queue, spec)
        await asyncio.wait_for(gate.reached.wait(), 20)
        answer = await handle.execute_update(DirectiveWorkflow.pause_directive)
        assert answer.accepted
        # the answer came once a's run had the pause: it cannot start its evaluation
        # when its agent finishes now (answered before, it did: 1 run in 7, and in 13)
        assert await answered_after_the_step_was_told(handle, "pause_directive")
        gate.opened.set()
        paused = await wait_until(handle, lambda s: s.status is DirectiveStatus.PAUSED)
        # a's agent finished, but nothing new starts while paused
        await asyncio.sleep(1.0)
        assert stand.called(EVALUATE) == [] and stand.called(EXECUTE, "b") == []
        assert step_status(await status(handle), "b") == "pending"
        with pytest.raises(WorkflowUpdateFailedError) as again:
            await handle.execute_update(DirectiveWorkflow.pause_directive)
        assert "already paused" in str(again.value.cause)
        await handle.signal(DirectiveWorkflow.resume)
        result = await handle.result()
        await save_history(handle, client, "pause-told")

    assert paused.status is DirectiveStatus.PAUSED
    assert result.status is DirectiveStatus.COMPLETED
    assert stand.order(EXECUTE) == ["a", "b"]


async def test_a_pause_that_reaches_a_step_before_its_first_task_holds(
        client: Client, task_queue: str) -> None:
    # the directive started the step unpaused, then paused and told it, all before the
    # step's first workflow task: the step's input must not undo the pause (fuzz seed
    # 579515: the agent ran while the directive was paused)
    stand = StandIns()
    spec = spec_of(("a", []))
    step_input = StepInput(directive_id="directive-test-step", generation=1,
                           spec=StepSpec.of(spec), step=spec.plan.steps[0],
                           integration_branch="makima/directive-test-step", paused=False)
    async with build_worker(client, task_queue, stand.activities()):
        handle = await client.start_workflow(
            StepWorkflow.run, step_input, id=f"step-test-{uuid.uuid4().hex[:8]}",
            task_queue=task_queue, start_signal="set_paused",
            start_signal_args=[PauseState(paused=True)])
        await asyncio.sleep(1.0)
        assert stand.called(EXECUTE) == [], "the agent ran while the step was told paused"
        await handle.signal(StepWorkflow.set_paused, PauseState(paused=False))
        result = await asyncio.wait_for(handle.result(), 30)
        await save_history(handle, client, "paused-before-first-task")
    assert result.status is StepStatus.PASSED and stand.order(EXECUTE) == ["a"]


async def test_stop_cancels_the_running_activity_and_ends_stopped(
        client: Client, task_queue: str) -> None:
    stand = StandIns()
    gate = stand.gate("a")  # never opened: only cancellation ends it
    spec = spec_of(("a", []), ("b", ["a"]))
    async with build_worker(client, task_queue, stand.activities()):
        handle = await start(client, task_queue, spec)
        await asyncio.wait_for(gate.reached.wait(), 20)
        answer = await handle.execute_update(DirectiveWorkflow.stop_directive,
                                             StopRequest(reason="changed my mind"))
        assert answer.accepted
        result = await handle.result()
        await save_history(handle, client, "stop")

    assert result.status is DirectiveStatus.STOPPED
    assert result.reason == "changed my mind"
    assert stand.cancelled == ["a"]
    assert {s.name: s.status.value for s in result.steps} == {"a": "cancelled", "b": "pending"}
    assert len(stand.called(ActivityName.CLEANUP_STEP, "a")) == 1


async def test_cost_breaker_pauses_and_raise_budget_then_resume_completes(
        client: Client, task_queue: str) -> None:
    stand = StandIns(execute_cost=0.6)
    spec = spec_of(("a", []), ("b", ["a"]), ("c", ["b"]), budgets={"max_cost_usd": 1.0})
    async with build_worker(client, task_queue, stand.activities()):
        handle = await start(client, task_queue, spec)
        paused = await wait_until(handle, lambda s: s.breaker is not None)
        assert paused.status is DirectiveStatus.PAUSED
        assert "cost budget spent" in paused.breaker
        await asyncio.sleep(0.5)
        assert stand.called(EXECUTE, "c") == []
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await handle.execute_update(DirectiveWorkflow.resume_directive)
        assert "raise the budget first" in str(refused.value.cause)
        await handle.signal(DirectiveWorkflow.raise_budget, BudgetRaise(max_cost_usd=10.0))
        raised = await wait_until(handle, lambda s: s.breaker is None)
        assert raised.status is DirectiveStatus.PAUSED  # until a person resumes
        await handle.execute_update(DirectiveWorkflow.resume_directive)
        result = await handle.result()
        await save_history(handle, client, "cost-breaker")

    assert result.status is DirectiveStatus.COMPLETED
    assert result.cost_usd == pytest.approx(1.8)
    assert [s.cost_usd for s in result.steps] == pytest.approx([0.6, 0.6, 0.6])
    assert result.budgets.max_cost_usd == 10.0


async def test_wall_time_breaker_pauses_when_time_runs_out(
        fresh_temporal_env: WorkflowEnvironment, task_queue: str) -> None:
    temporal_env, client = fresh_temporal_env, fresh_temporal_env.client
    # a waits for a person (no activity running), so the test server can skip time
    stand = StandIns(scores={"a": [0.6]})
    spec = spec_of(("a", []), ("b", ["a"]), budgets={"max_wall_time_minutes": 30})
    async with build_worker(client, task_queue, stand.activities()):
        handle = await start(client, task_queue, spec)
        await wait_until(handle, lambda s: bool(s.pending_approvals))
        await temporal_env.sleep(timedelta(minutes=31))
        paused = await wait_until(handle, lambda s: s.breaker is not None)
        assert paused.status is DirectiveStatus.PAUSED
        assert "wall-time budget spent" in paused.breaker
        assert paused.elapsed_seconds >= 30 * 60
        await handle.signal(DirectiveWorkflow.approve, ApprovalDecision(step="a", by="alice"))
        await wait_until(handle, lambda s: step_status(s, "a") == "passed")
        await asyncio.sleep(0.5)
        assert stand.called(EXECUTE, "b") == []  # held by the breaker
        await handle.signal(DirectiveWorkflow.raise_budget,
                            BudgetRaise(max_wall_time_minutes=600))
        await handle.signal(DirectiveWorkflow.resume)
        result = await handle.result()
        await save_history(handle, client, "wall-time")
    assert result.status is DirectiveStatus.COMPLETED
    assert result.elapsed_seconds >= 31 * 60


async def test_update_goal_mid_run_replans_a_generation_that_keeps_passed_steps(
        client: Client, task_queue: str) -> None:
    stand = StandIns()
    gate = stand.gate("b")
    stand.plans = [plan_of(("a", []), ("b", ["a"])), plan_of(("c", ["b"]))]
    spec = spec_of()
    async with build_worker(client, task_queue, stand.activities()):
        handle = await start(client, task_queue, spec)
        await asyncio.wait_for(gate.reached.wait(), 20)
        answer = await handle.execute_update(
            DirectiveWorkflow.update_directive_goal,
            GoalUpdate(goal="prove the engine, and add c", requirements=["c exists"]))
        assert answer.accepted
        gate.opened.set()
        result = await handle.result()
        await save_history(handle, client, "update-goal")

    assert result.status is DirectiveStatus.COMPLETED
    assert result.generation == 2
    assert {s.name: s.status.value for s in result.steps} == {
        "a": "passed", "b": "passed", "c": "passed"}
    assert [len(stand.called(EXECUTE, n)) for n in "abc"] == [1, 1, 1]
    replan = stand.called(PLAN)[1]
    assert replan.spec.goal == "prove the engine, and add c"
    assert replan.spec.requirements == ["c exists"]
    assert "goal changed" in replan.reason
    assert {s.name: s.status.value for s in replan.existing_steps} == {
        "a": "passed", "b": "passed"}
    assert result.replans == 0  # a person's change of goal is not a failed plan


async def test_invalid_plan_is_fed_back_and_the_second_plan_runs(
        client: Client, task_queue: str) -> None:
    stand = StandIns()
    stand.plans = [plan_of(("a", ["b"]), ("b", ["a"])), plan_of(("a", []), ("b", ["a"]))]
    async with build_worker(client, task_queue, stand.activities()):
        handle = await start(client, task_queue, spec_of())
        result = await handle.result()
        await save_history(handle, client, "invalid-plan")

    assert result.status is DirectiveStatus.COMPLETED
    first, second = stand.called(PLAN)
    assert first.validation_errors == []
    assert any("cycle: a -> b -> a" in e for e in second.validation_errors)
    assert second.previous_plan is not None and second.previous_plan.names == ["a", "b"]
    invalid = [e for e in stand.events if e.type is EventType.PLAN_INVALID]
    assert len(invalid) == 1


async def test_updates_reject_unknown_steps_and_approvals_with_nothing_pending(
        client: Client, task_queue: str) -> None:
    stand = StandIns()
    gate = stand.gate("a")
    spec = spec_of(("a", []), approvers=["alice"])
    async with build_worker(client, task_queue, stand.activities()):
        handle = await start(client, task_queue, spec)
        await asyncio.wait_for(gate.reached.wait(), 20)
        with pytest.raises(WorkflowUpdateFailedError) as unknown:
            await handle.execute_update(DirectiveWorkflow.approve_step,
                                        ApprovalDecision(step="nope", by="alice"))
        assert "unknown step 'nope'" in str(unknown.value.cause)
        with pytest.raises(WorkflowUpdateFailedError) as nothing:
            await handle.execute_update(DirectiveWorkflow.approve_step,
                                        ApprovalDecision(step="a", by="alice"))
        assert "nothing is pending approval" in str(nothing.value.cause)
        with pytest.raises(WorkflowUpdateFailedError) as passed_step:
            await handle.execute_update(DirectiveWorkflow.reevaluate_step, StepRef(step="a"))
        assert "only blocked, failed or awaiting_approval" in str(passed_step.value.cause)
        # signals with the same mistakes change nothing and break nothing
        for _ in range(20):
            await handle.signal(DirectiveWorkflow.approve, ApprovalDecision(step="nope"))
        gate.opened.set()
        result = await handle.result()
    assert result.status is DirectiveStatus.COMPLETED


async def test_approver_outside_the_list_is_rejected_and_reevaluate_reruns_evaluation(
        client: Client, task_queue: str) -> None:
    stand = StandIns(scores={"a": [0.6, 0.95]})
    spec = spec_of(("a", []), approvers=["alice"])
    async with build_worker(client, task_queue, stand.activities()):
        handle = await start(client, task_queue, spec)
        await wait_until(handle, lambda s: bool(s.pending_approvals))
        with pytest.raises(WorkflowUpdateFailedError) as outsider:
            await handle.execute_update(DirectiveWorkflow.approve_step,
                                        ApprovalDecision(step="a", by="mallory"))
        assert "'mallory' is not an approver" in str(outsider.value.cause)
        await handle.execute_update(DirectiveWorkflow.reevaluate_step, StepRef(step="a"))
        result = await handle.result()
        await save_history(handle, client, "reevaluate")
    assert result.status is DirectiveStatus.COMPLETED
    assert len(stand.called(ActivityName.CHECKOUT_STEP, "a")) == 1
    assert len(stand.called(EXECUTE, "a")) == 1
    assert result.steps[0].attempts == 2 and result.steps[0].score == 0.95


async def test_merge_conflict_is_reworked_with_the_files_named(
        client: Client, task_queue: str) -> None:
    stand = StandIns(conflicts={"a": 1})
    async with build_worker(client, task_queue, stand.activities()):
        result = await (await start(client, task_queue, spec_of(("a", [])))).result()
    assert result.status is DirectiveStatus.COMPLETED
    second = stand.called(EXECUTE, "a")[1]
    assert "shared.txt" in second.rework.instructions
    assert "conflict markers" in second.rework.instructions


async def test_user_supplied_invalid_plan_fails_with_every_problem(
        client: Client, task_queue: str) -> None:
    stand = StandIns()
    spec = spec_of(("a", ["ghost"]), ("a", []))
    async with build_worker(client, task_queue, stand.activities()):
        handle = await start(client, task_queue, spec)
        with pytest.raises(WorkflowFailureError) as failure:
            await handle.result()
    message = str(failure.value.cause)
    assert "used more than once" in message and "unknown step 'ghost'" in message
    assert stand.called(EXECUTE) == []
    assert stand.called(ActivityName.PREPARE_REPOSITORY) == [], "nothing written to the repo"


async def test_a_long_generation_continues_as_new_without_losing_or_repeating_steps(
        client: Client, task_queue: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import makima.constants

    monkeypatch.setattr(makima.constants, "HISTORY_CHECKPOINT_EVENTS", 40)
    stand = StandIns()
    names = [f"s{i}" for i in range(6)]
    spec = spec_of(*[(n, [names[i - 1]] if i else []) for i, n in enumerate(names)],
                   autonomy="full_auto")
    async with build_worker(client, task_queue, stand.activities()):
        handle = await start(client, task_queue, spec)
        result = await handle.result()
        await save_history(handle, client, "checkpoint")
        histories = await runs_of(client, handle.id, handle.first_execution_run_id)
        runs, lengths = len(histories), [len(h.events) for h in histories]

    assert result.status is DirectiveStatus.COMPLETED
    assert result.generation == 1, "a checkpoint is not a new generation"
    assert [s.status.value for s in result.steps] == ["passed"] * 6
    assert stand.order(EXECUTE) == names, "every step ran exactly once, in order"
    assert runs >= 3
    assert max(lengths) < 40 + 40, lengths  # a run ends soon after passing the threshold
    seqs = [e.seq for e in stand.events if e.source == handle.id]
    assert sorted(seqs) == list(range(1, len(seqs) + 1)), "event numbering survives each run"


async def heartbeat_recorded(client: Client, workflow_id: str) -> None:
    """Until the server holds a heartbeat of the workflow's pending activity (or it
    has none pending any more)."""
    for _ in range(200):
        described = await client.get_workflow_handle(workflow_id).describe()
        pending = described.raw_description.pending_activities
        if not pending or pending[0].HasField("heartbeat_details"):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no heartbeat of {workflow_id}'s activity reached the server")


async def test_the_spend_of_tries_that_timed_out_is_counted(
        fresh_temporal_env: WorkflowEnvironment, task_queue: str) -> None:
    # every try of the agent bills 0.2: two fail and are retried, the last one hangs as
    # if its worker had died; its heartbeat timeout carries what all three were billed
    # (a server of its own, whose time can be skipped)
    client = fresh_temporal_env.client
    stand = StandIns(stalled_executes={"a": 0.2}, plan_cost=0.0)
    # the hung try is cancelled at shutdown
    async with build_worker(client, task_queue, stand.activities(), graceful_seconds=0.1):
        handle = await start(client, task_queue, spec_of(("a", [])))
        ended = asyncio.ensure_future(handle.result())
        while not ended.done():  # a try that runs holds the skipping: skip on purpose
            if len(stand.called(ActivityName.EXECUTE_STEP)) == 3:
                # not before the last try's heartbeat reached the server: a skip that
                # came first timed it out without it (0.4 counted, once at load 7)
                await heartbeat_recorded(client, f"{handle.id}/g1/a")
            try:
                await fresh_temporal_env.sleep(timedelta(seconds=65))
            except RPCError as err:
                # under load the test server gave up a skip ("Timeout expired"); skip again
                if "Timeout expired" not in err.message:
                    raise
            await asyncio.sleep(0.2)
        with pytest.raises(WorkflowFailureError):
            await ended
        final = await status(handle)
        await save_history(handle, client, "timed-out-tries")
    assert len(stand.called(ActivityName.EXECUTE_STEP)) == 3  # EXECUTE_RETRY_POLICY
    assert stand.billed[handle.id] == 0.6
    assert final.cost_usd == 0.6, "spend counts every try, the timed-out ones included"
