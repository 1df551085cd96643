"""The execution activities: prepare the repository, run a step attempt in its
own worktree, check a hand-fixed step branch out for re-evaluation, merge a
passed step, remove a step's worktrees, and complete the directive.

Thin wrappers over makima.git, makima.executors and makima.completion; they
translate makima's errors into `ApplicationError` (type = the error's class
name, non-retryable where a retry cannot help).

`execute_step` heartbeats every `heartbeat_interval` seconds (and whenever the
agent reports progress) with `{elapsed_seconds, turns, last_tool, session_id,
...}`; a retry of the same attempt reads the session id back from
`activity.info().heartbeat_details` and resumes it. Cancellation kills the
agent's whole process group within seconds, and reports what the attempt was
billed until then (activities/billing.py). Call it with
`start_to_close_timeout=EXECUTE_TIMEOUT` and
`heartbeat_timeout=AGENT_HEARTBEAT_TIMEOUT` (makima.constants), and run the
worker with `max_heartbeat_throttle_interval` of a few seconds so a cancel
reaches the activity promptly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from temporalio import activity

from activities.billing import cancelled_after, usage_in
from activities.errors import translated_errors
from activities.heartbeat import HEARTBEAT_INTERVAL_SECONDS, Heartbeat
from makima.completion import ReportSource, complete
from makima.constants import MAX_TEXT_IN_HISTORY
from makima.contracts import (
    ActivityName,
    CheckoutInput,
    CleanupInput,
    CleanupOutput,
    CompleteInput,
    CompleteOutput,
    ExecuteInput,
    ExecuteOutput,
    MergeInput,
    MergeOutput,
    PrepareInput,
    PrepareOutput,
    integration_branch,
    step_branch,
)
from makima.errors import GitError, MakimaError
from makima.executors import ExecutionRequest, Executor, Progress, executor_for
from makima.git import (
    GitRepository,
    MissingBranch,
    makima_home,
)
from makima.models import Repository, Usage
from makima.process import scrub_secrets, truncate_tail
from makima.workspace import (
    Workspace,
    is_inside_worktrees,
    record_directive,
    step_folders,
    step_session_homes,
)

#: The trailer of an attempt's commit that records its result (JSON on one line).
RESULT_TRAILER = "Makima-Result: "


def commit_message(directive_id: str, step: str, attempt: int, summary: str,
                   record: dict[str, Any] | None = None) -> str:
    title = f"makima: {directive_id} step {step} attempt {attempt}"
    message = f"{title}\n\n{summary.strip()}" if summary.strip() else title
    if record is not None:
        message += f"\n\n{RESULT_TRAILER}{json.dumps(record, separators=(',', ':'))}"
    return message


def attempt_key(input: ExecuteInput) -> str:
    """Names one attempt of one step of one generation, in its commit's record."""
    return f"{input.directive_id}/g{input.generation}/{input.step.name}/a{input.attempt}"


def _recorded_result(message: str) -> dict[str, Any] | None:
    for line in reversed(message.splitlines()):
        if line.startswith(RESULT_TRAILER):
            try:
                record = json.loads(line.removeprefix(RESULT_TRAILER))
            except ValueError:
                return None
            return record if isinstance(record, dict) else None
    return None


def _session_from_heartbeat(details: Any) -> str | None:
    for item in reversed(list(details or [])):
        if isinstance(item, dict) and item.get("session_id"):
            return str(item["session_id"])
    return None


def _resumed_from_heartbeat(details: Any) -> str | None:
    """The session an earlier try of this attempt resumed (it did not finish)."""
    for item in reversed(list(details or [])):
        if isinstance(item, dict):
            return item.get("resumed_session") or None
    return None


#: Characters of the interrupted try's output tail told to the try that starts over.
PREVIOUS_OUTPUT_CHARS = 1500


def _previous_try(details: Any, worktree_note: str, branch_story: str) -> str:
    """What an earlier, interrupted try of this attempt did, for the agent of a try
    that does not resume its session (another worker, or a resume that failed):
    what it reported, what the worktree starts from, the step branch's commits, and
    the end of its output."""
    last = next((item for item in reversed(list(details or [])) if isinstance(item, dict)), {})
    parts = []
    if last:
        turns = last.get("turns") or 0
        parts.append(f"It had taken {turns} turn{'' if turns == 1 else 's'} (last tool: "
                     f"{last.get('last_tool') or 'none'}) over {last.get('elapsed_seconds', 0)} s.")
    parts += [worktree_note, branch_story]
    tail = str(last.get("output_tail") or "").strip()
    if tail:
        parts.append(f"The end of its output:\n{tail}")
    parts.append("Check what is already done here, then finish the step's task.")
    return "\n".join(parts)


async def _step_branch_story(repo: GitRepository, branch: str, integration_head: str) -> str:
    """The step branch's commits beyond the integration branch (subjects) and their
    diff stat: what earlier attempts of this step pushed."""
    head = await repo.branch_head(branch)
    if head is None or await repo.is_ancestor(head, integration_head):
        return f"The step branch {branch} holds no commit of this step yet."
    log = await repo.run("log", "--format=- %s", "-n", "20", f"{integration_head}..{head}")
    stat = await repo.run("diff", "--stat", f"{integration_head}...{head}")
    return (f"The step branch {branch} holds these commits (newest first):\n"
            f"{log.stdout.strip()}\nTheir changes against the integration branch:\n"
            f"{truncate_tail(stat.stdout.strip(), 2000)}")


class ExecutionActivities:
    """Built once per worker: `ExecutionActivities(makima_home(), worker_queue=...)`."""

    def __init__(self, home: Path | None = None, *, worker_queue: str = "",
                 heartbeat_interval: float = HEARTBEAT_INTERVAL_SECONDS,
                 executors: Callable[[Any], Executor] = executor_for,
                 reports: ReportSource | None = None) -> None:
        self.home = (home or makima_home()).resolve()
        self.heartbeat_interval = heartbeat_interval
        #: this worker's own task queue, where the attempts whose worktrees it holds
        #: are evaluated, merged and cleaned up (worker.py)
        self.worker_queue = worker_queue
        self.executors = executors
        #: the directive's report, the body of the pull request `completion: pr` opens
        self.reports = reports

    def activities(self) -> list[Callable[..., Any]]:
        return [self.prepare_repository, self.execute_step, self.checkout_step,
                self.merge_step, self.cleanup_step, self.complete_directive]

    @contextlib.asynccontextmanager
    async def _alive(self) -> AsyncIterator[None]:
        """For the git activities: heartbeat from the first line, so a worker that dies
        mid-merge is noticed within the heartbeat timeout instead of the activity's
        whole start-to-close timeout, and translate makima errors."""
        started = time.monotonic()
        async with Heartbeat(lambda: [{"elapsed_seconds": round(time.monotonic() - started, 1)}],
                             self.heartbeat_interval):
            with translated_errors():
                yield

    async def _open(self, repository: Repository) -> GitRepository:
        return await GitRepository.open(repository, self.home)

    # ------------------------------------------------------------------ prepare
    @activity.defn(name=ActivityName.PREPARE_REPOSITORY.value)
    async def prepare_repository(self, input: PrepareInput) -> PrepareOutput:
        async with self._alive():
            repo = await self._open(input.repository)
            branch = integration_branch(input.directive_id)
            await repo.refuse_unusable(branch, input.repository.base_branch)
            async with repo.lock():
                base = await repo.ensure_integration_branch(branch, input.repository.base_branch)
            return PrepareOutput(integration_branch=branch, base_commit=base,
                                 repository_path=str(repo.path))

    # ------------------------------------------------------------------ execute
    @activity.defn(name=ActivityName.EXECUTE_STEP.value)
    async def execute_step(self, input: ExecuteInput) -> ExecuteOutput:
        # heartbeats from the first line: cloning, a lock wait and fetching take time too
        info = activity.info()
        # what earlier tries of this attempt were billed: every heartbeat passes it on
        # (activities/billing.py), and the executor's usage starts from it
        progress = Progress(session_id=_session_from_heartbeat(info.heartbeat_details),
                            usage=usage_in(info.heartbeat_details))
        state = _AttemptProgress(input.step.name, input.attempt, time.monotonic(), progress)
        async with Heartbeat(lambda: [state.details()], self.heartbeat_interval) as heartbeat:
            with translated_errors():
                try:
                    return await self._execute(input, state, heartbeat)
                except MakimaError as exc:
                    # the failure reports every try's usage, and so does the last
                    # heartbeat, for a retry
                    if exc.usage is None:
                        exc.usage = progress.usage
                    progress.usage = exc.usage
                    heartbeat.beat()
                    raise
                except asyncio.CancelledError:
                    # a stop between two calls (a tool running): the turns so far
                    stopped = cancelled_after(progress.usage)
                    if stopped is None:
                        raise
                    raise stopped from None

    async def _execute(self, input: ExecuteInput, state: _AttemptProgress,
                       heartbeat: Heartbeat) -> ExecuteOutput:
        started = state.started
        progress = state.progress
        info = activity.info()
        step = input.step.name
        branch = step_branch(input.directive_id, step)
        executor = self.executors(input.spec.executor)
        repo = await self._open(input.spec.repository)
        # A directory of its own for every try: a try that was cut off may still have a
        # process writing into its directory (until its worker's death reaches it).
        workspace = Workspace(self.home, input.directive_id, step, input.attempt, info.attempt)
        await asyncio.to_thread(record_directive, self.home, input.directive_id)
        worktree = workspace.path
        previous_workspace = workspace.previous_try()
        previous = previous_workspace.path if previous_workspace else None
        resume_session_id = progress.session_id
        if resume_session_id and _resumed_from_heartbeat(info.heartbeat_details) == resume_session_id:
            # A try resumed this very session already and did not finish: never loop on
            # a resume that fails; start a new session told what happened instead.
            resume_session_id = None
        previous_try = ""
        async with repo.lock():
            await repo.check_branch_name(branch)
            await repo.fetch_branch(input.integration_branch, required=True)
            integration_head = await repo.branch_head(input.integration_branch)
            if integration_head is None:
                raise MissingBranch(f"integration branch {input.integration_branch} does not "
                                    "exist; prepare_repository must run first")
            start = integration_head
            if input.rework is not None and input.attempt > 1:
                # Rework: the agent fixes its own previous attempt.
                await repo.fetch_branch(branch)
                start = await repo.branch_head(branch) or integration_head
            if previous is not None:
                # A retry: the attempt may have finished already, and only its report to
                # Temporal got lost (a server restart). Then adopt it; never redo it.
                adopted = await self._adopt_finished(repo, input, branch, integration_head,
                                                     worktree)
                if adopted is not None:
                    return adopted
            conflicts: list[str] = []
            if (previous and resume_session_id
                    and await asyncio.to_thread(_exists, previous / ".git")):
                # Resuming an agent session here: it expects the files it wrote so far
                # (caught up with the integration branch already, by that try). Only
                # then: other retries never take a cut-off try's files, which a process
                # of it may have written until its worker's death reached it.
                start = await repo.commit_attempt(previous, commit_message(
                    input.directive_id, step, input.attempt, f"interrupted try {info.attempt - 1}"))
                await repo.add_worktree(worktree, start)
                previous_try = _previous_try(
                    info.heartbeat_details,
                    f"The worktree holds what it wrote (commit {start[:12]}).",
                    await _step_branch_story(repo, branch, integration_head))
            else:
                if previous:
                    resume_session_id = None  # no session, or its file is on another machine
                    await repo.fetch_branch(branch)
                    previous_try = _previous_try(
                        info.heartbeat_details,
                        f"Its files were not kept; the worktree starts from commit "
                        f"{start[:12]}.",
                        await _step_branch_story(repo, branch, integration_head))
                await repo.add_worktree(worktree, start)
                if start != integration_head:
                    conflicts = await _catch_up(repo, worktree, integration_head,
                                                input.integration_branch)

        # what earlier tries of this attempt were billed (resumed or not, it was spent)
        resume_usage = progress.usage
        progress.session_id = resume_session_id
        state.resumed_session = resume_session_id
        request = ExecutionRequest(
            directive_id=input.directive_id, spec=input.spec, step=input.step,
            attempt=input.attempt, worktree=worktree, rework=input.rework,
            resume_session_id=resume_session_id, resume_usage=resume_usage, conflicts=conflicts,
            resume_from=previous, previous_try=previous_try,
            on_progress=lambda _: heartbeat.beat(), progress=progress)
        result = await executor.run(request)

        session_id = result.session_id or progress.session_id
        head = await repo.commit_attempt(worktree, commit_message(
            input.directive_id, step, input.attempt, result.summary, record={
                "attempt": attempt_key(input), "success": result.success,
                "exit_code": result.exit_code, "summary": result.summary[:MAX_TEXT_IN_HISTORY],
                "output_tail": truncate_tail(result.output_tail, MAX_TEXT_IN_HISTORY),
                "session_id": session_id, "usage": result.usage.model_dump(mode="json")}))
        async with repo.lock():
            # publishing the commit and describing it need nothing of each other: at
            # once, on the path from this agent to the next step's
            _, changes = await asyncio.gather(self._publish(repo, branch, head),
                                              repo.describe(integration_head, head))
            # No commit when the integration branch holds all of it already (nothing
            # to evaluate or merge); a rework that changed nothing still hands back
            # the previous attempt's unmerged commit. A try that started on the
            # integration head holds it already or is a new commit on top of it.
            contained = head == integration_head or (
                start != integration_head and await repo.is_ancestor(head, integration_head))
        return ExecuteOutput(
            success=result.success,
            exit_code=result.exit_code,
            branch=branch,
            commit=None if contained else head,
            worktree=str(worktree),
            changed_files=changes.files,
            diff_stat=changes.diff_stat,
            output_tail=truncate_tail(result.output_tail, MAX_TEXT_IN_HISTORY),
            summary=result.summary[:MAX_TEXT_IN_HISTORY],
            session_id=session_id,
            duration_seconds=round(time.monotonic() - started, 3),
            usage=result.usage,
            worker_queue=self.worker_queue,
        )

    @staticmethod
    async def _publish(repo: GitRepository, branch: str, head: str) -> None:
        """The step branch at the attempt's commit, here and on the remote."""
        await repo.set_branch(branch, head)
        await repo.push_branch(branch, force=True)

    async def _adopt_finished(self, repo: GitRepository, input: ExecuteInput, branch: str,
                              integration_head: str, worktree: Path) -> ExecuteOutput | None:
        """This attempt's result, when an earlier try committed it to the step branch
        (the commit's `Makima-Result` record names the attempt), checked out here for
        the evaluation; else None. An attempt that changed nothing leaves no commit,
        so it is run again."""
        await repo.fetch_branch(branch)
        head = await repo.branch_head(branch)
        if head is None:
            return None
        message = await repo.run("log", "-1", "--format=%B", head)
        record = _recorded_result(message.stdout)
        if record is None or record.get("attempt") != attempt_key(input):
            return None
        await repo.add_worktree(worktree, head)
        changes = await repo.describe(integration_head, head)
        contained = await repo.is_ancestor(head, integration_head)
        return ExecuteOutput(
            success=bool(record.get("success")), exit_code=record.get("exit_code"),
            branch=branch, commit=None if contained else head, worktree=str(worktree),
            changed_files=changes.files, diff_stat=changes.diff_stat,
            output_tail=str(record.get("output_tail") or ""),
            summary=str(record.get("summary") or ""), session_id=record.get("session_id"),
            usage=Usage.model_validate(record.get("usage") or {}),
            worker_queue=self.worker_queue, adopted=True)

    # ------------------------------------------------------------------ checkout
    @activity.defn(name=ActivityName.CHECKOUT_STEP.value)
    async def checkout_step(self, input: CheckoutInput) -> ExecuteOutput:
        async with self._alive():
            repo = await self._open(input.repository)
            branch = step_branch(input.directive_id, input.step)
            await asyncio.to_thread(record_directive, self.home, input.directive_id)
            worktree = Workspace(self.home, input.directive_id, input.step, input.attempt,
                                 activity.info().attempt if activity.in_activity() else 1).path
            async with repo.lock():
                await repo.fetch_branch(branch)
                await repo.fetch_branch(input.integration_branch, required=True)
                head = await repo.branch_head(branch)
                if head is None:
                    raise MissingBranch(f"step {input.step} has no branch {branch} to check out")
                head = await self._adopt_worktree_commits(repo, input.directive_id, input.step,
                                                          branch, head)
                integration_head = await repo.branch_head(input.integration_branch)
                await repo.add_worktree(worktree, head)
                changes = await repo.describe(integration_head or head, head)
            return ExecuteOutput(
                success=True, exit_code=0, branch=branch, commit=head, worktree=str(worktree),
                changed_files=changes.files, diff_stat=changes.diff_stat,
                summary=f"checked out {branch} at {head[:12]} for re-evaluation",
                worker_queue=self.worker_queue)

    async def _adopt_worktree_commits(self, repo: GitRepository, directive_id: str, step: str,
                                      branch: str, head: str) -> str:
        """Attempt worktrees are detached, so a person who committed a fix inside one
        left the step branch behind; move the branch forward to such a commit."""
        for path in await asyncio.to_thread(step_folders, self.home, directive_id, step):
            result = await repo.run("rev-parse", "HEAD", cwd=path, check=False)
            candidate = result.stdout.strip()
            if (result.code == 0 and candidate and candidate != head
                    and await repo.is_ancestor(head, candidate)):
                await repo.set_branch(branch, candidate, expected=head)
                await repo.push_branch(branch, force=True)
                head = candidate
        return head

    # ------------------------------------------------------------------ merge
    @activity.defn(name=ActivityName.MERGE_STEP.value)
    async def merge_step(self, input: MergeInput) -> MergeOutput:
        async with self._alive():
            return await self.merge(input)

    async def merge(self, input: MergeInput) -> MergeOutput:
        """Merge the attempt's commit into the integration branch (the body of
        `merge_step`, also run by `evaluate_and_merge_step`)."""
        repo = await self._open(input.repository)
        target = input.integration_branch
        if not input.commit:
            head = await repo.branch_head(target)
            return MergeOutput(merged=True, commit=head, message=(
                f"step {input.step} attempt {input.attempt} changed nothing; nothing to merge"),
                removed_worktrees=await self._removed_after_merge(repo, input))
        async with repo.lock(f"directive-{input.directive_id}"), repo.lock():
            await repo.fetch_branch(input.branch)
            try:
                result = await repo.publish_merge(target, input.commit, (
                    f"makima: merge step {input.step} (attempt {input.attempt}) into {target}"))
            except GitError:
                # asked only now: on the path to the next step, a merge that works
                # spends no process on it
                if await repo.resolve(input.commit) is None:
                    raise MissingBranch(f"commit {input.commit} of step {input.step} is not in "
                                        f"the repository (branch {input.branch})") from None
                raise
        if not result.merged:
            files = ", ".join(result.conflict_files) or "(git named no file)"
            return MergeOutput(merged=False, commit=result.head,
                               conflict_files=result.conflict_files, message=(
                f"merging step {input.step} (attempt {input.attempt}) into {target} conflicts "
                f"in: {files}. Nothing was merged; a rework starts from the step's work with "
                f"{target} merged in, conflict markers included."))
        return MergeOutput(merged=True, commit=result.head,
                           message=f"merged step {input.step} into {target} at "
                                   f"{result.head[:12]}",
                           removed_worktrees=await self._removed_after_merge(repo, input))

    async def _removed_after_merge(self, repo: GitRepository, input: MergeInput) -> bool:
        """Remove the merged step's worktrees here when asked; True when done. A
        failure leaves them to cleanup_step, and never fails a merge that happened."""
        if not input.remove_worktrees:
            return False
        try:
            await self._remove_step_worktrees(repo, input.directive_id, input.step)
        except (MakimaError, OSError) as exc:
            activity.logger.warning("merged step %s, but removing its worktrees failed (the "
                                    "cleanup activity tries again): %s", input.step, exc)
            return False
        return True

    # ------------------------------------------------------------------ cleanup
    @activity.defn(name=ActivityName.CLEANUP_STEP.value)
    async def cleanup_step(self, input: CleanupInput) -> CleanupOutput:
        async with self._alive():
            try:
                repo: GitRepository | None = await self._open(input.repository)
            except MakimaError:
                repo = None  # the repository is gone: its worktrees are plain folders now
            extra: list[Path] = []
            if input.worktree:
                given = _absolute(input.worktree)
                # Only ever delete inside makima's own folder.
                if is_inside_worktrees(self.home, given):
                    extra.append(given)
            return CleanupOutput(removed=await self._remove_step_worktrees(
                repo, input.directive_id, input.step, extra))

    async def _remove_step_worktrees(self, repo: GitRepository | None, directive_id: str,
                                     step: str, extra: list[Path] | None = None) -> bool:
        """Remove every worktree of `step` on this worker (and `extra` ones), and its
        Claude Code session homes (a try that crashed and was never retried left its
        session there); True when there was a worktree. Without `repo` (gone) they
        are plain folders."""
        candidates = await asyncio.to_thread(step_folders, self.home, directive_id, step)
        candidates += [path for path in extra or [] if path not in candidates]
        removed = False
        for path in candidates:
            if repo is not None:
                removed |= await repo.remove_worktree(path)
            elif await asyncio.to_thread(path.exists):
                await asyncio.to_thread(shutil.rmtree, path, True)
                removed = True
        for path in await asyncio.to_thread(step_session_homes, self.home, directive_id, step):
            await asyncio.to_thread(shutil.rmtree, path, True)
        return removed

    # ------------------------------------------------------------------ complete
    @activity.defn(name=ActivityName.COMPLETE_DIRECTIVE.value)
    async def complete_directive(self, input: CompleteInput) -> CompleteOutput:
        async with self._alive():
            repo = await self._open(input.spec.repository)
            async with repo.lock(f"directive-{input.directive_id}"), repo.lock():
                await repo.fetch_branch(input.integration_branch)
                return await complete(repo, input, self.reports)


async def _catch_up(repo: GitRepository, worktree: Path, integration_head: str,
                    integration_branch: str) -> list[str]:
    """A rework starts from its step branch with the integration branch merged in, so
    work merged meanwhile (the cause of a merge conflict) is in its worktree; a
    conflict is left there, markers included, for the agent. Returns its files."""
    return await repo.merge_into_worktree(
        worktree, integration_head, f"makima: merge {integration_branch} into the step's work")


def _exists(path: Path) -> bool:
    return path.exists()


def _absolute(path: str) -> Path:
    return Path(path).resolve()


class _AttemptProgress:
    """Progress of one running attempt: its heartbeat details."""

    def __init__(self, step: str, attempt: int, started: float, progress: Progress) -> None:
        self.step = step
        self.attempt = attempt
        self.started = started
        self.progress = progress
        #: the session this try resumes: a next try must not resume it again
        self.resumed_session: str | None = None

    def details(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "attempt": self.attempt,
            "elapsed_seconds": round(time.monotonic() - self.started, 1),
            "turns": self.progress.turns,
            "last_tool": self.progress.last_tool,
            "session_id": self.progress.session_id,
            "note": self.progress.note[:200],
            "usage": (self.progress.usage.model_dump(mode="json")
                      if self.progress.usage is not None else None),
            "resumed_session": self.resumed_session,
            "output_tail": scrub_secrets(truncate_tail(self.progress.output_tail,
                                                       PREVIOUS_OUTPUT_CHARS)),
        }
