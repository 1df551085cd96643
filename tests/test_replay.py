"""Replay gate: recorded histories of the engine scenarios must replay against
the current workflow code. A change that would replay differently (a new
command, a reordered one) fails here; such a change belongs behind
`workflow.patched(...)`.

Regenerate the fixtures after an intended, patched change with
`MAKIMA_RECORD_HISTORIES=1 .venv/bin/pytest tests/test_directive_workflow.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

import makima.constants
from workflows.directive import DirectiveWorkflow
from workflows.step import StepWorkflow

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))


def test_every_scenario_has_a_recorded_history() -> None:
    names = {p.name.rsplit("-", 1)[0] for p in HISTORIES if "-step" not in p.name}
    expected = {"fanout", "rework", "replan", "replan-budget", "approval", "deny", "pause",
                "stop", "cost-breaker", "wall-time", "update-goal", "invalid-plan", "reevaluate",
                "checkpoint", "messages", "messages-v1", "signal-with-start", "stop-at-generation-end",
                "step-cancelled-outside", "stop-after-a-paused-attempt", "timed-out-tries",
                # routed to the worktree's worker (tests/test_routing.py); v1 before
                # the merge removed the worktrees itself, v2 before the directive
                # recorded a step's last events, v3 before one activity evaluated and
                # merged (tests/test_critical_path.py)
                "routed", "routed-v1", "routed-v2", "routed-v3", "evaluate-and-merge",
                "stop-during-evaluate-and-merge", "checkpoint-approve", "checkpoint-deny",
                "stop-during-merge", "step-terminated-while-starting",
                # the fuzzer's (seed 468784) directive that lost a step at a pause, on the
                # code before the patch 'directive-no-step-without-a-run'
                "fuzz-468784",
                # a stop that waits for the cancelled activity's end, which carries what
                # it was billed (tests/test_cancelled_calls_billed.py)
                "stop-agent-call-in-flight", "stop-judge-call-in-flight", "stop-agent-command",
                # cancelled with its cleanup's result: it reports its last attempt's spend
                "step-cancelled-at-cleanup",
                # stopped while its activity waited for a retry: it asked what the tries
                # so far were billed
                "stop-agent-waiting-for-a-retry",
                # a checkpoint on what the run counted, the wall-time breaker on its timer
                # (patch 'directive-decides-on-counts-and-timers', tests/test_stale_activations.py)
                "checkpoint-counted",
                # cancelled from outside: a stop wherever it finds the directive (patch
                # 'directive-cancel-is-a-stop', tests/test_cancelled_directive.py)
                "cancelled-while-planning", "cancelled-while-running",
                "cancelled-while-a-generation-ends",
                # pause answered once the running step has it (patch
                # 'directive-pause-answers-when-steps-told')
                "pause-told",
                # one step_status event when a step returns to wait for a person (patch
                # 'directive-result-repeats-no-status-event')
                "approval-once",
                # a StepWorkflow told "paused" before its first task (patch
                # 'step-pause-before-run-holds')
                "paused-before-first-task",
                # the planner hears the cancel and its call in flight is counted, or its
                # answer comes with the cancel (patch 'directive-planner-cancel-counted')
                "cancel-planner-call-in-flight", "cancelled-as-the-plan-came"}
    assert expected <= names, f"missing histories: {sorted(expected - names)}"
    # re-plan and goal change continue as new: their second run is recorded too
    assert {"replan-1.json", "update-goal-1.json"} <= {p.name for p in HISTORIES}
    # every signal and update, across continue-as-new (checkpoints and a goal change);
    # messages-v1 was recorded under the first patch only
    assert {"messages-1.json", "messages-2.json"} <= {p.name for p in HISTORIES}
    # a step waiting for a person does not hold the checkpoint: approve and deny are
    # decided in a later run than the one that asked
    assert {"checkpoint-approve-1.json", "checkpoint-deny-1.json"} <= {p.name for p in HISTORIES}
    # and every step child, whose code the directive's own history does not replay
    assert len([p for p in HISTORIES if "-step" in p.name]) >= 20


def load(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.parametrize("path", HISTORIES, ids=lambda p: p.stem)
async def test_recorded_history_replays(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if path.name.startswith(("checkpoint-", "messages-")):  # recorded with a low threshold
        monkeypatch.setattr(makima.constants, "HISTORY_CHECKPOINT_EVENTS", 40)
    if path.name.startswith("fuzz-"):  # the fuzzer's threshold (tests/test_fuzz_commands.py)
        monkeypatch.setattr(makima.constants, "HISTORY_CHECKPOINT_EVENTS", 80)
    fixture = load(path)
    history = WorkflowHistory.from_json(fixture["workflow_id"], fixture["history"])
    replayer = Replayer(workflows=[DirectiveWorkflow, StepWorkflow],
                        data_converter=pydantic_data_converter)
    await replayer.replay_workflow(history)


async def test_the_known_history_from_a_worker_restart_still_does_not_replay() -> None:
    """A canary for README "Known limits": the fuzzer with worker restarts recorded
    this history before the worker's query guard (makima/query_guard.py) existed: a
    status query ran an activity's result before its workflow task, whose update
    was then accepted after the activity that result scheduled; a replay applies
    the update first. Such a history stays broken; the guard keeps new ones from
    being written (tests/test_restart_queries.py). When this starts to replay, an
    SDK runs query activations as replays do, and the guard may go."""
    fixture = load(Path(__file__).parent / "histories" / "known" / "update-after-restart.json")
    history = WorkflowHistory.from_json(fixture["workflow_id"], fixture["history"])
    replayer = Replayer(workflows=[DirectiveWorkflow, StepWorkflow],
                        data_converter=pydantic_data_converter)
    replayed = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert "Update machine does not handle this event" in str(replayed.replay_failure)
