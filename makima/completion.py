"""What happens to a completed directive's integration branch (`spec.completion`):

- `branch` (default): left as it is for a person to review and merge;
- `merge`: the base branch is fast-forwarded to it, refused (with a message
  saying why) when the base branch moved since the directive started or when
  its checked-out working tree has changes that would be overwritten;
- `pr`: the branch is pushed and a pull request opened with `gh pr create`,
  whose body is the directive's report (makima/report.py: each acceptance
  criterion with its evidence, each step's outcome); when `gh` is not on PATH
  or the repository has no remote, nothing happens and the answer says so.

Never raises for those refusals: the directive is complete either way, and the
answer (`CompleteOutput.done=False` with the reason) becomes an event.
"""

from __future__ import annotations

import shutil
from collections.abc import Awaitable, Callable

from makima.contracts import CompleteInput, CompleteOutput
from makima.git import REMOTE, GitRepository, git
from makima.models import Completion
from makima.process import run_process

#: Longest pull request body sent to gh (GitHub refuses bodies over 65536 chars).
MAX_PR_BODY = 60_000
GH_TIMEOUT_SECONDS = 120.0

#: Writes a completed directive's report (the worker's: report.pull_request_report).
ReportSource = Callable[[CompleteInput], Awaitable[str]]


async def complete(repo: GitRepository, request: CompleteInput,
                   report: ReportSource | None = None) -> CompleteOutput:
    mode = Completion(request.spec.completion)
    branch = request.integration_branch
    head = await repo.branch_head(branch)
    if head is None:
        return CompleteOutput(completion=mode.value, done=False,
                              message=f"integration branch {branch} does not exist")
    if mode is Completion.MERGE:
        return await _fast_forward(repo, request, head)
    if mode is Completion.PR:
        return await _pull_request(repo, request, report)
    return CompleteOutput(completion=mode.value, done=True,
                          message=f"integration branch {branch} left for review at {head[:12]}")


async def _fast_forward(repo: GitRepository, request: CompleteInput, head: str) -> CompleteOutput:
    base_branch = request.spec.repository.base_branch
    branch = request.integration_branch

    def refused(why: str) -> CompleteOutput:
        return CompleteOutput(completion="merge", done=False,
                              message=f"did not merge {branch} into {base_branch}: {why}")

    await repo.fetch_branch(base_branch)
    base = await repo.branch_head(base_branch)
    if base is None:
        return refused(f"base branch {base_branch} no longer exists")
    if base == head:
        return CompleteOutput(completion="merge", done=True,
                              message=f"{base_branch} already at {head[:12]}")
    if not await repo.is_ancestor(base, head):
        return refused(
            f"{base_branch} moved since the directive started (it is at {base[:12]}, which "
            f"{branch} does not contain), so this is not a fast-forward. Merge or rebase "
            f"{branch} onto {base_branch} by hand.")
    checkout = await repo.checked_out_in(base_branch)
    if checkout is not None:
        # Someone works in that tree: let git update it, which refuses to overwrite
        # local changes, instead of moving the ref underneath it.
        result = await git("merge", "--ff-only", "--quiet", head, cwd=checkout, check=False)
        if result.code != 0:
            detail = (result.stderr.strip() or result.stdout.strip())[-1500:]
            return refused(f"{base_branch} is checked out in {checkout} and git refused to "
                           f"update it: {detail}. Commit or stash the changes there and retry.")
    elif not await repo.set_branch(base_branch, head, expected=base):
        return refused(f"{base_branch} moved while merging; run the completion again")
    if repo.pushes:
        await repo.push_branch(base_branch)
    return CompleteOutput(completion="merge", done=True,
                          message=f"fast-forwarded {base_branch} from {base[:12]} to {head[:12]}")


async def _pull_request(repo: GitRepository, request: CompleteInput,
                        report: ReportSource | None) -> CompleteOutput:
    branch = request.integration_branch
    gh = shutil.which("gh")
    if gh is None:
        return CompleteOutput(completion="pr", done=False, message=(
            f"no pull request opened: the GitHub CLI `gh` is not on the worker's PATH; the "
            f"work is on branch {branch}"))
    if REMOTE not in await repo.remotes():
        return CompleteOutput(completion="pr", done=False, message=(
            f"no pull request opened: the repository has no remote named {REMOTE!r}; the work "
            f"is on branch {branch}"))
    if report is None:
        return CompleteOutput(completion="pr", done=False, message=(
            f"no pull request opened: this worker has no read model to write the "
            f"directive's report from; the work is on branch {branch}"))
    push = await repo.run("push", "--quiet", REMOTE, f"refs/heads/{branch}:refs/heads/{branch}",
                          check=False)
    if push.code != 0:
        return CompleteOutput(completion="pr", done=False,
                              message=f"could not push {branch}: {push.stderr.strip()[-1500:]}")
    body = await report(request)
    if len(body) > MAX_PR_BODY:
        body = body[:MAX_PR_BODY] + f"\n\n[… truncated: `makima report {request.directive_id}`" \
                                    " prints it whole]\n"
    result = await run_process(
        [gh, "pr", "create", "--base", request.spec.repository.base_branch, "--head", branch,
         "--title", request.spec.title, "--body", body],
        cwd=repo.path, timeout_seconds=GH_TIMEOUT_SECONDS)
    output = result.output.strip()
    if result.exit_code != 0:
        return CompleteOutput(completion="pr", done=False,
                              message=f"gh pr create failed ({result.exit_code}): {output[-1500:]}")
    url = next((word for word in reversed(output.split()) if word.startswith("http")), None)
    return CompleteOutput(completion="pr", done=True, url=url,
                          message=f"opened a pull request for {branch}" + (f": {url}" if url else ""))
