"""The live view of `makima start --wait` on a terminal, drawn with rich: a
headline, a progress bar of passed steps, the step table with coloured status
and confidence, and what waits for a person. Piped output (logs, `| tee`,
tests) stays the plain text of makima.cli.render, printed again when it changes.
"""

from __future__ import annotations

from rich import box
from rich.console import Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from makima.models import DirectiveSnapshot, StepStatus

STATUS_STYLES = {
    StepStatus.PENDING: "dim",
    StepStatus.RUNNING: "bold blue",
    StepStatus.EVALUATING: "blue",
    StepStatus.REWORK: "dark_orange",
    StepStatus.AWAITING_APPROVAL: "bold yellow",
    StepStatus.PASSED: "green",
    StepStatus.FAILED: "bold red",
    StepStatus.BLOCKED: "bold red",
    StepStatus.SKIPPED: "dim",
    StepStatus.CANCELLED: "dim",
}
CONFIDENCE_STYLES = {"green": "green", "yellow": "yellow", "red": "red"}


def live_renderable(snapshot: DirectiveSnapshot) -> Group:
    passed = sum(1 for s in snapshot.steps if s.status is StepStatus.PASSED)
    total = len(snapshot.steps)
    headline = Text.assemble(
        (snapshot.directive_id, "bold"), "  ",
        (snapshot.status.value, "bold green" if snapshot.status.value == "completed" else
         "bold red" if snapshot.status.value in ("failed", "stopped") else "bold cyan"),
        f"  · generation {snapshot.generation} · spend ${snapshot.cost_usd:.4f}"
        f" · {snapshot.elapsed_seconds:.0f}s")
    progress = Table.grid(padding=(0, 1))
    progress.add_row(ProgressBar(total=max(total, 1), completed=passed, width=40),
                     Text(f"{passed}/{total} steps passed"))
    # (a box without "━": that character is the progress bar's)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, header_style="bold", pad_edge=False)
    for column in ("STEP", "STATUS", "ATTEMPT", "CONFIDENCE", "SPEND"):
        table.add_column(column)
    for step in snapshot.steps:
        confidence = Text("-")
        if step.score is not None:
            colour = step.confidence.value if step.confidence else ""
            confidence = Text(f"{colour} {step.score:.2f}".strip(),
                              style=CONFIDENCE_STYLES.get(colour, ""))
        table.add_row(step.name, Text(step.status.value, style=STATUS_STYLES[step.status]),
                      str(step.attempts), confidence, f"${step.cost_usd:.4f}")
    parts = [headline, progress, table]
    for pending in snapshot.pending_approvals:
        parts.append(Text(f"waiting for you: {pending.step} (attempt {pending.attempt}, "
                          f"score {pending.score:.2f}): makima show {snapshot.directive_id} "
                          f"{pending.step} --diff; makima approve {snapshot.directive_id} "
                          f"{pending.step} --attempt {pending.attempt}", style="yellow"))
    if snapshot.breaker:
        parts.append(Text(f"paused by a budget: {snapshot.breaker}", style="bold red"))
    if snapshot.reason and snapshot.status.is_final:
        parts.append(Text(f"reason: {snapshot.reason}"))
    return Group(*parts)
