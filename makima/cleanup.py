"""`makima clean`: what ended directives leave in their repositories, removed.

For each directive that ended (completed, failed, stopped) longer ago than
`older_than`, in its local repository (`repository.path`; `url` directives are
skipped, their branches live on the remote):
- every step branch `makima/<id>--steps/<step>` and the worktrees that have one
  checked out (`git worktree remove --force` by path; never a global prune, which
  would touch worktrees of other directives);
- the integration branch `makima/<id>` when the directive did not complete and
  the branch holds no commit beyond the base branch (it failed before any work);
- a completed directive's integration branch only with `integration=True`
  (asked for by `--integration`); it is the work the directive delivered.
`dry_run` reports the same list and removes nothing.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from makima.git import GitError, git

ENDED = ("completed", "failed", "stopped")


def parse_age(text: str) -> timedelta:
    """`7d`, `12h`, `30m`, `45s`, `2w`, `0` -> a timedelta; ValueError otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not match:
        raise ValueError(f"--older-than {text!r} is not an age like 7d, 12h, 30m or 0")
    number, unit = float(match.group(1)), match.group(2) or "s"
    seconds = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]
    return timedelta(seconds=number * seconds)


@dataclass
class Cleaned:
    directive_id: str
    repository: str
    removed: list[str] = field(default_factory=list)  # "branch X", "worktree Y"
    kept: list[str] = field(default_factory=list)  # what stays and why
    problem: str = ""


async def ended_directives(db: Any, older_than: timedelta) -> list[dict[str, Any]]:
    cutoff = datetime.now(UTC) - older_than
    rows = await db.fetch(
        """SELECT id, status, integration_branch,
                  spec->'repository'->>'path' AS path,
                  COALESCE(spec->'repository'->>'base_branch', 'main') AS base
           FROM directives
           WHERE status = ANY($1::text[]) AND COALESCE(updated_at, created_at) <= $2
           ORDER BY updated_at""", list(ENDED), cutoff)
    return [dict(r) for r in rows]


async def _branches(repo: Path, pattern: str) -> list[str]:
    done = await git("for-each-ref", "--format=%(refname:short)", f"refs/heads/{pattern}",
                     cwd=repo)
    return [line for line in done.stdout.splitlines() if line]


async def _worktrees_on(repo: Path, branches: set[str]) -> list[str]:
    done = await git("worktree", "list", "--porcelain", cwd=repo)
    found, path = [], None
    for line in done.stdout.splitlines():
        if line.startswith("worktree "):
            path = line[len("worktree "):]
        elif line.startswith("branch refs/heads/") and path:
            if line[len("branch refs/heads/"):] in branches:
                found.append(path)
    return found


async def clean_directive(row: dict[str, Any], *, integration: bool,
                          dry_run: bool) -> Cleaned:
    directive_id = row["id"]
    result = Cleaned(directive_id=directive_id, repository=row["path"] or "")
    if not row["path"]:
        result.problem = "its repository is a URL: its branches live on the remote"
        return result
    repo = Path(row["path"])
    if not await asyncio.to_thread(repo.is_dir):
        result.problem = f"{repo} is not on this machine any more"
        return result
    try:
        steps = await _branches(repo, f"makima/{directive_id}--steps/*")
        for path in await _worktrees_on(repo, set(steps)):
            result.removed.append(f"worktree {path}")
            if not dry_run:
                await git("worktree", "remove", "--force", path, cwd=repo)
        for branch in steps:
            result.removed.append(f"branch {branch}")
            if not dry_run:
                await git("branch", "-D", branch, cwd=repo)
        branch = row["integration_branch"] or f"makima/{directive_id}"
        if await _branches(repo, branch):
            ahead = await git("rev-list", "--count", f"{row['base']}..{branch}", cwd=repo,
                              check=False)
            empty = ahead.code == 0 and ahead.stdout.strip() == "0"
            if integration or (row["status"] != "completed" and empty):
                result.removed.append(f"branch {branch}")
                if not dry_run:
                    await git("branch", "-D", branch, cwd=repo)
            elif row["status"] == "completed":
                result.kept.append(f"branch {branch} (the completed work; --integration "
                                   "removes it)")
            else:
                result.kept.append(f"branch {branch} ({ahead.stdout.strip() or '?'} commits "
                                   f"of merged work; --integration removes it)")
    except GitError as error:
        result.problem = str(error)
    return result
