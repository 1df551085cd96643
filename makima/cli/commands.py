"""One coroutine per `makima` command. Each returns the exit code (makima.cli:
0 ok, 1 the directive failed or the action was refused, 2 bad input) or raises
CommandError with the code and a message for the user.

Steering commands are sent as the workflow's *updates*, so the answer (accepted,
or rejected and why) is printed at once. `list` and `events` read the Postgres
read model (DATABASE_URL, else the embedded server under MAKIMA_HOME);
everything else talks to Temporal only.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowUpdateFailedError,
)
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from makima.cli import EXIT_BAD_INPUT, EXIT_OK, EXIT_REFUSED, render, views
from makima.connection import connect_temporal, task_queue
from makima.contracts import (
    GENERATION_ATTRIBUTE,
    OWNER_ATTRIBUTE,
    SEARCH_ATTRIBUTES,
    STATUS_ATTRIBUTE,
    new_directive_id,
)
from makima.models import (
    ApprovalDecision,
    BudgetRaise,
    DirectiveSnapshot,
    DirectiveSpec,
    DirectiveStatus,
    Empty,
    GoalUpdate,
    StepStatus,
    StopRequest,
    UpdateAnswer,
)
from makima.query_guard import TASK_RETRY_MESSAGE

WORKFLOW_TYPE = "DirectiveWorkflow"
POLL_SECONDS = 0.5


class CommandError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def temporal_address() -> str:
    return os.environ.get("TEMPORAL_ADDRESS", "localhost:7233")


def ui_base() -> str:
    from makima.devstack import ui_url_for

    return os.environ.get("MAKIMA_UI_URL") or ui_url_for(temporal_address())


def ui_link(directive_id: str) -> str:
    namespace = os.environ.get("TEMPORAL_NAMESPACE", "default")
    return f"{ui_base()}/namespaces/{namespace}/workflows/{directive_id}"


async def connect() -> Client:
    try:
        return await connect_temporal()
    except Exception as error:
        raise CommandError(EXIT_REFUSED, f"cannot reach Temporal at {temporal_address()}: "
                                         f"{error}. Start it with `makima dev`, or set "
                                         "TEMPORAL_ADDRESS") from None


def emit_json(value: Any) -> None:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    print(json.dumps(value, indent=2, default=str))


# --------------------------------------------------------------------------- start


async def cluster_has_search_attributes(client: Client) -> bool:
    """Whether MakimaStatus/Owner/Generation are registered. MAKIMA_SEARCH_ATTRIBUTES=1/0
    answers without asking (clusters where the operator service is not allowed)."""
    forced = os.environ.get("MAKIMA_SEARCH_ATTRIBUTES", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    try:
        answer = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=client.namespace))
    except Exception:
        return False  # never fail a start for the sake of the list view
    return {key.name for key in SEARCH_ATTRIBUTES} <= set(answer.custom_attributes)


async def start_directive(client: Client, spec: DirectiveSpec,
                          directive_id: str | None = None) -> WorkflowHandle[Any, Any]:
    directive_id = directive_id or new_directive_id(spec.title, uuid.uuid4().hex)
    attributes = None
    if await cluster_has_search_attributes(client):
        attributes = TypedSearchAttributes([
            SearchAttributePair(STATUS_ATTRIBUTE, DirectiveStatus.PLANNING.value),
            SearchAttributePair(OWNER_ATTRIBUTE, spec.owner),
            SearchAttributePair(GENERATION_ATTRIBUTE, 1),
        ])
    try:
        return await client.start_workflow(
            WORKFLOW_TYPE, spec, id=directive_id, task_queue=task_queue(),
            result_type=DirectiveSnapshot, search_attributes=attributes,
            static_summary=spec.title,
            static_details=f"{spec.goal[:1000]}\n\nrepository: {spec.repository.location}")
    except WorkflowAlreadyStartedError:
        raise CommandError(EXIT_BAD_INPUT, f"a directive with id {directive_id!r} already "
                                           "exists; choose another --id") from None


OnSnapshot = Callable[[DirectiveSnapshot], Awaitable[None]]


async def follow_directive(client: Client, directive_id: str, *, show: bool = True,
                           on_snapshot: OnSnapshot | None = None) -> DirectiveSnapshot:
    """Poll the `status` query until the directive ends, redrawing the live table
    (in place on a terminal, else printed again whenever it changes)."""
    handle = client.get_workflow_handle(directive_id)  # no run id: follows continue-as-new
    started = await directive_started_at(client, directive_id)
    live = None
    if show and views.is_terminal():
        from rich.live import Live

        live = Live(auto_refresh=False, transient=False)
        live.start()
    last = ""
    try:
        while True:
            snapshot = with_elapsed_now(await query_status(handle), started)
            if live is not None:
                live.update(views.live_view(snapshot, plain=False), refresh=True)
            elif show:
                view = views.plain_text(views.live_view(snapshot, plain=True))
                comparable = view.partition("\n")[2]  # without the headline's ticking clock
                if comparable != last:
                    print(view + "\n", flush=True)
                last = comparable
            if snapshot.status.is_final:
                return snapshot
            if on_snapshot is not None:
                await on_snapshot(snapshot)
            await asyncio.sleep(POLL_SECONDS)
    finally:
        if live is not None:
            live.stop()


async def directive_started_at(client: Client, directive_id: str) -> datetime | None:
    """When the directive started: its first run's start (a directive continues as
    new at every generation), or None when Temporal cannot say."""
    try:
        described = await client.get_workflow_handle(directive_id).describe()
        first = described.raw_description.workflow_execution_info.first_run_id
        if first and first != described.run_id:
            described = await client.get_workflow_handle(directive_id, run_id=first).describe()
    except RPCError:
        return None
    return described.start_time


def with_elapsed_now(snapshot: DirectiveSnapshot, started: datetime | None) -> DirectiveSnapshot:
    """The snapshot with `elapsed_seconds` computed now from the start: the
    workflow's own value is as of its last task, stale while a directive idles."""
    if started is None or snapshot.status.is_final:
        return snapshot
    elapsed = (datetime.now(UTC) - started).total_seconds()
    return snapshot.model_copy(update={"elapsed_seconds": round(max(elapsed, 0.0), 3)})


async def cmd_start(args: Any) -> int:
    from makima.cli.spec import load_spec

    spec = load_spec(args.spec, title=args.title, goal=args.goal, repo=args.repo,
                     plan=args.plan)
    client = await connect()
    handle = await start_directive(client, spec, args.id)
    if not args.wait:
        if args.json:
            emit_json({"directive_id": handle.id, "run_id": handle.result_run_id,
                       "ui": ui_link(handle.id)})
        else:
            print(f"started {handle.id}\n  status: makima status {handle.id}\n"
                  f"  UI:     {ui_link(handle.id)}")
        return EXIT_OK
    if not args.json:
        print(f"started {handle.id}  ({ui_link(handle.id)})", flush=True)
    # Ctrl-C ends following at once, even inside a status query that is slow to answer
    # (seen in full test runs: a cancelled query kept `--wait` alive for over 30 s);
    # following only reads, so there is nothing to finish first.
    asyncio.get_running_loop().add_signal_handler(
        signal.SIGINT, _stop_following_now, handle.id)
    try:
        final = await follow_directive(client, handle.id, show=not args.json,
                                       on_snapshot=_bell_when_waiting(args.json))
    except (KeyboardInterrupt, asyncio.CancelledError):
        _stop_following_now(handle.id)
    if args.json:
        emit_json(final)
    elif any(s.status is StepStatus.PASSED for s in final.steps):  # work to look at
        print(f"\nbranch: {final.integration_branch}\n"
              f"  review: git -C {spec.repository.location} diff "
              f"{spec.repository.base_branch}...{final.integration_branch} --stat")
    return EXIT_OK if final.status is DirectiveStatus.COMPLETED else EXIT_REFUSED


def _stop_following_now(directive_id: str) -> None:
    print(f"\nstopped following; directive {directive_id} keeps running.\n"
          f"  follow it:  makima events {directive_id} --follow\n"
          f"  status:     makima status {directive_id}\n"
          f"  stop it:    makima stop {directive_id}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(130)


def _bell_when_waiting(quiet: bool) -> OnSnapshot:
    """Ring the terminal bell each time a new step starts waiting for a person."""
    rung: set[tuple[str, int]] = set()

    async def ring(snapshot: DirectiveSnapshot) -> None:
        waiting = {(p.step, p.attempt) for p in snapshot.pending_approvals}
        if waiting - rung and not quiet:
            terminal = sys.__stdout__ or sys.stdout  # past rich's capture of sys.stdout
            terminal.write("\a")
            terminal.flush()
        rung.update(waiting)

    return ring


# --------------------------------------------------------------------------- reading


async def query_status(handle: WorkflowHandle[Any, Any]) -> DirectiveSnapshot:
    for _ in range(3):  # asked again when the worker's query guard refused to answer
        try:
            return await handle.query("status", result_type=DirectiveSnapshot)
        except WorkflowQueryFailedError as error:
            if str(error) != TASK_RETRY_MESSAGE:
                raise CommandError(EXIT_REFUSED, f"status of {handle.id} failed: {error}") from None
        except RPCError as error:
            if error.status is RPCStatusCode.NOT_FOUND:
                raise CommandError(EXIT_BAD_INPUT, f"no directive with id {handle.id!r}") from None
            raise CommandError(EXIT_REFUSED, f"status of {handle.id} failed: {error}") from None
    raise CommandError(EXIT_REFUSED, f"status of {handle.id} failed: {TASK_RETRY_MESSAGE}")


async def cmd_status(args: Any) -> int:
    client = await connect()
    snapshot = await query_status(client.get_workflow_handle(args.id))
    snapshot = with_elapsed_now(snapshot, await directive_started_at(client, args.id))
    if args.json:
        emit_json(snapshot)
    else:
        views.out(views.status_view(snapshot, plain=not views.is_terminal()))
        print(f"\nUI: {ui_link(args.id)}")
    return EXIT_OK


async def _with_pool(work: Callable[[Any], Awaitable[int]]) -> int:
    from makima.store import StoreError, create_pool

    try:
        pool = await create_pool(min_size=1, max_size=2)
    except StoreError as error:
        raise CommandError(EXIT_REFUSED, str(error)) from None
    try:
        return await work(pool)
    finally:
        await pool.close()


async def cmd_list(args: Any) -> int:
    from makima.store import InvalidFilter
    from makima.store.reads import list_directives

    async def work(pool: Any) -> int:
        try:
            found = await list_directives(pool, status=args.status, owner=args.owner,
                                          waiting=args.waiting, search=args.search,
                                          limit=args.limit)
        except InvalidFilter as error:
            raise CommandError(EXIT_BAD_INPUT, str(error)) from None
        if args.json:
            emit_json([d.model_dump(mode="json") for d in found])
        else:
            views.out(views.directive_list(found, plain=not views.is_terminal()))
        return EXIT_OK

    return await _with_pool(work)


async def cmd_events(args: Any) -> int:
    from makima.store import NotFound
    from makima.store.reads import event_tail
    from makima.store.watch import watch_events

    async def work(pool: Any) -> int:
        try:
            backlog = await event_tail(pool, args.id, limit=args.limit)
            for event in backlog:
                print(render.event_line(event), flush=True)
            if args.follow:
                after = backlog[-1].position if backlog else 0
                if backlog and backlog[-1].type == "directive_status" and \
                        backlog[-1].data.get("status") in ("completed", "failed", "stopped"):
                    return EXIT_OK
                async for event in watch_events(pool, args.id, after=after, until_final=True):
                    print(render.event_line(event), flush=True)
        except NotFound as error:
            raise CommandError(EXIT_BAD_INPUT, f"{error} in the read model") from None
        return EXIT_OK

    return await _with_pool(work)


async def cmd_dag(args: Any) -> int:
    client = await connect()
    snapshot = await query_status(client.get_workflow_handle(args.id))
    if args.format == "text":
        print(render.dag_text(snapshot))
    elif args.format == "mermaid":
        print(render.dag_mermaid(snapshot))
    elif args.format == "dot":
        print(render.dag_dot(snapshot))
    else:
        dot = shutil.which("dot")
        if dot is None:
            raise CommandError(EXIT_REFUSED, "--format png needs graphviz's `dot`, which is not "
                                             "installed (apt-get install graphviz, brew install "
                                             "graphviz); --format dot prints its input instead")
        output = Path(args.output or f"{args.id}.png")
        done = await asyncio.to_thread(
            subprocess.run, [dot, "-Tpng", "-o", str(output)], input=render.dag_dot(snapshot),
            text=True, capture_output=True, check=False)
        if done.returncode != 0:
            raise CommandError(EXIT_REFUSED, f"dot failed: {done.stderr.strip()}")
        print(f"wrote {output}")
    return EXIT_OK


# --------------------------------------------------------------------------- steering


#: What the server answers (NOT_FOUND) when the run that admitted an update closed
#: before the workflow took it: the directive ended, or its run continued as new.
UPDATE_ABORTED_BY_CLOSE = "aborted by closing workflow"


async def send_update(client: Client, directive_id: str, update: str,
                      payload: BaseModel | None) -> UpdateAnswer:
    """Send a command and return the directive's answer. Sent again, under the same
    update id, while the run it reached closed for a continue-as-new before taking it;
    refused with that reason once the directive itself has ended."""
    handle = client.get_workflow_handle(directive_id)
    args = [payload] if payload is not None else []
    update_id = str(uuid.uuid4())
    for _ in range(5):
        try:
            return await handle.execute_update(update, args=args, id=update_id,
                                               result_type=UpdateAnswer)
        except WorkflowUpdateFailedError as error:
            cause = error.cause
            message = getattr(cause, "message", None) or str(cause or error)
            raise CommandError(EXIT_REFUSED, f"rejected: {message}") from None
        except RPCError as error:
            if UPDATE_ABORTED_BY_CLOSE not in error.message:
                _refuse_for(error, directive_id)
            status = (await handle.describe()).status
            if status is not WorkflowExecutionStatus.RUNNING:
                raise CommandError(EXIT_REFUSED, (
                    f"rejected: directive {directive_id} ended ({status.name.lower()}) "
                    "before it took the command")) from None
    raise CommandError(EXIT_REFUSED, f"rejected: directive {directive_id} kept closing its "
                                     "run before it took the command; send it again")


def _refuse_for(error: RPCError, directive_id: str) -> None:
    if error.status is RPCStatusCode.NOT_FOUND:
        if "already completed" in str(error).lower() or "completed" in error.message.lower():
            raise CommandError(EXIT_REFUSED, f"rejected: directive {directive_id} has "
                                             "already ended") from None
        raise CommandError(EXIT_BAD_INPUT, f"no directive with id {directive_id!r}") from None
    raise CommandError(EXIT_REFUSED, f"rejected: {error.message}") from None


async def _steer(args: Any, update: str, payload: BaseModel | None) -> int:
    client = await connect()
    answer = await send_update(client, args.id, update, payload)
    if not answer.accepted:
        print(f"rejected: {answer.message}")
        return EXIT_REFUSED
    print(f"accepted: {answer.message}")
    return EXIT_OK


def _decision(args: Any) -> ApprovalDecision:
    from makima.review import os_user

    return ApprovalDecision(step=args.step, by=args.by or os_user(), comment=args.comment,
                            attempt=args.attempt, generation=args.generation)


async def cmd_approve(args: Any) -> int:
    return await _steer(args, "approve_step", _decision(args))


async def cmd_deny(args: Any) -> int:
    return await _steer(args, "deny_step", _decision(args))


async def cmd_pause(args: Any) -> int:
    return await _steer(args, "pause_directive", Empty())


async def cmd_resume(args: Any) -> int:
    return await _steer(args, "resume_directive", Empty())


async def cmd_stop(args: Any) -> int:
    return await _steer(args, "stop_directive", StopRequest(reason=args.reason))


async def cmd_update_goal(args: Any) -> int:
    plan = None
    if args.plan is not None:
        from makima.cli.spec import read_document

        plan = read_document(args.plan)
    from pydantic import ValidationError

    from makima.cli.spec import pydantic_problems
    from makima.errors import SpecError

    try:
        update = GoalUpdate.model_validate({
            "goal": args.goal, "plan": plan,
            "requirements": args.requirement or None})
    except ValidationError as error:
        raise SpecError(pydantic_problems(error)) from None
    return await _steer(args, "update_directive_goal", update)


async def cmd_raise_budget(args: Any) -> int:
    from pydantic import ValidationError

    from makima.cli.spec import pydantic_problems
    from makima.errors import SpecError

    try:
        request = BudgetRaise(max_cost_usd=args.max_cost_usd,
                              max_wall_time_minutes=args.max_wall_time_minutes,
                              max_rework_cycles=args.max_rework_cycles)
    except ValidationError as error:
        raise SpecError(pydantic_problems(error)) from None
    if not request.model_dump(exclude_none=True):
        raise SpecError("name at least one budget: --max-cost-usd, --max-wall-time-minutes "
                        "or --max-rework-cycles")
    return await _steer(args, "raise_directive_budget", request)


# --------------------------------------------------------------------------- stack


async def cmd_dev(args: Any) -> int:
    from makima.devstack import run_dev

    return await run_dev(args.port, args.ui_port, console_port=args.console_port)


async def cmd_console(args: Any) -> int:
    from makima.console import run_console

    return await run_console(args.host, args.port)


async def cmd_report(args: Any) -> int:
    from makima.report import directive_report
    from makima.store import InvalidFilter, NotFound

    async def work(pool: Any) -> int:
        try:
            print(await directive_report(pool, args.id), end="")
        except (NotFound, InvalidFilter) as error:
            raise CommandError(EXIT_BAD_INPUT, str(error)) from None
        return EXIT_OK

    return await _with_pool(work)


async def cmd_demo(args: Any) -> int:
    from makima.cli.demo import run_demo

    return await run_demo(workdir=args.workdir, port=args.port, ui_port=args.ui_port)


async def cmd_migrate(args: Any) -> int:
    from makima.store.migrate import run_migrations

    applied = await run_migrations()
    print("applied: " + ", ".join(applied) if applied else "the schema is up to date")
    return EXIT_OK
