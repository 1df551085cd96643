"""The `claude_code` executor: Claude Code through the Claude Agent SDK
(`pip install 'makima[claude]'`), with the worktree as its working directory
and the task plan as its prompt.

The session id Claude Code reports is passed to the progress callback (the
activity puts it in its heartbeat details), and a retried attempt that finds it
there resumes that session (`--resume`) instead of starting over. Cost comes
from the result message.

Claude Code is started through a tiny launcher that makes it the leader of its
own process group and writes its pid down, so cancelling the attempt kills it
and every command it started within seconds (the SDK alone would wait for it).

Configuration (environment):
    MAKIMA_CLAUDE_CLI              path of the `claude` executable (default: the SDK's
                                   bundled one, else `claude` on PATH)
    MAKIMA_CLAUDE_PERMISSION_MODE  default bypassPermissions (unattended work)
    MAKIMA_AGENT_MAX_TURNS         default DEFAULT_MAX_TURNS
    MAKIMA_EXECUTOR_MODEL          default: Claude Code's own (spec.models.executor wins)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from makima.errors import ExecutorError
from makima.executors.base import (
    OUTPUT_TAIL_CHARS,
    ExecutionRequest,
    ExecutionResult,
    ExecutorSetupError,
    env_int,
    task_prompt,
)
from makima.models import ExecutorKind, Usage
from makima.process import KILL_GRACE_SECONDS, kill_process_group, truncate_tail

DEFAULT_MAX_TURNS = 200

_LAUNCHER = """#!{python}
import os, sys
with open(os.environ["MAKIMA_CLAUDE_PIDFILE"], "w") as f:
    f.write(str(os.getpid()))
os.setsid()
os.execv({cli!r}, [{cli!r}, *sys.argv[1:]])
"""


def _load_sdk() -> Any:
    try:
        import claude_agent_sdk
    except ImportError:
        raise ExecutorSetupError(
            "the claude_code executor needs the Claude Agent SDK: install it with "
            "`pip install 'makima[claude]'` (or `pip install claude-agent-sdk`) on the worker, "
            "or choose executor: anthropic or shell") from None
    return claude_agent_sdk


def find_claude_cli(sdk: Any) -> str:
    configured = (os.environ.get("MAKIMA_CLAUDE_CLI") or "").strip()
    if configured:
        if not os.access(configured, os.X_OK):
            raise ExecutorSetupError(f"MAKIMA_CLAUDE_CLI={configured} is not an executable file")
        return configured
    bundled = Path(sdk.__file__).parent / "_bundled" / "claude"
    if bundled.is_file():
        return str(bundled)
    found = shutil.which("claude")
    if found:
        return found
    raise ExecutorSetupError(
        "Claude Code (`claude`) was not found: install it (npm install -g "
        "@anthropic-ai/claude-code) or set MAKIMA_CLAUDE_CLI to its path")


class ClaudeCodeExecutor:
    kind = ExecutorKind.CLAUDE_CODE

    async def run(self, request: ExecutionRequest) -> ExecutionResult:
        sdk = _load_sdk()
        cli = find_claude_cli(sdk)
        with tempfile.TemporaryDirectory(prefix="makima-claude-") as scratch:
            launcher = Path(scratch) / "claude"
            launcher.write_text(_LAUNCHER.format(python=sys.executable, cli=cli))
            launcher.chmod(0o755)
            pidfile = Path(scratch) / "pid"
            options = sdk.ClaudeAgentOptions(
                cwd=str(request.worktree),
                cli_path=str(launcher),
                permission_mode=(os.environ.get("MAKIMA_CLAUDE_PERMISSION_MODE")
                                 or "bypassPermissions"),
                max_turns=env_int("MAKIMA_AGENT_MAX_TURNS", DEFAULT_MAX_TURNS),
                model=request.spec.models.executor
                or (os.environ.get("MAKIMA_EXECUTOR_MODEL") or "").strip() or None,
                resume=request.resume_session_id,
                env={"MAKIMA_CLAUDE_PIDFILE": str(pidfile)},
            )
            # The conversation runs in its own task so that a cancellation of this
            # one reaches us first: we kill Claude Code's process group, then let the
            # SDK clean up (it would otherwise wait for the CLI to exit on its own).
            conversation = asyncio.create_task(self._converse(sdk, request, options))
            try:
                return await asyncio.shield(conversation)
            except asyncio.CancelledError:
                await _kill_group_from(pidfile)
                conversation.cancel()
                with contextlib.suppress(BaseException):
                    await conversation
                raise
            finally:
                # Commands Claude Code left running must not outlive the attempt.
                _signal_group_from(pidfile, signal.SIGKILL)

    async def _converse(self, sdk: Any, request: ExecutionRequest, options: Any) -> ExecutionResult:
        session_id = request.resume_session_id
        texts: list[str] = []
        result: Any = None
        turns = 0
        try:
            async for message in sdk.query(prompt=task_prompt(request), options=options):
                if isinstance(message, sdk.SystemMessage):
                    found = message.data.get("session_id")
                    if found and found != session_id:
                        session_id = found
                        request.report(session_id=session_id)
                elif isinstance(message, sdk.AssistantMessage):
                    turns += 1
                    last_tool = request.progress.last_tool
                    for block in message.content:
                        if isinstance(block, sdk.TextBlock) and block.text.strip():
                            texts.append(block.text.strip())
                        elif isinstance(block, sdk.ToolUseBlock):
                            last_tool = block.name
                            texts.append(f"[{block.name}] {str(block.input)[:300]}")
                    request.report(turns=turns, last_tool=last_tool,
                                   session_id=message.session_id or session_id)
                elif isinstance(message, sdk.ResultMessage):
                    result = message
                    session_id = message.session_id or session_id
        except sdk.ClaudeSDKError as exc:
            # The CLI crashed or could not start: retryable, and the retry resumes the
            # session recorded in the heartbeat details.
            raise ExecutorError(f"Claude Code failed: {exc}") from exc
        if result is None:
            raise ExecutorError("Claude Code ended without a result message")
        raw = result.usage or {}
        usage = Usage(
            input_tokens=int(raw.get("input_tokens") or 0),
            output_tokens=int(raw.get("output_tokens") or 0),
            cache_read_tokens=int(raw.get("cache_read_input_tokens") or 0),
            cache_write_tokens=int(raw.get("cache_creation_input_tokens") or 0),
            cost_usd=round(float(result.total_cost_usd or 0.0), 6),
        )
        summary = (result.result or "").strip() or (texts[-1] if texts else "")
        if result.is_error:
            summary = f"Claude Code reported an error ({result.subtype}): {summary}"
        return ExecutionResult(
            success=not result.is_error,
            exit_code=1 if result.is_error else 0,
            output_tail=truncate_tail("\n".join(texts), OUTPUT_TAIL_CHARS),
            summary=summary[:2000],
            session_id=session_id,
            usage=usage,
        )


def _group_leader(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def _signal_group_from(pidfile: Path, sig: int) -> None:
    pid = _group_leader(pidfile)
    if pid is not None:
        kill_process_group(pid, sig)


async def _kill_group_from(pidfile: Path) -> None:
    pid = _group_leader(pidfile)
    if pid is None:
        return
    kill_process_group(pid, signal.SIGTERM)
    for _ in range(int(KILL_GRACE_SECONDS * 10)):
        await asyncio.sleep(0.1)
        try:
            os.killpg(pid, 0)
        except (ProcessLookupError, PermissionError):
            return
    kill_process_group(pid, signal.SIGKILL)
