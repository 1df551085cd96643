"""The `shell` executor: the step's `command` run with `bash -c` in the worktree.

For deterministic pipelines, offline use and tests. The command sees
MAKIMA_STEP, MAKIMA_ATTEMPT (1-based) and MAKIMA_REWORK_INSTRUCTIONS; a
non-zero exit is a failed attempt (its output tail becomes the evaluation's
evidence), not an error. It runs in the sandbox (makima.sandbox: its worktree
and nothing else, no network unless the directive's `sandbox.network`) with the
allow-listed environment of makima.process.agent_environment.
MAKIMA_STEP_TIMEOUT_SECONDS bounds it (default DEFAULT_STEP_TIMEOUT_SECONDS).
"""

from __future__ import annotations

from makima.executors.base import (
    OUTPUT_TAIL_CHARS,
    ExecutionRequest,
    ExecutionResult,
    ExecutorSetupError,
    env_seconds,
)
from makima.models import ExecutorKind
from makima.process import agent_environment, run_confined, truncate_tail
from makima.sandbox import Confinement

#: One hour: below the activity's start-to-close (EXECUTE_TIMEOUT, 2 h) so a hung
#: command ends as a failed attempt with its output, not as an activity timeout.
DEFAULT_STEP_TIMEOUT_SECONDS = 3600.0


class ShellExecutor:
    kind = ExecutorKind.SHELL

    async def run(self, request: ExecutionRequest) -> ExecutionResult:
        command = request.step.command
        if not command or not command.strip():
            raise ExecutorSetupError(
                f"step '{request.step.name}' has no command, and the shell executor runs only a"
                " step's `command`; give the step a command or choose another executor")
        timeout = env_seconds("MAKIMA_STEP_TIMEOUT_SECONDS", DEFAULT_STEP_TIMEOUT_SECONDS)
        env = agent_environment({
            "MAKIMA_STEP": request.step.name,
            "MAKIMA_ATTEMPT": str(request.attempt),
            "MAKIMA_REWORK_INSTRUCTIONS": request.rework.instructions if request.rework else "",
        }, declared=request.spec.sandbox.env)
        request.report(turns=1, last_tool="bash", note=command[:200])
        confinement = Confinement(request.worktree, network=request.spec.sandbox.network)
        result = await run_confined(["bash", "-c", command], confinement, env=env,
                                    timeout_seconds=timeout)
        tail = truncate_tail(result.output, OUTPUT_TAIL_CHARS)
        if result.timed_out:
            summary = f"command timed out after {timeout:g} s"
        else:
            summary = f"command exited with {result.exit_code}"
        return ExecutionResult(
            success=result.exit_code == 0,
            exit_code=result.exit_code,
            output_tail=tail,
            summary=summary,
        )
