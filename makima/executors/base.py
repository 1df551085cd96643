"""The one interface every executor implements, what it is given and what it
returns, the prompt an agent receives, and `executor_for(kind)`.

An executor works in a worktree it is handed and reports progress through a
callback; it never touches git branches (activities/execution.py commits its
work) or Temporal (the activity heartbeats with the progress it reports).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from makima.contracts import ExecutionSpec, ReworkContext
from makima.errors import ExecutorError
from makima.models import ExecutorKind, PlannedStep, Usage

#: Longest output tail an attempt hands back (it ends up in workflow history).
OUTPUT_TAIL_CHARS = 4000


class ExecutorSetupError(ExecutorError):
    """The executor cannot run at all here (missing SDK, missing command): a retry
    cannot help until a person changes something."""

    non_retryable = True


@dataclass
class Progress:
    """What an executor has done so far; the activity heartbeats with it."""

    turns: int = 0
    last_tool: str | None = None
    session_id: str | None = None
    note: str = ""
    #: What this attempt has been billed so far, its earlier tries included (kept in
    #: heartbeat details, so a retry counts the tokens of a try that failed or crashed).
    usage: Usage | None = None
    #: The end of what the agent said and did so far (kept in heartbeat details, so a
    #: try that starts over elsewhere is told where the interrupted one got to).
    output_tail: str = ""


@dataclass
class ExecutionRequest:
    directive_id: str
    spec: ExecutionSpec
    step: PlannedStep
    attempt: int  # 1-based
    worktree: Path
    rework: ReworkContext | None = None
    #: Claude Code: the session a previous try of this same attempt started, and
    #: that try's worktree (where the session's file is found).
    resume_session_id: str | None = None
    #: What the earlier tries of this attempt were billed (Temporal retried them):
    #: every executor's usage, in its progress and its result, starts from it.
    resume_usage: Usage | None = None
    resume_from: Path | None = None
    #: What an interrupted earlier try of this attempt left, for an agent that
    #: cannot resume its session here (another worker, or no session file).
    previous_try: str = ""
    #: Files with conflict markers: the integration branch was merged into this
    #: rework's worktree and conflicts with the step's earlier work.
    conflicts: list[str] = field(default_factory=list)
    #: Called whenever progress changes (cheap; the caller throttles).
    on_progress: Callable[[Progress], None] = lambda progress: None
    progress: Progress = field(default_factory=Progress)

    def report(self, **changes: object) -> None:
        for name, value in changes.items():
            setattr(self.progress, name, value)
        self.on_progress(self.progress)


@dataclass
class ExecutionResult:
    success: bool
    exit_code: int | None = None
    output_tail: str = ""
    summary: str = ""
    session_id: str | None = None
    usage: Usage = field(default_factory=Usage)


class Executor(Protocol):
    kind: ExecutorKind

    async def run(self, request: ExecutionRequest) -> ExecutionResult:
        """Do the step's work in `request.worktree`. A failed attempt is a result with
        `success=False`; an exception means the agent could not be run at all."""
        ...


def task_prompt(request: ExecutionRequest) -> str:
    """The agent's instructions: rework feedback first (when this attempt redoes
    a rejected one), then the directive's context, then the step's task plan."""
    spec, step = request.spec, request.step
    parts: list[str] = []
    if request.rework is not None:
        rework = request.rework
        score = f" (score {rework.score:.2f})" if rework.score is not None else ""
        parts.append(
            f"REWORK: this is attempt {rework.attempt} of step '{step.name}'. The previous "
            f"attempt was rejected{score}. The worktree holds that attempt's work: fix it "
            "rather than starting over.\n"
            f"Feedback: {rework.feedback or '(none)'}\n"
            f"Instructions: {rework.instructions or '(none)'}"
        )
    if request.conflicts:
        parts.append(
            "MERGE CONFLICT: the integration branch (work merged since your step began) has "
            "been merged into this worktree and conflicts with your step's work. The merge is "
            "under way; these files hold conflict markers (<<<<<<< ======= >>>>>>>):\n"
            + "\n".join(f"- {name}" for name in request.conflicts)
            + "\nResolve every conflict keeping both sides' intent and remove the markers. "
            "You may use git (status, diff, merge, rebase) inside this worktree; do not push "
            "or touch other branches. makima commits the merge with your changes.")
    if request.previous_try:
        parts.append(f"CONTINUATION: an earlier try of this attempt was interrupted (its worker "
                     f"stopped or it failed).\n{request.previous_try}")
    context = [f"Directive: {spec.title}", f"Goal: {spec.goal}"]
    for title, items in (("Requirements", spec.requirements),
                         ("Acceptance criteria", spec.acceptance_criteria),
                         ("Constraints", spec.constraints)):
        if items:
            context.append(f"{title}:\n" + "\n".join(f"- {item}" for item in items))
    parts.append("\n".join(context))
    task = [f"Your step: {step.name}"]
    if step.description:
        task.append(step.description)
    task.append(step.task_plan or step.description or "(no task plan given)")
    if step.verify:
        task.append("These commands must pass when you are done:\n"
                    + "\n".join(f"- {command}" for command in step.verify))
    task.append("Work only inside the current directory (a git worktree). Do not commit or "
                "push: makima commits your changes when you finish.")
    parts.append("\n".join(task))
    return "\n\n".join(parts)


def env_seconds(name: str, default: float) -> float:
    """A positive number of seconds from the environment, with a clear error."""
    text = (os.environ.get(name) or "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ExecutorSetupError(f"{name} must be a number of seconds, got {text!r}") from None
    if value <= 0:
        raise ExecutorSetupError(f"{name} must be positive, got {text!r}")
    return value


def env_int(name: str, default: int) -> int:
    text = (os.environ.get(name) or "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ExecutorSetupError(f"{name} must be a whole number, got {text!r}") from None
    if value <= 0:
        raise ExecutorSetupError(f"{name} must be positive, got {text!r}")
    return value


def executor_for(kind: ExecutorKind | str) -> Executor:
    """The executor for a spec's `executor`; configuration comes from the environment."""
    kind = ExecutorKind(kind)
    if kind is ExecutorKind.SHELL:
        from makima.executors.shell import ShellExecutor

        return ShellExecutor()
    if kind is ExecutorKind.ANTHROPIC:
        from makima.executors.anthropic_agent import AnthropicExecutor

        return AnthropicExecutor()
    from makima.executors.claude_code import ClaudeCodeExecutor

    return ClaudeCodeExecutor()
