"""Evaluation prompts: the judge's standing instructions (system, identical for
every step so it is part of the cached prefix) and the request to judge one
attempt of one step (its task, the diff and changed files, the results of the
programmatic checks, the thresholds).
"""

from __future__ import annotations

from makima.models import CheckResult, PlannedStep, Thresholds

#: Tool the judge answers through; its input schema is makima.evaluation.JudgeVerdict.
VERDICT_TOOL = "submit_evaluation"
VERDICT_TOOL_DESCRIPTION = "Submit the evaluation of the step attempt."
#: How much of each check's output the judge sees.
CHECK_OUTPUT_FOR_JUDGE = 1500

JUDGE_INSTRUCTIONS = f"""\
You are the reviewer of makima, a system where coding agents carry out the steps \
of a plan, each in its own git branch. You judge one attempt at one step: did the \
change do what the step's task plan asked, in a way that serves the directive \
and respects its constraints?

Evidence you get: the step's description and task plan, the diff of the attempt \
against the branch it started from, the files it changed, the agent's closing \
output, and the results of commands that were run on the result (the step's \
verify commands and the repository's own tests). Trust command results over the \
agent's claims. A failing required command means the step is not done.

Scoring, from 0.0 to 1.0:
- 0.9-1.0: everything the task plan asks is done, correct and tested where it \
should be; nothing left to fix.
- 0.7-0.9: done and working, with minor gaps a reviewer would still mention.
- 0.4-0.7: partly done, or done with a real defect or a missing piece.
- 0.0-0.4: not done, wrong, broken, or unrelated to the task.
List one criterion result per thing you checked (each acceptance criterion of the \
directive that this step touches, and each demand of the task plan), with the \
evidence you relied on (a file, a line of the diff, a command's output).

When the attempt is not clearly complete, `rework_instructions` must tell the \
agent exactly what to change next: which files, which behaviour, which command \
must pass. Never write vague advice such as "improve the code". When it is \
complete, leave `rework_instructions` empty.

Answer by calling the `{VERDICT_TOOL}` tool exactly once."""


def evaluation_system() -> str:
    return JUDGE_INSTRUCTIONS


def _check_block(check: CheckResult) -> str:
    state = "passed" if check.passed else (
        "did not finish" if check.exit_code is None else f"FAILED with exit code {check.exit_code}"
    )
    kind = "required" if check.required else "optional"
    tail = check.output_tail[-CHECK_OUTPUT_FOR_JUDGE:].strip() or "(no output)"
    return (f"$ {check.command}   [{kind}, {state}, {check.duration_seconds:.1f}s]\n"
            f"{tail}")


def evaluation_request(
    *,
    step: PlannedStep,
    attempt: int,
    thresholds: Thresholds,
    changed_files: list[str],
    diff_stat: str,
    diff: str,
    agent_output: str,
    checks: list[CheckResult],
) -> str:
    checks_text = ("\n\n".join(_check_block(c) for c in checks)
                   if checks else "(no commands were run for this step)")
    files = "\n".join(f"- {f}" for f in changed_files) or "(no files changed)"
    return "\n\n".join([
        f"Judge attempt {attempt} of step `{step.name}`.",
        f"Step description: {step.description or '(none)'}",
        f"Task plan given to the agent:\n<task_plan>\n{step.task_plan.strip()}\n</task_plan>",
        f"Files changed:\n{files}",
        f"Diff summary:\n{diff_stat.strip() or '(empty)'}",
        f"Diff against the starting branch:\n<diff>\n{diff.strip() or '(empty)'}\n</diff>",
        f"The agent's closing output:\n<agent_output>\n{agent_output.strip() or '(none)'}\n"
        "</agent_output>",
        f"Command results:\n{checks_text}",
        f"Thresholds: a score at or above {thresholds.green:.2f} passes the step; at or above "
        f"{thresholds.yellow:.2f} a person decides; below it the step goes back to the agent "
        "with your rework instructions.",
        f"Call `{VERDICT_TOOL}` with your evaluation.",
    ])
