"""What a dead worker left on its MAKIMA_HOME, removed by the next worker there:
the folders (worktrees and Claude Code session homes) of directives that ended.

A step's cleanup runs on the worker that holds its folders, through that
worker's own task queue. A worker that died took its queue with it, and a new
worker on the same home polls another one, so those cleanups never reach the
folders. A starting worker therefore asks Temporal about every directive it has
folders of, and removes the folders of those that are no longer running (or
that Temporal does not know). A running directive's folders stay: a retry may
still resume a session there. Each worktree is removed by path, with its
registration, from the repository it belongs to (never a global prune).

Not here: process groups a dead worker left (makima.lifeline), paths
(makima.workspace).
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from makima.git import GitRepository, git
from makima.workspace import directives_with_folders


async def reap_ended_directives(client: Client, home: Path) -> list[str]:
    """Remove the folders of directives that are not running; return their ids."""
    reaped = []
    for directive_id, folder in await asyncio.to_thread(directives_with_folders, home):
        try:
            description = await client.get_workflow_handle(directive_id).describe()
            if description.status is WorkflowExecutionStatus.RUNNING:
                continue
        except RPCError as err:
            if err.status is not RPCStatusCode.NOT_FOUND:
                raise
        for worktree in await asyncio.to_thread(_subfolders, folder):
            await _remove_worktree(worktree, home)
        await asyncio.to_thread(shutil.rmtree, folder, True)
        reaped.append(directive_id)
    return reaped


def _subfolders(folder: Path) -> list[Path]:
    return [path for path in folder.iterdir() if path.is_dir() and not path.is_symlink()]


async def _remove_worktree(path: Path, home: Path) -> None:
    """Remove the worktree at `path` and its registration in the repository it
    belongs to (found through its `.git` file); a plain folder is just deleted."""
    common = await git("rev-parse", "--path-format=absolute", "--git-common-dir",
                       cwd=path, check=False)
    if common.code == 0 and (path / ".git").is_file():
        repo = GitRepository(Path(common.stdout.strip()), home)
        async with repo.lock():
            await repo.remove_worktree(path)
    await asyncio.to_thread(shutil.rmtree, path, True)
