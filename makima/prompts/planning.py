"""Planning prompts: the planner's standing instructions (system) and the request
for one plan: a first plan, a re-plan after a failure or a goal change (with
the existing steps and their statuses), or a correction of a plan that failed
validation (with the errors).
"""

from __future__ import annotations

import json

from makima.contracts import PlanInput
from makima.models import StepState, StepStatus

#: Tool the planner answers through; its input schema is the Plan model.
PLAN_TOOL = "submit_plan"
PLAN_TOOL_DESCRIPTION = "Submit the plan: the steps that together achieve the directive."
MAX_STEPS = 20

PLANNER_INSTRUCTIONS = f"""\
You are the planner of makima, a system that hands a software goal to coding \
agents. You turn a directive into a plan: a small directed acyclic graph of \
steps. Each step is carried out by a coding agent working alone in its own git \
worktree of the repository, and is then checked by running commands and by a \
reviewer.

Rules for the plan:
- Step names are unique lowercase slugs: they start with a letter or digit and \
contain only a-z, 0-9, '-' and '_' (for example `add-cli-flag`), at most 63 characters.
- `depends_on` lists the names of the steps whose work this step needs. A step \
starts once all of its dependencies have passed and sees their merged work. Steps \
that do not depend on each other run in parallel, so only add a dependency when \
the work really needs it, and never make a cycle.
- `task_plan` is complete, self-contained instructions for the agent: the agent \
sees only the directive and its own step, never the other steps or this \
conversation. Name the files, functions, behaviour and tests involved.
- `description` is one or two sentences a person reads in a status listing.
- `verify` lists shell commands, run from the repository root, that must exit 0 \
when the step is done (for example a test command). Leave it empty when no \
command can check the step.
- Leave `command` empty unless the directive asks for shell steps.
- Use a reasonable number of steps: as few as make the work clear and reviewable, \
never more than {MAX_STEPS}. One step is fine for a small change.
- `summary` says in a few sentences how the plan reaches the goal.

Answer by calling the `{PLAN_TOOL}` tool exactly once."""


def planning_system() -> str:
    return PLANNER_INSTRUCTIONS


def _step_line(step: StepState) -> str:
    parts = [f"- `{step.name}`: {step.status.value}"]
    if step.depends_on:
        parts.append(f"(depends on {', '.join(step.depends_on)})")
    if step.attempts:
        parts.append(f"after {step.attempts} attempt(s)")
    if step.score is not None:
        parts.append(f"last score {step.score:.2f}")
    line = " ".join(parts)
    details = [d for d in (step.description, step.summary, step.reason) if d]
    if details:
        line += "\n  " + "\n  ".join(details)
    return line


def planning_request(request: PlanInput) -> str:
    """The user turn asking for a plan; what it contains depends on why the
    plan is asked for."""
    sections: list[str] = []
    replan = request.generation > 1 or bool(request.existing_steps) or bool(request.reason)
    if not replan:
        sections.append("Make the plan for this directive.")
    else:
        sections.append(
            f"This is a re-plan: generation {request.generation} of this directive's plan.\n"
            f"Why a new plan is needed: {request.reason or '(no reason recorded)'}"
        )
    if request.existing_steps:
        lines = "\n".join(_step_line(s) for s in request.existing_steps)
        passed = [s.name for s in request.existing_steps if s.status is StepStatus.PASSED]
        sections.append(f"Steps so far, with their status:\n{lines}")
        sections.append(
            "How to re-plan:\n"
            "- Passed steps are done and their work is merged; they are kept whatever you "
            "answer. A step you name like a passed step IS that step and will not run again, "
            "so to redo or extend that work give the new step a new name.\n"
            "- New steps may depend on passed steps by name"
            + (f" ({', '.join(passed)})" if passed else "") + ".\n"
            "- Steps that failed, were blocked or skipped will not continue: plan new steps "
            "that get their work done another way, using what their failure tells you.\n"
            "- Submit the new steps; listing the passed steps as well is allowed but not "
            "needed."
        )
    if request.previous_plan is not None or request.validation_errors:
        errors = "\n".join(f"- {e}" for e in request.validation_errors) or "- (no detail)"
        previous = (json.dumps(request.previous_plan.model_dump(mode="json"), indent=1)
                    if request.previous_plan is not None else "(none)")
        sections.append(
            "Your previous plan was rejected. Fix every problem below and submit the "
            f"corrected plan.\nProblems:\n{errors}\nThe rejected plan:\n{previous}"
        )
    sections.append(f"Call `{PLAN_TOOL}` with the plan.")
    return "\n\n".join(sections)
