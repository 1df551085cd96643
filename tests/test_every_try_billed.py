"""The directive's spend is the sum over every try of every call (issue 10, item 6).

A whole directive through the real activities (planner, `anthropic` agent, LLM
judge, all through the real `anthropic` client against the suite's loopback
Messages API; git in a real repository; events in the real Postgres) on the
Temporal test server, while the API answers 529 or 500 in the middle of a try.
Temporal retries the try; what the failed try was billed before the error must
still be in the directive's spend, to the cent: it equals what the server
billed, priced by makima's table.
"""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest
from temporalio.client import Client, WorkflowFailureError

from activities.evaluation import EvaluationActivities
from activities.execution import ExecutionActivities
from activities.planning import PlanningActivities
from activities.record import RecordActivities
from makima.llm.client import llm_from_env
from makima.llm.pricing import usage_from_api
from makima.models import DirectiveSpec, DirectiveStatus, ExecutorKind, Usage
from makima.store.reads import get_directive
from tests.fakes.repos import make_repo, set_identity, show
from tests.messages_server import MessagesServer, error_reply, text_reply, tool_reply, usage
from tests.postgres_fixture import pg_pool, postgres  # noqa: F401 (fixtures)
from tests.standins import start, status
from worker import build_worker


def server_bill(server: MessagesServer) -> float:
    """What the server billed: every 200 reply's usage, priced for the model asked for."""
    return sum((usage_from_api(model, used) for model, used in server.billed), Usage()).cost_usd


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MAKIMA_HOME", str(tmp_path / "home"))
    set_identity(monkeypatch)
    return make_repo(tmp_path / "repo", {"README.md": "demo\n"})


async def test_spend_counts_the_tries_temporal_retried_after_a_529_or_500(
        client: Client, task_queue: str, repo: Path, messages_server: MessagesServer,
        pg_pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", messages_server.base_url)
    monkeypatch.setenv("MAKIMA_AUTO_CHECKS", "0")
    plan = {"summary": "one step", "steps": [
        {"name": "hello", "description": "write hello.txt", "task_plan": "write hello.txt",
         "depends_on": []}]}
    verdict = {"score": 0.95, "summary": "hello.txt is there", "criteria": [],
               "rework_instructions": ""}
    messages_server.script(
        # planning, try 1: an answer that is not a plan (billed), then the correction
        # call is overloaded; try 2 plans
        tool_reply("submit_plan", {"summary": "no steps"}, used=usage(1100, 110)),
        error_reply(529, "overloaded"),
        tool_reply("submit_plan", plan, used=usage(1200, 120)),
        # the agent, try 1: one turn billed, then the API fails; try 2 does the work
        tool_reply("write_file", {"path": "hello.txt", "content": "hi\n"}, used=usage(2100, 210)),
        error_reply(500, "internal error"),
        tool_reply("write_file", {"path": "hello.txt", "content": "hello\n"},
                   used=usage(2200, 220)),
        text_reply("Wrote hello.txt.", used=usage(2300, 230)),
        # the judge, try 1: an invalid verdict (billed), its correction overloaded; try 2
        tool_reply("submit_evaluation", {"score": "high"}, used=usage(3100, 310)),
        error_reply(529, "overloaded"),
        tool_reply("submit_evaluation", verdict, used=usage(3200, 320)),
    )
    llm = llm_from_env()
    assert llm is not None
    activities = [*PlanningActivities(llm).activities(), *EvaluationActivities(llm).activities(),
                  *ExecutionActivities().activities(), *RecordActivities(pg_pool).activities()]
    spec = DirectiveSpec(title="hello", goal="write hello.txt", repository={"path": str(repo)},
                         executor=ExecutorKind.ANTHROPIC, evaluator="llm")
    try:
        async with build_worker(client, task_queue, activities):
            handle = await start(client, task_queue, spec)
            result = await handle.result()
    finally:
        await llm.close()

    assert result.status is DirectiveStatus.COMPLETED, result.reason
    assert show(repo, result.integration_branch, "hello.txt").strip() == "hello"
    assert messages_server.remaining == 0, "every scripted reply was asked for"
    assert len(messages_server.billed) == 7
    billed = server_bill(messages_server)
    assert result.cost_usd == pytest.approx(billed, abs=1e-9), (
        f"the directive reports ${result.cost_usd} of ${billed} billed")
    assert result.steps[0].cost_usd == pytest.approx(
        billed - sum((usage_from_api(m, u) for m, u in messages_server.billed[:2]),
                     Usage()).cost_usd, abs=1e-9), "the step's spend: its agent's and judge's"
    recorded = await get_directive(pg_pool, handle.id)  # what the console and CLI show
    assert recorded.directive.cost_usd == pytest.approx(billed, abs=1e-9)


async def test_a_directive_whose_planning_fails_at_last_counts_every_try_it_was_billed(
        client: Client, task_queue: str, repo: Path, messages_server: MessagesServer,
        pg_pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", messages_server.base_url)
    not_a_plan = {"summary": "no steps", "steps": "none"}
    messages_server.script(
        # try 1: an invalid answer, its correction overloaded: Temporal retries
        tool_reply("submit_plan", not_a_plan, used=usage(1100, 110)),
        error_reply(529, "overloaded"),
        # try 2: invalid twice, which no retry can help: the directive fails
        tool_reply("submit_plan", not_a_plan, used=usage(1200, 120)),
        tool_reply("submit_plan", not_a_plan, used=usage(1300, 130)),
    )
    llm = llm_from_env()
    assert llm is not None
    activities = [*PlanningActivities(llm).activities(), *EvaluationActivities(llm).activities(),
                  *ExecutionActivities().activities(), *RecordActivities(pg_pool).activities()]
    spec = DirectiveSpec(title="plan", goal="write hello.txt", repository={"path": str(repo)},
                         executor=ExecutorKind.ANTHROPIC)
    try:
        async with build_worker(client, task_queue, activities):
            handle = await start(client, task_queue, spec)
            with pytest.raises(WorkflowFailureError):
                await handle.result()
            final = await status(handle)
    finally:
        await llm.close()

    assert final.status is DirectiveStatus.FAILED and "planning failed" in final.reason
    assert len(messages_server.billed) == 3
    billed = server_bill(messages_server)
    assert final.cost_usd == pytest.approx(billed, abs=1e-9), (
        f"the directive reports ${final.cost_usd} of ${billed} billed")
