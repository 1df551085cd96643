"""The review desk on the command line: `inbox` (what waits for a person, why,
since when, and the exact commands to decide) and `show` (one step's attempts:
checks, verdicts, diff, output). Both read the Postgres read model and the
directive's repository; deciding is `approve` / `deny` in commands.py.
"""

from __future__ import annotations

from typing import Any

from makima.cli import EXIT_BAD_INPUT, EXIT_OK, views
from makima.cli.commands import CommandError, _with_pool, emit_json
from makima.review import DiffUnavailable, age, attempt_diff, why_waiting


async def cmd_inbox(args: Any) -> int:
    from makima.store.reads import inbox

    async def work(pool: Any) -> int:
        items = await inbox(pool)
        if args.json:
            emit_json([{**i.model_dump(mode="json"),
                        "why": why_waiting(i.checks, i.criteria, i.score, i.summary)}
                       for i in items])
        else:
            views.out(views.inbox_view(items))
        return EXIT_OK

    return await _with_pool(work)


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
        plain = not views.is_terminal()
        views.out(views.step_view(args.id, detail, attempts))
        shown = attempts[-1] if attempts else None
        if shown is not None and shown.commit:
            spec = directive.spec or {}
            base = directive.directive.integration_branch
            try:
                diff = await attempt_diff((spec.get("repository") or {}).get("path"), base,
                                          shown.commit)
            except DiffUnavailable as error:
                views.out(views.no_diff(error))
            else:
                views.out(views.diff_view(shown.attempt, base, diff.stat,
                                          diff.files if args.diff else None, plain=plain))
                if not args.diff:
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
