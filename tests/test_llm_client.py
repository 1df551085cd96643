"""The LLM client layer against the real `anthropic` SDK and the loopback
Messages API: configuration from the environment, and what each kind of API
failure becomes. Retries belong to Temporal: the SDK never retries (every
failure is one request on the server), and a rate-limited planning call is
retried by a real worker on the Temporal test server.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import pytest
from temporalio import workflow
from temporalio.client import Client, WorkflowFailureError
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

import makima.llm.client
from activities.planning import PlanningActivities
from makima.contracts import ActivityName, PlanInput, PlanOutput
from makima.errors import Cancelled, LLMFatalError, LLMRetryableError
from makima.llm.client import (
    DEFAULT_EVALUATOR_MODEL,
    DEFAULT_PLANNER_MODEL,
    LLMClient,
    llm_from_env,
    retry_after_seconds,
)
from makima.llm.pricing import usage_from_api
from makima.models import DirectiveSpec, ModelChoice, Repository, Usage
from tests.messages_server import MessagesServer, error_reply, slow, text_reply, tool_reply, usage

VALID_PLAN = {"steps": [{"name": "write-readme", "description": "a readme",
                         "task_plan": "Write README.md describing the project."}],
              "summary": "one step"}


def make_spec(**fields) -> DirectiveSpec:
    return DirectiveSpec(title="Docs", goal="Document the project",
                         repository=Repository(path="/tmp/repo"), **fields)


@pytest.fixture
def llm(messages_server: MessagesServer, monkeypatch: pytest.MonkeyPatch) -> LLMClient:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-key")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", messages_server.base_url)
    client = llm_from_env()
    assert client is not None
    return client


# --------------------------------------------------------------------------- configuration


def test_no_api_key_means_no_llm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    assert llm_from_env() is None
    monkeypatch.setenv("ANTHROPIC_API_KEY", "   ")
    assert llm_from_env() is None


def test_environment_configures_models_base_url_and_no_sdk_retries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("MAKIMA_PLANNER_MODEL", raising=False)
    monkeypatch.delenv("MAKIMA_EVALUATOR_MODEL", raising=False)
    defaults = llm_from_env()
    assert defaults is not None
    assert (defaults.planner_model, defaults.evaluator_model) == (
        DEFAULT_PLANNER_MODEL, DEFAULT_EVALUATOR_MODEL)
    assert defaults.anthropic.max_retries == 0
    assert defaults.base_url.startswith("http://127.0.0.1:9")

    monkeypatch.setenv("MAKIMA_PLANNER_MODEL", "claude-opus-4-7")
    monkeypatch.setenv("MAKIMA_EVALUATOR_MODEL", "claude-haiku-4-5")
    chosen = llm_from_env()
    assert chosen is not None
    assert (chosen.planner_model, chosen.evaluator_model) == ("claude-opus-4-7",
                                                              "claude-haiku-4-5")


def test_retry_after_header_forms() -> None:
    assert retry_after_seconds({"retry-after": "7"}) == 7.0
    assert retry_after_seconds({"Retry-After-Ms": "1500"}) == 1.5
    assert retry_after_seconds({}) is None
    assert retry_after_seconds({"retry-after": "soon"}) is None


# --------------------------------------------------------------------------- classification


async def test_401_is_non_retryable_and_says_what_to_fix(
    llm: LLMClient, messages_server: MessagesServer,
) -> None:
    messages_server.script(error_reply(401, "invalid x-api-key"))

    with pytest.raises(ApplicationError) as caught:
        await PlanningActivities(llm).plan_directive(
            PlanInput(directive_id="d-1", spec=make_spec()))

    assert caught.value.non_retryable
    assert caught.value.type == LLMFatalError.__name__
    assert "ANTHROPIC_API_KEY is missing or invalid" in caught.value.message
    assert len(messages_server.requests) == 1
    sent = messages_server.requests[0].headers
    assert "sk-test-key" in sent.get("x-api-key", "") + sent.get("authorization", "")


async def test_404_names_the_model(llm: LLMClient, messages_server: MessagesServer) -> None:
    messages_server.script(error_reply(404, "model: no-such-model"))
    spec = make_spec(models=ModelChoice(planner="no-such-model"))

    with pytest.raises(ApplicationError) as caught:
        await PlanningActivities(llm).plan_directive(PlanInput(directive_id="d-1", spec=spec))

    assert caught.value.non_retryable
    assert "'no-such-model'" in caught.value.message
    assert "MAKIMA_PLANNER_MODEL" in caught.value.message


@pytest.mark.parametrize(
    ("status", "headers", "delay"),
    [(429, {"retry-after": "7"}, timedelta(seconds=7)), (529, {}, None), (503, {}, None)],
)
async def test_rate_limit_overload_and_5xx_are_retryable_once_per_attempt(
    llm: LLMClient, messages_server: MessagesServer, status: int,
    headers: dict[str, str], delay: timedelta | None,
) -> None:
    messages_server.script(error_reply(status, headers=headers))

    with pytest.raises(ApplicationError) as caught:
        await PlanningActivities(llm).plan_directive(
            PlanInput(directive_id="d-1", spec=make_spec()))

    assert not caught.value.non_retryable
    assert caught.value.type == LLMRetryableError.__name__
    assert caught.value.next_retry_delay == delay
    assert len(messages_server.requests) == 1  # the SDK did not retry on its own


async def test_unreachable_api_is_retryable(monkeypatch: pytest.MonkeyPatch) -> None:
    with MessagesServer() as server:
        closed_url = server.base_url  # nothing listens there once the server stops
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", closed_url)
    llm = llm_from_env()

    with pytest.raises(ApplicationError) as caught:
        await PlanningActivities(llm).plan_directive(
            PlanInput(directive_id="d-1", spec=make_spec()))

    assert not caught.value.non_retryable
    assert "could not reach the Anthropic API" in caught.value.message


# --------------------------------------------------------------------------- Temporal owns retries


@workflow.defn
class PlanOnceWorkflow:
    """Calls the planning activity by name, as the directive workflow does."""

    @workflow.run
    async def run(self, request: PlanInput) -> PlanOutput:
        return await workflow.execute_activity(
            ActivityName.PLAN_DIRECTIVE.value,
            request,
            result_type=PlanOutput,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=RetryPolicy(initial_interval=timedelta(milliseconds=200),
                                     maximum_attempts=3),
        )


async def _run_plan_workflow(client: Client, task_queue: str, llm: LLMClient) -> tuple:
    async with Worker(client, task_queue=task_queue, workflows=[PlanOnceWorkflow],
                      activities=PlanningActivities(llm).activities(),
                      workflow_runner=UnsandboxedWorkflowRunner()):
        handle = await client.start_workflow(
            PlanOnceWorkflow.run, PlanInput(directive_id="d-1", spec=make_spec()),
            id=f"plan-{uuid.uuid4()}", task_queue=task_queue)
        result = await handle.result()
        history = await handle.fetch_history()
    attempts = [e.activity_task_started_event_attributes.attempt for e in history.events
                if e.HasField("activity_task_started_event_attributes")]
    return result, attempts


@pytest.mark.parametrize("first", [error_reply(429, headers={"retry-after": "1"}),
                                   error_reply(529)], ids=["429-retry-after", "529"])
async def test_temporal_retries_rate_limit_and_overload(
    client: Client, task_queue: str, llm: LLMClient, messages_server: MessagesServer, first,
) -> None:
    messages_server.script(first, tool_reply("submit_plan", VALID_PLAN))

    result, attempts = await _run_plan_workflow(client, task_queue, llm)

    assert result.plan.names == ["write-readme"]
    assert len(messages_server.requests) == 2  # one per activity attempt, none by the SDK
    assert attempts == [2]  # the history records the activity's last attempt: the second
    for request in messages_server.requests:
        assert request.headers["x-stainless-retry-count"] == "0"


async def test_fatal_error_is_not_retried_by_temporal(
    client: Client, task_queue: str, llm: LLMClient, messages_server: MessagesServer,
) -> None:
    messages_server.script(error_reply(401), tool_reply("submit_plan", VALID_PLAN))

    with pytest.raises(WorkflowFailureError) as caught:
        await _run_plan_workflow(client, task_queue, llm)

    assert isinstance(caught.value.cause, ActivityError)
    assert "ANTHROPIC_API_KEY is missing or invalid" in str(caught.value.cause.cause)
    assert len(messages_server.requests) == 1


# --------------------------------------------------------------------------- a cancel mid-call


async def cancelled_mid_call(llm: LLMClient, server: MessagesServer) -> Cancelled:
    """Cancel a call as soon as the server has it; the error the caller gets."""
    call = asyncio.ensure_future(llm.create_message(
        model="claude-test", max_tokens=100, messages=[{"role": "user", "content": "hi"}]))
    for _ in range(1000):
        if server.requests:
            break
        await asyncio.sleep(0.01)
    call.cancel()
    with pytest.raises(Cancelled) as caught:
        await call
    return caught.value


async def test_a_call_in_flight_at_a_cancel_is_waited_for_and_its_billing_reported(
        llm: LLMClient, messages_server: MessagesServer) -> None:
    messages_server.script(slow(text_reply("hello", used=usage(1000, 100)), 0.5))
    stopped = await cancelled_mid_call(llm, messages_server)
    assert "its answer was billed and is counted" in str(stopped)
    assert stopped.usage == usage_from_api("claude-test", messages_server.billed[0][1])
    assert stopped.usage.input_tokens == 1000


async def test_a_call_that_does_not_answer_within_the_grace_is_abandoned_and_said_so(
        llm: LLMClient, messages_server: MessagesServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(makima.llm.client, "CANCEL_GRACE_SECONDS", 0.2)
    messages_server.script(slow(text_reply("late", used=usage(1000, 100)), 2.0))
    stopped = await cancelled_mid_call(llm, messages_server)
    assert "was abandoned, so what it is billed is not counted" in str(stopped)
    assert stopped.usage == Usage()
    assert messages_server.wait_idle(10) and len(messages_server.billed) == 1, (
        "the server billed it all the same: the limit README names")
