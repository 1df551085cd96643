"""The review desk on the command line: `inbox` (what waits for a person, why,
since when, and the exact commands to decide) and `show` (one step's attempts:
checks, verdicts, diff, output). Both read the Postgres read model and the
directive's repository; deciding is `approve` / `deny` in commands.py.
"""

from __future__ import annotations

from typing import Any

from makima.cli import EXIT_BAD_INPUT, EXIT_OK
from makima.cli.commands import CommandError, _with_pool, emit_json
from makima.review import DiffUnavailable, age, attempt_diff, why_waiting
from makima.store.reads import AttemptRecord, InboxItem, StepDetail


def _quote(word: str) -> str:
    import shlex

    return shlex.quote(word)


def inbox_text(items: list[InboxItem]) -> str:
    if not items:
        return "nothing waits for a person"
    blocks = []
    for item in items:
        ref = f"{_quote(item.directive_id)} {_quote(item.step)}"
        score = f"  score {item.score:.2f}" if item.score is not None else ""
        lines = [f"{item.directive_id}  {item.step}  attempt {item.attempt}  "
                 f"waiting {age(item.requested_at)}{score}",
                 f"  title:      {item.title}",
                 f"  repository: {item.repository}"]
        if item.branch:
            lines.append(f"  branch:     {item.branch} @ {(item.commit or 'no commit')[:12]}")
        lines += [f"  why:        {reason}" for reason in
                  why_waiting(item.checks, item.criteria, item.score, item.summary)]
        if item.approvers:
            lines.append(f"  approvers:  {', '.join(item.approvers)}")
        lines += [f"  show:       makima show {ref} --attempt {item.attempt} --diff",
                  f"  approve:    makima approve {ref} --attempt {item.attempt} --comment '...'",
                  f"  deny:       makima deny {ref} --attempt {item.attempt} --comment '...'"]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


async def cmd_inbox(args: Any) -> int:
    from makima.store.reads import inbox

    async def work(pool: Any) -> int:
        items = await inbox(pool)
        if args.json:
            emit_json([{**i.model_dump(mode="json"),
                        "why": why_waiting(i.checks, i.criteria, i.score, i.summary)}
                       for i in items])
        else:
            print(inbox_text(items))
        return EXIT_OK

    return await _with_pool(work)


def attempt_text(detail: StepDetail, attempt: AttemptRecord) -> list[str]:
    lines = [f"attempt {attempt.attempt}" + (f"  {attempt.summary}" if attempt.summary else "")]
    if attempt.branch:
        lines.append(f"  branch:   {attempt.branch} @ {attempt.commit or 'no commit'}")
    lines.append(f"  spend:    ${attempt.cost_usd:.4f}"
                 + (f"  in {attempt.duration_seconds:.1f}s"
                    if attempt.duration_seconds is not None else ""))
    if attempt.exit_code not in (None, 0):
        lines.append(f"  agent exited {attempt.exit_code}")
    evaluation = attempt.evaluation
    if evaluation is None:
        lines.append("  not evaluated")
    else:
        lines.append(f"  verdict:  {evaluation.confidence} {evaluation.score:.2f}"
                     f" by {evaluation.evaluator or 'the evaluator'}"
                     + (f": {evaluation.summary}" if evaluation.summary else ""))
        for check in evaluation.checks:
            mark = "pass" if check.passed else "FAIL"
            code = "none" if check.exit_code is None else check.exit_code
            lines.append(f"  check {mark}: `{check.command}` exit {code}")
            if not check.passed and check.output_tail.strip():
                lines += [f"      {line}" for line in check.output_tail.strip().splitlines()[-8:]]
        for criterion in evaluation.criteria:
            mark = "met" if criterion.passed else "NOT MET"
            lines.append(f"  criterion {mark} ({criterion.score:.2f}): {criterion.criterion}"
                         + (f" — {criterion.evidence}" if criterion.evidence else ""))
        if not evaluation.checks and not evaluation.criteria:
            lines.append("  nothing verified this: no check ran and no judge looked at it")
        if evaluation.rework_instructions:
            lines.append(f"  rework:   {evaluation.rework_instructions}")
    decided = [a for a in detail.approvals if a.attempt == attempt.attempt and a.decided_at]
    for approval in decided:
        verb = "approved" if approval.approved else "denied"
        lines.append(f"  {verb} by {approval.decided_by}"
                     + (f": {approval.comment}" if approval.comment else ""))
    if attempt.output_tail.strip():
        lines.append("  output (tail):")
        lines += [f"      {line}" for line in attempt.output_tail.rstrip().splitlines()[-15:]]
    return lines


async def cmd_clean(args: Any) -> int:
    from makima.cleanup import clean_directive, ended_directives, parse_age

    try:
        older_than = parse_age(args.older_than)
    except ValueError as error:
        raise CommandError(EXIT_BAD_INPUT, str(error)) from None

    async def work(pool: Any) -> int:
        verb = "would remove" if args.dry_run else "removed"
        rows = await ended_directives(pool, older_than)
        touched = 0
        for row in rows:
            cleaned = await clean_directive(row, integration=args.integration,
                                            dry_run=args.dry_run)
            if cleaned.problem:
                print(f"{cleaned.directive_id}: skipped: {cleaned.problem}")
                continue
            for thing in cleaned.removed:
                print(f"{cleaned.directive_id}: {verb} {thing}")
            for thing in cleaned.kept:
                print(f"{cleaned.directive_id}: kept {thing}")
            touched += bool(cleaned.removed)
        print(f"{len(rows)} ended directive{'s' if len(rows) != 1 else ''} older than "
              f"{args.older_than}; {touched} had something to clean")
        return EXIT_OK

    return await _with_pool(work)


async def cmd_show(args: Any) -> int:
    from makima.store import InvalidFilter, NotFound
    from makima.store.reads import get_directive, get_step

    async def work(pool: Any) -> int:
        try:
            directive = await get_directive(pool, args.id)
            detail = await get_step(pool, args.id, args.step, generation=args.generation)
        except (NotFound, InvalidFilter) as error:
            raise CommandError(EXIT_BAD_INPUT, str(error)) from None
        attempts = detail.attempts
        if args.attempt is not None:
            attempts = [a for a in attempts if a.attempt == args.attempt]
            if not attempts:
                known = ", ".join(str(a.attempt) for a in detail.attempts) or "none yet"
                raise CommandError(EXIT_BAD_INPUT, f"step {args.step!r} has no attempt "
                                                   f"{args.attempt}; its attempts: {known}")
        step = detail.step
        print(f"{args.id}  {step.name}  {step.status}  (generation {step.generation}, "
              f"{step.attempts} attempt{'s' if step.attempts != 1 else ''})")
        if step.description:
            print(f"  {step.description}")
        for attempt in attempts:
            print()
            print("\n".join(attempt_text(detail, attempt)))
        shown = attempts[-1] if attempts else None
        if shown is not None and shown.commit:
            spec = directive.spec or {}
            base = directive.directive.integration_branch
            try:
                diff = await attempt_diff((spec.get("repository") or {}).get("path"), base,
                                          shown.commit)
            except DiffUnavailable as error:
                print(f"\n(no diff: {error})")
            else:
                print(f"\ndiff of attempt {shown.attempt} against {base}:")
                print(diff.stat or "(no changes)")
                if args.diff:
                    for file in diff.files:
                        print()
                        print(file.patch.rstrip())
                else:
                    print(f"(the whole diff: makima show {args.id} {args.step} "
                          f"--attempt {shown.attempt} --diff)")
        waiting = [a for a in detail.approvals if a.decided_at is None and a.requested_at
                   and step.status == "awaiting_approval"]
        if waiting:
            a = waiting[-1]
            print(f"\nwaiting for a person since {age(a.requested_at)} ago:\n"
                  f"  makima approve {args.id} {args.step} --attempt {a.attempt}\n"
                  f"  makima deny {args.id} {args.step} --attempt {a.attempt}")
        return EXIT_OK

    return await _with_pool(work)
