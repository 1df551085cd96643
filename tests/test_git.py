"""makima.git and makima.process on real repositories and real processes: the
fallback identity, merges that never touch a working tree, ref-name checks,
bounded output, timeouts that kill a whole process group."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from makima.errors import GitError
from makima.git import GitRepository, InvalidRefName, NotARepository, makima_home
from makima.models import Repository
from makima.process import run_process
from tests.fakes.repos import make_repo, set_identity, sh, show


def repo_without_identity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A repository on a machine with no identity anywhere: no env, no global or
    system config."""
    set_identity(monkeypatch)
    repo_path = make_repo(tmp_path / "repo")
    for key in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL",
                "EMAIL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "nohome"))
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    return repo_path


async def test_commits_get_a_fallback_identity_without_any_git_config(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo_path = repo_without_identity(tmp_path, monkeypatch)
    repo = GitRepository(repo_path, tmp_path / "home")
    worktree = await repo.add_worktree(tmp_path / "home" / "wt", "main")
    (worktree / "new.txt").write_text("new\n")
    head = await repo.commit_attempt(worktree, "makima: test commit")
    author = sh("git", "log", "-1", "--format=%an <%ae>|%cn <%ce>", head, cwd=repo_path)
    assert author == "makima <makima@localhost>|makima <makima@localhost>"


async def test_the_fallback_fills_only_what_git_config_leaves_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo_path = repo_without_identity(tmp_path, monkeypatch)
    sh("git", "config", "user.name", "Ada Lovelace", cwd=repo_path)  # a name, no email
    monkeypatch.setenv("GIT_COMMITTER_EMAIL", "ci@example.org")
    repo = GitRepository(repo_path, tmp_path / "home")
    worktree = await repo.add_worktree(tmp_path / "home" / "wt", "main")
    (worktree / "new.txt").write_text("new\n")
    head = await repo.commit_attempt(worktree, "makima: test commit")
    author = sh("git", "log", "-1", "--format=%an <%ae>|%cn <%ce>", head, cwd=repo_path)
    assert author == "Ada Lovelace <makima@localhost>|Ada Lovelace <ci@example.org>"


async def test_merge_leaves_a_dirty_checkout_alone(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    set_identity(monkeypatch)
    repo_path = make_repo(tmp_path / "repo", {"a.txt": "a\n"})
    sh("git", "branch", "integration", cwd=repo_path)
    sh("git", "checkout", "--quiet", "integration", cwd=repo_path)  # the user sits on it
    (repo_path / "a.txt").write_text("uncommitted edit\n")
    repo = GitRepository(repo_path, tmp_path / "home")
    worktree = await repo.add_worktree(tmp_path / "home" / "wt", "main")
    (worktree / "b.txt").write_text("b\n")
    commit = await repo.commit_attempt(worktree, "add b")
    result = await repo.merge("main", commit, "merge b")
    assert result.merged
    assert show(repo_path, "main", "b.txt") == "b"
    assert (repo_path / "a.txt").read_text() == "uncommitted edit\n"
    assert not (repo_path / "b.txt").exists()


async def test_branch_names_git_refuses_are_reported_clearly(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    set_identity(monkeypatch)
    repo = GitRepository(make_repo(tmp_path / "repo"), tmp_path / "home")
    with pytest.raises(InvalidRefName, match="refuses the branch name 'makima/bad..id'"):
        await repo.ensure_integration_branch("makima/bad..id", "main")


async def test_open_refuses_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="does not exist"):
        await GitRepository.open(Repository(path=str(tmp_path / "nope")), tmp_path)


def test_makima_home_is_absolute(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAKIMA_HOME", "relative/home")
    assert makima_home().is_absolute() and makima_home().name == "home"
    monkeypatch.delenv("MAKIMA_HOME")
    assert makima_home() == (Path.cwd() / ".makima").resolve()


async def test_output_of_a_50_mb_command_is_kept_as_a_bounded_tail(tmp_path: Path) -> None:
    result = await run_process(
        ["bash", "-c", "head -c 50000000 /dev/zero | tr '\\0' x; echo; echo THE-END"],
        cwd=tmp_path, tail_bytes=8192)
    assert result.exit_code == 0
    assert result.output.rstrip().endswith("THE-END")
    assert len(result.output) < 9000
    assert "truncated" in result.output.splitlines()[0]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


async def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    result = await run_process(
        ["bash", "-c", f"sleep 600 & echo $! > {pidfile}; echo started; wait"],
        cwd=tmp_path, timeout_seconds=1)
    child = int(pidfile.read_text())
    try:
        assert result.timed_out and result.exit_code is None
        assert "started" in result.output and "timed out after 1 s" in result.output
        for _ in range(50):
            if not _alive(child):
                break
            await asyncio.sleep(0.1)
        assert not _alive(child)
    finally:
        if _alive(child):
            os.kill(child, 9)


async def test_a_background_child_left_behind_does_not_hang_the_command(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    result = await asyncio.wait_for(run_process(
        ["bash", "-c", f"sleep 600 & echo $! > {pidfile}; echo done"], cwd=tmp_path), 20)
    child = int(pidfile.read_text())
    try:
        assert result.exit_code == 0 and "done" in result.output
        for _ in range(50):
            if not _alive(child):
                break
            await asyncio.sleep(0.1)
        assert not _alive(child)
    finally:
        if _alive(child):
            os.kill(child, 9)


async def test_removing_a_worktree_leaves_worktrees_this_worker_cannot_see_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another worker's live worktree, in a home this worker cannot see, stays a
    worktree when this worker removes its own (a global prune would unregister it)."""
    set_identity(monkeypatch)
    repo_path = make_repo(tmp_path / "repo")
    theirs = GitRepository(repo_path, tmp_path / "their-home")
    ours = GitRepository(repo_path, tmp_path / "our-home")
    their_worktree = await theirs.add_worktree(tmp_path / "their-home" / "wt", "main")
    our_worktree = await ours.add_worktree(tmp_path / "our-home" / "wt", "main")
    hidden = tmp_path / "elsewhere"
    their_worktree.parent.rename(hidden)  # as seen from our machine: no such folder

    assert await ours.remove_worktree(our_worktree)

    hidden.rename(their_worktree.parent)
    assert sh("git", "status", "--porcelain", cwd=their_worktree) == ""
    assert not our_worktree.exists()
    listed = sh("git", "worktree", "list", "--porcelain", cwd=repo_path)
    assert f"worktree {their_worktree}" in listed and str(our_worktree) not in listed


async def test_a_worktree_folder_deleted_by_hand_loses_only_its_registration(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    set_identity(monkeypatch)
    repo_path = make_repo(tmp_path / "repo")
    repo = GitRepository(repo_path, tmp_path / "home")
    gone = await repo.add_worktree(tmp_path / "home" / "gone", "main")
    kept = await repo.add_worktree(tmp_path / "home" / "kept", "main")
    sh("rm", "-rf", str(gone), cwd=tmp_path)

    assert not await repo.remove_worktree(gone)

    listed = sh("git", "worktree", "list", "--porcelain", cwd=repo_path)
    assert str(gone) not in listed and f"worktree {kept}" in listed


def test_names_passed_without_asking_git_are_names_git_accepts(tmp_path: Path) -> None:
    # check_branch_name skips git for plain names; every one of them must be a name
    # git accepts (random names over an alphabet of git's special characters)
    import random
    import subprocess

    from makima.git import _PLAIN_BRANCH

    rng = random.Random(13)
    names = {"makima/directive-demo-1a2b--steps/write_tests", "a.b/c", "a.lock/b", "-x"}
    for alphabet in ("ab1_-./", "ab1_-./@{}~^:?*[ \\"):
        names |= {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))
                  for _ in range(300)}
    plain = [n for n in names if _PLAIN_BRANCH.fullmatch(n)
             and not any(part.endswith(".lock") for part in n.split("/"))]
    assert len(plain) > 20
    for name in plain:
        git = subprocess.run(["git", "check-ref-format", "--branch", name], cwd=tmp_path,
                             capture_output=True)
        assert git.returncode == 0, f"{name!r} passes the fast path, but git refuses it"


async def test_an_attempt_s_commit_is_its_worktree_s_head(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # commit_attempt reads a detached HEAD from the worktree's admin folder and asks
    # git only otherwise: either way the answer is git's own HEAD
    set_identity(monkeypatch)
    repo_path = make_repo(tmp_path / "repo", {"a.txt": "a\n"})
    repo = await GitRepository.open(Repository(path=str(repo_path)), tmp_path / "home")
    worktree = await repo.add_worktree(tmp_path / "home" / "wt", "main")
    start = sh("git", "rev-parse", "HEAD", cwd=worktree)

    assert await repo.commit_attempt(worktree, "nothing changed") == start
    (worktree / "b.txt").write_text("b\n")
    head = await repo.commit_attempt(worktree, "add b")
    assert head != start and head == sh("git", "rev-parse", "HEAD", cwd=worktree)
    assert sh("git", "log", "-1", "--format=%s", head, cwd=repo_path) == "add b"
    # an agent that checked a branch out in its worktree
    sh("git", "checkout", "-q", "-b", "agent-branch", cwd=worktree)
    (worktree / "c.txt").write_text("c\n")
    on_branch = await repo.commit_attempt(worktree, "add c")
    assert on_branch == sh("git", "rev-parse", "agent-branch", cwd=repo_path) != head


async def test_a_commit_git_refuses_fails_with_git_s_message(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    set_identity(monkeypatch)
    repo_path = make_repo(tmp_path / "repo", {"a.txt": "a\n"})
    repo = await GitRepository.open(Repository(path=str(repo_path)), tmp_path / "home")
    worktree = await repo.add_worktree(tmp_path / "home" / "wt", "main")
    (worktree / "b.txt").write_text("b\n")
    for number, (key, value) in enumerate({"commit.gpgSign": "true",
                                           "gpg.program": "false"}.items()):
        monkeypatch.setenv(f"GIT_CONFIG_KEY_{number}", key)
        monkeypatch.setenv(f"GIT_CONFIG_VALUE_{number}", value)
    monkeypatch.setenv("GIT_CONFIG_COUNT", "2")
    with pytest.raises(GitError, match="git commit failed in .*gpg failed to sign"):
        await repo.commit_attempt(worktree, "add b")


async def test_a_path_repository_replaced_by_a_folder_is_refused_again(tmp_path: Path) -> None:
    # the git directory of an opened path repository is remembered, and checked
    repo_path = make_repo(tmp_path / "repo")
    await GitRepository.open(Repository(path=str(repo_path)), tmp_path / "home")
    sh("rm", "-rf", str(repo_path / ".git"), cwd=tmp_path)
    with pytest.raises(NotARepository, match="is not a git repository"):
        await GitRepository.open(Repository(path=str(repo_path)), tmp_path / "home")


async def test_a_removed_worktree_leaves_git_nothing_to_prune_and_its_path_reusable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # removed without a git process: git must agree that it is gone
    set_identity(monkeypatch)
    repo_path = make_repo(tmp_path / "repo")
    repo = GitRepository(repo_path, tmp_path / "home")
    worktree = await repo.add_worktree(tmp_path / "home" / "wt", "main")
    (worktree / "work.txt").write_text("uncommitted\n")
    outside = tmp_path / "not-a-registration"
    outside.mkdir()
    other = await repo.add_worktree(tmp_path / "home" / "other", "main")
    # a pointer that names a folder outside the repository's registrations
    (other / ".git").write_text(f"gitdir: {outside}\n")

    assert await repo.remove_worktree(worktree)
    assert await repo.remove_worktree(other)

    assert not worktree.exists() and outside.is_dir(), "removed what was not the worktree's"
    assert str(worktree) not in sh("git", "worktree", "list", "--porcelain", cwd=repo_path)
    assert sh("git", "worktree", "prune", "--dry-run", "--verbose", cwd=repo_path) == ""
    assert await repo.add_worktree(worktree, "main") == worktree
    assert sh("git", "status", "--porcelain", cwd=worktree) == ""


async def test_merging_a_commit_the_repository_lacks_fails_instead_of_conflicting(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # git merge-tree exits 1 both for a conflict and for a merge it refuses; only the
    # first names a tree (a refused merge read as a conflict sent the step to rework)
    set_identity(monkeypatch)
    repo_path = make_repo(tmp_path / "repo")
    repo = GitRepository(repo_path, tmp_path / "home")
    with pytest.raises(GitError, match="not something we can merge"):
        await repo.merge("main", "1234567890" * 4, "merge a commit that is not here")
    assert sh("git", "rev-list", "--count", "main", cwd=repo_path) == "1"
