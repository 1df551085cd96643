"""The step graph as SVG for the directive page: graphviz's `dot` when it is
installed (the same dot source as `makima dag --format dot`), else a layered
layout of our own (columns by dependency level, rows in plan order). Nodes
are filled by step status with the colours of makima.cli.render.
"""

from __future__ import annotations

import shutil
import subprocess
from html import escape

from makima.cli.render import STATUS_COLOURS
from makima.dag import levels
from makima.models import Plan, PlannedStep, StepStatus
from makima.store.reads import StepRecord

NODE_W, NODE_H, GAP_X, GAP_Y, PAD = 150, 44, 60, 18, 10


def _plan(steps: list[StepRecord]) -> Plan:
    names = {s.name for s in steps}
    return Plan(steps=[PlannedStep(name=s.name, depends_on=[d for d in s.depends_on
                                                           if d in names]) for s in steps])


def _colour(status: str) -> str:
    try:
        return STATUS_COLOURS[StepStatus(status)]
    except ValueError:
        return "#eeeeee"


def dag_svg(steps: list[StepRecord]) -> str:
    if not steps:
        return '<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>'
    dot = shutil.which("dot")
    if dot is not None:
        done = subprocess.run([dot, "-Tsvg"], input=_dot(steps), capture_output=True,
                              text=True, check=False, timeout=10)
        if done.returncode == 0 and "<svg" in done.stdout:
            return done.stdout[done.stdout.index("<svg"):]
    return _own_layout(steps)


def _dot(steps: list[StepRecord]) -> str:
    lines = ["digraph steps {", "rankdir=LR;",
             'node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=11];']
    for i, step in enumerate(steps):
        lines.append(f'n{i} [id="step-node-{escape(step.name)}", '
                     f'label="{step.name}\\n{step.status}", fillcolor="{_colour(step.status)}"];')
    index = {s.name: i for i, s in enumerate(steps)}
    for i, step in enumerate(steps):
        lines += [f"n{index[d]} -> n{i};" for d in step.depends_on if d in index]
    lines.append("}")
    return "\n".join(lines)


def _own_layout(steps: list[StepRecord]) -> str:
    level = levels(_plan(steps))
    rows: dict[int, int] = {}
    where: dict[str, tuple[int, int]] = {}
    for step in steps:
        column = level[step.name]
        row = rows.get(column, 0)
        rows[column] = row + 1
        where[step.name] = (PAD + column * (NODE_W + GAP_X), PAD + row * (NODE_H + GAP_Y))
    width = PAD * 2 + (max(level.values()) + 1) * (NODE_W + GAP_X) - GAP_X
    height = PAD * 2 + max(rows.values()) * (NODE_H + GAP_Y) - GAP_Y
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" '
             'markerWidth="6" markerHeight="6" orient="auto"><path d="M0,0L10,5L0,10z" '
             'fill="#555"/></marker></defs>']
    for step in steps:
        x2, y2 = where[step.name]
        for dep in step.depends_on:
            if dep in where:
                x1, y1 = where[dep]
                parts.append(f'<line x1="{x1 + NODE_W}" y1="{y1 + NODE_H / 2}" x2="{x2}" '
                             f'y2="{y2 + NODE_H / 2}" stroke="#555" marker-end="url(#arrow)"/>')
    for step in steps:
        x, y = where[step.name]
        name = escape(step.name)
        parts.append(
            f'<g id="step-node-{name}" class="node {escape(step.status)}"><a href="#step-{name}">'
            f'<rect x="{x}" y="{y}" width="{NODE_W}" height="{NODE_H}" rx="8" '
            f'fill="{_colour(step.status)}" stroke="#555"/>'
            f'<text x="{x + NODE_W / 2}" y="{y + 18}" text-anchor="middle">{name}</text>'
            f'<text x="{x + NODE_W / 2}" y="{y + 34}" text-anchor="middle" fill="#333">'
            f'{escape(step.status)}</text></a></g>')
    parts.append("</svg>")
    return "\n".join(parts)
