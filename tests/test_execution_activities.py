"""The execution activities on real git repositories with the shell executor:
steps see their dependencies' merged work, independent steps both merge, a
conflict is a red result naming the file, `url` repositories go through a
bare remote, completion modes, and cancellation killing a `sleep 600`."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from temporalio import workflow
from temporalio.client import WorkflowFailureError
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment
from temporalio.worker import Worker

from activities.execution import ExecutionActivities
from makima.completion import MAX_PR_BODY
from makima.contracts import (
    CheckoutInput,
    CleanupInput,
    CompleteInput,
    ExecuteInput,
    ExecuteOutput,
    MergeInput,
    PrepareInput,
    ReworkContext,
)
from makima.git import GitRepository
from makima.models import (
    Completion,
    Confidence,
    DirectiveSpec,
    ExecutorKind,
    PlannedStep,
    Repository,
    StepState,
    StepStatus,
)
from makima.workspace import session_home, step_folders
from tests.fakes.repos import install_fake, make_repo, set_identity, sh, show

DIRECTIVE = "directive-test-0001"


@pytest.fixture(autouse=True)
def identity(monkeypatch: pytest.MonkeyPatch) -> None:
    set_identity(monkeypatch)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "repo", {"README.md": "hello\n", "shared.txt": "one\ntwo\n"})


@pytest.fixture
def acts(tmp_path: Path) -> ExecutionActivities:
    return ExecutionActivities(tmp_path / "home", heartbeat_interval=0.5)


def spec_for(repository: Repository, **changes: object) -> DirectiveSpec:
    return DirectiveSpec(title="Test", goal="do things", repository=repository,
                         executor=ExecutorKind.SHELL, **changes)


async def prepare(acts: ExecutionActivities, repository: Repository) -> str:
    out = await acts.prepare_repository(PrepareInput(directive_id=DIRECTIVE, repository=repository))
    return out.integration_branch


async def execute(acts: ExecutionActivities, spec: DirectiveSpec, integration: str, name: str,
                  command: str | None, attempt: int = 1, rework: ReworkContext | None = None,
                  env: ActivityEnvironment | None = None) -> ExecuteOutput:
    request = ExecuteInput(directive_id=DIRECTIVE, generation=1, spec=spec,
                           step=PlannedStep(name=name, task_plan=f"do {name}", command=command),
                           attempt=attempt, integration_branch=integration, rework=rework)
    return await (env or ActivityEnvironment()).run(acts.execute_step, request)


async def merge(acts: ExecutionActivities, repository: Repository, integration: str,
                out: ExecuteOutput, name: str, attempt: int = 1):
    return await acts.merge_step(MergeInput(
        directive_id=DIRECTIVE, repository=repository, integration_branch=integration,
        step=name, attempt=attempt, branch=out.branch, commit=out.commit))


async def test_three_steps_each_see_the_merged_work_of_their_dependency(
        acts: ExecutionActivities, repo: Path) -> None:
    repository = Repository(path=str(repo))
    spec = spec_for(repository)
    integration = await prepare(acts, repository)
    assert integration == f"makima/{DIRECTIVE}"
    user_head = sh("git", "rev-parse", "HEAD", cwd=repo)

    a = await execute(acts, spec, integration, "alpha",
                      'echo "alpha $MAKIMA_STEP $MAKIMA_ATTEMPT" > a.txt')
    assert a.success and a.commit and a.changed_files == ["a.txt"]
    assert a.branch == f"makima/{DIRECTIVE}--steps/alpha"
    assert (await merge(acts, repository, integration, a, "alpha")).merged

    b = await execute(acts, spec, integration, "beta", "cat a.txt > b.txt && echo beta >> b.txt")
    assert b.success, b.output_tail
    assert (await merge(acts, repository, integration, b, "beta")).merged

    c = await execute(acts, spec, integration, "gamma", "cat b.txt > c.txt")
    assert c.success, c.output_tail
    merged = await merge(acts, repository, integration, c, "gamma")
    assert merged.merged

    assert show(repo, integration, "c.txt") == "alpha alpha 1\nbeta"
    log = sh("git", "log", "--format=%s", integration, cwd=repo)
    assert f"makima: {DIRECTIVE} step gamma attempt 1" in log
    # The user's checkout was not touched.
    assert sh("git", "rev-parse", "HEAD", cwd=repo) == user_head
    assert sh("git", "status", "--porcelain", cwd=repo) == ""


async def test_independent_steps_editing_different_files_both_merge(
        acts: ExecutionActivities, repo: Path) -> None:
    repository = Repository(path=str(repo))
    spec = spec_for(repository)
    integration = await prepare(acts, repository)
    left = await execute(acts, spec, integration, "left", "echo left > left.txt")
    right = await execute(acts, spec, integration, "right", "echo right > right.txt")
    first, second = await asyncio.gather(merge(acts, repository, integration, left, "left"),
                                         merge(acts, repository, integration, right, "right"))
    assert first.merged and second.merged
    assert show(repo, integration, "left.txt") == "left"
    assert show(repo, integration, "right.txt") == "right"
    # Merging the same commit again is a no-op that still says merged.
    again = await merge(acts, repository, integration, left, "left")
    assert again.merged
    assert again.commit == sh("git", "rev-parse", integration, cwd=repo)


async def test_two_steps_editing_the_same_line_second_merge_conflicts(
        acts: ExecutionActivities, repo: Path) -> None:
    repository = Repository(path=str(repo))
    spec = spec_for(repository)
    integration = await prepare(acts, repository)
    one = await execute(acts, spec, integration, "one", "sed -i 's/^one$/ONE/' shared.txt")
    two = await execute(acts, spec, integration, "two", "sed -i 's/^one$/uno/' shared.txt")
    assert (await merge(acts, repository, integration, one, "one")).merged
    head = sh("git", "rev-parse", integration, cwd=repo)
    conflict = await merge(acts, repository, integration, two, "two")
    assert not conflict.merged
    assert conflict.conflict_files == ["shared.txt"]
    assert "shared.txt" in conflict.message and "merged in" in conflict.message
    # Nothing moved and nothing was left half-merged.
    assert sh("git", "rev-parse", integration, cwd=repo) == head
    assert show(repo, integration, "shared.txt") == "ONE\ntwo"
    assert sh("git", "status", "--porcelain", cwd=repo) == ""


async def test_failed_command_is_a_failed_attempt_with_its_output(
        acts: ExecutionActivities, repo: Path) -> None:
    repository = Repository(path=str(repo))
    integration = await prepare(acts, repository)
    out = await execute(acts, spec_for(repository), integration, "broken",
                        "echo 'tests: 3 failed' ; exit 4")
    assert not out.success and out.exit_code == 4
    assert "tests: 3 failed" in out.output_tail
    assert out.commit is None


async def test_shell_step_without_command_is_a_non_retryable_error(
        acts: ExecutionActivities, repo: Path) -> None:
    repository = Repository(path=str(repo))
    integration = await prepare(acts, repository)
    with pytest.raises(ApplicationError) as caught:
        await execute(acts, spec_for(repository), integration, "nocommand", None)
    assert caught.value.non_retryable and "nocommand" in str(caught.value)


async def test_rework_attempt_continues_from_the_previous_attempt(
        acts: ExecutionActivities, repo: Path) -> None:
    repository = Repository(path=str(repo))
    spec = spec_for(repository)
    integration = await prepare(acts, repository)
    first = await execute(acts, spec, integration, "fix", "echo draft > work.txt")
    rework = ReworkContext(attempt=2, feedback="too short", instructions="add a line")
    second = await execute(acts, spec, integration, "fix",
                           'echo "$MAKIMA_REWORK_INSTRUCTIONS" >> work.txt', attempt=2,
                           rework=rework)
    assert second.success and second.commit != first.commit
    assert show(repo, second.commit or "", "work.txt") == "draft\nadd a line"
    assert "fix-a2" in second.worktree
    # A rework that changes nothing still hands back the unmerged work to judge.
    third = await execute(acts, spec, integration, "fix", "true", attempt=3,
                          rework=ReworkContext(attempt=3))
    assert third.commit == second.commit and third.changed_files == ["work.txt"]


async def test_prepare_is_idempotent_and_refuses_bad_repositories(
        acts: ExecutionActivities, repo: Path, tmp_path: Path) -> None:
    repository = Repository(path=str(repo))
    integration = await prepare(acts, repository)
    out = await execute(acts, spec_for(repository), integration, "s", "echo x > x.txt")
    await merge(acts, repository, integration, out, "s")
    head = sh("git", "rev-parse", integration, cwd=repo)
    await prepare(acts, repository)  # a retry neither fails nor moves the branch
    assert sh("git", "rev-parse", integration, cwd=repo) == head

    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(ApplicationError) as caught:
        await prepare(acts, Repository(path=str(plain)))
    assert caught.value.non_retryable and "is not a git repository" in str(caught.value)

    with pytest.raises(ApplicationError) as caught:
        await prepare(acts, Repository(path=str(repo), base_branch="develop"))
    assert caught.value.non_retryable and "develop" in str(caught.value)


async def test_url_repository_goes_through_a_bare_remote(
        acts: ExecutionActivities, repo: Path, tmp_path: Path) -> None:
    remote = tmp_path / "remote.git"
    sh("git", "clone", "--bare", "--quiet", str(repo), str(remote), cwd=tmp_path)
    repository = Repository(url=str(remote))
    spec = spec_for(repository)
    integration = await prepare(acts, repository)
    assert sh("git", "rev-parse", integration, cwd=remote)  # pushed back

    a = await execute(acts, spec, integration, "alpha", "echo from-alpha > a.txt")
    assert sh("git", "rev-parse", a.branch, cwd=remote) == a.commit
    assert (await merge(acts, repository, integration, a, "alpha")).merged
    assert show(remote, integration, "a.txt") == "from-alpha"

    # A second worker (empty MAKIMA_HOME) picks the work up from the remote.
    other = ExecutionActivities(tmp_path / "home2", heartbeat_interval=0.5)
    b = await execute(other, spec, integration, "beta", "cat a.txt > b.txt")
    assert b.success, b.output_tail
    assert (await merge(other, repository, integration, b, "beta")).merged
    assert show(remote, integration, "b.txt") == "from-alpha"


async def test_checkout_step_describes_a_hand_fixed_branch(
        acts: ExecutionActivities, repo: Path) -> None:
    repository = Repository(path=str(repo))
    spec = spec_for(repository)
    integration = await prepare(acts, repository)
    out = await execute(acts, spec, integration, "hand", "echo bad > h.txt; exit 1")
    # A person fixes the step by hand in the attempt's worktree and commits there.
    worktree = Path(out.worktree)
    (worktree / "h.txt").write_text("good\n")
    sh("git", "commit", "--quiet", "-am", "fix by hand", cwd=worktree)
    fixed = sh("git", "rev-parse", "HEAD", cwd=worktree)

    checked = await acts.checkout_step(CheckoutInput(
        directive_id=DIRECTIVE, generation=1, repository=spec.repository, step="hand", attempt=2,
        integration_branch=integration))
    assert checked.success and checked.commit == fixed
    assert checked.changed_files == ["h.txt"]
    assert (Path(checked.worktree) / "h.txt").read_text() == "good\n"
    assert sh("git", "rev-parse", out.branch, cwd=repo) == fixed  # the branch followed
    # The re-evaluated commit merges like any attempt.
    merged = await merge(acts, repository, integration, checked, "hand", attempt=2)
    assert merged.merged and show(repo, integration, "h.txt") == "good"


async def test_cleanup_removes_the_steps_worktrees_and_is_idempotent(
        acts: ExecutionActivities, repo: Path) -> None:
    repository = Repository(path=str(repo))
    spec = spec_for(repository)
    integration = await prepare(acts, repository)
    first = await execute(acts, spec, integration, "tidy", "echo 1 > t.txt")
    second = await execute(acts, spec, integration, "tidy", "echo 2 > t.txt", attempt=2)
    keep = await execute(acts, spec, integration, "tidy-up", "echo 3 > u.txt")
    # Claude Code's session homes: one of a try that crashed and was never retried
    crashed = session_home(Path(first.worktree).parent / "tidy-a3-t1")
    kept_home = session_home(Path(keep.worktree))
    for folder in (crashed, kept_home):
        (folder / ".claude").mkdir(parents=True)
    request = CleanupInput(directive_id=DIRECTIVE, repository=repository, step="tidy")
    assert (await acts.cleanup_step(request)).removed
    assert not _exists(first.worktree) and not _exists(second.worktree)
    assert not crashed.exists() and kept_home.exists()
    assert _exists(keep.worktree)  # another step's worktree stays
    assert not (await acts.cleanup_step(request)).removed
    assert str(first.worktree) not in sh("git", "worktree", "list", cwd=repo)


async def test_a_merge_asked_to_removes_the_steps_worktrees_once_merged(
        acts: ExecutionActivities, repo: Path) -> None:
    repository = Repository(path=str(repo))
    spec = spec_for(repository)
    integration = await prepare(acts, repository)
    one = await execute(acts, spec, integration, "one", "sed -i 's/^one$/ONE/' shared.txt")
    two = await execute(acts, spec, integration, "two", "sed -i 's/^one$/uno/' shared.txt")
    other = await execute(acts, spec, integration, "other", "echo o > o.txt")

    def asked(out: ExecuteOutput, name: str) -> MergeInput:
        return MergeInput(directive_id=DIRECTIVE, repository=repository,
                          integration_branch=integration, step=name, attempt=1,
                          branch=out.branch, commit=out.commit, remove_worktrees=True)

    merged = await acts.merge_step(asked(one, "one"))
    assert merged.merged and merged.removed_worktrees
    assert not _exists(one.worktree)
    assert str(one.worktree) not in sh("git", "worktree", "list", cwd=repo)
    # a conflict keeps the worktree (the step is not done), as does not asking
    conflict = await acts.merge_step(asked(two, "two"))
    assert not conflict.merged and not conflict.removed_worktrees and _exists(two.worktree)
    plain = await merge(acts, repository, integration, other, "other")
    assert plain.merged and not plain.removed_worktrees and _exists(other.worktree)


# ----------------------------------------------------------------------------- completion


async def _directive_with_work(acts: ExecutionActivities, repository: Repository,
                               completion: Completion) -> CompleteInput:
    spec = spec_for(repository, completion=completion)
    integration = await prepare(acts, repository)
    out = await execute(acts, spec, integration, "feature", "echo feature > feature.txt")
    assert (await merge(acts, repository, integration, out, "feature")).merged
    steps = [StepState(name="feature", status=StepStatus.PASSED, attempts=1, score=0.93,
                       confidence=Confidence.GREEN, summary="added feature.txt; tests pass",
                       commit=out.commit)]
    return CompleteInput(directive_id=DIRECTIVE, spec=spec, integration_branch=integration,
                         steps=steps)


async def test_merge_completion_fast_forwards_the_base_branch(
        acts: ExecutionActivities, repo: Path, tmp_path: Path) -> None:
    # A bare repository: the base branch is checked out nowhere.
    bare = tmp_path / "bare.git"
    sh("git", "clone", "--bare", "--quiet", str(repo), str(bare), cwd=tmp_path)
    request = await _directive_with_work(acts, Repository(path=str(bare)), Completion.MERGE)
    out = await acts.complete_directive(request)
    assert out.done, out.message
    assert sh("git", "rev-parse", "main", cwd=bare) == sh(
        "git", "rev-parse", request.integration_branch, cwd=bare)


async def test_merge_completion_updates_a_checked_out_base_branch_and_its_files(
        acts: ExecutionActivities, repo: Path) -> None:
    request = await _directive_with_work(acts, Repository(path=str(repo)), Completion.MERGE)
    out = await acts.complete_directive(request)
    assert out.done, out.message
    assert (repo / "feature.txt").read_text() == "feature\n"
    assert sh("git", "status", "--porcelain", cwd=repo) == ""


async def test_merge_completion_refuses_when_the_base_branch_moved(
        acts: ExecutionActivities, repo: Path) -> None:
    request = await _directive_with_work(acts, Repository(path=str(repo)), Completion.MERGE)
    (repo / "other.txt").write_text("meanwhile\n")
    sh("git", "add", "other.txt", cwd=repo)
    sh("git", "commit", "--quiet", "-m", "meanwhile", cwd=repo)
    moved = sh("git", "rev-parse", "main", cwd=repo)
    out = await acts.complete_directive(request)
    assert not out.done
    assert "moved" in out.message and "fast-forward" in out.message
    assert sh("git", "rev-parse", "main", cwd=repo) == moved


async def test_pr_completion_pushes_and_opens_a_pull_request_whose_body_is_the_report(
        acts: ExecutionActivities, repo: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The body is what the worker's report source writes (the read model's
    report: tests/test_console.py checks it is `makima report`'s text), cut to
    what GitHub accepts; without a report source no pull request is opened."""
    remote = tmp_path / "origin.git"
    sh("git", "init", "--bare", "--quiet", str(remote), cwd=tmp_path)
    sh("git", "remote", "add", "origin", str(remote), cwd=repo)
    bin_dir = tmp_path / "bin"
    install_fake("gh", bin_dir)
    gh_log = tmp_path / "gh.log"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_GH_LOG", str(gh_log))

    request = await _directive_with_work(acts, Repository(path=str(repo)), Completion.PR)
    out = await acts.complete_directive(request)
    assert not out.done and "no read model to write the directive's report" in out.message
    assert not gh_log.exists()

    asked = []

    async def report(for_request: CompleteInput) -> str:
        asked.append(for_request.directive_id)
        return "# Test\n\n- [x] does things\n" + "x" * (MAX_PR_BODY + 10)

    acts.reports = report
    out = await acts.complete_directive(request)
    assert out.done, out.message
    assert out.url == "https://github.example/acme/repo/pull/7"
    assert asked == [request.directive_id]
    call = json.loads(gh_log.read_text().splitlines()[0])
    argv = call["argv"]
    assert argv[:2] == ["pr", "create"]
    assert argv[argv.index("--base") + 1] == "main"
    assert argv[argv.index("--head") + 1] == request.integration_branch
    assert argv[argv.index("--title") + 1] == "Test"
    body = argv[argv.index("--body") + 1]
    assert body.startswith("# Test\n\n- [x] does things\nxxx")
    assert body.endswith(f"[… truncated: `makima report {request.directive_id}` prints it "
                         "whole]\n")
    assert len(body) < MAX_PR_BODY + 100
    # The branch was pushed before the pull request was asked for.
    assert sh("git", "rev-parse", request.integration_branch, cwd=remote)


async def test_pr_completion_without_gh_says_so(
        acts: ExecutionActivities, repo: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    request = await _directive_with_work(acts, Repository(path=str(repo)), Completion.PR)
    empty = tmp_path / "nobin"
    empty.mkdir()
    git_dir = Path(sh("which", "git", cwd=tmp_path)).parent
    monkeypatch.setenv("PATH", f"{empty}{os.pathsep}{git_dir}")
    out = await acts.complete_directive(request)
    assert not out.done and "gh" in out.message


# ----------------------------------------------------------------------------- cancellation


@workflow.defn(sandboxed=False)
class RunStepWorkflow:
    """Runs one execute_step, as the step workflow does, so it can be cancelled."""

    @workflow.run
    async def run(self, request: ExecuteInput) -> ExecuteOutput:
        return await workflow.execute_activity(
            "execute_step", request, result_type=ExecuteOutput,
            start_to_close_timeout=timedelta(minutes=5), heartbeat_timeout=timedelta(seconds=30),
            retry_policy=RetryPolicy(maximum_attempts=1))


def _exists(path: str) -> bool:
    return Path(path).exists()


def _pid_running(*argv: str) -> int | None:
    """The pid of a process whose command line is exactly `argv`."""
    wanted = "\0".join(argv) + "\0"
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_text() == wanted:
                    return int(entry.name)
            except OSError:
                continue
    return None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has been killed; only its exit status is left


async def test_cancelling_execute_step_kills_the_command_within_5_seconds(
        repo: Path, tmp_path: Path, client, task_queue: str) -> None:
    acts = ExecutionActivities(tmp_path / "home")  # the production heartbeat interval
    repository = Repository(path=str(repo))
    integration = await prepare(acts, repository)
    # The command runs in the sandbox's own PID namespace (and may not write outside
    # its worktree), so the test finds the sleep by its unique argument.
    duration = f"600.{uuid.uuid4().int % 10**9}"
    request = ExecuteInput(
        directive_id=DIRECTIVE, generation=1, spec=spec_for(repository),
        step=PlannedStep(name="sleepy", command=f"sleep {duration} & wait"),
        integration_branch=integration)
    sleep_pid = None
    async with Worker(client, task_queue=task_queue, workflows=[RunStepWorkflow],
                      activities=acts.activities(),
                      max_heartbeat_throttle_interval=timedelta(seconds=1),
                      default_heartbeat_throttle_interval=timedelta(seconds=1)):
        handle = await client.start_workflow(RunStepWorkflow.run, request,
                                             id=f"cancel-{uuid.uuid4()}", task_queue=task_queue)
        try:
            for _ in range(200):
                sleep_pid = _pid_running("sleep", duration)
                if sleep_pid is not None:
                    break
                await asyncio.sleep(0.1)
            assert sleep_pid is not None, "the step's sleep never started"
            assert _alive(sleep_pid)
            await handle.cancel()
            for _ in range(50):  # 5 s
                if not _alive(sleep_pid):
                    break
                await asyncio.sleep(0.1)
            assert not _alive(sleep_pid), "sleep 600 survived the cancellation for 5 s"
            with pytest.raises(WorkflowFailureError):
                await handle.result()
        finally:
            if sleep_pid is not None and _alive(sleep_pid):
                os.kill(sleep_pid, 9)


async def test_git_activities_heartbeat_while_they_run(acts: ExecutionActivities, repo: Path) -> None:
    """So a worker that dies mid-merge is noticed within GIT_HEARTBEAT_TIMEOUT."""
    beats: list[object] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *details: beats.append(details)
    repository = Repository(path=str(repo))
    out = await env.run(acts.prepare_repository,
                        PrepareInput(directive_id=DIRECTIVE, repository=repository))
    assert beats and "elapsed_seconds" in beats[0][0]
    beats.clear()
    await env.run(acts.cleanup_step, CleanupInput(directive_id=DIRECTIVE, repository=repository,
                                                   step="none"))
    assert beats, "cleanup_step sent no heartbeat"
    assert out.integration_branch == f"makima/{DIRECTIVE}"


async def test_execute_step_heartbeats_while_it_waits_for_the_repository_lock(
        acts: ExecutionActivities, repo: Path, tmp_path: Path) -> None:
    """Heartbeats start on the activity's first line: a try stuck behind another
    process's lock (or a slow clone or fetch) is not mistaken for a dead worker."""
    repository = Repository(path=str(repo))
    integration = await prepare(acts, repository)
    beats: list[object] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *details: beats.append(details[0])
    async with (await GitRepository.open(repository, tmp_path / "other-home")).lock():
        running = asyncio.create_task(
            execute(acts, spec_for(repository), integration, "waits", "echo ok > ok.txt", env=env))
        for _ in range(100):
            if len(beats) >= 3:
                break
            await asyncio.sleep(0.1)
        assert len(beats) >= 3, "no heartbeats while waiting for the lock"
        assert not step_folders(tmp_path / "home", DIRECTIVE, "waits"), "a worktree before the lock"
        assert not running.done()
    out = await asyncio.wait_for(running, 30)
    assert out.success and out.changed_files == ["ok.txt"]
    assert {beat["step"] for beat in beats} == {"waits"}  # type: ignore[index]


async def test_concurrent_merges_into_one_remote_all_succeed_first_time(
        repo: Path, tmp_path: Path) -> None:
    """Six workers (own homes, own clones) merge six steps into one remote at once:
    each merge_step succeeds on its first try, however often another pushed first."""
    remote = tmp_path / "remote.git"
    sh("git", "clone", "--bare", "--quiet", str(repo), str(remote), cwd=tmp_path)
    repository = Repository(url=str(remote))
    spec = spec_for(repository)
    workers = [ExecutionActivities(tmp_path / f"home{i}", heartbeat_interval=0.5)
               for i in range(6)]
    integration = await prepare(workers[0], repository)
    done = [await execute(w, spec, integration, f"s{i}", f"echo {i} > f{i}.txt")
            for i, w in enumerate(workers)]

    merged = await asyncio.gather(*(
        merge(w, repository, integration, out, f"s{i}")
        for i, (w, out) in enumerate(zip(workers, done, strict=True))))

    assert all(m.merged for m in merged), [m.message for m in merged]
    for i in range(6):
        assert show(remote, integration, f"f{i}.txt") == str(i)


async def test_a_retry_adopts_the_finished_attempt_instead_of_running_the_agent_again(
        acts: ExecutionActivities, repo: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent finished and committed, but Temporal never heard of it (the server
    was down): the retry returns the recorded result, and the agent runs once."""
    monkeypatch.setenv("MAKIMA_SANDBOX", "off")  # the command counts its runs outside
    repository = Repository(path=str(repo))
    spec = spec_for(repository)
    integration = await prepare(acts, repository)
    runs = tmp_path / "runs"
    command = f"echo ran >> {runs}; echo built > built.txt; echo 'the output'"
    first = await execute(acts, spec, integration, "build", command)
    assert first.success and not first.adopted

    retry = ActivityEnvironment()
    retry.info = dataclasses.replace(retry.info, attempt=2)
    again = await execute(acts, spec, integration, "build", command, env=retry)

    assert runs.read_text().split() == ["ran"], "the agent ran again"
    assert again.adopted and again.success and again.commit == first.commit
    assert "the output" in again.output_tail and again.changed_files == ["built.txt"]
    assert again.worktree != first.worktree  # checked out in the retry's own folder
    assert (Path(again.worktree) / "built.txt").read_text() == "built\n"

    # another attempt of the step (a rework) is work of its own: it runs
    rework = ReworkContext(attempt=2, feedback="again", instructions="again")
    redone = await execute(acts, spec, integration, "build", command, attempt=2,
                           rework=rework, env=retry)
    assert not redone.adopted and runs.read_text().split() == ["ran", "ran"]
