"""Confinement seen from what a person reads afterwards: whole directives through
the real activities (real git, the embedded Postgres, the Temporal test server).

- A shell step and its check try to print the worker's secrets and reach a
  loopback port: the directive still completes, and no secret value is in the
  workflow's history or in any row of any table.
- The real Claude Code CLI fails (a permission mode it refuses): its stderr
  message is what `makima status` shows as the reason.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import asyncpg
import pytest
from temporalio.client import Client, WorkflowFailureError

from activities.evaluation import EvaluationActivities
from activities.execution import ExecutionActivities
from activities.planning import PlanningActivities
from activities.record import RecordActivities
from makima.cli.views import plain_text, status_view
from makima.models import DirectiveSpec, DirectiveStatus
from tests.fakes.repos import make_repo, set_identity
from tests.postgres_fixture import pg_pool, postgres  # noqa: F401 (fixtures)
from tests.standins import start, status
from tests.test_sandbox import Listener
from worker import build_worker

TABLES = ("directives", "chains", "steps", "attempts", "evaluations", "approvals", "events")


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MAKIMA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MAKIMA_AUTO_CHECKS", "0")
    set_identity(monkeypatch)
    return make_repo(tmp_path / "repo", {"README.md": "demo\n"})


def activities(pg_pool: asyncpg.Pool) -> list:  # noqa: F811
    return [*PlanningActivities(None).activities(), *EvaluationActivities(None).activities(),
            *ExecutionActivities().activities(), *RecordActivities(pg_pool).activities()]


async def everything_kept(pg_pool: asyncpg.Pool, handle) -> str:  # noqa: ANN001, F811
    history = (await handle.fetch_history()).to_json()
    rows = []
    for table in TABLES:
        rows += [str(dict(row)) for row in await pg_pool.fetch(f"SELECT * FROM {table}")]
    return history + "\n".join(rows)


async def test_secrets_reach_no_history_and_no_row(
        client: Client, task_queue: str, repo: Path, pg_pool: asyncpg.Pool,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    secret = f"s3cret-{uuid.uuid4().hex}"
    password = f"pw-{uuid.uuid4().hex}"
    monkeypatch.setenv("MAKIMA_TEST_SECRET", secret)
    monkeypatch.setenv("DATABASE_URL", f"postgresql://makima:{password}@127.0.0.1:1/x")
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    listener = Listener()
    port = listener.start()
    leak = ("env; cat /proc/1/environ /proc/$PPID/environ | tr '\\0' '\\n'; "
            f"echo probe > /dev/tcp/127.0.0.1/{port}; echo done")
    spec = DirectiveSpec.model_validate({
        "title": "leaky", "goal": "try to print secrets", "executor": "shell",
        "autonomy": "full_auto", "repository": {"path": str(repo)},
        "plan": {"steps": [{"name": "leak", "command": f"{leak} > leak.txt",
                            "verify": [leak]}]},
    })
    try:
        async with build_worker(client, task_queue, activities(pg_pool)):
            handle = await start(client, task_queue, spec)
            result = await handle.result()
    finally:
        listener.sock.close()
    assert result.status is DirectiveStatus.COMPLETED
    kept = await everything_kept(pg_pool, handle)
    assert "HOME=/tmp/home" in kept, "the probe's output was recorded"
    assert secret not in kept and password not in kept
    assert listener.connections == 0


async def test_the_clis_stderr_is_what_status_shows_when_claude_code_fails(
        client: Client, task_queue: str, repo: Path, pg_pool: asyncpg.Pool,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("claude_agent_sdk")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-unused")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("MAKIMA_CLAUDE_CLI", raising=False)
    monkeypatch.setenv("MAKIMA_CLAUDE_PERMISSION_MODE", "bogusMode")
    spec = DirectiveSpec.model_validate({
        "title": "broken cli", "goal": "write a file", "executor": "claude_code",
        "repository": {"path": str(repo)}, "budgets": {"max_chain_regenerations": 0},
        "plan": {"steps": [{"name": "write", "task_plan": "write hello.txt"}]},
    })
    async with build_worker(client, task_queue, activities(pg_pool)):
        handle = await start(client, task_queue, spec)
        with pytest.raises(WorkflowFailureError):
            await handle.result()
        snapshot = await status(handle)  # what `makima status` renders
    assert snapshot.status is DirectiveStatus.FAILED
    shown = plain_text(status_view(snapshot, plain=True))
    assert "its stderr ended with" in shown and "bogusMode" in shown, shown
