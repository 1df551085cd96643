"""What the command line shows, as rich renderables: the directive list, the
inbox, one step's attempts, the status view and the live view of `start --wait`.

`out(view)` draws a view on a terminal with colour, boxes and progress bars; piped
(a file, `| grep`, tests) the same view prints as plain text: no colour, no box,
never wrapped, one table row per line (`plain_text`). `--json` never comes here.
Event lines and the step graph as text, mermaid or dot are makima.cli.render's.

User data (titles, commands, output) always goes in as `Text`, never as markup.
"""

from __future__ import annotations

import io
import shlex
import sys
from collections.abc import Sequence

from rich.console import Console, Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from makima.models import DirectiveSnapshot, PendingApproval, StepStatus
from makima.review import DiffUnavailable, FileDiff, age, why_waiting
from makima.store.reads import AttemptRecord, DirectiveSummary, InboxItem, StepDetail

#: Widest line a plain view prints: in effect, never wrapped.
PLAIN_WIDTH = 100_000

STATUS_STYLES = {
    StepStatus.PENDING.value: "dim",
    StepStatus.RUNNING.value: "bold blue",
    StepStatus.EVALUATING.value: "blue",
    StepStatus.REWORK.value: "dark_orange",
    StepStatus.AWAITING_APPROVAL.value: "bold yellow",
    StepStatus.PASSED.value: "green",
    StepStatus.FAILED.value: "bold red",
    StepStatus.BLOCKED.value: "bold red",
    StepStatus.SKIPPED.value: "dim",
    StepStatus.CANCELLED.value: "dim",
    # a directive's
    "planning": "cyan", "active": "bold cyan", "paused": "dark_orange",
    "completed": "bold green", "failed": "bold red", "stopped": "bold red",
}
CONFIDENCE_STYLES = {"green": "green", "yellow": "yellow", "red": "red"}


# --------------------------------------------------------------------------- printing


def is_terminal() -> bool:
    return sys.stdout.isatty()


def plain_text(view: RenderableType) -> str:
    """The view without colour, boxes or wrapping, trailing spaces removed."""
    console = Console(file=io.StringIO(), width=PLAIN_WIDTH, color_system=None,
                      no_color=True, force_terminal=False, highlight=False, emoji=False)
    console.print(view, soft_wrap=True)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    return "\n".join(line.rstrip() for line in text.rstrip("\n").split("\n"))


def out(view: RenderableType) -> None:
    """Print a view to stdout: drawn on a terminal, plain text otherwise."""
    if is_terminal():
        Console(highlight=False, emoji=False).print(view)
    else:
        print(plain_text(view), flush=True)


# --------------------------------------------------------------------------- pieces


def status_text(status: str) -> Text:
    return Text(status, style=STATUS_STYLES.get(status, ""))


def confidence_text(confidence: str | None, score: float | None) -> Text:
    if score is None:
        return Text("-")
    colour = confidence or ""
    return Text(f"{colour} {score:.2f}".strip(), style=CONFIDENCE_STYLES.get(colour, ""))


def progress(passed: int, total: int, *, plain: bool, width: int = 30) -> RenderableType:
    """A bar of passed steps on a terminal; `n/m steps passed` either way."""
    words = Text(f"{passed}/{total} steps passed")
    if plain:
        return words
    grid = Table.grid(padding=(0, 1))
    grid.add_row(ProgressBar(total=max(total, 1), completed=passed, width=width), words)
    return grid


def table(*headers: str, plain: bool) -> Table:
    """Columns two spaces apart; on a terminal, the header bold and underlined."""
    grid = Table(box=None, show_edge=False, pad_edge=False, padding=(0, 1),
                 header_style="" if plain else "bold underline")
    for header in headers:
        grid.add_column(header)
    return grid


def fields(rows: Sequence[tuple[str, RenderableType]], indent: int = 2) -> Table:
    """`key:  value` lines, the values aligned."""
    grid = Table.grid(padding=(0, 1, 0, 0))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    for key, value in rows:
        grid.add_row(Text(" " * indent + key + ":"), value)
    return grid


def command(text: str) -> Text:
    return Text(text, style="cyan")


def _quote(word: str) -> str:
    return shlex.quote(word)


# --------------------------------------------------------------------------- a directive


def headline(snapshot: DirectiveSnapshot) -> Text:
    return Text.assemble(
        (snapshot.directive_id, "bold"), "  ", status_text(snapshot.status.value),
        f" · generation {snapshot.generation} · spend ${snapshot.cost_usd:.4f}"
        f" · {snapshot.elapsed_seconds:.0f}s")


def step_table(snapshot: DirectiveSnapshot, *, plain: bool) -> Table:
    steps = table("STEP", "STATUS", "ATTEMPT", "CONFIDENCE", "SPEND", plain=plain)
    for step in snapshot.steps:
        steps.add_row(Text(step.name), status_text(step.status.value), str(step.attempts),
                      confidence_text(step.confidence.value if step.confidence else None,
                                      step.score),
                      f"${step.cost_usd:.4f}")
    return steps


def _passed(snapshot: DirectiveSnapshot) -> int:
    return sum(1 for s in snapshot.steps if s.status is StepStatus.PASSED)


def waiting_line(snapshot: DirectiveSnapshot, pending: PendingApproval) -> Text:
    """A step waiting for you, with the commands to look at it and decide."""
    ref = f"{_quote(snapshot.directive_id)} {_quote(pending.step)}"
    return Text(f"waiting for you: {pending.step} (attempt {pending.attempt}, score "
                f"{pending.score:.2f}): makima show {ref} --diff; makima approve {ref} "
                f"--attempt {pending.attempt}", style="yellow")


def live_view(snapshot: DirectiveSnapshot, *, plain: bool) -> Group:
    """What `start --wait` redraws: headline, progress, steps, what waits for you."""
    parts: list[RenderableType] = [headline(snapshot)]
    if snapshot.steps:  # (none while the first plan is made)
        parts += [progress(_passed(snapshot), len(snapshot.steps), plain=plain),
                  step_table(snapshot, plain=plain)]
    parts += [waiting_line(snapshot, pending) for pending in snapshot.pending_approvals]
    if snapshot.breaker:
        parts.append(Text(f"paused by a budget: {snapshot.breaker}", style="bold red"))
    if snapshot.reason and snapshot.status.is_final:
        parts.append(Text(f"reason: {snapshot.reason}"))
    return Group(*parts)


def status_view(snapshot: DirectiveSnapshot, *, plain: bool) -> Group:
    budgets = snapshot.budgets
    status = status_text(snapshot.status.value)
    if snapshot.reason:
        status.append(f" ({snapshot.reason})", style="")
    spend = f"${snapshot.cost_usd:.4f}" + (f" of ${budgets.max_cost_usd:.2f}"
                                           if budgets.max_cost_usd is not None else "")
    elapsed = f"{snapshot.elapsed_seconds:.0f}s" + (
        f" of {budgets.max_wall_time_minutes:g} min"
        if budgets.max_wall_time_minutes is not None else "")
    rows: list[tuple[str, RenderableType]] = [
        ("directive", Text(snapshot.directive_id, style="bold")),
        ("title", Text(snapshot.title)),
        ("owner", Text(snapshot.owner)),
        ("status", status),
        ("generation", Text(f"{snapshot.generation} (re-plans {snapshot.replans})")),
        ("progress", progress(_passed(snapshot), len(snapshot.steps), plain=plain)),
        ("spend", Text(spend)),
        ("elapsed", Text(elapsed)),
        ("branch", Text(snapshot.integration_branch)),
    ]
    if snapshot.breaker:
        rows.append(("breaker", Text(snapshot.breaker, style="bold red")))
    parts: list[RenderableType] = [fields(rows, indent=0), Text(""),
                                   step_table(snapshot, plain=plain)]
    if snapshot.pending_approvals:
        parts.append(Text(""))
        parts += [waiting_line(snapshot, pending) for pending in snapshot.pending_approvals]
    return Group(*parts)


def directive_list(directives: Sequence[DirectiveSummary], *, plain: bool) -> RenderableType:
    if not directives:
        return Text("no directives")
    # the repository last: on a narrow terminal it is what gets folded away
    rows = table("ID", "STATUS", "PROGRESS", "SPEND", "AGE", "OWNER", "TITLE", "REPOSITORY",
                 plain=plain)
    for column in rows.columns:  # on a narrow terminal the repository gives way first
        column.no_wrap = column.header != "REPOSITORY"
        column.overflow = "ellipsis"
    for d in directives:
        status = status_text(d.status)
        if d.waiting:
            status.append(f" ({d.waiting} waiting)", style="bold yellow")
        done: RenderableType = Text(f"{d.steps_passed}/{d.steps_total}")
        if not plain:
            done = Table.grid(padding=(0, 1))
            done.add_row(ProgressBar(total=max(d.steps_total, 1), completed=d.steps_passed,
                                     width=5), Text(f"{d.steps_passed}/{d.steps_total}"))
        spend = f"${d.cost_usd:.4f}"
        rows.add_row(Text(d.id), status, done, spend, age(d.created_at), Text(d.owner),
                     Text(d.title), Text(d.repository))
    return rows


# --------------------------------------------------------------------------- the review desk


def inbox_view(items: Sequence[InboxItem]) -> RenderableType:
    if not items:
        return Text("nothing waits for a person")
    blocks: list[RenderableType] = []
    for item in items:
        if blocks:
            blocks.append(Text(""))
        ref = f"{_quote(item.directive_id)} {_quote(item.step)}"
        head = Text.assemble((item.directive_id, "bold"), "  ", (item.step, "bold yellow"),
                             f"  attempt {item.attempt}  ",
                             (f"waiting {age(item.requested_at)}", "yellow"))
        if item.score is not None:
            head.append(f"  score {item.score:.2f}")
        rows: list[tuple[str, RenderableType]] = [("title", Text(item.title)),
                                                   ("repository", Text(item.repository))]
        if item.branch:
            rows.append(("branch", Text(f"{item.branch} @ {(item.commit or 'no commit')[:12]}")))
        rows += [("why", Text(reason, style="dark_orange")) for reason in
                 why_waiting(item.checks, item.criteria, item.score, item.summary)]
        if item.approvers:
            rows.append(("approvers", Text(", ".join(item.approvers))))
        rows += [("show", command(f"makima show {ref} --attempt {item.attempt} --diff")),
                 ("approve", command(f"makima approve {ref} --attempt {item.attempt} "
                                     "--comment '...'")),
                 ("deny", command(f"makima deny {ref} --attempt {item.attempt} "
                                  "--comment '...'"))]
        blocks += [head, fields(rows)]
    return Group(*blocks)


def _tail(text: str, lines: int, style: str = "") -> list[Text]:
    return [Text("      " + line, style=style) for line in text.rstrip().splitlines()[-lines:]]


def attempt_view(detail: StepDetail, attempt: AttemptRecord) -> Group:
    lines: list[RenderableType] = [Text.assemble((f"attempt {attempt.attempt}", "bold"),
                                                 f"  {attempt.summary}" if attempt.summary
                                                 else "")]
    rows: list[tuple[str, RenderableType]] = []
    if attempt.branch:
        rows.append(("branch", Text(f"{attempt.branch} @ {attempt.commit or 'no commit'}")))
    rows.append(("spend", Text(f"${attempt.cost_usd:.4f}" + (
        f"  in {attempt.duration_seconds:.1f}s" if attempt.duration_seconds is not None
        else ""))))
    evaluation = attempt.evaluation
    if evaluation is not None:
        verdict = confidence_text(evaluation.confidence, evaluation.score)
        verdict.append(f" by {evaluation.evaluator or 'the evaluator'}", style="")
        if evaluation.summary:
            verdict.append(f": {evaluation.summary}", style="")
        rows.append(("verdict", verdict))
    lines.append(fields(rows))
    if attempt.exit_code not in (None, 0):
        lines.append(Text(f"  agent exited {attempt.exit_code}", style="red"))
    if evaluation is None:
        lines.append(Text("  not evaluated", style="dim"))
    else:
        for check in evaluation.checks:
            code = "none" if check.exit_code is None else check.exit_code
            lines.append(Text.assemble(
                "  check ", ("pass", "green") if check.passed else ("FAIL", "bold red"),
                f": `{check.command}` exit {code}"))
            if not check.passed and check.output_tail.strip():
                lines += _tail(check.output_tail, 8, "dim")
        for criterion in evaluation.criteria:
            lines.append(Text.assemble(
                "  criterion ", ("met", "green") if criterion.passed else ("NOT MET", "bold red"),
                f" ({criterion.score:.2f}): {criterion.criterion}",
                f" — {criterion.evidence}" if criterion.evidence else ""))
        if not evaluation.checks and not evaluation.criteria:
            lines.append(Text("  nothing verified this: no check ran and no judge looked at it",
                              style="dark_orange"))
        if evaluation.rework_instructions:
            lines.append(Text(f"  for a rework: {evaluation.rework_instructions}", style="dim"))
    for approval in detail.approvals:
        if approval.attempt == attempt.attempt and approval.decided_at:
            verb = "approved" if approval.approved else "denied"
            lines.append(Text(f"  {verb} by {approval.decided_by}"
                              + (f": {approval.comment}" if approval.comment else ""),
                              style="green" if approval.approved else "red"))
    if attempt.output_tail.strip():
        lines.append(Text("  output (tail):"))
        lines += _tail(attempt.output_tail, 15)
    return Group(*lines)


def step_view(directive_id: str, detail: StepDetail,
              attempts: Sequence[AttemptRecord]) -> Group:
    step = detail.step
    parts: list[RenderableType] = [Text.assemble(
        (directive_id, "bold"), "  ", (step.name, "bold"), "  ", status_text(step.status),
        f"  (generation {step.generation}, {step.attempts} attempt"
        f"{'s' if step.attempts != 1 else ''})")]
    if step.description:
        parts.append(Text(f"  {step.description}"))
    for attempt in attempts:
        parts += [Text(""), attempt_view(detail, attempt)]
    return Group(*parts)


def diff_view(attempt: int, base: str, stat: str, files: Sequence[FileDiff] | None, *,
              plain: bool) -> Group:
    """The diff of an attempt: its stat, and with `files` each file's patch."""
    parts: list[RenderableType] = [Text(""), Text(f"diff of attempt {attempt} against {base}:",
                                                  style="bold"),
                                   Text(stat or "(no changes)")]
    for file in files or ():
        parts.append(Text(""))
        patch = file.patch.rstrip()
        parts.append(Text(patch) if plain else Syntax(patch, "diff", theme="ansi_dark",
                                                      background_color="default"))
    return Group(*parts)


def no_diff(problem: DiffUnavailable) -> Text:
    return Text(f"\n(no diff: {problem})", style="dim")
