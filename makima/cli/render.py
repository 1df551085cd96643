"""What the command line prints: the live step table, the status view, the
directive list, event lines, and the step graph as text, mermaid or dot.

Pure functions from models to strings; no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

from makima.dag import levels
from makima.models import DirectiveSnapshot, Plan, PlannedStep, StepState, StepStatus
from makima.store.reads import DirectiveSummary, EventRecord

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


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def _confidence(step: StepState) -> str:
    if step.score is None:
        return "-"
    colour = step.confidence.value if step.confidence else ""
    return f"{colour} {step.score:.2f}".strip()


def step_table(snapshot: DirectiveSnapshot) -> str:
    rows = [[s.name, s.status.value, str(s.attempts), _confidence(s), f"${s.cost_usd:.4f}"]
            for s in snapshot.steps]
    return table(["STEP", "STATUS", "ATTEMPT", "CONFIDENCE", "SPEND"], rows)


def headline(snapshot: DirectiveSnapshot) -> str:
    parts = [f"{snapshot.directive_id}  {snapshot.status.value}",
             f"generation {snapshot.generation}",
             f"spend ${snapshot.cost_usd:.4f}",
             f"{snapshot.elapsed_seconds:.0f}s"]
    return " · ".join(parts)


def live_view(snapshot: DirectiveSnapshot) -> str:
    """The block `start --wait` redraws: headline, step table, what waits for a person."""
    lines = [headline(snapshot), step_table(snapshot)]
    for pending in snapshot.pending_approvals:
        lines.append(f"waiting for approval: {pending.step} (attempt {pending.attempt}, "
                     f"score {pending.score:.2f}): makima approve {snapshot.directive_id} "
                     f"{pending.step}")
    if snapshot.breaker:
        lines.append(f"paused by a budget: {snapshot.breaker}")
    if snapshot.reason and snapshot.status.is_final:
        lines.append(f"reason: {snapshot.reason}")
    return "\n".join(lines)


def status_view(snapshot: DirectiveSnapshot) -> str:
    budgets = snapshot.budgets
    lines = [
        f"directive  {snapshot.directive_id}",
        f"title      {snapshot.title}",
        f"owner      {snapshot.owner}",
        f"status     {snapshot.status.value}" + (f" ({snapshot.reason})" if snapshot.reason else ""),
        f"generation {snapshot.generation} (re-plans {snapshot.replans})",
        f"spend      ${snapshot.cost_usd:.4f}"
        + (f" of ${budgets.max_cost_usd:.2f}" if budgets.max_cost_usd is not None else ""),
        f"elapsed    {snapshot.elapsed_seconds:.0f}s"
        + (f" of {budgets.max_wall_time_minutes:g} min"
           if budgets.max_wall_time_minutes is not None else ""),
        f"branch     {snapshot.integration_branch}",
    ]
    if snapshot.breaker:
        lines.append(f"breaker    {snapshot.breaker}")
    lines += ["", step_table(snapshot)]
    if snapshot.pending_approvals:
        lines.append("")
        for pending in snapshot.pending_approvals:
            lines.append(f"waiting for approval: {pending.step} (attempt {pending.attempt}, "
                         f"score {pending.score:.2f}) {pending.summary}".rstrip())
    return "\n".join(lines)


def directive_list(directives: Sequence[DirectiveSummary]) -> str:
    if not directives:
        return "no directives"
    from makima.review import age

    rows = [[d.id, d.status + (f" ({d.waiting} waiting)" if d.waiting else ""),
             f"{d.steps_passed}/{d.steps_total}", f"${d.cost_usd:.4f}", age(d.created_at),
             d.repository, d.owner, d.title]
            for d in directives]
    return table(["ID", "STATUS", "PROGRESS", "SPEND", "AGE", "REPOSITORY", "OWNER", "TITLE"],
                 rows)


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
