"""The `claude_code` executor through the real Claude Agent SDK, talking to a
stand-in `claude` (tests/fakes/claude) that speaks the stream-json protocol.
The real bundled CLI is driven in tests/test_claude_code_real.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.execution import ExecutionActivities
from makima.contracts import ExecuteInput, ExecuteOutput, PrepareInput, ReworkContext
from makima.llm.pricing import usage_from_api
from makima.models import DirectiveSpec, ExecutorKind, PlannedStep, Repository, Usage
from tests.fakes.repos import install_fake, make_repo, set_identity, show

pytest.importorskip("claude_agent_sdk", reason="the `claude` extra is not installed")

DIRECTIVE = "directive-claude-0001"


@pytest.fixture
def fake_claude(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    set_identity(monkeypatch)
    cli = install_fake("claude", tmp_path / "bin")
    log = tmp_path / "claude.log"
    monkeypatch.setenv("MAKIMA_CLAUDE_CLI", str(cli))
    monkeypatch.setenv("FAKE_CLAUDE_LOG", str(log))
    monkeypatch.setenv("CLAUDE_AGENT_SDK_SKIP_VERSION_CHECK", "1")
    # The stand-in tests the SDK plumbing (session, resume, cancel) and reports to the
    # test through files and pids outside any sandbox; the real CLI runs sandboxed in
    # tests/test_claude_code_real.py.
    monkeypatch.setenv("MAKIMA_SANDBOX", "off")
    monkeypatch.setenv("MAKIMA_AGENT_ENV_PASSTHROUGH", ",".join(
        ["FAKE_CLAUDE_LOG", "FAKE_CLAUDE_MODE", "FAKE_CLAUDE_SESSION", "FAKE_CLAUDE_SLEEP",
         "FAKE_CLAUDE_CHILD_PID", "FAKE_CLAUDE_FILE"]))
    return log


def calls(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


async def _run(tmp_path: Path, env: ActivityEnvironment, step: str = "build"
               ) -> tuple[ExecuteOutput, Repository]:
    repository = Repository(path=str(make_repo(tmp_path / "repo")))
    acts = ExecutionActivities(tmp_path / "home", heartbeat_interval=0.5)
    prepared = await acts.prepare_repository(PrepareInput(directive_id=DIRECTIVE,
                                                          repository=repository))
    spec = DirectiveSpec(title="Claude", goal="Write claude.txt", repository=repository,
                         executor=ExecutorKind.CLAUDE_CODE)
    out = await env.run(acts.execute_step, ExecuteInput(
        directive_id=DIRECTIVE, generation=1, spec=spec,
        step=PlannedStep(name=step, task_plan="Create claude.txt."),
        integration_branch=prepared.integration_branch))
    return out, repository


async def test_claude_code_works_in_the_worktree_and_reports_session_and_cost(
        tmp_path: Path, fake_claude: Path) -> None:
    heartbeats: list[dict[str, Any]] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *details: heartbeats.append(details[0])
    out, repository = await _run(tmp_path, env)

    assert out.success, out.summary
    assert out.session_id == "sess-fake-1"
    assert out.summary == "Done: wrote claude.txt"
    assert out.changed_files == ["claude.txt"]
    assert show(Path(repository.path or ""), out.commit or "", "claude.txt").startswith(
        "written by the fake claude")
    assert out.usage.cost_usd == pytest.approx(0.0123)
    assert out.usage.input_tokens == 120 and out.usage.cache_read_tokens == 7
    [call] = calls(fake_claude)
    assert call["cwd"] == out.worktree
    assert "Create claude.txt." in call["prompt"] and "Write claude.txt" in call["prompt"]
    assert not any(arg.startswith("--resume") for arg in call["argv"])
    # Claude Code runs as the leader of its own process group (so cancel can kill it all).
    assert call["pgid"] != os.getpgid(0) and call["pgid"] != call["pid"]
    assert any(beat.get("session_id") == "sess-fake-1" for beat in heartbeats)
    assert any(beat.get("last_tool") == "Write" for beat in heartbeats)


async def test_a_crash_is_retryable_and_the_retry_resumes_the_session(
        tmp_path: Path, fake_claude: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_CLAUDE_MODE", "crash")
    monkeypatch.setenv("FAKE_CLAUDE_SESSION", "sess-crashy")
    monkeypatch.setenv("FAKE_CLAUDE_SLEEP", "0.2")
    heartbeats: list[dict[str, Any]] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *details: heartbeats.append(details[0])
    with pytest.raises(ApplicationError) as caught:
        await _run(tmp_path, env)
    assert not caught.value.non_retryable  # Temporal retries it
    # no result message: the failure carries what the turn before the crash was billed
    crashed = Usage.model_validate(caught.value.details[0]["usage"])
    assert crashed.input_tokens == 1000 and crashed.cost_usd > 0
    last_details = heartbeats[-1]
    assert last_details["session_id"] == "sess-crashy"
    assert last_details["usage"]["input_tokens"] == 1000  # billed before the crash

    # Temporal's retry of the same attempt hands the last heartbeat details back.
    retry = ActivityEnvironment()
    retry.info = dataclasses.replace(retry.info, attempt=2, heartbeat_details=[last_details])
    repository = Repository(path=str(tmp_path / "repo"))
    acts = ExecutionActivities(tmp_path / "home", heartbeat_interval=0.5)
    spec = DirectiveSpec(title="Claude", goal="Write claude.txt", repository=repository,
                         executor=ExecutorKind.CLAUDE_CODE)
    out = await retry.run(acts.execute_step, ExecuteInput(
        directive_id=DIRECTIVE, generation=1, spec=spec,
        step=PlannedStep(name="build", task_plan="Create claude.txt."),
        integration_branch=f"makima/{DIRECTIVE}"))
    assert out.success and out.session_id == "sess-crashy"
    # tokens and cost cover the same calls: the whole session, the crashed try included
    assert out.usage.input_tokens == 1120 and out.usage.output_tokens == 130
    assert out.usage.cost_usd == pytest.approx(0.0123)
    second = calls(fake_claude)[-1]
    assert "--resume=sess-crashy" in second["argv"]
    assert "resumed: sess-crashy" in (Path(out.worktree) / "claude.txt").read_text()
    # the retry worked in a directory of its own: the first try's may still be written to
    assert second["cwd"] != calls(fake_claude)[0]["cwd"]


async def test_a_retry_on_a_worker_without_the_session_starts_a_new_one_told_what_happened(
        tmp_path: Path, fake_claude: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_CLAUDE_MODE", "crash")
    monkeypatch.setenv("FAKE_CLAUDE_SESSION", "sess-elsewhere")
    monkeypatch.setenv("FAKE_CLAUDE_SLEEP", "0.2")
    heartbeats: list[dict[str, Any]] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *details: heartbeats.append(details[0])
    with pytest.raises(ApplicationError):
        await _run(tmp_path, env)
    monkeypatch.setenv("FAKE_CLAUDE_MODE", "ok")

    # The retry lands on another machine: another home, so no session file of it.
    retry = ActivityEnvironment()
    retry.info = dataclasses.replace(retry.info, attempt=2, heartbeat_details=[heartbeats[-1]])
    repository = Repository(path=str(tmp_path / "repo"))
    acts = ExecutionActivities(tmp_path / "other-home", heartbeat_interval=0.5)
    spec = DirectiveSpec(title="Claude", goal="Write claude.txt", repository=repository,
                         executor=ExecutorKind.CLAUDE_CODE)
    out = await retry.run(acts.execute_step, ExecuteInput(
        directive_id=DIRECTIVE, generation=1, spec=spec,
        step=PlannedStep(name="build", task_plan="Create claude.txt."),
        integration_branch=f"makima/{DIRECTIVE}"))

    assert out.success, out.summary
    second = calls(fake_claude)[-1]
    assert not any(arg.startswith("--resume") for arg in second["argv"]), (
        "resuming a session whose file is on another machine fails on every retry")
    assert "CONTINUATION: an earlier try of this attempt was interrupted" in second["prompt"]


def _input(repository: Repository, attempt: int = 1,
           rework: ReworkContext | None = None) -> ExecuteInput:
    spec = DirectiveSpec(title="Claude", goal="Write claude.txt", repository=repository,
                         executor=ExecutorKind.CLAUDE_CODE)
    return ExecuteInput(directive_id=DIRECTIVE, generation=1, spec=spec, attempt=attempt,
                        step=PlannedStep(name="build", task_plan="Create claude.txt."),
                        integration_branch=f"makima/{DIRECTIVE}", rework=rework)


def _try(number: int, details: list[Any], heartbeats: list[dict[str, Any]]) -> ActivityEnvironment:
    """Temporal's try `number` of an attempt: it hands back the last heartbeat details."""
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, attempt=number, heartbeat_details=details)
    env.on_heartbeat = lambda *beat: heartbeats.append(beat[0])
    return env


async def test_a_rework_retried_on_another_worker_is_told_the_branch_s_commits_and_output_tail(
        tmp_path: Path, fake_claude: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, repository = await _run(tmp_path, ActivityEnvironment())  # attempt 1, pushed
    rework = _input(repository, attempt=2, rework=ReworkContext(
        attempt=2, feedback="too short", instructions="add a second line"))
    monkeypatch.setenv("FAKE_CLAUDE_MODE", "crash")
    monkeypatch.setenv("FAKE_CLAUDE_SESSION", "sess-rework")
    monkeypatch.setenv("FAKE_CLAUDE_SLEEP", "0.2")
    heartbeats: list[dict[str, Any]] = []
    with pytest.raises(ApplicationError):
        await _try(1, [], heartbeats).run(
            ExecutionActivities(tmp_path / "home", heartbeat_interval=0.5).execute_step, rework)
    monkeypatch.setenv("FAKE_CLAUDE_MODE", "ok")

    # Temporal's second try of attempt 2 lands on another machine
    out = await _try(2, [heartbeats[-1]], []).run(
        ExecutionActivities(tmp_path / "other-home", heartbeat_interval=0.5).execute_step, rework)

    assert out.success, out.summary
    second = calls(fake_claude)[-1]
    assert not any(arg.startswith("--resume") for arg in second["argv"])
    prompt = second["prompt"]
    assert "CONTINUATION: an earlier try of this attempt was interrupted" in prompt
    assert "It had taken 1 turn (last tool: none)" in prompt
    assert "Its files were not kept; the worktree starts from commit" in prompt
    # the step branch's commits (attempt 1's) with their diff stat, and the output tail
    assert f"- makima: {DIRECTIVE} step build attempt 1" in prompt
    assert "claude.txt | 1 +" in prompt
    assert "The end of its output:\nThinking." in prompt
    assert first.commit is not None and prompt.index("REWORK") < prompt.index("CONTINUATION")


async def test_a_resume_that_fails_is_not_tried_again(
        tmp_path: Path, fake_claude: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Try 1 crashes; try 2 resumes its session (the file is here) and crashes too;
    try 3 starts a new session told what happened, rather than resuming forever."""
    repository = Repository(path=str(make_repo(tmp_path / "repo")))
    acts = ExecutionActivities(tmp_path / "home", heartbeat_interval=0.5)
    await acts.prepare_repository(PrepareInput(directive_id=DIRECTIVE, repository=repository))
    monkeypatch.setenv("FAKE_CLAUDE_MODE", "crash-always")
    monkeypatch.setenv("FAKE_CLAUDE_SESSION", "sess-broken")
    monkeypatch.setenv("FAKE_CLAUDE_SLEEP", "0.2")
    first: list[dict[str, Any]] = []
    with pytest.raises(ApplicationError):
        await _try(1, [], first).run(acts.execute_step, _input(repository))
    second: list[dict[str, Any]] = []
    with pytest.raises(ApplicationError):
        await _try(2, [first[-1]], second).run(acts.execute_step, _input(repository))
    assert "--resume=sess-broken" in calls(fake_claude)[1]["argv"]
    assert second[-1]["resumed_session"] == "sess-broken"
    monkeypatch.setenv("FAKE_CLAUDE_MODE", "ok")
    monkeypatch.setenv("FAKE_CLAUDE_SESSION", "sess-new")

    out = await _try(3, [second[-1]], []).run(acts.execute_step, _input(repository))

    assert out.success and out.session_id == "sess-new"
    third = calls(fake_claude)[2]
    assert not any(arg.startswith("--resume") for arg in third["argv"])
    assert "CONTINUATION" in third["prompt"] and "Its files were not kept" in third["prompt"]


async def test_missing_sdk_is_a_clear_non_retryable_error(
        tmp_path: Path, fake_claude: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "claude_agent_sdk", None)  # import fails
    with pytest.raises(ApplicationError) as caught:
        await _run(tmp_path, ActivityEnvironment())
    assert caught.value.non_retryable
    assert "pip install 'makima[claude]'" in str(caught.value)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


async def test_cancelling_kills_claude_code_and_its_commands(
        tmp_path: Path, fake_claude: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    child_pidfile = tmp_path / "child.pid"
    monkeypatch.setenv("FAKE_CLAUDE_MODE", "hang")
    monkeypatch.setenv("FAKE_CLAUDE_CHILD_PID", str(child_pidfile))
    env = ActivityEnvironment()
    running = asyncio.create_task(_run(tmp_path, env))
    child = None
    try:
        for _ in range(200):
            if child_pidfile.exists() and child_pidfile.read_text().strip():
                break
            await asyncio.sleep(0.05)
        child = int(child_pidfile.read_text())
        assert _alive(child)
        env.cancel()
        for _ in range(100):  # 5 s
            if not _alive(child):
                break
            await asyncio.sleep(0.05)
        assert not _alive(child), "Claude Code's command survived the cancellation"
        assert not _alive(calls(fake_claude)[0]["pid"])
        with pytest.raises(BaseException):  # noqa: B017 (cancelled, in whatever form)
            await asyncio.wait_for(running, 10)
    finally:
        running.cancel()
        if child is not None and _alive(child):
            os.kill(child, 9)


async def test_a_cancel_after_a_billed_turn_reports_that_turn_priced_once(
        tmp_path: Path, fake_claude: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stand-in reports a turn it never sent through the model proxy: a cancelled
    attempt (no result message) still reports the stream's usage for it, one message
    id once, priced."""
    monkeypatch.setenv("FAKE_CLAUDE_MODE", "turn-then-hang")
    monkeypatch.setenv("FAKE_CLAUDE_CHILD_PID", str(tmp_path / "child.pid"))
    heartbeats: list[dict[str, Any]] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *details: heartbeats.append(details[0])
    running = asyncio.create_task(_run(tmp_path, env))
    try:
        for _ in range(200):
            if any(beat.get("usage") for beat in heartbeats):
                break
            await asyncio.sleep(0.05)
        env.cancel()
        with pytest.raises(ApplicationError) as caught:
            await asyncio.wait_for(running, 20)
    finally:
        running.cancel()
    turn = usage_from_api("claude-sonnet-4-5", {"input_tokens": 2000, "output_tokens": 1,
                                                "cache_read_input_tokens": 300})
    assert caught.value.type == "Cancelled"
    assert Usage.model_validate(caught.value.details[0]["usage"]) == turn
    assert turn.cost_usd > 0
