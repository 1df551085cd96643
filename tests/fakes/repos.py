"""Real git repositories in temporary folders for the execution tests, and a
fixture-friendly git identity (so tests never depend on the machine's git config)."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

FAKES = Path(__file__).parent

IDENTITY = {
    "GIT_AUTHOR_NAME": "Test Author",
    "GIT_AUTHOR_EMAIL": "author@example.test",
    "GIT_COMMITTER_NAME": "Test Author",
    "GIT_COMMITTER_EMAIL": "author@example.test",
}


def set_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in IDENTITY.items():
        monkeypatch.setenv(key, value)


def sh(*args: str, cwd: Path) -> str:
    """Run git (or anything) synchronously in a test and return stdout; fail loudly."""
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"{args} failed: {result.stderr}"
    return result.stdout.strip()


def make_repo(path: Path, files: dict[str, str] | None = None, branch: str = "main") -> Path:
    """A non-bare repository with one commit on `branch`."""
    path.mkdir(parents=True, exist_ok=True)
    sh("git", "init", "--quiet", "--initial-branch", branch, cwd=path)
    for name, content in (files or {"README.md": "hello\n"}).items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(content)
    sh("git", "add", "--all", cwd=path)
    sh("git", "commit", "--quiet", "-m", "initial", cwd=path)
    return path


def show(repo: Path, ref: str, name: str) -> str:
    """A file's content at `ref` (without checking anything out)."""
    return sh("git", "show", f"{ref}:{name}", cwd=repo)


def install_fake(name: str, folder: Path) -> Path:
    """Copy a stand-in executable into `folder` and make it runnable with this
    interpreter (the copy's mode and shebang do not depend on the checkout)."""
    folder.mkdir(parents=True, exist_ok=True)
    source = (FAKES / name).read_text().split("\n", 1)[1]
    target = folder / name
    target.write_text(f"#!{sys.executable}\n{source}")
    target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return target


def git_available() -> bool:
    return shutil.which("git") is not None
