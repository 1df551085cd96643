"""The rework prefix: what an agent reads before its original task plan when an
earlier attempt was sent back (the attempt number, the reviewer's feedback and
instructions). Executors call `task_with_rework(step.task_plan, rework)`.
"""

from __future__ import annotations

from makima.contracts import ReworkContext


def rework_prefix(rework: ReworkContext) -> str:
    score = f" (score {rework.score:.2f})" if rework.score is not None else ""
    lines = [
        f"REWORK: this is attempt {rework.attempt} of this step. The previous attempt was "
        f"reviewed and sent back{score}. Where its changes are still in your worktree, "
        "fix them rather than starting over, unless the feedback says the approach is wrong.",
    ]
    if rework.feedback.strip():
        lines += ["", "Reviewer's feedback:", rework.feedback.strip()]
    if rework.instructions.strip():
        lines += ["", "What to do in this attempt:", rework.instructions.strip()]
    return "\n".join(lines)


def task_with_rework(task_plan: str, rework: ReworkContext | None) -> str:
    """The task plan an attempt receives: unchanged on a first attempt, else the
    rework prefix followed by the original task plan."""
    if rework is None:
        return task_plan
    return f"{rework_prefix(rework)}\n\n--- Original task plan ---\n{task_plan}"
