"""What a person reviewing a step needs said in words, shared by the CLI and the
console: why an attempt waits for them, how long it has waited, and the diff of
its work against the directive's integration branch.

Pure functions, except `attempt_diff` (runs `git diff`, read-only).
What does not live here: the queries (`makima.store.reads`), the pages
(`makima.console`), the terminal output (`makima.cli.render`).
"""

from __future__ import annotations

import asyncio
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from makima.models import CheckResult, CriterionResult

NOTHING_VERIFIED = "nothing verified this: no check ran and no judge looked at it"


def why_waiting(checks: list[CheckResult], criteria: list[CriterionResult],
                score: float | None, summary: str = "") -> list[str]:
    """The reasons an attempt is yellow, most concrete first: checks that failed
    (with their exit codes), the judge's unmet criteria, else that nothing verified it."""
    reasons = [f"check failed: `{c.command}` exited {_exit(c)}"
               for c in checks if not c.passed]
    reasons += [f"criterion not met: {c.criterion} ({c.score:.2f})"
                + (f" — {c.evidence}" if c.evidence else "")
                for c in criteria if not c.passed]
    if not checks and not criteria:
        reasons.append(NOTHING_VERIFIED)
    if not reasons:
        reasons.append(f"every check passed, but the score {score or 0:.2f} is below green"
                       + (f": {summary}" if summary else ""))
    return reasons


def os_user() -> str:
    """Who runs this process: the default `by` of a decision from the CLI, and
    every visitor of a console that has no users (loopback only)."""
    import getpass
    import os

    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name and no passwd entry (some containers)
        return f"uid-{os.getuid()}"


def _exit(check: CheckResult) -> str:
    return "nothing (timed out or could not start)" if check.exit_code is None \
        else str(check.exit_code)


def age(since: datetime | None, now: datetime | None = None) -> str:
    """`3m`, `2h 5m`, `4d 1h`: how long ago `since` was, computed now (never stale)."""
    if since is None:
        return "-"
    seconds = max(0, int(((now or datetime.now(UTC)) - since).total_seconds()))
    if seconds < 60:
        return f"{seconds}s"
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if hours < 1:
        return f"{minutes}m"
    if days < 1:
        return f"{hours}h {minutes % 60}m"
    return f"{days}d {hours % 24}h"


@dataclass(frozen=True)
class FileDiff:
    path: str
    added: int
    removed: int
    patch: str  # the unified diff of this file


@dataclass(frozen=True)
class AttemptDiff:
    base: str  # what it is compared with (the integration branch)
    commit: str
    stat: str
    files: list[FileDiff]


class DiffUnavailable(Exception):
    """The diff cannot be shown; the message says why."""


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise DiffUnavailable(f"git {' '.join(args)} failed in {repo}: "
                              f"{done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


async def attempt_diff(repository: str | None, base: str, commit: str | None) -> AttemptDiff:
    """The attempt's commit against `base` (`git diff base...commit`: what the step
    adds since it branched), read from the local repository the directive names."""
    if not commit:
        raise DiffUnavailable("this attempt committed nothing, so there is no diff")
    if not repository:
        raise DiffUnavailable("the directive's repository is a URL; fetch its step branch "
                              "and run git diff there")
    return await asyncio.to_thread(_diff, Path(repository), base, commit)


def _diff(repo: Path, base: str, commit: str) -> AttemptDiff:
    if not repo.is_dir():
        raise DiffUnavailable(f"the repository {repo} is not on this machine")
    span = f"{base}...{commit}"
    stat = _git(repo, "diff", "--stat", span).rstrip()
    counts = {}
    for line in _git(repo, "diff", "--numstat", span).splitlines():
        added, removed, path = line.split("\t", 2)
        counts[path] = (int(added) if added.isdigit() else 0,
                        int(removed) if removed.isdigit() else 0)
    files = []
    for chunk in _split_files(_git(repo, "diff", span)):
        path = chunk.split("\n", 1)[0].rsplit(" b/", 1)[-1]
        added, removed = counts.get(path, (0, 0))
        files.append(FileDiff(path=path, added=added, removed=removed, patch=chunk))
    return AttemptDiff(base=base, commit=commit, stat=stat, files=files)


def _split_files(patch: str) -> list[str]:
    chunks: list[str] = []
    for line in patch.splitlines(keepends=True):
        if line.startswith("diff --git ") or not chunks:
            chunks.append("")
        chunks[-1] += line
    return [c for c in chunks if c.strip()]
