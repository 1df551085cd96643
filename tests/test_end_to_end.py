"""Whole directives through the real activities: planning and judging through
the real `anthropic` client against the loopback Messages API, the `shell`
executor in real git worktrees of a real repository, and every event recorded
in the real (embedded) Postgres, on the Temporal test server.

What a user would check afterwards: the directive completed, its integration
branch holds every passed step's work, and the read model agrees with the
workflow's final `status`.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import asyncpg
import pytest
from temporalio.client import Client

from activities.evaluation import EvaluationActivities
from activities.execution import ExecutionActivities
from activities.planning import PlanningActivities
from activities.record import RecordActivities
from makima.llm.client import llm_from_env
from makima.models import DirectiveSpec, DirectiveStatus
from makima.store.reads import directive_state, snapshot_differences
from tests.fakes.repos import make_repo, set_identity
from tests.messages_server import MessagesServer, tool_reply
from tests.postgres_fixture import pg_pool, postgres  # noqa: F401 (fixtures)
from tests.standins import start
from worker import build_worker


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                          text=True).stdout


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MAKIMA_HOME", str(tmp_path / "home"))
    set_identity(monkeypatch)
    return make_repo(tmp_path / "repo", {"README.md": "demo\n"})


def judged(score: float) -> object:
    return tool_reply("submit_evaluation", {
        "score": score, "summary": f"judged {score}", "criteria": [],
        "rework_instructions": "" if score >= 0.8 else "do better"})


async def test_llm_planned_directive_runs_in_git_and_is_recorded(
        client: Client, task_queue: str, repo: Path, messages_server: MessagesServer,
        pg_pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", messages_server.base_url)
    monkeypatch.setenv("MAKIMA_AUTO_CHECKS", "0")
    messages_server.script(
        tool_reply("submit_plan", {"summary": "two steps", "steps": [
            {"name": "write-a", "description": "write a", "task_plan": "write a.txt",
             "command": "echo A > a.txt", "depends_on": []},
            {"name": "build-b", "description": "b from a", "task_plan": "derive b.txt",
             "command": "cat a.txt > b.txt && echo B >> b.txt",
             "verify": ["grep -q A b.txt"], "depends_on": ["write-a"]},
        ]}),
        judged(0.95),
        judged(0.9),
    )
    llm = llm_from_env()
    assert llm is not None
    activities = [*PlanningActivities(llm).activities(), *EvaluationActivities(llm).activities(),
                  *ExecutionActivities().activities(), *RecordActivities(pg_pool).activities()]
    spec = DirectiveSpec(title="letters", goal="write a.txt and b.txt",
                         repository={"path": str(repo)}, executor="shell")
    async with build_worker(client, task_queue, activities):
        handle = await start(client, task_queue, spec)
        result = await handle.result()
    await llm.close()

    assert result.status is DirectiveStatus.COMPLETED
    assert [(s.name, s.status.value) for s in result.steps] == [
        ("write-a", "passed"), ("build-b", "passed")]
    assert "write a.txt and b.txt" in messages_server.requests[0].text
    # the dependant saw its dependency's merged work, and both are on the integration branch
    branch = result.integration_branch
    assert branch == f"makima/{handle.id}"
    assert git(repo, "show", f"{branch}:a.txt") == "A\n"
    assert git(repo, "show", f"{branch}:b.txt") == "A\nB\n"
    assert git(repo, "rev-parse", "--abbrev-ref", "HEAD").strip() == "main"
    assert not (repo / "a.txt").exists(), "the user's checkout must not change"
    # the judge was asked about each step, with its checks
    assert "grep -q A b.txt" in messages_server.requests[2].text
    state = await directive_state(pg_pool, handle.id)
    assert snapshot_differences(state, result) == []
    assert result.cost_usd > 0


async def test_supplied_plan_without_llm_reworks_a_failing_check_and_records_it(
        client: Client, task_queue: str, repo: Path, pg_pool: asyncpg.Pool,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.setenv("MAKIMA_AUTO_CHECKS", "0")
    spec = DirectiveSpec.model_validate({
        "title": "flaky", "goal": "out.txt says good", "executor": "shell",
        "autonomy": "guarded", "repository": {"path": str(repo), "base_branch": "main"},
        "plan": {"steps": [
            {"name": "flaky", "description": "good on the second try",
             "command": 'if [ "$MAKIMA_ATTEMPT" = 1 ]; then echo bad > out.txt; '
                        'else echo good > out.txt; fi',
             "verify": ["grep -q good out.txt"]},
            {"name": "after", "depends_on": ["flaky"], "command": "cp out.txt copy.txt",
             "verify": ["test -f copy.txt"]},
        ]},
    })
    activities = [*PlanningActivities(None).activities(), *EvaluationActivities(None).activities(),
                  *ExecutionActivities().activities(), *RecordActivities(pg_pool).activities()]
    async with build_worker(client, task_queue, activities):
        handle = await start(client, task_queue, spec)
        result = await handle.result()

    assert result.status is DirectiveStatus.COMPLETED
    flaky, after = result.steps
    assert (flaky.attempts, flaky.status.value, flaky.score) == (2, "passed", 1.0)
    assert after.attempts == 1
    assert git(repo, "show", f"{result.integration_branch}:copy.txt") == "good\n"
    state = await directive_state(pg_pool, handle.id)
    assert snapshot_differences(state, result) == []
    evaluations = await pg_pool.fetch(
        "SELECT attempt, score FROM evaluations WHERE directive_id = $1 AND step = 'flaky' "
        "ORDER BY attempt", handle.id)
    assert [(r["attempt"], r["score"] < 0.5) for r in evaluations] == [(1, True), (2, False)]
