"""The step graph: plan validation, the ready frontier, dependency levels, steps
to skip or revive, and a layered position per step for drawing.

Pure functions over `Plan` and step statuses; no I/O, deterministic (every
result follows plan order, never set order), safe in workflow code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from makima.models import (
    DEAD_STEP_STATUSES,
    STEP_NAME_RE,
    Plan,
    PlannedStep,
    StepStatus,
)

MAX_STEPS = 500
MAX_DEPENDENCIES = 50


def validate_plan(
    plan: Plan | None,
    *,
    kept: Iterable[str] = (),
    max_steps: int = MAX_STEPS,
) -> list[str]:
    """Every problem of a plan, one clear message each; an empty list means valid.

    `kept` names steps that already passed in an earlier generation: new steps
    may depend on them, and a step named like one of them is that step.
    """
    if plan is None or not plan.steps:
        return ["the plan has no steps: it needs at least one"]
    problems: list[str] = []
    kept_names = set(kept)
    if len(plan.steps) > max_steps:
        problems.append(f"the plan has {len(plan.steps)} steps; at most {max_steps} are allowed")

    seen: set[str] = set()
    for step in plan.steps:
        if not STEP_NAME_RE.match(step.name):
            problems.append(
                f"step name {step.name!r} is invalid: use 1-63 lowercase letters, digits, "
                "'-' or '_', starting with a letter or digit"
            )
        if step.name in seen:
            problems.append(f"step name {step.name!r} is used more than once")
        seen.add(step.name)

    known = seen | kept_names
    for step in plan.steps:
        if len(step.depends_on) > MAX_DEPENDENCIES:
            problems.append(
                f"step {step.name!r} has {len(step.depends_on)} dependencies; "
                f"at most {MAX_DEPENDENCIES} are allowed"
            )
        for dep in step.depends_on:
            if dep == step.name:
                problems.append(f"step {step.name!r} depends on itself")
            elif dep not in known:
                problems.append(f"step {step.name!r} depends on unknown step {dep!r}")
        if len(set(step.depends_on)) != len(step.depends_on):
            problems.append(f"step {step.name!r} lists a dependency more than once")

    cycle = find_cycle(plan.steps)
    if cycle:
        problems.append("the plan has a cycle: " + " -> ".join(cycle))
    return problems


def find_cycle(steps: Iterable[PlannedStep]) -> list[str] | None:
    """A dependency cycle as a path that ends where it starts (`a -> b -> a`), or
    None. Self-dependencies are reported by `validate_plan` on their own."""
    graph = {s.name: [d for d in s.depends_on if d != s.name] for s in steps}
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(graph, white)

    for root in graph:
        if color[root] != white:
            continue
        # iterative DFS so a 500-step chain cannot hit the recursion limit
        path: list[str] = [root]
        iters = [iter(graph[root])]
        color[root] = grey
        while iters:
            dep = next(iters[-1], None)
            if dep is None:
                color[path.pop()] = black
                iters.pop()
                continue
            if dep not in graph:
                continue
            if color[dep] == grey:
                start = path.index(dep)
                # report in dependency order: `a -> b` means a depends on b
                return path[start:] + [dep]
            if color[dep] == white:
                color[dep] = grey
                path.append(dep)
                iters.append(iter(graph[dep]))
    return None


def ready_steps(plan: Plan, statuses: Mapping[str, StepStatus]) -> list[str]:
    """Pending steps whose every dependency has passed, in plan order.

    A dependency missing from `statuses` counts as not passed, except that a
    dependency absent from the plan is looked up in `statuses` too (a step
    kept from an earlier generation)."""
    ready = []
    for step in plan.steps:
        if statuses.get(step.name, StepStatus.PENDING) != StepStatus.PENDING:
            continue
        if all(statuses.get(dep) == StepStatus.PASSED for dep in step.depends_on):
            ready.append(step.name)
    return ready


def steps_to_skip(plan: Plan, statuses: Mapping[str, StepStatus]) -> list[str]:
    """Pending steps that can never run because a dependency, directly or through
    others, can never pass (failed, blocked, skipped or cancelled)."""
    dead = {name for name, status in statuses.items() if status in DEAD_STEP_STATUSES}
    skip: list[str] = []
    changed = True
    while changed:
        changed = False
        for step in plan.steps:
            if step.name in dead:
                continue
            if statuses.get(step.name, StepStatus.PENDING) != StepStatus.PENDING:
                continue
            if any(dep in dead for dep in step.depends_on):
                dead.add(step.name)
                skip.append(step.name)
                changed = True
    order = {name: i for i, name in enumerate(plan.names)}
    return sorted(skip, key=order.__getitem__)


def steps_to_revive(plan: Plan, statuses: Mapping[str, StepStatus]) -> list[str]:
    """Skipped steps that no dependency holds back any more (a failed step that is
    being re-evaluated), in plan order: they are pending again."""
    unskipped = {name: StepStatus.PENDING if status is StepStatus.SKIPPED else status
                 for name, status in statuses.items()}
    still = set(steps_to_skip(plan, unskipped))
    return [name for name in plan.names
            if statuses.get(name) is StepStatus.SKIPPED and name not in still]


def levels(plan: Plan) -> dict[str, int]:
    """Each step's dependency level: 0 for steps with no dependency in the plan,
    else one more than its deepest dependency. Assumes a valid (acyclic) plan."""
    by_name = {s.name: s for s in plan.steps}
    level: dict[str, int] = {}
    for name in topological_order(plan):
        deps = [d for d in by_name[name].depends_on if d in by_name]
        level[name] = 1 + max((level[d] for d in deps), default=-1)
    return level


def topological_order(plan: Plan) -> list[str]:
    """Steps so that each comes after its dependencies; ties keep plan order."""
    names = plan.names
    in_plan = set(names)
    remaining = {s.name: {d for d in s.depends_on if d in in_plan} for s in plan.steps}
    order: list[str] = []
    while remaining:
        free = [n for n in names if n in remaining and not remaining[n]]
        if not free:
            raise ValueError("the plan has a cycle: " + " -> ".join(find_cycle(plan.steps) or []))
        for name in free:
            del remaining[name]
            order.append(name)
        for deps in remaining.values():
            deps.difference_update(free)
    return order


@dataclass(frozen=True)
class Position:
    """Where to draw a step: `layer` is its level (left to right), `row` its place
    within the layer (top to bottom)."""

    layer: int
    row: int


def layout(plan: Plan) -> dict[str, Position]:
    """A layered position for each step (for drawing the DAG). Within a layer,
    steps are ordered by the mean row of their dependencies (the barycenter
    heuristic), which keeps edges short and mostly uncrossed; ties keep plan order."""
    level = levels(plan)
    by_name = {s.name: s for s in plan.steps}
    layers: dict[int, list[str]] = {}
    for name in plan.names:
        layers.setdefault(level[name], []).append(name)
    position: dict[str, Position] = {}
    for layer in sorted(layers):
        members = layers[layer]

        def barycenter(name: str) -> float:
            rows = [position[d].row for d in by_name[name].depends_on if d in position]
            return sum(rows) / len(rows) if rows else float("inf")

        ordered = sorted(members, key=lambda n: (barycenter(n), members.index(n)))
        for row, name in enumerate(ordered):
            position[name] = Position(layer, row)
    return position


def critical_path_length(plan: Plan, durations: Mapping[str, float]) -> float:
    """The longest chain of step durations through the DAG (the makespan floor)."""
    by_name = {s.name: s for s in plan.steps}
    finish: dict[str, float] = {}
    for name in topological_order(plan):
        start = max((finish[d] for d in by_name[name].depends_on if d in finish), default=0.0)
        finish[name] = start + durations.get(name, 0.0)
    return max(finish.values(), default=0.0)
