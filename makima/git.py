"""Git for makima: the repository a directive works on, its integration branch,
one worktree per step attempt, the attempt's commit, merges into the
integration branch and the final fast-forward of the base branch.

Real git through subprocesses (git >= 2.38 for `merge-tree --write-tree`).
Merges never touch a working tree: the merged tree is computed with
`git merge-tree`, committed with `commit-tree` and published with a
compare-and-swap `update-ref`, so a user's checkout of the repository is left
alone and two workers merging at once cannot lose a merge.

A repository given by `path` is used in place (single machine: every worker
must see that path). One given by `url` is cloned (bare) once per worker into
`<home>/repos/<hash>`, fetched on reuse, and every branch makima writes is
pushed back to that remote, which stays the source of truth (another worker,
on another machine, may run the next step). Publishing a merge to the remote
is a compare-and-swap loop (`publish_merge`) that never fails because another
worker merged first.

Locks are `flock` files next to the repository's objects (in its git
directory), so every process using the repository, whatever its MAKIMA_HOME,
takes the same lock. Worktrees are removed one by one, by path: never a global
`git worktree prune`, which would unregister every worktree this process cannot
see (another worker's, another container's) from a shared repository.

Not here: Temporal (see activities/execution.py) and executors.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from makima.errors import GitError
from makima.models import Repository
from makima.process import tool_environment

#: Identity for makima's own commits when the machine has none configured.
FALLBACK_NAME = "makima"
FALLBACK_EMAIL = "makima@localhost"
#: Longest any single git command may take (clone and fetch of big repositories included).
GIT_COMMAND_TIMEOUT = 600.0
REMOTE = "origin"
#: Branch names git always accepts (components of letters, digits, '_' and '-',
#: joined by '/' or single dots, none ending in `.lock`): checked without git.
_PLAIN_BRANCH = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*(?:[./][A-Za-z0-9_][A-Za-z0-9_-]*)*")


class NotARepository(GitError):
    """The path given for a repository is not a git repository."""

    non_retryable = True


class MissingBranch(GitError):
    """A branch the directive needs does not exist."""

    non_retryable = True


class InvalidRefName(GitError):
    """A branch name built from a directive id or step name is refused by git."""

    non_retryable = True


def makima_home() -> Path:
    """`MAKIMA_HOME` (default `./.makima`) as an absolute path."""
    return Path(os.environ.get("MAKIMA_HOME") or ".makima").expanduser().resolve()


def safe_path_component(name: str) -> str:
    """A name usable as one folder name (ids may hold '/', worktree folders may not)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "_"
    return cleaned[:120]


# Small synchronous file-system checks (fast, local; kept out of async bodies).
def _absolute(path: str) -> Path:
    return Path(path).expanduser().resolve()


def _is_dir(path: Path) -> bool:
    return path.is_dir()


def _exists(path: Path) -> bool:
    return path.exists()


@dataclass
class GitResult:
    code: int
    stdout: str
    stderr: str


#: Git's credentials for `url` repositories come from the worker's environment,
#: never from the URL (a spec's URL is stored without userinfo, see
#: makima.models.Repository): MAKIMA_GIT_PASSWORD (a token) and MAKIMA_GIT_USERNAME
#: (default x-access-token, what GitHub and GitLab accept with a token).
CREDENTIAL_HELPER = (
    '!f() { test "$1" = get && test -n "$MAKIMA_GIT_PASSWORD" || exit 0; '
    'echo "username=${MAKIMA_GIT_USERNAME:-x-access-token}"; '
    'echo "password=$MAKIMA_GIT_PASSWORD"; }; f'
)


def _with_credential_helper(env: dict[str, str]) -> None:
    """Add CREDENTIAL_HELPER through GIT_CONFIG_* (after any the worker set)."""
    try:
        count = int(env.get("GIT_CONFIG_COUNT") or 0)
    except ValueError:
        count = 0
    env[f"GIT_CONFIG_KEY_{count}"] = "credential.helper"
    env[f"GIT_CONFIG_VALUE_{count}"] = CREDENTIAL_HELPER
    env["GIT_CONFIG_COUNT"] = str(count + 1)


def _git_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = tool_environment()
    _with_credential_helper(env)
    # Never wait for a password prompt or an editor: a worker has no terminal.
    env["GIT_TERMINAL_PROMPT"] = "0"
    env.setdefault("GIT_EDITOR", "true")
    env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
    env["LC_ALL"] = "C"  # stable messages and file lists
    if extra:
        env.update(extra)
    return env


async def git(*args: str, cwd: Path | str, check: bool = True,
              env: Mapping[str, str] | None = None,
              timeout_seconds: float = GIT_COMMAND_TIMEOUT) -> GitResult:
    """Run `git <args>` in `cwd`; with `check`, a non-zero exit raises GitError
    carrying git's own message."""
    process = await asyncio.create_subprocess_exec(
        "git", *args, cwd=str(cwd), env=_git_env(env),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout_seconds)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 9)
        with contextlib.suppress(ProcessLookupError):
            await asyncio.shield(process.wait())
        raise
    result = GitResult(process.returncode or 0, out.decode("utf-8", "replace"),
                       err.decode("utf-8", "replace"))
    if check and result.code != 0:
        message = (result.stderr.strip() or result.stdout.strip() or "no output")[-2000:]
        raise GitError(f"git {' '.join(args[:3])} failed in {cwd}: {message}")
    return result


@contextlib.asynccontextmanager
async def file_lock(path: Path) -> AsyncIterator[None]:
    """An exclusive lock across processes (flock), waited for without blocking
    the event loop."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing releases the lock


async def _remove_tree(path: Path) -> None:
    """`rm -rf`, off the event loop (a big worktree takes seconds)."""
    await asyncio.to_thread(shutil.rmtree, path, True)


# --------------------------------------------------------------------------- the repository


@dataclass
class Changes:
    """What a commit changed against the integration branch."""

    files: list[str]
    diff_stat: str


#: The git directory of each `path` repository this process opened: every step
#: activity opens its repository, and asking git again each time put a process on
#: the path from one step's agent to the next. Checked (its HEAD file) on each use.
_GIT_DIRS: dict[Path, Path] = {}


class GitRepository:
    """One repository as makima sees it: where its objects live (`path`), whether
    branches go back to a remote (`pushes`), and the worker's folder (`home`)."""

    def __init__(self, path: Path, home: Path, *, pushes: bool = False) -> None:
        self.path = path
        self.home = home
        self.pushes = pushes
        self._git_dir: Path | None = None

    # -- opening
    @classmethod
    async def open(cls, repository: Repository, home: Path) -> GitRepository:
        """The repository of a spec: `path` in place, `url` through the worker's clone."""
        if repository.path:
            path = _absolute(repository.path)
            if not _is_dir(path):
                raise NotARepository(f"repository path {path} does not exist or is not a folder")
            git_dir = _GIT_DIRS.get(path)
            if git_dir is None or not _exists(git_dir / "HEAD"):
                probe = await git("rev-parse", "--path-format=absolute", "--git-common-dir",
                                  cwd=path, check=False)
                if probe.code != 0:
                    raise NotARepository(f"{path} is not a git repository (git init it first)")
                git_dir = _GIT_DIRS[path] = Path(probe.stdout.strip())
            repository = cls(path, home)
            repository._git_dir = git_dir  # one git process fewer
            return repository
        return await cls._open_clone(repository.url or "", home)

    @classmethod
    async def _open_clone(cls, url: str, home: Path) -> GitRepository:
        digest = hashlib.sha256(url.encode()).hexdigest()[:16]
        path = home / "repos" / digest
        async with file_lock(home / "locks" / f"repo-{digest}.lock"):
            if not (path / "HEAD").exists():
                if path.exists():
                    await _remove_tree(path)  # a clone that died half-way
                path.parent.mkdir(parents=True, exist_ok=True)
                result = await git("clone", "--bare", "--quiet", url, str(path),
                                   cwd=path.parent, check=False)
                if result.code != 0:
                    raise GitError(f"cannot clone {url}: {result.stderr.strip()[-1000:]}")
        clone = cls(path, home, pushes=True)
        clone._git_dir = path  # a bare clone is its own git directory
        return clone

    async def git_dir(self) -> Path:
        """The repository's own git directory (shared by all its worktrees)."""
        if self._git_dir is None:
            result = await self.run("rev-parse", "--path-format=absolute", "--git-common-dir")
            self._git_dir = Path(result.stdout.strip())
        return self._git_dir

    @contextlib.asynccontextmanager
    async def lock(self, name: str = "repository") -> AsyncIterator[None]:
        """An exclusive lock on this repository for every process that uses it.

        The default serialises ref and worktree bookkeeping (concurrent fetches and
        `worktree add`s into one repository trip over git's own locks); `name` gives
        a lock of its own, such as one directive's integration branch."""
        folder = await self.git_dir() / "makima-locks"
        async with file_lock(folder / f"{safe_path_component(name)}.lock"):
            yield

    async def run(self, *args: str, check: bool = True, cwd: Path | None = None,
                  env: Mapping[str, str] | None = None) -> GitResult:
        return await git(*args, cwd=cwd or self.path, check=check, env=env)

    # -- refs
    async def resolve(self, ref: str) -> str | None:
        result = await self.run("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}",
                                check=False)
        return result.stdout.strip() or None if result.code == 0 else None

    async def branch_head(self, branch: str) -> str | None:
        return await self.resolve(f"refs/heads/{branch}")

    async def check_branch_name(self, branch: str) -> None:
        if _PLAIN_BRANCH.fullmatch(branch) and not any(
                part.endswith(".lock") for part in branch.split("/")):
            return  # git accepts every such name: no process to ask it
        result = await self.run("check-ref-format", "--branch", branch, check=False)
        if result.code != 0:
            raise InvalidRefName(
                f"git refuses the branch name {branch!r} (built from the directive id or step"
                " name); use ids of letters, digits, '-', '_' and '.'")

    async def is_ancestor(self, ancestor: str, descendant: str) -> bool:
        result = await self.run("merge-base", "--is-ancestor", ancestor, descendant, check=False)
        return result.code == 0

    async def set_branch(self, branch: str, commit: str, expected: str | None = None) -> bool:
        """Point `branch` at `commit`; with `expected`, only if it still points there
        (compare-and-swap). Returns False when someone else moved it first."""
        args = ["update-ref", "-m", "makima", f"refs/heads/{branch}", commit]
        if expected is not None:
            args.append(expected)
        result = await self.run(*args, check=False)
        if result.code != 0 and expected is None:
            raise GitError(f"cannot move {branch} to {commit[:12]}: {result.stderr.strip()}")
        return result.code == 0

    # -- remote (url repositories)
    async def fetch_branch(self, branch: str, *, required: bool = False) -> bool:
        """Bring `branch` from the remote into the clone (forced: the remote is the
        truth). Path repositories have nothing to fetch."""
        if not self.pushes:
            return True
        result = await self.run("fetch", "--quiet", REMOTE,
                                f"+refs/heads/{branch}:refs/heads/{branch}", check=False)
        if result.code != 0 and required:
            if "couldn't find remote ref" in result.stderr:
                raise MissingBranch(f"branch {branch!r} does not exist on the remote")
            raise GitError(f"cannot fetch {branch} from the remote: {result.stderr.strip()}")
        return result.code == 0

    async def push_branch(self, branch: str, *, force: bool = False) -> None:
        if not self.pushes:
            return
        refspec = f"{'+' if force else ''}refs/heads/{branch}:refs/heads/{branch}"
        await self.run("push", "--quiet", REMOTE, refspec)

    async def remotes(self) -> list[str]:
        result = await self.run("remote", check=False)
        return [line for line in result.stdout.split() if line]

    # -- integration branch
    async def refuse_unusable(self, branch: str, base_branch: str) -> None:
        """Refuse, before anything is written (a lock file included), an integration
        branch name git refuses or a missing base branch (a `url` repository's base
        branch is checked after its fetch, in `ensure_integration_branch`)."""
        await self.check_branch_name(branch)
        if not self.pushes and await self.branch_head(base_branch) is None:
            raise self._missing_base(base_branch)

    def _missing_base(self, base_branch: str) -> MissingBranch:
        return MissingBranch(f"base branch {base_branch!r} does not exist in {self.path}"
                             " (set repository.base_branch to an existing branch)")

    async def ensure_integration_branch(self, branch: str, base_branch: str) -> str:
        """Create `branch` from `base_branch` unless it exists (a retry must neither fail
        nor move it). Returns the base branch's commit."""
        await self.check_branch_name(branch)
        await self.fetch_branch(base_branch, required=True)
        base = await self.branch_head(base_branch)
        if base is None:
            raise self._missing_base(base_branch)
        if await self.branch_head(branch) is None:
            await self.fetch_branch(branch)  # another worker may have created it already
        if await self.branch_head(branch) is None:
            await self.set_branch(branch, base, expected="0" * 40)
        await self.push_branch(branch)
        return base

    # -- worktrees
    async def add_worktree(self, path: Path, commit: str) -> Path:
        """A fresh detached worktree at `commit`, replacing whatever was at `path`.

        Detached, so a branch checked out elsewhere (by a person, or a stale attempt)
        never blocks it; the attempt's commit is put on the step branch afterwards."""
        await self.remove_worktree(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        await self.run("worktree", "add", "--detach", "--quiet", str(path), commit)
        return path

    async def remove_worktree(self, path: Path) -> bool:
        """Remove the worktree at `path` and its registration, and nothing else
        (idempotent); True when there was one.

        What `git worktree remove --force --force` does, without a git process (one
        fewer between a merge and the next step's agent): the folder, then its
        registration (`<git dir>/worktrees/<name>`, found from the folder's `.git`
        pointer, or, for a folder deleted by other means, by the path it records:
        what `git worktree prune` would do for that one worktree)."""
        admin = await self.git_dir() / "worktrees"
        named = await asyncio.to_thread(_registration_named_by, path, admin)
        existed = _exists(path)
        if existed:
            await _remove_tree(path)
        if named is not None:
            await _remove_tree(named)
        for registration in await asyncio.to_thread(_registrations_of, admin, path):
            await _remove_tree(registration)
        return existed

    # -- attempts
    async def commit_attempt(self, worktree: Path, message: str) -> str:
        """Commit everything in `worktree` (if anything changed, or a merge is under
        way) and return HEAD.

        git itself says when there is nothing to commit (a merge under way is
        committed even without changes), so no process asks first; and a detached
        HEAD is read from the worktree's admin folder, not from another process."""
        await self.run("add", "--all", cwd=worktree)
        commit = await self.run("commit", "--quiet", "--no-verify", "-m", message,
                                cwd=worktree, env=await self.identity_env(), check=False)
        if commit.code != 0 and not _nothing_to_commit(commit):
            raise GitError(f"git commit failed in {worktree}: "
                           f"{(commit.stderr.strip() or commit.stdout.strip())[-2000:]}")
        return await asyncio.to_thread(_detached_head, worktree) or await self._head(worktree)

    async def merge_into_worktree(self, worktree: Path, commit: str, message: str) -> list[str]:
        """For a rework whose step branch lags the integration branch: merge `commit`
        into the worktree's HEAD. A clean merge is committed; a conflicting one is
        left under way, conflict markers in the files, for the agent to resolve
        (makima commits the merge with its work). Returns the conflicted files."""
        if await self.is_ancestor(commit, await self._head(worktree)):
            return []
        result = await self.run("merge", "--no-ff", "--no-edit", "-m", message, commit,
                                cwd=worktree, check=False, env=await self.identity_env())
        if result.code == 0:
            return []
        conflicted = await self.run("diff", "--name-only", "--diff-filter=U", cwd=worktree)
        files = [line for line in conflicted.stdout.splitlines() if line]
        if not files:
            raise GitError(f"git merge of {commit[:12]} into {worktree} failed: "
                           f"{(result.stderr or result.stdout).strip()[-1000:]}")
        return files

    async def _head(self, worktree: Path) -> str:
        return (await self.run("rev-parse", "HEAD", cwd=worktree)).stdout.strip()

    async def describe(self, base: str, head: str) -> Changes:
        """Files changed and a diff stat of `head` against its merge base with `base`."""
        names, stat = await asyncio.gather(  # two processes at once: both only read
            self.run("diff", "--name-only", f"{base}...{head}"),
            self.run("diff", "--stat=100", f"{base}...{head}"))
        files = [line for line in names.stdout.splitlines() if line]
        return Changes(files, stat.stdout.strip()[-3000:])

    async def identity_env(self) -> dict[str, str]:
        """A fallback author and committer when neither the environment nor git's
        config name one, so commits work on a machine with no git setup."""
        env: dict[str, str] = {}
        wanted = [f"GIT_{role}_{part}" for role in ("AUTHOR", "COMMITTER")
                  for part in ("NAME", "EMAIL")]
        if all(os.environ.get(name) for name in wanted):
            return env  # the environment names everyone: no need to ask git
        found = await self.run("config", "--get-regexp", r"^user\.(name|email)$", check=False)
        configured = {key for key, _, value in
                      (line.partition(" ") for line in found.stdout.splitlines())
                      if value.strip()}
        for name in wanted:
            part = "name" if name.endswith("_NAME") else "email"
            if not os.environ.get(name) and f"user.{part}" not in configured:
                env[name] = FALLBACK_NAME if part == "name" else FALLBACK_EMAIL
        return env

    # -- merging
    async def merge(self, target: str, source_commit: str, message: str) -> MergeResult:
        """Merge `source_commit` into branch `target` without a working tree.

        Already contained → merged (idempotent). A conflict changes nothing and names
        the files. A race with another merger is retried on the new head."""
        for _ in range(10):
            head = await self.branch_head(target)
            if head is None:
                raise MissingBranch(f"integration branch {target!r} does not exist")
            if await self.is_ancestor(source_commit, head):
                return MergeResult(True, head, [])
            tree = await self.run("merge-tree", "--write-tree", "--name-only", "--no-messages",
                                  head, source_commit, check=False)
            lines = tree.stdout.splitlines()
            # a conflict is exit 1 with the merged tree first; exit 1 without a tree
            # is git refusing the merge itself (e.g. a commit it does not have)
            if tree.code == 1 and lines and _OBJECT_ID.fullmatch(lines[0]):
                return MergeResult(False, head, [line for line in lines[1:] if line])
            if tree.code != 0 or not lines:
                raise GitError(f"git merge-tree failed: {tree.stderr.strip()}"
                               " (makima needs git 2.38 or newer)")
            commit = await self.run("commit-tree", lines[0], "-p", head, "-p", source_commit,
                                    "-m", message, env=await self.identity_env())
            merged = commit.stdout.strip()
            if await self.set_branch(target, merged, expected=head):
                return MergeResult(True, merged, [])
        raise GitError(f"could not merge into {target}: it kept moving under concurrent merges")

    async def publish_merge(self, target: str, source_commit: str, message: str) -> MergeResult:
        """Merge `source_commit` into `target` and, for a `url` repository, into the
        remote's `target`: a compare-and-swap loop (fetch, merge, push with
        `--force-with-lease` on the fetched head) that goes round again whenever
        another worker moved the remote first, and fails only when the remote stops
        moving yet still refuses the push."""
        refused = 0
        while True:
            await self.fetch_branch(target, required=True)
            # the head fetched from the remote (the lease); a path repository has none
            expected = await self.branch_head(target) if self.pushes else None
            result = await self.merge(target, source_commit, message)
            if not result.merged or not self.pushes or result.head == expected:
                return result
            push = await self.run(
                "push", "--quiet", f"--force-with-lease=refs/heads/{target}:{expected}",
                REMOTE, f"{result.head}:refs/heads/{target}", check=False)
            if push.code == 0:
                return result
            await self.fetch_branch(target, required=True)
            if await self.branch_head(target) != expected:
                refused = 0  # another worker merged first: merge again on top of theirs
                continue
            refused += 1
            if refused >= 3:
                raise GitError(f"the remote refuses the merge into {target}: "
                               f"{push.stderr.strip()[-1000:]}")

    async def checked_out_in(self, branch: str) -> Path | None:
        """The worktree (the main one included) that has `branch` checked out, if any."""
        result = await self.run("worktree", "list", "--porcelain", check=False)
        current: Path | None = None
        for line in result.stdout.splitlines():
            if line.startswith("worktree "):
                current = Path(line.removeprefix("worktree "))
            elif line == f"branch refs/heads/{branch}" and current is not None:
                return current
        return None


_OBJECT_ID = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


def _nothing_to_commit(result: GitResult) -> bool:
    """`git commit` refused only because nothing changed (LC_ALL=C: git's words)."""
    said = result.stdout
    return result.code == 1 and any(words in said for words in (
        "nothing to commit", "nothing added to commit", "no changes added to commit"))


def _detached_head(worktree: Path) -> str | None:
    """The commit a linked worktree's detached HEAD holds (its admin folder's HEAD
    file, as gitrepository-layout(5) lays it out), or None (a branch checked out,
    or anything unexpected: then ask git)."""
    try:
        with (worktree / ".git").open("rb") as pointer:
            text = pointer.read(4096).decode(errors="replace").strip()
        if not text.startswith("gitdir:"):
            return None
        admin = worktree / text.removeprefix("gitdir:").strip()
        with (admin / "HEAD").open("rb") as head:
            value = head.read(100).decode(errors="replace").strip()
    except OSError:
        return None
    return value if _OBJECT_ID.fullmatch(value) else None


def _registration_named_by(worktree: Path, admin: Path) -> Path | None:
    """The registration a worktree's `.git` pointer names, when it is one of this
    repository's (`admin` is `<git dir>/worktrees`): never a folder elsewhere."""
    try:
        with (worktree / ".git").open("rb") as pointer:
            text = pointer.read(4096).decode(errors="replace").strip()
    except OSError:
        return None
    if not text.startswith("gitdir:"):
        return None
    named = (worktree / text.removeprefix("gitdir:").strip()).resolve()
    return named if named.parent == admin.resolve() and named.is_dir() else None


def _registrations_of(admin: Path, worktree: Path) -> list[Path]:
    """git's bookkeeping folders (`<git dir>/worktrees/<name>`) of the worktree at
    `worktree` whose folder is gone."""
    if not admin.is_dir():
        return []
    found = []
    for registration in admin.iterdir():
        try:
            gitdir = (registration / "gitdir").read_text().strip()
        except OSError:
            continue
        if Path(gitdir).parent == worktree and not Path(gitdir).exists():
            found.append(registration)
    return found


@dataclass
class MergeResult:
    merged: bool
    head: str
    conflict_files: list[str]
