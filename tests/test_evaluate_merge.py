"""`evaluate_and_merge_step` on real git repositories with the shell executor: an
attempt that passes without a person is merged by its evaluation (and its
worktrees removed there); one that needs a person or a rework is not; a merge
that fails says so, and a try after it merges without evaluating again; a cancel
while the checks run merges nothing, and a cancel while the merge runs is
answered with the merge's outcome."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.evaluate_merge import EvaluateMergeActivities, to_its_end
from activities.evaluation import EvaluationActivities
from activities.execution import ExecutionActivities
from makima.contracts import (
    MERGING,
    EvaluateInput,
    EvaluateMergeInput,
    ExecuteInput,
    MergeInput,
    MergeOutput,
    PrepareInput,
)
from makima.models import Autonomy, Confidence, DirectiveSpec, ExecutorKind, PlannedStep, Repository
from tests.fakes.repos import make_repo, set_identity, sh, show

DIRECTIVE = "directive-fused-0001"


@pytest.fixture(autouse=True)
def identity(monkeypatch: pytest.MonkeyPatch) -> None:
    set_identity(monkeypatch)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "repo", {"README.md": "hello\n"})


@pytest.fixture
def execution(tmp_path: Path) -> ExecutionActivities:
    return ExecutionActivities(tmp_path / "home", heartbeat_interval=0.5)


@pytest.fixture
def fused(execution: ExecutionActivities) -> EvaluateMergeActivities:
    return EvaluateMergeActivities(EvaluationActivities(None, auto_checks=False), execution)


async def attempt(execution: ExecutionActivities, repo: Path, verify: list[str],
                  autonomy: Autonomy = Autonomy.FULL_AUTO, step_name: str = "greet",
                  says: str = "hi") -> EvaluateMergeInput:
    """Run a step that writes hi.txt; the request that evaluates (and maybe merges) it."""
    repository = Repository(path=str(repo))
    spec = DirectiveSpec(title="Test", goal="greet", repository=repository,
                         executor=ExecutorKind.SHELL, autonomy=autonomy)
    integration = (await execution.prepare_repository(
        PrepareInput(directive_id=DIRECTIVE, repository=repository))).integration_branch
    step = PlannedStep(name=step_name, task_plan="greet", command=f"echo {says} > hi.txt",
                       verify=verify)
    out = await ActivityEnvironment().run(execution.execute_step, ExecuteInput(
        directive_id=DIRECTIVE, generation=1, spec=spec, step=step, attempt=1,
        integration_branch=integration))
    assert out.success and out.commit, out
    return EvaluateMergeInput(
        evaluate=EvaluateInput(directive_id=DIRECTIVE, generation=1, spec=spec, step=step,
                               attempt=1, integration_branch=integration, execution=out),
        merge=MergeInput(directive_id=DIRECTIVE, repository=repository,
                         integration_branch=integration, step=step_name, attempt=1,
                         branch=out.branch, commit=out.commit, remove_worktrees=True))


def exists(path: str) -> bool:
    return Path(path).exists()


def merged_file(repo: Path, request: EvaluateMergeInput) -> bool:
    listed = sh("git", "ls-tree", "--name-only", request.merge.integration_branch, cwd=repo)
    return "hi.txt" in listed.split()


async def test_a_green_attempt_is_merged_and_its_worktrees_removed(
        fused: EvaluateMergeActivities, execution: ExecutionActivities, repo: Path) -> None:
    request = await attempt(execution, repo, ["test -f hi.txt"])
    done = await ActivityEnvironment().run(fused.evaluate_and_merge_step, request)
    assert done.evaluation.confidence is Confidence.GREEN
    assert done.merge is not None and done.merge.merged and done.merge.removed_worktrees
    assert show(repo, request.merge.integration_branch, "hi.txt") == "hi"
    assert not exists(request.evaluate.execution.worktree)


async def test_a_red_attempt_is_not_merged(
        fused: EvaluateMergeActivities, execution: ExecutionActivities, repo: Path) -> None:
    request = await attempt(execution, repo, ["test -f missing.txt"])
    done = await ActivityEnvironment().run(fused.evaluate_and_merge_step, request)
    assert done.evaluation.confidence is Confidence.RED and done.merge is None
    assert not merged_file(repo, request)
    assert exists(request.evaluate.execution.worktree), "kept for the rework"


@pytest.mark.parametrize("autonomy", [Autonomy.GUARDED, Autonomy.FULL_AUTO])
async def test_a_yellow_attempt_is_merged_only_when_nobody_must_decide(
        fused: EvaluateMergeActivities, execution: ExecutionActivities, repo: Path,
        autonomy: Autonomy) -> None:
    # nothing verifies it (no check, no judge): yellow, a person decides unless full_auto
    request = await attempt(execution, repo, [], autonomy)
    done = await ActivityEnvironment().run(fused.evaluate_and_merge_step, request)
    assert done.evaluation.confidence is Confidence.YELLOW
    if autonomy is Autonomy.GUARDED:
        assert done.merge is None and not merged_file(repo, request)
    else:
        assert done.merge is not None and done.merge.merged and merged_file(repo, request)


async def test_a_cancel_while_the_checks_run_merges_nothing(
        fused: EvaluateMergeActivities, execution: ExecutionActivities, repo: Path) -> None:
    request = await attempt(execution, repo, ["sleep 30"])
    env = ActivityEnvironment()
    running = asyncio.create_task(env.run(fused.evaluate_and_merge_step, request))
    await asyncio.sleep(1.0)
    assert not running.done()
    env.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(running, 20)
    assert not merged_file(repo, request)


async def test_a_cancel_while_merging_is_answered_with_the_merge() -> None:
    release = asyncio.Event()

    async def merge() -> MergeOutput:
        await release.wait()
        return MergeOutput(merged=True, message="merged")

    merging = asyncio.create_task(to_its_end(merge()))
    await asyncio.sleep(0.05)
    merging.cancel()
    await asyncio.sleep(0.05)
    assert not merging.done(), "the merge was cut off"
    release.set()
    assert (await asyncio.wait_for(merging, 5)).merged


async def test_a_merge_that_fails_says_it_was_the_merge(
        fused: EvaluateMergeActivities, execution: ExecutionActivities, repo: Path) -> None:
    request = await attempt(execution, repo, ["test -f hi.txt"])
    # the attempt's commit is gone from the repository by the time it merges
    gone = request.model_copy(update={"merge": request.merge.model_copy(
        update={"commit": "0" * 40})})
    with pytest.raises(ApplicationError) as failed:
        await ActivityEnvironment().run(fused.evaluate_and_merge_step, gone)
    assert failed.value.type == "MissingBranch" and failed.value.non_retryable
    assert f"commit {'0' * 40} of step greet is not in the repository" in failed.value.message
    assert failed.value.details[0]["stage"] == MERGING
    assert "usage" in failed.value.details[0]  # what the evaluation was billed
    assert not merged_file(repo, request)


async def test_a_try_after_a_failed_merge_merges_without_evaluating_again(
        fused: EvaluateMergeActivities, execution: ExecutionActivities, repo: Path) -> None:
    # the first try's merge heartbeats carry its (green) evaluation
    request = await attempt(execution, repo, ["test -f hi.txt"])
    first = ActivityEnvironment()
    beats: list[tuple[Any, ...]] = []
    first.on_heartbeat = lambda *details: beats.append(details)
    done = await first.run(fused.evaluate_and_merge_step, request)
    merging = [b for b in beats if b and b[0] == MERGING]
    assert merging and merging[-1][2]["evaluation"] == done.evaluation.model_dump(mode="json")

    # a retry of a try that failed while merging: its check would now fail (the file
    # is gone from the worktree), but it is not run again; the attempt merges
    retry_request = await attempt(execution, repo, ["test -f hi.txt"], step_name="again",
                                  says="again")
    await asyncio.to_thread(Path(retry_request.evaluate.execution.worktree, "hi.txt").unlink)
    retry = ActivityEnvironment()
    retry.info = dataclasses.replace(retry.info, attempt=2, heartbeat_details=list(merging[-1]))
    again = await retry.run(fused.evaluate_and_merge_step, retry_request)
    assert again.evaluation == done.evaluation
    assert again.merge is not None and again.merge.merged
    assert show(repo, retry_request.merge.integration_branch, "hi.txt") == "again"
