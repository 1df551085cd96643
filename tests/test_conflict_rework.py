"""A merge conflict that rework resolves, with real git and the real activities:
two parallel steps change the same line, the second's merge conflicts, its
rework starts from its own work with the integration branch merged in (conflict
markers included, the files named in its prompt), the `anthropic` agent
resolves it inside its sandboxed worktree (git allowed there), and both intents
end up on the integration branch."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest
from temporalio.client import Client
from temporalio.testing import ActivityEnvironment

from activities.evaluation import EvaluationActivities
from activities.execution import ExecutionActivities
from activities.planning import PlanningActivities
from activities.record import RecordActivities
from makima.contracts import ExecuteInput, ExecuteOutput, MergeInput, PrepareInput, ReworkContext
from makima.models import DirectiveSpec, DirectiveStatus, ExecutorKind, PlannedStep, Repository
from makima.policy import merge_conflict_evaluation
from tests.fakes.repos import make_repo, set_identity, sh, show
from tests.messages_server import MessagesServer, text_reply, tool_reply
from tests.postgres_fixture import pg_pool, postgres  # noqa: F401 (fixtures)
from tests.standins import start
from worker import build_worker

DIRECTIVE = "directive-conflict-0001"


def tool_result(server: MessagesServer, request_index: int) -> str:
    return server.requests[request_index].body["messages"][-1]["content"][0]["content"]


async def test_a_rework_resolves_the_conflict_and_both_intents_are_merged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, messages_server: MessagesServer) -> None:
    set_identity(monkeypatch)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", messages_server.base_url)
    repo = make_repo(tmp_path / "repo", {"greeting.txt": "hello\n"})
    repository = Repository(path=str(repo))
    spec = DirectiveSpec(title="Greetings", goal="Greet from both teams", repository=repository,
                         executor=ExecutorKind.ANTHROPIC)
    acts = ExecutionActivities(tmp_path / "home", heartbeat_interval=0.5)
    integration = (await acts.prepare_repository(PrepareInput(
        directive_id=DIRECTIVE, repository=repository))).integration_branch

    async def execute(name: str, attempt: int = 1,
                      rework: ReworkContext | None = None) -> ExecuteOutput:
        return await ActivityEnvironment().run(acts.execute_step, ExecuteInput(
            directive_id=DIRECTIVE, generation=1, spec=spec, attempt=attempt, rework=rework,
            step=PlannedStep(name=name, task_plan=f"Make greeting.txt greet from {name}."),
            integration_branch=integration))

    async def merge(name: str, out: ExecuteOutput, attempt: int = 1):  # noqa: ANN202
        return await acts.merge_step(MergeInput(
            directive_id=DIRECTIVE, repository=repository, integration_branch=integration,
            step=name, attempt=attempt, branch=out.branch, commit=out.commit))

    # Two parallel steps: both start from the same integration head.
    messages_server.script(
        tool_reply("write_file", {"path": "greeting.txt", "content": "hello from A\n"}),
        text_reply("A greets"),
        tool_reply("write_file", {"path": "greeting.txt", "content": "hello from B\n"}),
        text_reply("B greets"))
    a = await execute("a")
    b = await execute("b")
    assert (await merge("a", a)).merged
    conflict = await merge("b", b)
    assert not conflict.merged and conflict.conflict_files == ["greeting.txt"]

    evaluation = merge_conflict_evaluation(conflict.conflict_files, conflict.message)
    first_rework_request = len(messages_server.requests)
    messages_server.script(
        tool_reply("run_command", {"command": "git status --short"}),
        tool_reply("read_file", {"path": "greeting.txt"}),
        tool_reply("write_file", {"path": "greeting.txt",
                                  "content": "hello from A\nhello from B\n"}),
        text_reply("Kept both greetings."))
    b2 = await execute("b", attempt=2, rework=ReworkContext(
        attempt=2, score=evaluation.score, feedback=evaluation.summary,
        instructions=evaluation.rework_instructions))
    assert b2.success, b2.summary

    prompt = messages_server.requests[first_rework_request].text
    assert "MERGE CONFLICT" in prompt and "- greeting.txt" in prompt
    status = tool_result(messages_server, first_rework_request + 1)
    assert "UU greeting.txt" in status, "git works in the sandbox and shows the merge"
    markers = tool_result(messages_server, first_rework_request + 2)
    assert "<<<<<<<" in markers and "hello from A" in markers and "hello from B" in markers

    merged = await merge("b", b2, attempt=2)
    assert merged.merged, merged.message
    assert show(repo, integration, "greeting.txt") == "hello from A\nhello from B"
    parents = sh("git", "log", "-1", "--format=%P", b2.commit or "", cwd=repo).split()
    assert len(parents) == 2, "the rework's commit is the merge of both lines of work"
    assert sh("git", "status", "--porcelain", cwd=repo) == ""


async def test_a_directive_with_two_parallel_steps_on_one_line_completes_with_both(
        client: Client, task_queue: str, tmp_path: Path, pg_pool: asyncpg.Pool,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same through the real workflows: whichever step merges second conflicts,
    is sent back red, and its rework (a shell step that resolves conflict markers
    when it finds them) succeeds."""
    monkeypatch.setenv("MAKIMA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MAKIMA_AUTO_CHECKS", "0")
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    set_identity(monkeypatch)
    repo = make_repo(tmp_path / "repo", {"greeting.txt": "hello\n"})

    # The first try waits 2 s before it writes, so both steps' worktrees exist before
    # either merges (steps got fast enough that one could merge before the other began,
    # and then nothing conflicted: 1 run in 5).
    def greet(team: str) -> str:
        return ("if grep -q '^<<<<<<<' greeting.txt; then "
                "printf 'hello from A\\nhello from B\\n' > greeting.txt; "
                f"else sleep 2; echo 'hello from {team}' > greeting.txt; fi")

    spec = DirectiveSpec.model_validate({
        "title": "greetings", "goal": "greet from both teams", "executor": "shell",
        "autonomy": "full_auto", "repository": {"path": str(repo)},
        "plan": {"steps": [{"name": "a", "command": greet("A")},
                           {"name": "b", "command": greet("B")}]},
    })
    activities = [*PlanningActivities(None).activities(), *EvaluationActivities(None).activities(),
                  *ExecutionActivities().activities(), *RecordActivities(pg_pool).activities()]
    async with build_worker(client, task_queue, activities):
        handle = await start(client, task_queue, spec)
        result = await handle.result()

    assert result.status is DirectiveStatus.COMPLETED, result.reason
    assert sorted(step.attempts for step in result.steps) == [1, 2], "one rework, no more"
    assert show(repo, result.integration_branch, "greeting.txt") == "hello from A\nhello from B"
    conflicts = await pg_pool.fetch("SELECT step FROM events WHERE directive_id = $1 AND "
                                    "type = 'merge_conflict'", handle.id)
    assert len(conflicts) == 1
