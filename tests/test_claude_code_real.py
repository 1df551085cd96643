"""The REAL Claude Code CLI bundled in claude-agent-sdk, driven by the
`claude_code` executor through `execute_step`, against the suite's Messages API
server (streamed as server-sent events, as the CLI asks), in the sandbox, as
root (the test machine's user): no network, nothing but loopback.

Proves: a Write tool use lands in the attempt's commit; Claude Code runs with
its own system prompt plus makima's step instructions; the CLI holds only a
placeholder key while the model API sees the worker's (added by the proxy
outside the sandbox); a Bash command of the agent cannot escape
(tests/test_sandbox.py's probe); a failing CLI's stderr reaches the reason.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.execution import ExecutionActivities
from makima.contracts import ExecuteInput, ExecuteOutput, PrepareInput
from makima.executors.base import ExecutorSetupError
from makima.executors.claude_code import STEP_INSTRUCTIONS, claude_code_preflight
from makima.executors.model_proxy import PLACEHOLDER_KEY
from makima.models import DirectiveSpec, ExecutorKind, PlannedStep, Repository
from makima.workspace import Workspace, session_home
from tests.fakes.repos import make_repo, set_identity, show
from tests.messages_server import (
    MessagesServer,
    ReceivedRequest,
    Reply,
    Responder,
    text_reply,
    tool_reply,
)
from tests.test_sandbox import Target, target  # noqa: F401 (the fixture)

pytest.importorskip("claude_agent_sdk", reason="the `claude` extra is not installed")

DIRECTIVE = "directive-real-claude-0001"
MODEL = "claude-sonnet-4-5"


def agent_turns(*replies: Reply | Responder) -> Any:
    """A responder: the agent loop's requests (they carry Claude Code's tools) get
    `replies` in order (a responder is called); anything else the CLI asks on the
    side gets a short text."""
    queue = list(replies)

    def respond(request: ReceivedRequest) -> Reply:
        tools = {tool.get("name") for tool in request.body.get("tools") or []}
        if "Bash" in tools and queue:
            reply = queue.pop(0)
            return reply(request) if callable(reply) else reply
        return text_reply("ok", model=MODEL)

    return respond


def tool_result_text(request: ReceivedRequest) -> str:
    """The text of the tool_result blocks the CLI sent back in `request`."""
    parts: list[str] = []
    for block in request.body["messages"][-1]["content"]:
        if isinstance(block, dict) and block.get("type") == "tool_result":
            content = block.get("content")
            parts += ([content] if isinstance(content, str)
                      else [item.get("text", "") for item in content or []])
    return "\n".join(parts)


async def run_step(home: Path, repository: Repository, step: str, server: MessagesServer,
                   *replies: Reply) -> ExecuteOutput:
    server.script(*[agent_turns(*replies)] * 20)
    acts = ExecutionActivities(home, heartbeat_interval=0.5)
    prepared = await acts.prepare_repository(PrepareInput(directive_id=DIRECTIVE,
                                                          repository=repository))
    spec = DirectiveSpec(title="Real Claude", goal="Greet in hello.txt", repository=repository,
                         executor=ExecutorKind.CLAUDE_CODE)
    spec.models.executor = MODEL
    return await ActivityEnvironment().run(acts.execute_step, ExecuteInput(
        directive_id=DIRECTIVE, generation=1, spec=spec,
        step=PlannedStep(name=step, task_plan="Create hello.txt saying hi."),
        integration_branch=prepared.integration_branch))


def worktree_of(home: Path, step: str) -> Path:
    return Workspace(home, DIRECTIVE, step, attempt=1).path


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch, messages_server: MessagesServer) -> str:
    set_identity(monkeypatch)
    key = f"sk-ant-test-{uuid.uuid4().hex}"
    monkeypatch.setenv("ANTHROPIC_API_KEY", key)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", messages_server.base_url)
    monkeypatch.delenv("MAKIMA_CLAUDE_CLI", raising=False)  # the SDK's bundled CLI
    return key


async def test_the_real_cli_streams_writes_a_file_and_keeps_the_key_outside(
        tmp_path: Path, api: str, messages_server: MessagesServer) -> None:
    home = tmp_path / "home"
    repository = Repository(path=str(make_repo(tmp_path / "repo")))
    hello = worktree_of(home, "write") / "hello.txt"
    out = await run_step(home, repository, "write", messages_server,
                         tool_reply("Write", {"file_path": str(hello), "content": "hi\n"},
                                    model=MODEL),
                         text_reply("Wrote hello.txt.", model=MODEL))

    assert out.success, out.summary
    assert out.summary == "Wrote hello.txt."
    assert out.changed_files == ["hello.txt"]
    assert show(Path(repository.path or ""), out.commit or "", "hello.txt") == "hi"
    assert out.session_id and out.usage.input_tokens > 0 and out.usage.cost_usd > 0
    loop = [r for r in messages_server.requests
            if "Bash" in {t.get("name") for t in r.body.get("tools") or []}]
    assert len(loop) == 2 and all(r.body.get("stream") for r in loop)
    system = json.dumps(loop[0].body["system"])
    assert STEP_INSTRUCTIONS[:60] in system
    assert len(system) > 5000, "Claude Code's own system prompt (the preset) is missing"
    # the model API saw the worker's key; the CLI only ever had the placeholder
    assert {r.headers.get("x-api-key") for r in messages_server.requests} == {api}
    assert PLACEHOLDER_KEY not in json.dumps([r.headers for r in messages_server.requests])
    assert not session_home(worktree_of(home, "write")).exists()


async def test_a_claude_code_bash_command_cannot_escape(
        target: Target, api: str, messages_server: MessagesServer,  # noqa: F811
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    target.secrets.append(api)
    repository = Repository(path=str(target.repo))
    out = await run_step(target.home, repository, "probe", messages_server,
                         tool_reply("Bash", {"command": target.probe(),
                                             "description": "probe the sandbox"}, model=MODEL),
                         text_reply("Probed.", model=MODEL))
    assert out.success, out.summary
    results = [tool_result_text(r) for r in messages_server.requests]
    probe_output = next(text for text in results if "allowed: worktree" in text)
    target.assert_contained(probe_output)
    assert "made.txt" in out.changed_files
    target.assert_nothing_leaks(out, [r.body for r in messages_server.requests], caplog.text)


async def test_the_clis_stderr_is_the_reason_when_it_fails(
        tmp_path: Path, api: str, messages_server: MessagesServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAKIMA_CLAUDE_PERMISSION_MODE", "bogusMode")
    repository = Repository(path=str(make_repo(tmp_path / "repo")))
    with pytest.raises(ApplicationError) as failed:
        await run_step(tmp_path / "home", repository, "broken", messages_server)
    assert "its stderr ended with" in failed.value.message
    assert "bogusMode" in failed.value.message.split("its stderr ended with", 1)[1]


def test_a_root_worker_without_the_sandbox_refuses_to_start_naming_the_fix(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAKIMA_SANDBOX", "off")
    monkeypatch.delenv("MAKIMA_CLAUDE_PERMISSION_MODE", raising=False)
    if os.geteuid() != 0:
        claude_code_preflight()  # an unprivileged worker may run Claude Code unconfined
        return
    with pytest.raises(ExecutorSetupError) as refused:
        claude_code_preflight()
    for fix in ("bubblewrap", "non-root user", "MAKIMA_CLAUDE_PERMISSION_MODE"):
        assert fix in str(refused.value)
    monkeypatch.setenv("MAKIMA_SANDBOX", "on")
    claude_code_preflight()  # sandboxed, the agent is not root
