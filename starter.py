"""The `makima` command line: start, watch and steer directives, run the
embedded stack, and the demo.

    makima start SPEC [--wait]        makima status ID [--json]
    makima approve ID STEP            makima dev
    makima demo                       makima --help / makima COMMAND --help

Exit codes: 0 ok, 1 the directive failed or the action was refused, 2 bad input.
The commands live in makima/cli/; this module only parses arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from makima.cli import EXIT_BAD_INPUT, EXIT_REFUSED, desk
from makima.cli import commands as cmd
from makima.errors import MakimaError, SpecError
from makima.models import DirectiveStatus


class _Parser(argparse.ArgumentParser):
    """argparse exits with 2 on bad usage already; this keeps the message short."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="makima", description="Start, watch and steer makima directives.",
                     epilog="Exit codes: 0 ok, 1 the directive failed or the action was "
                            "refused, 2 bad input. Configuration: TEMPORAL_ADDRESS, "
                            "TEMPORAL_NAMESPACE, MAKIMA_TASK_QUEUE, DATABASE_URL, MAKIMA_HOME "
                            "(see README).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, run) -> argparse.ArgumentParser:  # noqa: ANN001
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(run=run)
        return p

    p = command("start", "start a directive from a YAML or JSON spec", cmd.cmd_start)
    p.add_argument("spec", type=Path, nargs="?", help="the spec file (YAML or JSON); optional "
                   "when --title, --goal and --repo say everything")
    p.add_argument("--id", help="the directive (workflow) id; default directive-<slug>-<random>")
    p.add_argument("--title", help="override the spec's title")
    p.add_argument("--goal", help="override the spec's goal")
    p.add_argument("--repo", help="override the repository path (a local git repository)")
    p.add_argument("--plan", type=Path, help="a plan file (YAML or JSON) to supply")
    p.add_argument("--wait", action="store_true",
                   help="show a live table of the steps until the directive ends")
    p.add_argument("--json", action="store_true", help="print JSON (with --wait: the final "
                   "status only)")

    p = command("status", "a directive's status (the workflow's status query)", cmd.cmd_status)
    p.add_argument("id")
    p.add_argument("--json", action="store_true", help="the whole snapshot as JSON")

    p = command("list", "directives, newest first (from the Postgres read model)", cmd.cmd_list)
    p.add_argument("--status", choices=[s.value for s in DirectiveStatus])
    p.add_argument("--owner")
    p.add_argument("--waiting", action="store_true",
                   help="only directives with a step waiting for a person")
    p.add_argument("--search", help="only titles containing this text (any case)")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")

    p = command("inbox", "every step waiting for a person, oldest first: why, since when, "
                "and the commands to decide", desk.cmd_inbox)
    p.add_argument("--json", action="store_true")

    p = command("show", "one step's attempts: checks, judge's verdicts, branch and commit, "
                "diff stat (--diff: the whole diff), the agent's output", desk.cmd_show)
    p.add_argument("id")
    p.add_argument("step")
    p.add_argument("--attempt", type=int, help="only this attempt (default: every attempt; "
                   "the diff is the last one shown)")
    p.add_argument("--generation", type=int, help="default: the current generation")
    p.add_argument("--diff", action="store_true", help="print the whole diff, not its stat")

    p = command("events", "a directive's event log (from the read model)", cmd.cmd_events)
    p.add_argument("id")
    p.add_argument("--follow", "-f", action="store_true",
                   help="keep printing new events live until the directive ends")
    p.add_argument("--limit", type=int, default=100, help="how many recent events first")

    for name, run, what in (("approve", cmd.cmd_approve, "approve a step waiting for a person"),
                            ("deny", cmd.cmd_deny, "deny a step waiting for a person (it is "
                                                   "blocked)")):
        p = command(name, f"{what} (the {name}_step update)", run)
        p.add_argument("id")
        p.add_argument("step")
        p.add_argument("--by", help="who decides, checked against the directive's approvers "
                       "(default: your OS user name)")
        p.add_argument("--attempt", type=int, help="the attempt you reviewed (as `makima "
                       "inbox` names it); refused if another attempt waits by now")
        p.add_argument("--generation", type=int, help="the generation you reviewed (default: "
                       "the current one)")
        p.add_argument("--comment", default="")

    p = command("pause", "pause: no new step or attempt starts (pause_directive)", cmd.cmd_pause)
    p.add_argument("id")
    p = command("resume", "resume a paused directive (resume_directive)", cmd.cmd_resume)
    p.add_argument("id")
    p = command("stop", "stop: running steps are cancelled (stop_directive)", cmd.cmd_stop)
    p.add_argument("id")
    p.add_argument("--reason", default="stopped from the command line")

    p = command("update-goal", "change the goal; the next generation builds on passed work "
                "(update_directive_goal)", cmd.cmd_update_goal)
    p.add_argument("id")
    p.add_argument("--goal", required=True)
    p.add_argument("--requirement", action="append", help="a new requirement (repeatable)")
    p.add_argument("--plan", type=Path, help="a plan file for the next generation (needed "
                   "when the directive has no planner)")

    p = command("raise-budget", "raise budgets (raise_directive_budget); resume afterwards",
                cmd.cmd_raise_budget)
    p.add_argument("id")
    p.add_argument("--max-cost-usd", type=float)
    p.add_argument("--max-wall-time-minutes", type=float)
    p.add_argument("--max-rework-cycles", type=int)

    p = command("dag", "the step graph with each step's status", cmd.cmd_dag)
    p.add_argument("id")
    p.add_argument("--format", choices=["text", "mermaid", "dot", "png"], default="text")
    p.add_argument("--output", "-o", help="png: where to write it (default ID.png)")

    p = command("dev", "the embedded stack in the foreground: Temporal dev server with its UI, "
                "Postgres, one worker", cmd.cmd_dev)
    p.add_argument("--port", type=int, default=7233, help="Temporal's gRPC port")
    p.add_argument("--ui-port", type=int, default=8233, help="the web UI's port")
    p.add_argument("--console-port", type=int, default=8234,
                   help="the makima console's port (0: no console)")

    p = command("console", "the review desk in a browser: inbox, directives, diffs, decisions "
                "(reads DATABASE_URL, acts through TEMPORAL_ADDRESS)", cmd.cmd_console)
    p.add_argument("--host", default="127.0.0.1", help="where to listen; anything but loopback "
                   "needs MAKIMA_CONSOLE_USERS or MAKIMA_CONSOLE_AUTH_HEADER")
    p.add_argument("--port", type=int, default=8234)

    p = command("clean", "remove the step branches and worktrees of ended directives, and "
                "integration branches of directives that failed before any work",
                desk.cmd_clean)
    p.add_argument("--older-than", default="7d", help="only directives that ended at least "
                   "this long ago: 7d, 12h, 30m, 0 (default 7d)")
    p.add_argument("--integration", action="store_true", help="also remove the integration "
                   "branches of ended directives, completed ones included")
    p.add_argument("--dry-run", action="store_true", help="say what would go; remove nothing")

    p = command("report", "a directive's report in Markdown: each acceptance criterion with "
                "its evidence, each step's outcome", cmd.cmd_report)
    p.add_argument("id")

    p = command("demo", "run the demo directive on a sample repository", cmd.cmd_demo)
    p.add_argument("--workdir", type=Path, help="where to make the sample repository "
                   "(default: a new temporary folder, kept)")
    p.add_argument("--port", type=int, help="Temporal's gRPC port of the demo's own stack "
                   "(default: a free port); with TEMPORAL_ADDRESS set, that server is used")
    p.add_argument("--ui-port", type=int, help="its web UI's port (default: a free port)")

    command("migrate", "apply the Postgres migrations (DATABASE_URL or the embedded one)",
            cmd.cmd_migrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The console script. Called with `argv` (tests, other Python code) it
    returns the exit code; as the program itself it exits with it."""
    try:
        code = run_command(argv)
    except BrokenPipeError:
        # `makima list | head`: the reader left; say nothing more, like other tools
        # (exit 141, as if SIGPIPE had ended it).
        if argv is None:  # stdout is ours: point it at /dev/null so flushing cannot fail
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141
    if argv is None:
        # The Temporal client's native runtime keeps threads that can crash the
        # interpreter while it finalizes (a fatal PyGILState_Release, seen as
        # exit code -11 or -6 after a correct run). Nothing is left to clean up
        # here, so leave without finalizing.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def run_command(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(args.run(args))
    except SpecError as error:
        print("the input has problems; nothing was started:", file=sys.stderr)
        for problem in error.problems:
            print(f"  - {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except cmd.CommandError as error:
        if str(error):
            print(str(error), file=sys.stderr if error.code else sys.stdout)
        return error.code
    except MakimaError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
