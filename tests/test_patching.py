"""The patching rule, shown on our own workflow the way Temporal's patch tests do:
a change to StepWorkflow that adds a command replays the recorded histories
only when it sits behind `workflow.patched(...)`; without the guard the replay
gate fails. (Step histories are in tests/histories/*-step*.json.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from temporalio import workflow
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer, UnsandboxedWorkflowRunner
from temporalio.workflow import NondeterminismError

from makima.contracts import StepInput, StepResult
from workflows.directive import DirectiveWorkflow
from workflows.step import StepWorkflow

STEP_HISTORIES = sorted((Path(__file__).parent / "histories").glob("rework-step*.json"))


@workflow.defn(name="StepWorkflow")
class PatchedStepWorkflow(StepWorkflow):
    """Version 2: removes worktrees twice (a new activity call), behind a patch."""

    @workflow.run
    async def run(self, input: StepInput) -> StepResult:
        return await super().run(input)

    async def _cleanup(self) -> None:
        if workflow.patched("cleanup-twice"):
            await super()._cleanup()
        await super()._cleanup()


@workflow.defn(name="StepWorkflow")
class UnguardedStepWorkflow(StepWorkflow):
    """The same change without the guard."""

    @workflow.run
    async def run(self, input: StepInput) -> StepResult:
        return await super().run(input)

    async def _cleanup(self) -> None:
        await super()._cleanup()
        await super()._cleanup()


def histories() -> list[WorkflowHistory]:
    loaded = []
    for path in STEP_HISTORIES:
        fixture = json.loads(path.read_text())
        loaded.append(WorkflowHistory.from_json(fixture["workflow_id"], fixture["history"]))
    return loaded


def replayer(step_class: type) -> Replayer:
    return Replayer(workflows=[DirectiveWorkflow, step_class],
                    data_converter=pydantic_data_converter,
                    workflow_runner=UnsandboxedWorkflowRunner())


async def test_a_patched_change_replays_old_histories() -> None:
    assert STEP_HISTORIES, "the rework scenario's step history is missing"
    for history in histories():
        await replayer(PatchedStepWorkflow).replay_workflow(history)


async def test_the_same_change_without_the_patch_fails_the_replay_gate() -> None:
    with pytest.raises(NondeterminismError):
        for history in histories():
            await replayer(UnguardedStepWorkflow).replay_workflow(history)
