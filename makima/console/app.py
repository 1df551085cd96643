"""The console's routes (Starlette): pages rendered on the server from the
Postgres read model, actions sent to the directive workflow as Temporal
updates, and each directive's events streamed live (LISTEN/NOTIFY ->
server-sent events).

    GET  /                                    the inbox (and breakers that paused a directive)
    GET  /directives?status=&owner=&q=        the directive list
    GET  /directives/{id}                     a directive's page
    GET  /directives/{id}/live                its live part (status, graph, steps), re-fetched on events
    GET  /directives/{id}/events              server-sent events
    GET  /directives/{id}/steps/{step}/attempts/{n}/diff   an attempt's diff, highlighted
    GET  /directives/{id}/report              the directive's report (Markdown)
    POST /directives/{id}/actions/{action}    approve, deny, pause, resume, stop,
                                              raise-budget, update-goal, raise-and-resume

Why no htmx: the only dynamic parts are "post a form, show the answer inline"
and "re-fetch a fragment when an event arrives"; console.js does both in about
sixty lines, with nothing to vendor or build.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import BaseModel, ValidationError
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import DiffLexer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from temporalio.client import Client

from makima.cli.render import event_line
from makima.console.auth import Access, signed_in
from makima.console.graph import dag_svg
from makima.models import ApprovalDecision, BudgetRaise, Empty, GoalUpdate, StopRequest
from makima.review import DiffUnavailable, age, attempt_diff, why_waiting
from makima.store import reads
from makima.store.errors import InvalidFilter, NotFound
from makima.store.watch import SharedListener, watch_events

HERE = Path(__file__).parent
DIFF_FORMATTER = HtmlFormatter(nowrap=False, cssclass="hl")


@dataclass
class Console:
    pool: asyncpg.Pool
    temporal: Callable[[], Any]  # async () -> Client, connected on first use
    access: Access
    ui_url: str = ""
    #: wakes every open page's event stream; None: each stream LISTENs on its own
    listener: SharedListener | None = None


def _templates() -> Environment:
    env = Environment(loader=FileSystemLoader(HERE / "templates"),
                      autoescape=select_autoescape(["html"]), trim_blocks=True,
                      lstrip_blocks=True)
    env.globals["age"] = age
    env.globals["why_waiting"] = why_waiting
    env.filters["money"] = lambda v: f"${(v or 0):.4f}"
    return env


TEMPLATES = _templates()


def page(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    html = TEMPLATES.get_template(name).render(user=request.state.user, **context)
    return HTMLResponse(html, status_code=status_code)


# --------------------------------------------------------------------------- pages


async def inbox_page(request: Request) -> Response:
    console: Console = request.app.state.console
    items = await reads.inbox(console.pool)
    breakers = await reads.paused_by_breakers(console.pool)
    return page(request, "inbox.html", items=items, breakers=breakers)


async def directives_page(request: Request) -> Response:
    console: Console = request.app.state.console
    status = request.query_params.get("status") or None
    owner = request.query_params.get("owner") or None
    search = request.query_params.get("q") or None
    error = ""
    try:
        found = await reads.list_directives(console.pool, status=status, owner=owner,
                                            search=search, limit=200)
    except InvalidFilter as problem:
        found, error = [], str(problem)
    return page(request, "directives.html", directives=found, error=error,
                status=status or "", owner=owner or "", q=search or "",
                statuses=[s.value for s in reads.DirectiveStatus])


async def _directive_context(console: Console, directive_id: str) -> dict[str, Any]:
    detail = await reads.get_directive(console.pool, directive_id)
    order = [s.get("name") for s in ((detail.chain.plan or {}).get("steps") or [])] \
        if detail.chain else []
    detail.steps.sort(key=lambda s: order.index(s.name) if s.name in order else len(order))
    steps = []
    for step in detail.steps:
        steps.append(await reads.get_step(console.pool, directive_id, step.name,
                                          generation=step.generation))
    waiting = {(i.step, i.attempt): i for i in
               await reads.inbox(console.pool, directive_id=directive_id)}
    chains = await reads.generations(console.pool, directive_id)
    last = max((c.generation for c in chains), default=0)
    return {"detail": detail, "d": detail.directive, "steps": steps, "waiting": waiting,
            "graph": dag_svg(detail.steps), "spec": detail.spec or {},
            "passed": sum(1 for s in detail.steps if s.status == "passed"),
            "chains": [(c, generation_outcome(c, detail.directive.status, last))
                       for c in chains]}


def generation_outcome(chain: reads.ChainRecord, directive_status: str, last: int) -> str:
    """What became of a generation, as the page's list of generations says it: a plan
    that is being made or could not be made, a generation a later one replaced, or
    (the last one) the directive's own state; not "ready" for a finished one."""
    if chain.plan_status in ("planning", "invalid", "failed"):
        return {"planning": "planning", "invalid": "plan invalid",
                "failed": "planning failed"}[chain.plan_status]
    if chain.generation < last:
        return "ended, re-planned"
    return "running" if directive_status == "active" else directive_status


async def directive_page(request: Request) -> Response:
    console: Console = request.app.state.console
    directive_id = request.path_params["id"]
    # The events first: the page follows those after the last one shown, so the state
    # read next is at least that new, and an event recorded in between still arrives
    # (read the other way round, it was lost and the page stood still).
    try:
        events = await reads.event_tail(console.pool, directive_id, limit=200)
        context = await _directive_context(console, directive_id)
    except NotFound as problem:
        return page(request, "missing.html", status_code=404, message=str(problem))
    from makima.report import directive_report

    return page(request, "directive.html", events=[(e.position, event_line(e)) for e in events],
                report=await directive_report(console.pool, directive_id),
                last_position=events[-1].position if events else 0,
                ui_url=console.ui_url, **context)


async def directive_live(request: Request) -> Response:
    console: Console = request.app.state.console
    try:
        context = await _directive_context(console, request.path_params["id"])
    except NotFound as problem:
        return HTMLResponse(str(problem), status_code=404)
    return page(request, "_live.html", **context)


async def attempt_diff_fragment(request: Request) -> Response:
    console: Console = request.app.state.console
    directive_id, step = request.path_params["id"], request.path_params["step"]
    number = request.path_params["attempt"]
    try:
        detail = await reads.get_directive(console.pool, directive_id)
        step_detail = await reads.get_step(console.pool, directive_id, step,
                                           generation=_int(request.query_params.get("g")))
    except (NotFound, InvalidFilter) as problem:
        return HTMLResponse(f'<p class="problem">{_esc(str(problem))}</p>', status_code=404)
    attempt = next((a for a in step_detail.attempts if a.attempt == number), None)
    if attempt is None:
        return HTMLResponse(f'<p class="problem">step {_esc(step)} has no attempt {number}</p>',
                            status_code=404)
    repository = ((detail.spec or {}).get("repository") or {}).get("path")
    try:
        diff = await attempt_diff(repository, detail.directive.integration_branch,
                                  attempt.commit)
    except DiffUnavailable as problem:
        return HTMLResponse(f'<p class="problem">{_esc(str(problem))}</p>')
    files = [(f, highlight(f.patch, DiffLexer(), DIFF_FORMATTER)) for f in diff.files]
    return page(request, "_diff.html", diff=diff, files=files)


async def report_page(request: Request) -> Response:
    from makima.report import directive_report

    console: Console = request.app.state.console
    try:
        text = await directive_report(console.pool, request.path_params["id"])
    except NotFound as problem:
        return Response(str(problem), status_code=404, media_type="text/plain")
    return Response(text, media_type="text/markdown; charset=utf-8")


def _int(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None


def _esc(text: str) -> str:
    from html import escape

    return escape(text)


# --------------------------------------------------------------------------- live events


async def directive_events(request: Request) -> Response:
    console: Console = request.app.state.console
    directive_id = request.path_params["id"]
    # A browser that reconnects sends the last id it saw; the page's `after` is older.
    after = max(_int(request.query_params.get("after")) or 0,
                _int(request.headers.get("last-event-id")) or 0)

    async def stream() -> AsyncIterator[str]:
        yield "retry: 2000\n\n"
        async for event in watch_events(console.pool, directive_id, after=after,
                                        must_exist=False, listener=console.listener):
            payload = {"position": event.position, "line": event_line(event),
                       "type": event.type}
            yield f"id: {event.position}\ndata: {json.dumps(payload)}\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store"})


# --------------------------------------------------------------------------- actions


def _decision(form: dict[str, str], user: str) -> ApprovalDecision:
    return ApprovalDecision(step=form.get("step", ""), by=user, comment=form.get("comment", ""),
                            attempt=_int(form.get("attempt")),
                            generation=_int(form.get("generation")))


def _budget(form: dict[str, str]) -> BudgetRaise:
    values = {k: form[k] for k in ("max_cost_usd", "max_wall_time_minutes",
                                   "max_rework_cycles") if form.get(k, "").strip()}
    if not values:
        raise ValueError("name at least one budget to raise")
    return BudgetRaise.model_validate(values)


def _goal(form: dict[str, str]) -> GoalUpdate:
    requirements = [r.strip() for r in form.get("requirements", "").splitlines() if r.strip()]
    return GoalUpdate.model_validate({"goal": form.get("goal", ""),
                                      "requirements": requirements or None})


#: action -> the updates it sends, in order, each with how its payload is built.
ACTIONS: dict[str, list[tuple[str, Callable[[dict[str, str], str], BaseModel]]]] = {
    "approve": [("approve_step", _decision)],
    "deny": [("deny_step", _decision)],
    "pause": [("pause_directive", lambda f, u: Empty())],
    "resume": [("resume_directive", lambda f, u: Empty())],
    "stop": [("stop_directive", lambda f, u: StopRequest(
        reason=f.get("reason") or f"stopped from the console by {u}"))],
    "raise-budget": [("raise_directive_budget", lambda f, u: _budget(f))],
    "raise-and-resume": [("raise_directive_budget", lambda f, u: _budget(f)),
                         ("resume_directive", lambda f, u: Empty())],
    "update-goal": [("update_directive_goal", lambda f, u: _goal(f))],
}


async def act(request: Request) -> Response:
    """Send an action's updates; answer {"ok", "message"} for the page to show inline."""
    console: Console = request.app.state.console
    from makima.cli.commands import CommandError, send_update

    directive_id, action = request.path_params["id"], request.path_params["action"]
    if action not in ACTIONS:
        return _answer(False, f"unknown action {action!r}; known: {', '.join(ACTIONS)}", 404)
    if request.headers.get("x-makima-console") != "1":
        # Browsers cannot add this header to a cross-site form post: no CSRF.
        return _answer(False, "send actions from the console page", 403)
    user = request.state.user
    form = {k: str(v) for k, v in (await request.form()).items()}
    try:
        detail = await reads.get_directive(console.pool, directive_id)
    except (NotFound, InvalidFilter) as problem:
        return _answer(False, str(problem), 404)
    approvers = (detail.spec or {}).get("approvers")
    if action in ("approve", "deny") and approvers and user not in approvers:
        return _answer(False, f"{user} may not decide here: this directive's approvers are "
                              f"{', '.join(approvers)}", 403)
    try:
        payloads = [(update, build(form, user)) for update, build in ACTIONS[action]]
    except ValidationError as problem:
        first = problem.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return _answer(False, f"{where}: {first['msg']}" if where else first["msg"], 400)
    except ValueError as problem:
        return _answer(False, str(problem), 400)
    try:
        client: Client = await console.temporal()
    except Exception as problem:  # noqa: BLE001 - shown to the person, not swallowed
        return _answer(False, f"cannot reach Temporal: {problem}", 503)
    messages = []
    for update, payload in payloads:
        try:
            answer = await send_update(client, directive_id, update, payload)
        except CommandError as problem:
            return _answer(False, str(problem), 409)
        if not answer.accepted:
            return _answer(False, f"rejected: {answer.message}", 409)
        messages.append(answer.message)
    return _answer(True, "accepted: " + "; ".join(messages))


def _answer(ok: bool, message: str, status_code: int = 200) -> JSONResponse:
    return JSONResponse({"ok": ok, "message": message}, status_code=status_code)


# --------------------------------------------------------------------------- the app


class SignedIn:
    """ASGI middleware: every request but static files needs a user; it is kept
    in `request.state.user` (plain ASGI, so event streams pass through untouched)."""

    def __init__(self, app: Any, access: Access) -> None:
        self.app, self.access = app, access

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope["headers"]}
        user = signed_in(self.access, headers)
        if user is None and not scope["path"].startswith("/static/"):
            response = Response("sign in: this console needs a user name and token",
                                status_code=401,
                                headers={"WWW-Authenticate": 'Basic realm="makima"'})
            return await response(scope, receive, send)
        scope.setdefault("state", {})["user"] = user
        return await self.app(scope, receive, send)


def build_app(console: Console) -> Starlette:
    from starlette.middleware import Middleware

    app = Starlette(
        routes=[
            Route("/", inbox_page),
            Route("/directives", directives_page),
            Route("/directives/{id}", directive_page),
            Route("/directives/{id}/live", directive_live),
            Route("/directives/{id}/events", directive_events),
            Route("/directives/{id}/report", report_page),
            Route("/directives/{id}/steps/{step}/attempts/{attempt:int}/diff",
                  attempt_diff_fragment),
            Route("/directives/{id}/actions/{action}", act, methods=["POST"]),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ],
        middleware=[Middleware(SignedIn, access=console.access)],
    )
    app.state.console = console
    return app


def lazy_temporal(address: str | None = None) -> Callable[[], Any]:
    """Connect to Temporal on first use, then reuse the client (a console with
    Temporal down still shows everything it reads from Postgres)."""
    from makima.connection import connect_temporal

    held: list[Client] = []
    lock = asyncio.Lock()

    async def get() -> Client:
        async with lock:
            if not held:
                held.append(await connect_temporal(address))
            return held[0]

    return get
