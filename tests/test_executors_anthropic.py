"""The `anthropic` executor: the real `anthropic` client against the loopback
Messages API (tests/messages_server.py) scripted with tool calls."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from anthropic import AsyncAnthropic
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.execution import ExecutionActivities
from makima.contracts import ExecuteInput, PrepareInput, ReworkContext
from makima.errors import LLMFatalError, LLMRetryableError
from makima.executors.anthropic_agent import AnthropicExecutor
from makima.executors.base import ExecutionRequest
from makima.models import DirectiveSpec, ExecutorKind, ModelChoice, PlannedStep, Repository
from tests.fakes.repos import make_repo, set_identity, show
from tests.messages_server import MessagesServer, error_reply, text_reply, tool_reply, usage

DIRECTIVE = "directive-agent-0001"


def tool_results(server: MessagesServer, request_index: int) -> list[dict[str, Any]]:
    """The tool_result blocks makima sent in its `request_index`-th request."""
    last = server.requests[request_index].body["messages"][-1]
    return [block for block in last["content"] if block.get("type") == "tool_result"]


def spec(repository: Repository, **changes: Any) -> DirectiveSpec:
    return DirectiveSpec(title="Agent test", goal="Greet the world in a file",
                         requirements=["write hello.txt"], repository=repository,
                         executor=ExecutorKind.ANTHROPIC, **changes)


async def test_agent_writes_a_file_and_runs_a_command_through_execute_step(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, messages_server: MessagesServer) -> None:
    set_identity(monkeypatch)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", messages_server.base_url)
    repository = Repository(path=str(make_repo(tmp_path / "repo")))
    acts = ExecutionActivities(tmp_path / "home", heartbeat_interval=0.5)
    prepared = await acts.prepare_repository(PrepareInput(directive_id=DIRECTIVE,
                                                          repository=repository))
    messages_server.script(
        tool_reply("write_file", {"path": "hello.txt", "content": "hello world\n"},
                   used=usage(100, 20)),
        tool_reply("run_command", {"command": "wc -l < hello.txt > count.txt && echo counted"
                                              " key=${ANTHROPIC_API_KEY:-none}"},
                   used=usage(200, 30)),
        text_reply("Wrote hello.txt and counted its lines.", used=usage(300, 40)),
    )
    heartbeats: list[Any] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *details: heartbeats.append(details[0])
    out = await env.run(acts.execute_step, ExecuteInput(
        directive_id=DIRECTIVE, generation=1,
        spec=spec(repository, models=ModelChoice(executor="claude-haiku-4-5")),
        step=PlannedStep(name="greet", task_plan="Create hello.txt saying hello world."),
        integration_branch=prepared.integration_branch))

    assert out.success, out.summary
    assert out.summary == "Wrote hello.txt and counted its lines."
    assert sorted(out.changed_files) == ["count.txt", "hello.txt"]
    assert show(Path(repository.path or ""), out.commit or "", "count.txt") == "1"
    assert out.usage.input_tokens == 600 and out.usage.output_tokens == 90
    assert out.usage.cost_usd > 0
    first = messages_server.requests[0]
    assert first.body["model"] == "claude-haiku-4-5"
    assert "Greet the world in a file" in first.text and "Create hello.txt" in first.text
    assert {tool["name"] for tool in first.body["tools"]} == {
        "list_files", "read_file", "write_file", "edit_file", "run_command"}
    command_result = tool_results(messages_server, 2)[0]
    assert not command_result["is_error"] and "counted" in command_result["content"]
    assert "key=none" in command_result["content"]  # the worker's secrets stay with it
    assert any(beat["last_tool"] == "run_command" and beat["turns"] >= 2 for beat in heartbeats)


async def test_file_tool_paths_outside_the_worktree_are_refused(
        tmp_path: Path, messages_server: MessagesServer) -> None:
    worktree = tmp_path / "worktree"
    worktree.mkdir()
    (worktree / "inside.txt").write_text("fine\n")
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET\n")
    (worktree / "link.txt").symlink_to(secret)
    (worktree / "linkdir").symlink_to(tmp_path)
    messages_server.script(
        tool_reply("read_file", {"path": "../secret.txt"}),
        tool_reply("read_file", {"path": str(secret)}),
        tool_reply("read_file", {"path": "link.txt"}),
        tool_reply("write_file", {"path": "linkdir/escape.txt", "content": "x"}),
        tool_reply("write_file", {"path": "../escape.txt", "content": "x"}),
        tool_reply("edit_file", {"path": ".git/config", "old_text": "a", "new_text": "b"}),
        tool_reply("read_file", {"path": "inside.txt"}),
        text_reply("gave up"),
    )
    client = AsyncAnthropic(api_key="k", base_url=messages_server.base_url, max_retries=0)
    result = await AnthropicExecutor(client).run(ExecutionRequest(
        directive_id=DIRECTIVE, spec=spec(Repository(path=str(tmp_path))),
        step=PlannedStep(name="escape", task_plan="try to escape"), attempt=1,
        worktree=worktree))
    assert result.success
    refusals = [tool_results(messages_server, i)[0] for i in range(1, 7)]
    for refusal in refusals:
        assert refusal["is_error"], refusal
        assert "refused" in refusal["content"]
    assert "outside the worktree" in refusals[0]["content"]
    assert "TOP-SECRET" not in json.dumps([r.body for r in messages_server.requests])
    assert not (tmp_path / "escape.txt").exists()
    allowed = tool_results(messages_server, 7)[0]
    assert not allowed["is_error"] and allowed["content"] == "fine\n"


async def test_a_fifo_and_a_50_gb_file_in_the_worktree_neither_hang_nor_exhaust_the_worker(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, messages_server: MessagesServer) -> None:
    """The agent leaves a FIFO and a sparse 50 GB file and then reads, writes and edits
    them: each tool answers at once (refused, or cut to a bounded read), the attempt
    ends, and its heartbeats kept coming throughout (the event loop never blocked)."""
    set_identity(monkeypatch)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", messages_server.base_url)
    repository = Repository(path=str(make_repo(tmp_path / "repo")))
    acts = ExecutionActivities(tmp_path / "home", heartbeat_interval=0.2)
    prepared = await acts.prepare_repository(PrepareInput(directive_id=DIRECTIVE,
                                                          repository=repository))
    messages_server.script(
        tool_reply("run_command", {"command": "mkfifo pipe && truncate -s 50G huge.bin"}),
        tool_reply("list_files", {}),
        tool_reply("read_file", {"path": "pipe"}),
        tool_reply("write_file", {"path": "pipe", "content": "x"}),
        tool_reply("edit_file", {"path": "pipe", "old_text": "a", "new_text": "b"}),
        tool_reply("read_file", {"path": "huge.bin"}),
        tool_reply("edit_file", {"path": "huge.bin", "old_text": "a", "new_text": "b"}),
        tool_reply("run_command", {"command": "rm pipe huge.bin && echo fine > ok.txt"}),
        text_reply("done"),
    )
    beats: list[float] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *details: beats.append(time.monotonic())
    out = await asyncio.wait_for(env.run(acts.execute_step, ExecuteInput(
        directive_id=DIRECTIVE, generation=1, spec=spec(repository),
        step=PlannedStep(name="odd-files", task_plan="leave odd files"),
        integration_branch=prepared.integration_branch)), 120)

    assert out.success and out.changed_files == ["ok.txt"], out.summary
    results = [tool_results(messages_server, i)[0] for i in range(2, 8)]
    listed = results[0]["content"].splitlines()
    assert "huge.bin" in listed and "pipe" not in listed
    for refused in results[1:4]:
        assert refused["is_error"] and "'pipe' is not a regular file" in refused["content"]
    assert not results[4]["is_error"]
    assert results[4]["content"].endswith(
        "[… huge.bin has 53687091200 bytes; only its first 20000 characters are shown]")
    assert results[5]["is_error"] and "more than edit_file rewrites" in results[5]["content"]
    # heartbeats came all along (before the tools ran in threads, the FIFO's open
    # held the event loop, and with it every heartbeat, forever)
    assert len(beats) >= 2


async def test_rework_feedback_is_put_before_the_task(
        tmp_path: Path, messages_server: MessagesServer) -> None:
    messages_server.script(text_reply("fixed"))
    client = AsyncAnthropic(api_key="k", base_url=messages_server.base_url, max_retries=0)
    await AnthropicExecutor(client).run(ExecutionRequest(
        directive_id=DIRECTIVE, spec=spec(Repository(path=str(tmp_path))),
        step=PlannedStep(name="redo", task_plan="THE TASK"), attempt=3, worktree=tmp_path,
        rework=ReworkContext(attempt=3, score=0.4, feedback="tests fail",
                             instructions="make test_x pass")))
    prompt = messages_server.requests[0].body["messages"][0]["content"][0]["text"]
    assert prompt.index("REWORK") < prompt.index("THE TASK")
    assert "attempt 3" in prompt and "tests fail" in prompt and "make test_x pass" in prompt


async def test_turn_limit_ends_a_looping_agent_as_a_failed_attempt(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, messages_server: MessagesServer) -> None:
    monkeypatch.setenv("MAKIMA_AGENT_MAX_TURNS", "3")
    messages_server.script(*[tool_reply("list_files", {}) for _ in range(3)])
    client = AsyncAnthropic(api_key="k", base_url=messages_server.base_url, max_retries=0)
    result = await AnthropicExecutor(client).run(ExecutionRequest(
        directive_id=DIRECTIVE, spec=spec(Repository(path=str(tmp_path))),
        step=PlannedStep(name="loop", task_plan="loop"), attempt=1, worktree=tmp_path))
    assert not result.success and "3 turns" in result.summary
    assert len(messages_server.requests) == 3 and result.usage.input_tokens == 300


async def test_command_timeout_and_truncated_output(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, messages_server: MessagesServer) -> None:
    monkeypatch.setenv("MAKIMA_AGENT_COMMAND_TIMEOUT_SECONDS", "1")
    messages_server.script(
        tool_reply("run_command", {"command": "sleep 30"}),
        tool_reply("run_command", {"command": "seq 1 200000"}),
        text_reply("ok"))
    client = AsyncAnthropic(api_key="k", base_url=messages_server.base_url, max_retries=0)
    await AnthropicExecutor(client).run(ExecutionRequest(
        directive_id=DIRECTIVE, spec=spec(Repository(path=str(tmp_path))),
        step=PlannedStep(name="slow", task_plan="slow"), attempt=1, worktree=tmp_path))
    timed_out = tool_results(messages_server, 1)[0]
    assert timed_out["is_error"] and "timed out" in timed_out["content"]
    long_output = tool_results(messages_server, 2)[0]["content"]
    assert len(long_output) < 25_000 and long_output.rstrip().endswith("200000")
    assert "truncated" in long_output


async def test_an_authentication_failure_is_not_retried(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, messages_server: MessagesServer) -> None:
    messages_server.script(error_reply(401, "invalid x-api-key"))
    client = AsyncAnthropic(api_key="k", base_url=messages_server.base_url, max_retries=0)
    with pytest.raises(LLMFatalError, match="ANTHROPIC_API_KEY"):
        await AnthropicExecutor(client).run(ExecutionRequest(
            directive_id=DIRECTIVE, spec=spec(Repository(path=str(tmp_path))),
            step=PlannedStep(name="auth", task_plan="x"), attempt=1, worktree=tmp_path))


async def test_missing_api_key_is_a_clear_non_retryable_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    set_identity(monkeypatch)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    repository = Repository(path=str(make_repo(tmp_path / "repo")))
    acts = ExecutionActivities(tmp_path / "home")
    prepared = await acts.prepare_repository(PrepareInput(directive_id=DIRECTIVE,
                                                          repository=repository))
    with pytest.raises(ApplicationError) as caught:
        await ActivityEnvironment().run(acts.execute_step, ExecuteInput(
            directive_id=DIRECTIVE, generation=1, spec=spec(repository),
            step=PlannedStep(name="nokey", task_plan="x"),
            integration_branch=prepared.integration_branch))
    assert caught.value.non_retryable and "ANTHROPIC_API_KEY" in str(caught.value)


async def test_each_turn_reads_the_earlier_conversation_from_the_prompt_cache(
        tmp_path: Path) -> None:
    (tmp_path / "big.py").write_text("x = 1  # padding\n" * 600)
    with MessagesServer(caching=True) as server:
        server.script(tool_reply("read_file", {"path": "big.py"}),
                      tool_reply("read_file", {"path": "big.py"}), text_reply("done"))
        client = AsyncAnthropic(api_key="k", base_url=server.base_url, max_retries=0)
        result = await AnthropicExecutor(client).run(ExecutionRequest(
            directive_id=DIRECTIVE, spec=spec(Repository(path=str(tmp_path))),
            step=PlannedStep(name="cache", task_plan="read big.py twice"), attempt=1,
            worktree=tmp_path))
    bodies = [request.body for request in server.requests]
    for body in bodies:
        assert body["system"][-1]["cache_control"] == {"type": "ephemeral"}
        marked = [block for message in body["messages"] for block in message["content"]
                  if isinstance(block, dict) and "cache_control" in block]
        assert marked == [body["messages"][-1]["content"][-1]], "one breakpoint: the latest turn"
    # turn 2 and 3 read what turn 1 and 2 wrote; the bill counts every token
    assert result.usage.cache_read_tokens > 0 and result.usage.cache_write_tokens > 0
    assert result.usage.input_tokens < result.usage.cache_read_tokens


async def test_a_failed_turn_keeps_what_the_earlier_turns_were_billed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, messages_server: MessagesServer) -> None:
    set_identity(monkeypatch)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", messages_server.base_url)
    repository = Repository(path=str(make_repo(tmp_path / "repo")))
    acts = ExecutionActivities(tmp_path / "home", heartbeat_interval=0.5)
    prepared = await acts.prepare_repository(PrepareInput(directive_id=DIRECTIVE,
                                                          repository=repository))
    messages_server.script(tool_reply("list_files", {}, used=usage(1000, 200)),
                           error_reply(529, "overloaded"))
    with pytest.raises(ApplicationError) as failed:
        await ActivityEnvironment().run(acts.execute_step, ExecuteInput(
            directive_id=DIRECTIVE, generation=1, spec=spec(repository),
            step=PlannedStep(name="billed", task_plan="x"),
            integration_branch=prepared.integration_branch))
    assert not failed.value.non_retryable
    billed = failed.value.details[0]["usage"]
    assert billed["input_tokens"] == 1000 and billed["output_tokens"] == 200
    assert billed["cost_usd"] > 0


async def test_the_agent_honours_the_llm_timeout_and_names_its_own_model_variable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, messages_server: MessagesServer) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", messages_server.base_url)
    monkeypatch.setenv("MAKIMA_LLM_TIMEOUT", "0.5")

    def slow(request: Any) -> Any:
        time.sleep(2)
        return text_reply("too late")

    messages_server.script(slow, error_reply(404, "model: nope"))
    request = ExecutionRequest(directive_id=DIRECTIVE, spec=spec(Repository(path=str(tmp_path))),
                               step=PlannedStep(name="t", task_plan="x"), attempt=1,
                               worktree=tmp_path)
    with pytest.raises(LLMRetryableError, match="did not answer in time"):
        await AnthropicExecutor().run(request)
    with pytest.raises(LLMFatalError) as missing:
        await AnthropicExecutor().run(request)
    assert "MAKIMA_EXECUTOR_MODEL" in str(missing.value)
    assert "MAKIMA_PLANNER_MODEL" not in str(missing.value)
