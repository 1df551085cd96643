"""The `anthropic` executor: makima's own tool-use loop over the Messages API.

The model gets five tools (list_files, read_file, write_file, edit_file,
run_command) confined to the worktree. The file tools run in the worker and
refuse a path that resolves outside the worktree (`../x`, `/etc/passwd`, a
symlink pointing out) or into `.git`; the refusal goes back to the model as an
`is_error` tool result so it can change course. `run_command` runs in the
sandbox (makima.sandbox): the worktree and its git data are all it can change,
the worker's processes, files and secrets are invisible, and it has no network
unless the directive's `sandbox.network` says so. There is no command
deny-list: inside the sandbox `git merge` or `git rebase` of its own worktree
is fine (a rework after a merge conflict needs them), and `git push` or moving
a branch fails because the refs are read-only and the network is absent.

Configuration (environment):
    ANTHROPIC_API_KEY, ANTHROPIC_BASE_URL    the client (max_retries=0: Temporal retries)
    MAKIMA_EXECUTOR_MODEL                    default DEFAULT_EXECUTOR_MODEL (spec.models.executor wins)
    MAKIMA_AGENT_MAX_TURNS                   default DEFAULT_MAX_TURNS
    MAKIMA_AGENT_COMMAND_TIMEOUT_SECONDS     default DEFAULT_COMMAND_TIMEOUT_SECONDS
"""

from __future__ import annotations

import asyncio
import codecs
import os
import stat
import time
from pathlib import Path
from typing import Any, BinaryIO

from anthropic import AsyncAnthropic

from makima.errors import MakimaError
from makima.executors.base import (
    OUTPUT_TAIL_CHARS,
    ExecutionRequest,
    ExecutionResult,
    ExecutorSetupError,
    env_int,
    env_seconds,
    task_prompt,
)
from makima.llm.client import anthropic_from_env, create_message
from makima.llm.pricing import usage_from_api
from makima.models import ExecutorKind, SandboxSettings, Usage
from makima.process import agent_environment, run_confined, truncate_tail
from makima.sandbox import Confinement

DEFAULT_EXECUTOR_MODEL = "claude-sonnet-5-5"
DEFAULT_MAX_TURNS = 50
DEFAULT_COMMAND_TIMEOUT_SECONDS = 300.0
MAX_TOKENS = 16_000
#: Longest tool result (file content, command output) sent back to the model.
TOOL_OUTPUT_CHARS = 20_000
#: Files listed at most by one list_files call, and entries it looks at at most
#: (a tree of millions of files must not keep the worker busy).
MAX_LISTED_FILES = 500
MAX_WALKED_ENTRIES = 50_000
#: Bytes read_file reads of one file at most, and the largest file edit_file rewrites:
#: an agent's 50 GB file is refused or cut, never loaded.
MAX_READ_BYTES = 256 * 1024
MAX_EDIT_BYTES = 2 * 1024 * 1024

SYSTEM_PROMPT = (
    "You are a careful software engineer working inside a git worktree. Use the tools to "
    "inspect and change files and to run commands (tests, builds). Paths are relative to the "
    "worktree root. When the task is done, reply with a short summary of what you changed "
    "and how you checked it, without calling a tool."
)

TOOLS: list[dict[str, Any]] = [
    {
        "name": "list_files",
        "description": "List files under a folder of the worktree (recursively).",
        "input_schema": {"type": "object", "properties": {
            "path": {"type": "string", "description": "folder, default '.'"}}},
    },
    {
        "name": "read_file",
        "description": "Read a text file of the worktree.",
        "input_schema": {"type": "object", "properties": {"path": {"type": "string"}},
                         "required": ["path"]},
    },
    {
        "name": "write_file",
        "description": "Create or overwrite a file of the worktree with the given content.",
        "input_schema": {"type": "object", "properties": {
            "path": {"type": "string"}, "content": {"type": "string"}},
            "required": ["path", "content"]},
    },
    {
        "name": "edit_file",
        "description": "Replace one exact occurrence of old_text by new_text in a file.",
        "input_schema": {"type": "object", "properties": {
            "path": {"type": "string"}, "old_text": {"type": "string"},
            "new_text": {"type": "string"}}, "required": ["path", "old_text", "new_text"]},
    },
    {
        "name": "run_command",
        "description": "Run a shell command (bash -c) in the worktree root, in a sandbox "
                       "that can change only the worktree; returns exit code and output.",
        "input_schema": {"type": "object", "properties": {"command": {"type": "string"}},
                         "required": ["command"]},
    },
]


class ToolRefused(Exception):
    """A tool call the worktree's confinement does not allow; shown to the model."""


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


def _open_regular(target: Path, shown: str, flags: int) -> BinaryIO:
    """`target` opened (binary, unbuffered) if it is a regular file, else ToolRefused.
    O_NONBLOCK: opening a FIFO an agent left there returns at once instead of
    waiting for a writer or reader forever; O_NOFOLLOW: a symlink swapped in after
    `confined_path` resolved the path is not followed."""
    if target.is_symlink() or (target.exists() and not _regular(target)):
        raise ToolRefused(f"refused: {shown!r} is not a regular file")
    fd = os.open(target, flags | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ToolRefused(f"refused: {shown!r} is not a regular file")
        os.set_blocking(fd, True)
        mode = "r+b" if flags & os.O_RDWR else "wb" if flags & os.O_WRONLY else "rb"
        return os.fdopen(fd, mode, buffering=0)
    except BaseException:
        os.close(fd)
        raise


def confined_path(root: Path, relative: str) -> Path:
    """`relative` inside `root`, or ToolRefused. Symlinks are resolved first, so a
    link that points out of the worktree is refused like `../`."""
    if not isinstance(relative, str) or not relative.strip():
        raise ToolRefused("a path is required")
    root = root.resolve()
    candidate = (root / relative).resolve()
    if candidate != root and root not in candidate.parents:
        raise ToolRefused(f"refused: {relative!r} resolves to {candidate}, outside the worktree")
    inside = candidate.relative_to(root).parts
    if inside and inside[0] == ".git":
        raise ToolRefused(f"refused: {relative!r} is git's own data; makima commits for you")
    return candidate


class AnthropicExecutor:
    kind = ExecutorKind.ANTHROPIC

    def __init__(self, client: AsyncAnthropic | None = None, *,
                 prompt_caching: bool = True) -> None:
        self._client = client
        #: False only to measure what caching saves (bench/caching.py).
        self.prompt_caching = prompt_caching

    def client(self) -> AsyncAnthropic:
        if self._client is None:
            self._client = anthropic_from_env()
            if self._client is None:
                raise ExecutorSetupError(
                    "the anthropic executor needs ANTHROPIC_API_KEY in the worker's environment")
        return self._client

    async def run(self, request: ExecutionRequest) -> ExecutionResult:
        client = self.client()
        model = (request.spec.models.executor
                 or (os.environ.get("MAKIMA_EXECUTOR_MODEL") or "").strip()
                 or DEFAULT_EXECUTOR_MODEL)
        max_turns = env_int("MAKIMA_AGENT_MAX_TURNS", DEFAULT_MAX_TURNS)
        command_timeout = env_seconds("MAKIMA_AGENT_COMMAND_TIMEOUT_SECONDS",
                                      DEFAULT_COMMAND_TIMEOUT_SECONDS)
        tools = _Tools(request.worktree, command_timeout, request.spec.sandbox)
        messages: list[dict[str, Any]] = [{"role": "user", "content": task_prompt(request)}]
        usage = request.resume_usage or Usage()  # what earlier tries were billed
        transcript: list[str] = []
        for turn in range(1, max_turns + 1):
            try:
                response = await create_message(client, role="executor", model=model,
                                                max_tokens=MAX_TOKENS, **self._cached(messages))
            except MakimaError as exc:
                # the turns before this one (and earlier tries) were billed, and a call
                # that answered after a cancel (a stop) too
                exc.usage = usage + (exc.usage or Usage())
                raise
            usage = usage + usage_from_api(model, response.usage)
            text = "\n".join(b.text for b in response.content if b.type == "text").strip()
            if text:
                transcript.append(text)
            tool_uses = [b for b in response.content if b.type == "tool_use"]
            # heartbeats pass the usage on to a retry, and the output's end to a try
            # that starts over
            request.report(turns=turn, usage=usage, output_tail="\n".join(transcript[-6:]))
            if response.stop_reason != "tool_use" or not tool_uses:
                return ExecutionResult(
                    success=True, exit_code=0, summary=text[:2000] or "the agent finished",
                    output_tail=truncate_tail("\n".join(transcript), OUTPUT_TAIL_CHARS),
                    usage=usage)
            messages.append({"role": "assistant",
                             "content": [b.model_dump(exclude_none=True) for b in response.content]})
            results = []
            for use in tool_uses:
                request.report(last_tool=use.name)
                content, is_error = await tools.call(use.name, use.input)
                transcript.append(f"$ {use.name} {_short(use.input)}\n{content[:500]}")
                results.append({"type": "tool_result", "tool_use_id": use.id,
                                "content": content, "is_error": is_error})
            messages.append({"role": "user", "content": results})
        return ExecutionResult(
            success=False, exit_code=None,
            summary=f"the agent did not finish within {max_turns} turns (MAKIMA_AGENT_MAX_TURNS)",
            output_tail=truncate_tail("\n".join(transcript), OUTPUT_TAIL_CHARS), usage=usage)


    def _cached(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        """system, tools and messages as sent: with prompt caching, a breakpoint on
        the system prompt (tools and system are the stable prefix) and one on the
        latest turn's last block, so each turn reads the whole earlier conversation
        from the cache and writes only what is new. Only the latest turn carries
        one (the API allows four); the earlier breakpoint's prefix is still found."""
        if not self.prompt_caching:
            return {"system": SYSTEM_PROMPT, "tools": TOOLS, "messages": messages}
        ephemeral = {"type": "ephemeral"}
        last = dict(messages[-1])
        content = last["content"]
        blocks = ([{"type": "text", "text": content}] if isinstance(content, str)
                  else [dict(block) for block in content])
        blocks[-1]["cache_control"] = ephemeral
        last["content"] = blocks
        return {"system": [{"type": "text", "text": SYSTEM_PROMPT, "cache_control": ephemeral}],
                "tools": TOOLS, "messages": [*messages[:-1], last]}


def _short(value: Any, limit: int = 200) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "…"


class _Tools:
    """The tool implementations, bound to one worktree."""

    def __init__(self, root: Path, command_timeout: float,
                 sandbox: SandboxSettings | None = None) -> None:
        self.root = root.resolve()
        self.command_timeout = command_timeout
        self.sandbox = sandbox or SandboxSettings()

    async def call(self, name: str, arguments: Any) -> tuple[str, bool]:
        """(content, is_error) for one tool call; never raises for bad input. The file
        tools run in a thread: a big tree or file must not stall the worker's event
        loop (and with it every heartbeat it sends)."""
        args = arguments if isinstance(arguments, dict) else {}
        try:
            if name == "list_files":
                return await asyncio.to_thread(self.list_files, args.get("path") or "."), False
            if name == "read_file":
                return await asyncio.to_thread(self.read_file, args.get("path", "")), False
            if name == "write_file":
                return await asyncio.to_thread(self.write_file, args.get("path", ""),
                                               args.get("content", "")), False
            if name == "edit_file":
                return await asyncio.to_thread(self.edit_file, args.get("path", ""),
                                               args.get("old_text", ""),
                                               args.get("new_text", "")), False
            if name == "run_command":
                return await self.run_command(args.get("command", ""))
            return f"unknown tool {name!r}", True
        except ToolRefused as exc:
            return str(exc), True
        except (OSError, UnicodeDecodeError, TypeError) as exc:
            return f"{name} failed: {exc}", True

    def list_files(self, path: str) -> str:
        folder = confined_path(self.root, path)
        if not folder.is_dir():
            raise ToolRefused(f"{path!r} is not a folder")
        found: list[str] = []
        walked = 0
        for current, folders, names in os.walk(folder):
            folders[:] = sorted(f for f in folders if Path(current) / f != self.root / ".git")
            for name in sorted(names):
                walked += 1
                entry = Path(current) / name
                if entry.is_file():
                    found.append(str(entry.relative_to(self.root)))
                if len(found) >= MAX_LISTED_FILES or walked >= MAX_WALKED_ENTRIES:
                    found.append(f"[… stopped after {len(found)} files]")
                    return "\n".join(found)
            walked += len(folders)
        return "\n".join(found) or "(no files)"

    def read_file(self, path: str) -> str:
        target = confined_path(self.root, path)
        with _open_regular(target, path, os.O_RDONLY) as file:
            size = os.fstat(file.fileno()).st_size
            data = file.read(MAX_READ_BYTES)
        # an incomplete character at the cut is left out; invalid UTF-8 is an error
        text = codecs.getincrementaldecoder("utf-8")().decode(data, final=len(data) >= size)
        if len(text) > TOOL_OUTPUT_CHARS or len(data) < size:
            shown = text[:TOOL_OUTPUT_CHARS]
            return shown + (f"\n[… {path} has {size} bytes; only its first {len(shown)} "
                            "characters are shown]")
        return text

    def write_file(self, path: str, content: str) -> str:
        target = confined_path(self.root, path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with _open_regular(target, path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC) as file:
            file.write(content.encode("utf-8"))
        return f"wrote {len(content)} characters to {target.relative_to(self.root)}"

    def edit_file(self, path: str, old_text: str, new_text: str) -> str:
        target = confined_path(self.root, path)
        with _open_regular(target, path, os.O_RDWR) as file:
            size = os.fstat(file.fileno()).st_size
            if size > MAX_EDIT_BYTES:
                raise ToolRefused(f"refused: {path!r} has {size} bytes, more than edit_file "
                                  f"rewrites ({MAX_EDIT_BYTES}); use run_command (sed, a script)")
            text = file.read().decode("utf-8")
            count = text.count(old_text) if old_text else 0
            if count != 1:
                raise ToolRefused(f"old_text must occur exactly once in {path!r}; it occurs "
                                  f"{count} times")
            file.seek(0)
            file.truncate()
            file.write(text.replace(old_text, new_text, 1).encode("utf-8"))
        return f"edited {target.relative_to(self.root)}"

    async def run_command(self, command: str) -> tuple[str, bool]:
        if not command.strip():
            return "a command is required", True
        started = time.monotonic()
        result = await run_confined(["bash", "-c", command],
                                    Confinement(self.root, network=self.sandbox.network),
                                    env=agent_environment(declared=self.sandbox.env),
                                    timeout_seconds=self.command_timeout)
        output = truncate_tail(result.output, TOOL_OUTPUT_CHARS)
        status = ("timed out" if result.timed_out else f"exit code {result.exit_code}")
        return (f"{status} after {time.monotonic() - started:.1f} s\n{output}",
                result.exit_code != 0)
