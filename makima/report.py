"""A directive's report in Markdown, ready to paste into a pull request: each
acceptance criterion with its evidence (the steps whose judge ruled on it, the
checks that ran with command and exit code, the verdict, the commit), a
criterion that nothing evidenced said so plainly, then every step's outcome.

`directive_report(db, id)` reads the read model; `render_report(...)` is pure.
Shown by `makima report ID`, on the console's directive page, and as the body
of the pull request that `completion: pr` opens (`pull_request_report`).
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field

from makima.contracts import CompleteInput
from makima.store import reads
from makima.store.reads import AttemptRecord, DirectiveDetail, StepDetail

NO_EVIDENCE = "**no evidence**: no judge ruled on this criterion and no check was tied to it"


def _norm(text: str) -> str:
    return re.sub(r"\W+", " ", text).strip().lower()


@dataclass
class Evidence:
    step: str
    attempt: AttemptRecord
    passed: bool
    score: float
    note: str = ""
    checks: list[str] = field(default_factory=list)


def _final_attempt(step: StepDetail) -> AttemptRecord | None:
    evaluated = [a for a in step.attempts if a.evaluation is not None]
    return evaluated[-1] if evaluated else (step.attempts[-1] if step.attempts else None)


def evidence_for(criterion: str, steps: list[StepDetail]) -> list[Evidence]:
    """The judge's verdicts on `criterion` in each step's last evaluated attempt
    (matched by wording, ignoring case and punctuation)."""
    wanted = _norm(criterion)
    found = []
    for step in steps:
        attempt = _final_attempt(step)
        if attempt is None or attempt.evaluation is None:
            continue
        for verdict in attempt.evaluation.criteria:
            said = _norm(verdict.criterion)
            if said and (said == wanted or wanted in said or said in wanted):
                found.append(Evidence(
                    step=step.step.name, attempt=attempt, passed=verdict.passed,
                    score=verdict.score, note=verdict.evidence,
                    checks=[f"`{c.command}` exit {c.exit_code if c.exit_code is not None else 'none'}"
                            for c in attempt.evaluation.checks]))
    return found


def render_report(detail: DirectiveDetail, steps: list[StepDetail],
                  merged: dict[tuple[int, str], str] | None = None) -> str:
    """`merged`: (generation, step) -> the integration branch's commit after its merge."""
    merged = merged or {}
    landed = {s.step.name: merged.get((s.step.generation, s.step.name)) for s in steps}
    d = detail.directive
    spec = detail.spec or {}
    passed = sum(1 for s in detail.steps if s.status == "passed")
    lines = [f"# {d.title}", "",
             f"makima directive `{d.id}`: **{d.status}**"
             + (f" ({d.reason})" if d.reason else "")
             + f"; {passed}/{len(detail.steps)} steps passed in generation {d.generation}; "
               f"spend ${d.cost_usd:.4f}; integration branch `{d.integration_branch}`.", ""]
    goal = (spec.get("goal") or "").strip()
    if goal:
        lines += ["## Goal", "", goal, ""]
    lines += ["## Acceptance criteria", ""]
    criteria = spec.get("acceptance_criteria") or []
    if not criteria:
        lines += ["The spec lists no acceptance criteria.", ""]
    for criterion in criteria:
        found = evidence_for(criterion, steps)
        met = found and all(e.passed for e in found)
        mark = "x" if met else " "
        lines.append(f"- [{mark}] {criterion}")
        if not found:
            lines.append(f"  - {NO_EVIDENCE}")
        for e in found:
            commit = f" at `{e.attempt.commit[:12]}`" if e.attempt.commit else ""
            if landed.get(e.step):
                commit += f", merged as `{landed[e.step][:12]}`"
            lines.append(f"  - step `{e.step}` attempt {e.attempt.attempt}{commit}: judge "
                         f"{'met' if e.passed else 'NOT met'} ({e.score:.2f})"
                         + (f": {e.note}" if e.note else ""))
            if e.checks:
                lines.append(f"    - checks: {', '.join(e.checks)}")
    lines += ["", "## Steps", ""]
    for step in steps:
        attempt = _final_attempt(step)
        head = f"- `{step.step.name}` **{step.step.status}**"
        if attempt is not None:
            head += f", attempt {attempt.attempt}"
            if attempt.commit:
                head += f", commit `{attempt.commit[:12]}`"
            if landed.get(step.step.name):
                head += f", merged into `{d.integration_branch}` as " \
                        f"`{landed[step.step.name][:12]}`"
            if attempt.evaluation is not None:
                e = attempt.evaluation
                head += f", {e.confidence} {e.score:.2f}"
        lines.append(head)
        if attempt is not None and attempt.evaluation is not None:
            for check in attempt.evaluation.checks:
                code = check.exit_code if check.exit_code is not None else "none"
                lines.append(f"  - check `{check.command}`: exit {code}")
            if not attempt.evaluation.checks and not attempt.evaluation.criteria:
                lines.append("  - nothing verified this step (no check, no judge)")
        for decision in step.approvals:
            if decision.decided_at is not None:
                verb = "approved" if decision.approved else "denied"
                lines.append(f"  - {verb} by {decision.decided_by}"
                             + (f": {decision.comment}" if decision.comment else ""))
    return "\n".join(lines).rstrip() + "\n"


async def directive_report(db: reads.Database, directive_id: str) -> str:
    detail = await reads.get_directive(db, directive_id)
    steps = [await reads.get_step(db, directive_id, s.name, generation=s.generation)
             for s in detail.steps]
    return render_report(detail, steps, await reads.merge_commits(db, directive_id))


#: How long a completion waits for the read model to record every step's merge.
READ_MODEL_WAIT_SECONDS = 30.0


async def pull_request_report(db: reads.Database, request: CompleteInput, *,
                              wait_seconds: float = READ_MODEL_WAIT_SECONDS) -> str:
    """The report of a directive whose steps all passed, as its pull request's
    body: the same text `makima report ID` prints once it has ended. The
    workflow records events without waiting for them, so this first waits (a
    bounded time) until the read model holds every step's merge, and it calls
    the directive completed, which the read model will say a moment later."""
    wanted = {(s.generation, s.name) for s in request.steps}
    deadline = time.monotonic() + wait_seconds
    merged = await reads.merge_commits(db, request.directive_id)
    while not wanted <= merged.keys() and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        merged = await reads.merge_commits(db, request.directive_id)
    detail = await reads.get_directive(db, request.directive_id)
    detail.directive = detail.directive.model_copy(update={
        "status": "completed", "reason": f"all {len(request.steps)} steps passed"})
    steps = [await reads.get_step(db, request.directive_id, s.name, generation=s.generation)
             for s in detail.steps]
    return render_report(detail, steps, merged)
