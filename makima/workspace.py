"""Where an attempt lives: a `Workspace` is one try of one step attempt, on one
worker, in one folder. Nothing else builds worktree paths.

    $MAKIMA_HOME/worktrees/<directive>/<step>-a<attempt>-t<try>

Every try has a folder of its own: a try that was cut off may still have a
process writing into its folder until its worker's death reaches it, so no
later try ever works there. The folder is on the worker that ran the try; the
attempt's evaluate, merge and cleanup go to that worker (its own task queue,
see worker.py), and a worker that is gone is replaced by a new try elsewhere,
from what was pushed to the step branch.

Not here: git (makima.git), Temporal (activities/).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from makima.git import safe_path_component

WORKTREES = "worktrees"
#: Claude Code's HOME of each try (its session files), kept next to the try's folder
#: (never inside it, where it would be committed) until the run ends or the step
#: is cleaned up.
SESSION_HOMES = ".claude-homes"


@dataclass(frozen=True)
class Workspace:
    home: Path
    directive_id: str
    step: str
    attempt: int  # 1-based, the step's attempt (a rework is a new attempt)
    try_number: int = 1  # 1-based, Temporal's try of that attempt's activity

    @property
    def path(self) -> Path:
        return directive_folder(self.home, self.directive_id) / safe_path_component(
            f"{self.step}-a{self.attempt}-t{self.try_number}")

    def previous_try(self) -> Workspace | None:
        if self.try_number <= 1:
            return None
        return Workspace(self.home, self.directive_id, self.step, self.attempt,
                         self.try_number - 1)


#: In each directive's folder: the directive's id (the folder's name is only a safe
#: form of it).
DIRECTIVE_RECORD = ".directive"


def directive_folder(home: Path, directive_id: str) -> Path:
    return home / WORKTREES / safe_path_component(directive_id)


def record_directive(home: Path, directive_id: str) -> None:
    """Write down which directive a folder belongs to (blocking: a tiny write)."""
    folder = directive_folder(home, directive_id)
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / DIRECTIVE_RECORD
    if not record.is_file():
        record.write_text(directive_id)


def directives_with_folders(home: Path) -> list[tuple[str, Path]]:
    """(directive id, its folder) of every directive with folders on this worker
    whose id was written down (blocking)."""
    root = home / WORKTREES
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        record = folder / DIRECTIVE_RECORD
        if record.is_file() and not record.is_symlink():
            found.append((record.read_text()[:1000].strip(), folder))
    return found


def session_home(worktree: Path) -> Path:
    """Claude Code's HOME for the try working in `worktree`."""
    return worktree.parent / SESSION_HOMES / worktree.name


def step_folders(home: Path, directive_id: str, step: str) -> list[Path]:
    """The folders of every try of every attempt of `step` on this worker."""
    return _tries_in(directive_folder(home, directive_id), step)


def step_session_homes(home: Path, directive_id: str, step: str) -> list[Path]:
    """The session homes of every try of `step` on this worker, their worktrees
    removed or not (a crashed try that was never retried leaves one behind)."""
    return _tries_in(directive_folder(home, directive_id) / SESSION_HOMES, step)


def _tries_in(folder: Path, step: str) -> list[Path]:
    pattern = re.compile(rf"^{re.escape(safe_path_component(step))}-a\d+-t\d+$")
    if not folder.is_dir():
        return []
    return [path for path in folder.iterdir() if pattern.match(path.name)]


def is_inside_worktrees(home: Path, path: Path) -> bool:
    """Whether `path` lies in makima's own worktree folder (the only place cleanup
    may delete)."""
    return home / WORKTREES in path.parents
