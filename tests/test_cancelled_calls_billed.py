"""A stop counts what the work it cancels was billed, the call in flight included
(issue 10, "every billed token counted").

A whole directive through the real activities (the `anthropic` agent and the LLM
judge through the real `anthropic` client against the suite's loopback Messages
API, git in a real repository, events in the real Postgres) on the Temporal test
server. A person stops it while a model call is in flight: the agent's turn, or
the judge's verdict in the fused evaluate-and-merge activity; or between two
calls, while the agent's command runs. The server bills a call once it has
generated the answer, whether or not makima is still there to read it. The
directive's spend must equal what the server billed, to the cent.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import asyncpg
import pytest
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import CancelledError

from activities.billing import BillingActivities
from activities.evaluate_merge import EvaluateMergeActivities
from activities.evaluation import EvaluationActivities
from activities.execution import ExecutionActivities
from activities.planning import PlanningActivities
from activities.record import RecordActivities
from makima.contracts import integration_branch
from makima.llm.client import llm_from_env
from makima.models import DirectiveSpec, DirectiveStatus, ExecutorKind, StepStatus, StopRequest
from makima.store.reads import get_directive
from tests.fakes.repos import make_repo, set_identity, sh
from tests.messages_server import MessagesServer, error_reply, slow, text_reply, tool_reply, usage
from tests.postgres_fixture import pg_pool, postgres  # noqa: F401 (fixtures)
from tests.standins import save_history, start
from tests.test_every_try_billed import server_bill
from worker import build_worker
from workflows.directive import DirectiveWorkflow

#: How long the call in flight takes to generate: longer than a cancel takes to reach
#: the activity (a heartbeat), so the stop lands while it is out.
GENERATION_SECONDS = 2.0

PLAN = {"summary": "one step", "steps": [
    {"name": "hello", "description": "write hello.txt", "task_plan": "write hello.txt",
     "depends_on": []}]}


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MAKIMA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    monkeypatch.setenv("MAKIMA_AUTO_CHECKS", "0")
    set_identity(monkeypatch)
    return make_repo(tmp_path / "repo", {"README.md": "demo\n"})


async def requests_reached(server: MessagesServer, count: int) -> None:
    for _ in range(600):
        if len(server.requests) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the server got {len(server.requests)} requests, not {count}")


async def stopped_spend(client: Client, task_queue: str, server: MessagesServer,
                        pool: asyncpg.Pool, spec: DirectiveSpec, *, stop_at_request: int,
                        history: str, own_queue: str | None = None, stop_after: float = 0.0,
                        ) -> tuple[WorkflowHandle, float]:
    """Run `spec`, stop it once the server has received `stop_at_request` requests (that
    one is in flight), and return the handle and the spend the directive reports. The
    histories are kept as replay fixtures `history` (MAKIMA_RECORD_HISTORIES=1)."""
    llm = llm_from_env()
    assert llm is not None
    execution = ExecutionActivities(worker_queue=own_queue or "", heartbeat_interval=0.5)
    evaluation = EvaluationActivities(llm)
    activities = [*BillingActivities().activities(), *evaluation.activities(),
                  *execution.activities(),
                  *EvaluateMergeActivities(evaluation, execution).activities(),
                  *RecordActivities(pool).activities()]
    workers = [build_worker(client, task_queue, activities)]
    if own_queue:  # the attempt's worker: evaluate-and-merge runs there
        workers.append(build_worker(client, own_queue, activities, workflows=False))
    try:
        async with contextlib.AsyncExitStack() as running:
            for worker in workers:
                await running.enter_async_context(worker)
            handle = await start(client, task_queue, spec)
            await requests_reached(server, stop_at_request)
            await asyncio.sleep(stop_after)
            answer = await handle.execute_update(DirectiveWorkflow.stop_directive,
                                                 StopRequest(reason="halt"))
            assert answer.accepted, answer
            result = await handle.result()
            await save_history(handle, client, history)
    finally:
        await llm.close()
    assert result.status is DirectiveStatus.STOPPED, result.reason
    assert result.steps[0].status is StepStatus.CANCELLED
    # the call that was in flight may still be generating: it is billed when done
    assert server.wait_idle(30), "the server still answers a call"
    return handle, result.cost_usd


def assert_reports_the_bill(spent: float, messages_server: MessagesServer) -> float:
    """The server's bill, which `spent` (the directive's reported spend) must equal."""
    billed = server_bill(messages_server)
    assert spent == pytest.approx(billed, abs=1e-9), (
        f"the directive reports ${spent} of ${billed} billed")
    return billed


async def test_a_stop_while_the_agents_call_is_in_flight_counts_that_call_and_the_turns_before(
        client: Client, task_queue: str, repo: Path, messages_server: MessagesServer,
        pg_pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setenv("ANTHROPIC_BASE_URL", messages_server.base_url)
    write = tool_reply("write_file", {"path": "hello.txt", "content": "hi\n"},
                       used=usage(2100, 210))
    # turn 1 answers at once; every later turn is out for GENERATION_SECONDS, and the
    # agent never finishes on its own before the stop
    messages_server.script(write, *[
        slow(tool_reply("write_file", {"path": "hello.txt", "content": f"hi {n}\n"},
                        used=usage(2200 + n, 220 + n)), GENERATION_SECONDS)
        for n in range(10)])
    spec = DirectiveSpec(title="hello", goal="write hello.txt", repository={"path": str(repo)},
                         executor=ExecutorKind.ANTHROPIC, evaluator="programmatic", plan=PLAN)

    handle, spent = await stopped_spend(client, task_queue, messages_server, pg_pool, spec,
                                        stop_at_request=2, history="stop-agent-call-in-flight")

    assert len(messages_server.billed) >= 2, "turn 1 and the turn in flight were billed"
    billed = assert_reports_the_bill(spent, messages_server)
    recorded = await get_directive(pg_pool, handle.id)  # what the console and CLI show
    assert recorded.directive.cost_usd == pytest.approx(billed, abs=1e-9)


async def test_a_stop_while_the_judges_call_is_in_flight_counts_it_and_merges_nothing(
        client: Client, task_queue: str, repo: Path, messages_server: MessagesServer,
        pg_pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setenv("ANTHROPIC_BASE_URL", messages_server.base_url)
    verdict = {"score": 0.95, "summary": "hello.txt is there", "criteria": [],
               "rework_instructions": ""}
    messages_server.script(
        tool_reply("write_file", {"path": "hello.txt", "content": "hello\n"},
                   used=usage(2100, 210)),
        text_reply("Wrote hello.txt.", used=usage(2200, 220)),
        # the judge: a green verdict that would merge, out while the stop arrives
        slow(tool_reply("submit_evaluation", verdict, used=usage(3100, 310)),
             GENERATION_SECONDS))
    spec = DirectiveSpec(title="hello", goal="write hello.txt", repository={"path": str(repo)},
                         executor=ExecutorKind.ANTHROPIC, evaluator="llm", plan=PLAN)

    handle, spent = await stopped_spend(client, task_queue, messages_server, pg_pool, spec,
                                        stop_at_request=3, history="stop-judge-call-in-flight",
                                        own_queue=f"{task_queue}-own")

    assert len(messages_server.billed) == 3, "the agent's two turns and the judge's verdict"
    assert_reports_the_bill(spent, messages_server)
    listed = sh("git", "ls-tree", "--name-only", integration_branch(handle.id), cwd=repo)
    assert "hello.txt" not in listed.split(), "nothing merges after a stop"


async def test_a_stop_while_the_agents_command_runs_counts_the_turns_before(
        client: Client, task_queue: str, repo: Path, messages_server: MessagesServer,
        pg_pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setenv("ANTHROPIC_BASE_URL", messages_server.base_url)
    messages_server.script(
        tool_reply("write_file", {"path": "hello.txt", "content": "hi\n"},
                   used=usage(2100, 210)),
        # the stop comes while this command runs: no call is in flight
        tool_reply("run_command", {"command": "sleep 30"}, used=usage(2200, 220)),
        text_reply("Done.", used=usage(2300, 230)))
    spec = DirectiveSpec(title="hello", goal="write hello.txt", repository={"path": str(repo)},
                         executor=ExecutorKind.ANTHROPIC, evaluator="programmatic", plan=PLAN)

    handle, spent = await stopped_spend(client, task_queue, messages_server, pg_pool, spec,
                                        stop_at_request=2, history="stop-agent-command")

    assert len(messages_server.billed) == 2, "the stop came before the third turn"
    assert_reports_the_bill(spent, messages_server)


async def test_a_stop_while_the_agent_waits_for_a_retry_counts_the_failed_try(
        client: Client, task_queue: str, repo: Path, messages_server: MessagesServer,
        pg_pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setenv("ANTHROPIC_BASE_URL", messages_server.base_url)
    messages_server.script(
        tool_reply("write_file", {"path": "hello.txt", "content": "hi\n"},
                   used=usage(2100, 210)),
        # the try fails after one billed turn; Temporal retries it in 10 minutes
        error_reply(529, "overloaded", headers={"retry-after": "600"}),
        # should the retry come first, it is in flight when the stop comes
        *[slow(tool_reply("write_file", {"path": "hello.txt", "content": f"hi {n}\n"},
                          used=usage(2200 + n, 220 + n)), GENERATION_SECONDS)
          for n in range(10)])
    spec = DirectiveSpec(title="hello", goal="write hello.txt", repository={"path": str(repo)},
                         executor=ExecutorKind.ANTHROPIC, evaluator="programmatic", plan=PLAN)

    handle, spent = await stopped_spend(client, task_queue, messages_server, pg_pool, spec,
                                        stop_at_request=2, stop_after=1.0,
                                        history="stop-agent-waiting-for-a-retry")

    assert messages_server.billed, "the failed try's turn was billed"
    assert_reports_the_bill(spent, messages_server)


async def test_a_cancel_while_the_planners_call_is_in_flight_counts_that_call(
        client: Client, task_queue: str, repo: Path, messages_server: MessagesServer,
        pg_pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    # `temporal workflow cancel` of the directive while it plans: a stop by another
    # name, and the planner's answer, billed whether or not anyone reads it, is counted
    monkeypatch.setenv("ANTHROPIC_BASE_URL", messages_server.base_url)
    messages_server.script(slow(tool_reply("submit_plan", PLAN, used=usage(4100, 410)),
                                GENERATION_SECONDS))
    spec = DirectiveSpec(title="hello", goal="write hello.txt", repository={"path": str(repo)},
                         executor=ExecutorKind.ANTHROPIC, evaluator="programmatic")
    llm = llm_from_env()
    assert llm is not None
    execution = ExecutionActivities(heartbeat_interval=0.5)
    activities = [*PlanningActivities(llm).activities(), *execution.activities(),
                  *RecordActivities(pool=pg_pool).activities()]
    try:
        async with build_worker(client, task_queue, activities):
            handle = await start(client, task_queue, spec)
            await requests_reached(messages_server, 1)
            await handle.cancel()
            with pytest.raises(WorkflowFailureError) as failure:
                await handle.result()
            final = await handle.query(DirectiveWorkflow.status)
            await save_history(handle, client, "cancel-planner-call-in-flight")
    finally:
        await llm.close()
    assert isinstance(failure.value.cause, CancelledError)
    assert final.status is DirectiveStatus.STOPPED and final.steps == []
    assert messages_server.wait_idle(30) and len(messages_server.billed) == 1
    billed = assert_reports_the_bill(final.cost_usd, messages_server)
    recorded = await get_directive(pg_pool, handle.id)
    assert recorded.directive.status == "stopped"
    assert recorded.directive.cost_usd == pytest.approx(billed, abs=1e-9)
