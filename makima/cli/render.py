"""The command line's plain strings: event lines (also the console's event log)
and the step graph as text, mermaid or dot. Tables and views are
makima.cli.views' (rich).

Pure functions from models to strings; no I/O.
"""

from __future__ import annotations

from makima.dag import levels
from makima.models import DirectiveSnapshot, Plan, PlannedStep, StepStatus
from makima.store.reads import EventRecord

#: Fill colours of the graph's nodes (mermaid and dot), by step status.
STATUS_COLOURS = {
    StepStatus.PENDING: "#eeeeee",
    StepStatus.RUNNING: "#bcd7ff",
    StepStatus.EVALUATING: "#bcd7ff",
    StepStatus.REWORK: "#ffd59e",
    StepStatus.AWAITING_APPROVAL: "#fff3a0",
    StepStatus.PASSED: "#b9f0c0",
    StepStatus.FAILED: "#ffb3b3",
    StepStatus.BLOCKED: "#ffb3b3",
    StepStatus.SKIPPED: "#dddddd",
    StepStatus.CANCELLED: "#dddddd",
}


def event_line(event: EventRecord) -> str:
    where = f" {event.step}" if event.step else ""
    attempt = f"#{event.attempt}" if event.attempt else ""
    return (f"{event.position:>5}  {event.at:%H:%M:%S}  {event.type:<18}{where}{attempt}  "
            f"{event.message}").rstrip()


# --------------------------------------------------------------------------- the step graph


def _graph(snapshot: DirectiveSnapshot) -> tuple[Plan, dict[str, int]]:
    names = {s.name for s in snapshot.steps}
    plan = Plan(steps=[PlannedStep(name=s.name, depends_on=[d for d in s.depends_on if d in names])
                       for s in snapshot.steps])
    return plan, levels(plan)


def dag_text(snapshot: DirectiveSnapshot) -> str:
    plan, level = _graph(snapshot)
    by_name = {s.name: s for s in snapshot.steps}
    lines = [f"{snapshot.directive_id} (generation {snapshot.generation}, "
             f"{snapshot.status.value})"]
    for depth in sorted(set(level.values())):
        lines.append(f"level {depth}")
        for step in plan.steps:
            if level[step.name] != depth:
                continue
            state = by_name[step.name]
            after = f"  <- {', '.join(step.depends_on)}" if step.depends_on else ""
            lines.append(f"  {step.name}  [{state.status.value}]{after}")
    return "\n".join(lines)


def _node_id(name: str) -> str:
    # mermaid and dot ids: step names are slugs, but `-` is not an identifier character
    return "s_" + name.replace("-", "_")


def dag_mermaid(snapshot: DirectiveSnapshot) -> str:
    plan, _ = _graph(snapshot)
    by_name = {s.name: s for s in snapshot.steps}
    lines = ["flowchart LR"]
    for step in plan.steps:
        status = by_name[step.name].status.value
        lines.append(f'    {_node_id(step.name)}["{step.name}<br/>{status}"]:::{status}')
    for step in plan.steps:
        for dep in step.depends_on:
            lines.append(f"    {_node_id(dep)} --> {_node_id(step.name)}")
    for status, colour in STATUS_COLOURS.items():
        lines.append(f"    classDef {status.value} fill:{colour},stroke:#555")
    return "\n".join(lines)


def dag_dot(snapshot: DirectiveSnapshot) -> str:
    plan, _ = _graph(snapshot)
    by_name = {s.name: s for s in snapshot.steps}
    lines = [f'digraph "{snapshot.directive_id}" {{', "  rankdir=LR;",
             '  node [shape=box, style="rounded,filled", fontname="Helvetica"];']
    for step in plan.steps:
        status = by_name[step.name].status
        lines.append(f'  {_node_id(step.name)} [label="{step.name}\\n{status.value}", '
                     f'fillcolor="{STATUS_COLOURS[status]}"];')
    for step in plan.steps:
        for dep in step.depends_on:
            lines.append(f"  {_node_id(dep)} -> {_node_id(step.name)};")
    lines.append("}")
    return "\n".join(lines)
