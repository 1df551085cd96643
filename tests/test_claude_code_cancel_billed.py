"""A stop counts what a `claude_code` attempt it cuts off was billed (issue 10,
"every billed token counted"), as it does for the `anthropic` executor
(tests/test_cancelled_calls_billed.py).

The REAL Claude Code CLI bundled in claude-agent-sdk, sandboxed, reaches the
suite's loopback Messages API through makima's model proxy; a whole directive
runs through the real activities on the Temporal test server. A person stops it
while the agent's Bash command runs after billed turns, or while a model call is
in flight. The CLI reports what it spent only in its final `result` message,
which a killed CLI never writes; the directive's spend must still equal what the
server billed, to the cent.
"""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest
from temporalio.client import Client

from makima.models import DirectiveSpec, ExecutorKind
from tests.messages_server import (
    MessagesServer,
    ReceivedRequest,
    slow,
    text_reply,
    tool_reply,
    usage,
)
from tests.postgres_fixture import pg_pool, postgres  # noqa: F401 (fixtures)
from tests.test_cancelled_calls_billed import (
    GENERATION_SECONDS,
    PLAN,
    assert_reports_the_bill,
    repo,  # noqa: F401 (fixture)
    stopped_spend,
)
from tests.test_claude_code_real import MODEL, agent_turns

pytest.importorskip("claude_agent_sdk", reason="the `claude` extra is not installed")


def claude_code_spec(repository: Path) -> DirectiveSpec:
    spec = DirectiveSpec(title="hello", goal="write hello.txt",
                         repository={"path": str(repository)}, executor=ExecutorKind.CLAUDE_CODE, evaluator="programmatic", plan=PLAN)
    spec.models.executor = MODEL
    return spec


def agent_calls(server: MessagesServer) -> list[ReceivedRequest]:
    """The agent loop's requests (they carry Claude Code's tools), not its side calls."""
    return [r for r in server.requests
            if "Bash" in {tool.get("name") for tool in r.body.get("tools") or []}]


@pytest.fixture
def real_cli(monkeypatch: pytest.MonkeyPatch, messages_server: MessagesServer) -> None:
    monkeypatch.setenv("ANTHROPIC_BASE_URL", messages_server.base_url)
    monkeypatch.delenv("MAKIMA_CLAUDE_CLI", raising=False)  # the SDK's bundled CLI


async def test_a_stop_while_claude_codes_command_runs_counts_the_turns_before(
        client: Client, task_queue: str, repo: Path, messages_server: MessagesServer,  # noqa: F811
        pg_pool: asyncpg.Pool, real_cli: None) -> None:  # noqa: F811
    messages_server.script(*[agent_turns(
        # two billed turns, the first of two parts (text, then a tool use) under one id
        tool_reply("Bash", {"command": "echo one > one.txt", "description": "write one"},
                   text="Writing one.txt first.", model=MODEL,
                   used=usage(2100, 210, cache_read=500, cache_write=300)),
        # the stop comes while this command runs: no call is in flight
        # (Claude Code refuses a plain `sleep`)
        tool_reply("Bash", {"command": "timeout 30 tail -f /dev/null",
                            "description": "a slow build"}, model=MODEL, used=usage(2200, 220)),
        text_reply("Done.", model=MODEL, used=usage(2300, 230)))] * 20)

    _, spent = await stopped_spend(client, task_queue, messages_server, pg_pool,
                                   claude_code_spec(repo), stop_at_request=2, stop_after=1.0,
                                   history="stop-claude-code-command")

    assert len(agent_calls(messages_server)) == 2, "the stop came before the third turn"
    assert_reports_the_bill(spent, messages_server)


@pytest.mark.parametrize("sandbox", ["on", "off"])
async def test_a_stop_while_claude_codes_call_is_in_flight_counts_that_call(
        client: Client, task_queue: str, repo: Path, messages_server: MessagesServer,  # noqa: F811
        pg_pool: asyncpg.Pool, real_cli: None, sandbox: str,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Sandboxed, and unconfined (MAKIMA_SANDBOX=off: the CLI talks to the proxy on the
    worker's loopback; as root it needs a permission mode other than bypassPermissions,
    which denies its Bash commands, and the turns are billed all the same)."""
    monkeypatch.setenv("MAKIMA_SANDBOX", sandbox)
    if sandbox == "off":
        monkeypatch.setenv("MAKIMA_CLAUDE_PERMISSION_MODE", "acceptEdits")
    # turn 1 answers at once; every later turn is out for GENERATION_SECONDS: the stop
    # arrives while the API generates one, the CLI is killed, and the API bills the
    # answer all the same
    messages_server.script(*[agent_turns(
        tool_reply("Bash", {"command": "echo one > one.txt", "description": "write one"},
                   model=MODEL, used=usage(2100, 210)),
        *[slow(tool_reply("Bash", {"command": f"echo {n} > {n}.txt", "description": "write"},
                          model=MODEL, used=usage(2200 + n, 220 + n)), GENERATION_SECONDS)
          for n in range(10)])] * 20)

    _, spent = await stopped_spend(client, task_queue, messages_server, pg_pool,
                                   claude_code_spec(repo), stop_at_request=2,
                                   history="stop-claude-code-call-in-flight")

    assert len(agent_calls(messages_server)) >= 2, "turn 1 and the turn in flight"
    assert_reports_the_bill(spent, messages_server)
