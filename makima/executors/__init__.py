"""Executors: what does a step attempt's work in its worktree. One interface
(`Executor` in base), three kinds (shell, anthropic, claude_code), chosen with
`executor_for(spec.executor)`. The SDK-backed modules are imported lazily, so
a worker without the `claude` extra still runs the other two."""

from makima.executors.base import (
    ExecutionRequest,
    ExecutionResult,
    Executor,
    ExecutorSetupError,
    Progress,
    executor_for,
    task_prompt,
)

__all__ = [
    "ExecutionRequest",
    "ExecutionResult",
    "Executor",
    "ExecutorSetupError",
    "Progress",
    "executor_for",
    "task_prompt",
]
