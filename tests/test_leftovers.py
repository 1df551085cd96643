"""A starting worker removes what a dead worker on its home left of directives
that ended (their cleanups went to the dead worker's queue and never ran), and
nothing of directives still running. The real time-skipping test server and real
git worktrees."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import Client

from makima.git import GitRepository
from makima.leftovers import reap_ended_directives
from makima.models import Repository
from makima.workspace import Workspace, directive_folder, record_directive, session_home
from tests.fakes.repos import make_repo, set_identity, sh
from tests.standins import spec_of, start


async def test_a_starting_worker_removes_the_folders_of_ended_directives_only(
        client: Client, task_queue: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    set_identity(monkeypatch)
    repo_path = make_repo(tmp_path / "repo")
    home = tmp_path / "home"
    repo = await GitRepository.open(Repository(path=str(repo_path)), home)
    head = sh("git", "rev-parse", "HEAD", cwd=repo_path)
    running = await start(client, task_queue, spec_of(("one", [])))  # nobody polls: it runs
    ended = await start(client, task_queue, spec_of(("one", [])))
    await ended.terminate("ended")
    ids = {"running": running.id, "ended": ended.id, "unknown": "directive-gone-0001"}
    worktrees = {}
    for name, directive_id in ids.items():
        record_directive(home, directive_id)
        path = Workspace(home, directive_id, "one", 1).path
        await repo.add_worktree(path, head)
        (session_home(path) / ".claude").mkdir(parents=True)
        worktrees[name] = path
    legacy = directive_folder(home, "directive-of-an-older-worker") / "one-a1-t1"
    legacy.mkdir(parents=True)  # no record of its directive: left alone

    try:
        reaped = await reap_ended_directives(client, home)
    finally:
        await running.terminate("test over")

    assert sorted(reaped) == sorted([ended.id, "directive-gone-0001"])
    assert worktrees["running"].is_dir() and session_home(worktrees["running"]).is_dir()
    assert not directive_folder(home, ended.id).exists()
    assert not directive_folder(home, "directive-gone-0001").exists()
    assert legacy.is_dir()
    listed = sh("git", "worktree", "list", "--porcelain", cwd=repo_path)
    assert str(worktrees["running"]) in listed
    assert str(worktrees["ended"]) not in listed and str(worktrees["unknown"]) not in listed
