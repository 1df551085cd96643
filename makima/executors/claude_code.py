"""The `claude_code` executor: Claude Code through the Claude Agent SDK
(`pip install 'makima[claude]'`), with the worktree as its working directory,
Claude Code's own system prompt (the `claude_code` preset) with makima's step
instructions appended, and the task plan as its prompt.

Confinement: the whole CLI runs in the sandbox (makima.sandbox) as an
unprivileged uid, so it and every command its Bash tool runs can change only
the worktree. The sandbox has no network: the CLI reaches the model API through
makima.executors.model_proxy, which adds the worker's credentials outside, so
the CLI holds only a placeholder key. Its HOME (sessions, settings) is a folder
kept next to the worktree (`.claude-homes/<try folder>`) so a retry can resume,
and removed once the attempt's run ends with a result. Because the agent is not
root inside the sandbox, `bypassPermissions` works for a root worker too. With
MAKIMA_SANDBOX=off the CLI runs unconfined with the worker's credentials; a root
worker then refuses to start (`claude_code_preflight`), since Claude Code
refuses `bypassPermissions` for root.

The CLI's stderr is kept (its end) and goes into the attempt's reason when the
CLI fails, and into the output tail.

The session id Claude Code reports is passed to the progress callback (the
activity puts it in its heartbeat details). Every try of an attempt has a
directory of its own, so a retry resumes that session (`--resume`) only where
the earlier try's session file is (the same machine; `adopt_session` copies it
into the new try's home); elsewhere it starts a new session, told what the
earlier try did (activities/execution.py builds that account), rather than
failing on every retry with "No conversation found".

Cost: the result message's total is the attempt's cost. Until it comes, and
when it never does (a stop kills the CLI, the CLI crashes), what the attempt
was billed is the model proxy's count of every answer it relayed
(makima/executors/api_meter.py), priced with makima's table: reported with
every progress, and in the failure or the cancel. A stop waits up to
CANCEL_GRACE_SECONDS for a call that was out when the CLI was killed (the API
bills it all the same), as the `anthropic` executor does. With the sandbox off
the CLI runs unconfined but still talks to the proxy, on a port of the worker's
loopback, so the count is the same.

Claude Code is started through a tiny launcher that gives it a process group of
its own, led by makima's watchdog (makima/lifeline.py: the group dies with the
worker), and writes the group's id down, so cancelling the attempt kills it and
every command it started within seconds (the SDK alone would wait for it).

Configuration (environment):
    MAKIMA_CLAUDE_CLI              path of the `claude` executable (default: the SDK's
                                   bundled one, else `claude` on PATH)
    MAKIMA_CLAUDE_PERMISSION_MODE  default bypassPermissions (unattended work; safe: the
                                   sandbox confines it)
    MAKIMA_AGENT_MAX_TURNS         default DEFAULT_MAX_TURNS
    MAKIMA_EXECUTOR_MODEL          default: Claude Code's own (spec.models.executor wins)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import shutil
import signal
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

from makima import lifeline
from makima.errors import ExecutorError
from makima.executors.api_meter import ApiMeter
from makima.executors.base import (
    OUTPUT_TAIL_CHARS,
    ExecutionRequest,
    ExecutionResult,
    ExecutorSetupError,
    env_int,
    task_prompt,
)
from makima.executors.model_proxy import (
    FORWARDER,
    PLACEHOLDER_KEY,
    SANDBOX_API_PORT,
    ModelProxy,
)
from makima.llm.client import CANCEL_GRACE_SECONDS
from makima.llm.pricing import usage_from_api
from makima.models import ExecutorKind, Usage
from makima.process import (
    KILL_GRACE_SECONDS,
    agent_environment,
    kill_process_group,
    scrub_secrets,
    truncate_tail,
)
from makima.sandbox import Confinement, bwrap_command, sandbox_enabled
from makima.workspace import session_home

logger = logging.getLogger(__name__)

DEFAULT_MAX_TURNS = 200
DEFAULT_PERMISSION_MODE = "bypassPermissions"
#: Lines of the CLI's stderr kept for the attempt's reason and output tail.
STDERR_LINES = 40
#: A session file larger than this is not copied for a resume (a new session starts).
MAX_SESSION_BYTES = 200 * 1024 * 1024

#: Appended to Claude Code's own system prompt.
STEP_INSTRUCTIONS = (
    "You are running unattended as one step of a makima directive: nobody can answer "
    "questions, so decide, do the work, and end with a short summary of what you changed "
    "and how you checked it. Work only inside the current directory, a git worktree of "
    "its own. makima commits your changes when you finish: do not commit, push or switch "
    "branches (merging or rebasing inside this worktree is fine when the task asks for it)."
)

#: Started by the SDK in place of the CLI: becomes (as makima's watchdog) the leader of its own process
#: group (so a cancel kills everything), writes its pid down, and starts the
#: command makima prepared (the sandboxed CLI) with makima's environment plus the
#: SDK's own CLAUDE_* settings.
_LAUNCHER = """#!{python}
import json, os, re, sys
with open({launch!r}) as f:
    launch = json.load(f)
with open(launch["pidfile"], "w") as f:
    f.write(str(os.getpid()))
os.setsid()
env = dict(launch["env"])
secret = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|AUTH|CREDENTIAL)", re.I)
env.update({{k: v for k, v in os.environ.items()
            if k.startswith("CLAUDE") and not secret.search(k)}})
os.execve(launch["argv"][0], launch["argv"] + sys.argv[1:], env)
"""


def permission_mode() -> str:
    return (os.environ.get("MAKIMA_CLAUDE_PERMISSION_MODE") or "").strip() or DEFAULT_PERMISSION_MODE


def claude_code_preflight() -> None:
    """At worker start: Claude Code refuses `bypassPermissions` for root unless it
    runs sandboxed, so a root worker without the sandbox refuses to start."""
    if os.geteuid() == 0 and not sandbox_enabled() and permission_mode() == "bypassPermissions":
        raise ExecutorSetupError(
            "Claude Code refuses --permission-mode bypassPermissions for root, and "
            "MAKIMA_SANDBOX=off leaves it unconfined: enable the sandbox (install bubblewrap; "
            "the agent then runs as an unprivileged user), run the worker as a non-root user, "
            "or choose another MAKIMA_CLAUDE_PERMISSION_MODE (e.g. acceptEdits)")


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
        home = session_home(request.worktree)
        home.mkdir(parents=True, exist_ok=True)
        resume = request.resume_session_id
        if resume and not await asyncio.to_thread(
                adopt_session, resume, request.resume_from, request.worktree):
            # Its file is on another machine (or gone): `--resume` would fail on every
            # retry, so start a new session told what the earlier try did.
            resume = None
            request.report(session_id=None)
        stderr: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)
        # every call the CLI makes passes the model proxy, which counts what it is billed
        meter = ApiMeter(lambda _: request.report(usage=spend.total))
        spend = _Spend(request.resume_usage or Usage(), meter)
        with tempfile.TemporaryDirectory(prefix="makima-claude-") as folder:
            scratch = Path(folder)
            pidfile = scratch / "pid"
            async with contextlib.AsyncExitStack() as stack:
                # sandboxed, the CLI reaches the proxy through a socket bound into the
                # sandbox; unconfined, on a port of the worker's loopback
                proxy = await stack.enter_async_context(ModelProxy(
                    scratch / "api.sock" if sandbox_enabled() else None, meter=meter))
                argv, env = _confined_cli(cli, request, scratch, home, proxy)
                launch = scratch / "launch.json"
                # the SDK starts the launcher from this process: the watchdog's parent
                launch.write_text(json.dumps({"pidfile": str(pidfile),
                                              "argv": lifeline.guarded(argv),
                                              "env": env}))
                launcher = scratch / "claude"
                launcher.write_text(_LAUNCHER.format(python=sys.executable, launch=str(launch)))
                launcher.chmod(0o700)
                options = sdk.ClaudeAgentOptions(
                    cwd=str(request.worktree),
                    cli_path=str(launcher),
                    system_prompt={"type": "preset", "preset": "claude_code",
                                   "append": STEP_INSTRUCTIONS},
                    permission_mode=permission_mode(),
                    max_turns=env_int("MAKIMA_AGENT_MAX_TURNS", DEFAULT_MAX_TURNS),
                    model=request.spec.models.executor
                    or (os.environ.get("MAKIMA_EXECUTOR_MODEL") or "").strip() or None,
                    resume=resume,
                    stderr=stderr.append,
                )
                # The conversation runs in its own task so that a cancellation of this
                # one reaches us first: we kill Claude Code's process group, then let the
                # SDK clean up (it would otherwise wait for the CLI to exit on its own).
                conversation = asyncio.create_task(
                    self._converse(sdk, request, options, stderr, spend))
                try:
                    result = await asyncio.shield(conversation)
                except asyncio.CancelledError:
                    await _kill_group_from(pidfile)
                    conversation.cancel()
                    with contextlib.suppress(BaseException):
                        await conversation
                    # the progress (and so the cancel's report) carries what was billed
                    await _settled_spend(spend, request)
                    raise
                except ExecutorError as exc:
                    # no result message: what the calls so far were billed goes with
                    # the failure
                    _signal_group_from(pidfile, signal.SIGKILL)
                    exc.usage = await _settled_spend(spend, request)
                    raise
                finally:
                    # Commands Claude Code left running must not outlive the attempt.
                    _signal_group_from(pidfile, signal.SIGKILL)
        # The run ended with a result: nothing left to resume.
        await asyncio.to_thread(shutil.rmtree, home, True)
        return result

    async def _converse(self, sdk: Any, request: ExecutionRequest, options: Any,
                        stderr: collections.deque[str], spend: _Spend) -> ExecutionResult:
        session_id = options.resume
        earlier = spend.earlier
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
                    spend.saw(message)
                    request.report(turns=turns, last_tool=last_tool,
                                   session_id=message.session_id or session_id,
                                   usage=spend.total,
                                   output_tail="\n".join(texts[-6:]))
                elif isinstance(message, sdk.ResultMessage):
                    result = message
                    session_id = message.session_id or session_id
        except sdk.ClaudeSDKError as exc:
            # The CLI crashed or could not start: retryable, and the retry resumes the
            # session recorded in the heartbeat details.
            # Not chained: the SDK's error says only "check stderr"; this message carries
            # its text and the stderr, and a failure's innermost cause is what people see.
            raise ExecutorError(scrub_secrets(
                f"Claude Code failed: {exc}{_stderr_note(stderr)}")) from None
        if result is None:
            raise ExecutorError(scrub_secrets(
                f"Claude Code ended without a result message{_stderr_note(stderr)}"))
        # The result's tokens are this run's, its cost the whole session's (a resumed
        # session included): add the tokens earlier tries of the session were billed
        # so both cover the same calls.
        cost = round(float(result.total_cost_usd or 0.0), 6)
        if options.resume:
            usage = (earlier + _tokens(result.usage or {})).model_copy(update={"cost_usd": cost})
        else:  # a new session: what an earlier try's session spent comes on top
            usage = earlier + _tokens(result.usage or {}).model_copy(update={"cost_usd": cost})
        summary = (result.result or "").strip() or (texts[-1] if texts else "")
        if result.is_error:
            summary = (f"Claude Code reported an error ({result.subtype}): {summary}"
                       f"{_stderr_note(stderr)}")
        if stderr:
            texts.append("[stderr]\n" + "\n".join(stderr))
        return ExecutionResult(
            success=not result.is_error,
            exit_code=1 if result.is_error else 0,
            output_tail=scrub_secrets(truncate_tail("\n".join(texts), OUTPUT_TAIL_CHARS)),
            summary=scrub_secrets(summary[-2000:] if result.is_error else summary[:2000]),
            session_id=session_id,
            usage=usage,
        )


class _Spend:
    """What the attempt has been billed before its result message says: its earlier
    tries' usage plus this run's calls, one per message id: as the model proxy
    counted them, else (an answer the proxy has not finished reading, or a CLI
    that reports calls the proxy never saw) as the stream reported them (a message
    streamed in parts repeats its id and usage)."""

    def __init__(self, earlier: Usage, meter: ApiMeter) -> None:
        self.earlier = earlier
        self.meter = meter
        self._streamed: dict[str, Usage] = {}

    def saw(self, message: Any) -> None:
        """An assistant message of the stream."""
        if message.usage and message.message_id:
            self._streamed[message.message_id] = usage_from_api(message.model or "",
                                                                message.usage)

    @property
    def total(self) -> Usage:
        metered = self.meter.calls
        streamed = (used for key, used in self._streamed.items() if key not in metered)
        return sum(streamed, sum(metered.values(), self.earlier))


async def _settled_spend(spend: _Spend, request: ExecutionRequest) -> Usage:
    """What the attempt was billed, once the calls still out when the CLI ended have
    answered (each is billed, whoever reads it), waiting up to CANCEL_GRACE_SECONDS;
    reported as progress too, which a cancel reports (activities/execution.py)."""
    if not await spend.meter.settled(CANCEL_GRACE_SECONDS):
        logger.warning("a call of Claude Code's was still out %.0f s after the CLI ended; "
                       "it was abandoned, and what the API bills for it is not counted",
                       CANCEL_GRACE_SECONDS)
    total = spend.total
    request.report(usage=total)
    return total


def _tokens(raw: dict[str, Any]) -> Usage:
    return Usage(
        input_tokens=int(raw.get("input_tokens") or 0),
        output_tokens=int(raw.get("output_tokens") or 0),
        cache_read_tokens=int(raw.get("cache_read_input_tokens") or 0),
        cache_write_tokens=int(raw.get("cache_creation_input_tokens") or 0),
    )


def session_file(worktree: Path, session_id: str) -> Path:
    """Where Claude Code keeps a session started in `worktree`: one folder per
    working directory under its config folder (CLAUDE_CONFIG_DIR, else the
    attempt's home's `.claude`)."""
    config = Path(os.environ.get("CLAUDE_CONFIG_DIR") or session_home(worktree) / ".claude")
    project = "".join(c if c.isalnum() else "-" for c in str(worktree))
    return config / "projects" / project / f"{session_id}.jsonl"


def adopt_session(session_id: str, previous: Path | None, worktree: Path) -> bool:
    """Make session `session_id`, started in `previous`, resumable in `worktree`
    (every try of an attempt has a directory of its own). False when this machine
    has no file of it, or none makima would copy: not a regular file, or larger
    than MAX_SESSION_BYTES (the agent can write to its home). Blocking: call it
    in a thread."""
    target = session_file(worktree, session_id)
    if _regular_file(target, MAX_SESSION_BYTES):
        return True
    source = session_file(previous, session_id) if previous is not None else None
    if source is None or not _regular_file(source, MAX_SESSION_BYTES):
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return True


def _regular_file(path: Path, max_bytes: int) -> bool:
    try:
        status = path.lstat()
    except OSError:
        return False
    return stat.S_ISREG(status.st_mode) and status.st_size <= max_bytes


def _confined_cli(cli: str, request: ExecutionRequest, scratch: Path, home: Path,
                  proxy: ModelProxy) -> tuple[list[str], dict[str, str]]:
    """The command and environment that start the CLI with a placeholder key, talking
    to the model proxy: inside the sandbox, behind the proxy's forwarder; or, with
    the sandbox off, the CLI itself, to the proxy's port on the worker's loopback."""
    sandbox = request.spec.sandbox
    quiet = {"CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1"}
    if not sandbox_enabled():
        env = agent_environment({**quiet, "ANTHROPIC_BASE_URL": proxy.base_url,
                                 "ANTHROPIC_API_KEY": PLACEHOLDER_KEY, "HOME": str(home)},
                                declared=sandbox.env)
        return [cli], env
    forwarder = scratch / "forwarder.py"
    forwarder.write_text(FORWARDER)
    socket_path = scratch / "api.sock"
    real_cli = Path(cli).resolve()
    confinement = Confinement(request.worktree, network=False, home=home,
                              readonly=(scratch, real_cli.parent))
    argv = bwrap_command([sys.executable, str(forwarder), str(socket_path),
                          str(SANDBOX_API_PORT), str(real_cli)], confinement)
    env = agent_environment({
        **quiet,
        "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{SANDBOX_API_PORT}",
        "ANTHROPIC_API_KEY": PLACEHOLDER_KEY,
        # honest: makima provides the sandbox this process runs in
        "IS_SANDBOX": "1",
    }, declared=sandbox.env)
    return argv, env


def _stderr_note(stderr: collections.deque[str]) -> str:
    lines = [line.rstrip() for line in stderr if line.strip()]
    return ("; its stderr ended with:\n" + "\n".join(lines[-15:])) if lines else ""


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
