"""The read API over the read model, for the CLI (and any later web page):

- `list_directives(db, status=, owner=, waiting=, search=, limit=)`: newest
  first, filtered, each with its repository, progress and waiting count;
- `inbox(db)`: every step waiting for a person across directives, oldest first,
  with its attempt's branch, commit and evaluation; `paused_by_breakers(db)`;
- `generations(db, id)`: every generation with why it was planned;
  `merge_commits(db, id)`: where each step landed on the integration branch;
- `get_directive(db, id)`: one directive with its current generation's plan
  state, steps and pending approvals;
- `get_step(db, id, step, generation=)`: a step with its attempts, their
  evaluations, and its approvals;
- `event_tail(db, id, limit=, after=)`: the event log in position order;
- `directive_state(db, id)` + `snapshot_differences(state, snapshot)`: what the
  rows say about a directive next to what its workflow's `status` query says.

`db` is an asyncpg pool or connection. Unknown ids raise `NotFound`; filter
values that cannot mean anything raise `InvalidFilter` naming the allowed ones.
What does not live here: writing (`writes.py`), streaming (`watch.py`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import asyncpg
from pydantic import Field

from makima.models import (
    CheckResult,
    CriterionResult,
    DirectiveSnapshot,
    DirectiveStatus,
    Model,
    StepStatus,
)
from makima.store.errors import InvalidFilter, NotFound

Database = asyncpg.Pool | asyncpg.Connection

MAX_LIMIT = 1000

# --------------------------------------------------------------------------- read models


class DirectiveSummary(Model):
    id: str
    title: str
    owner: str
    status: str
    reason: str = ""
    generation: int = 1
    cost_usd: float = 0.0
    breaker: str | None = None
    integration_branch: str = ""
    created_at: datetime | None = None
    updated_at: datetime | None = None
    repository: str = ""  # the spec's path or url
    steps_total: int = 0  # in the current generation
    steps_passed: int = 0
    waiting: int = 0  # steps waiting for a person
    max_cost_usd: float | None = None


class InboxItem(Model):
    """One step waiting for a person: what they are asked to approve."""

    directive_id: str
    title: str
    owner: str
    repository: str = ""
    approvers: list[str] = Field(default_factory=list)
    integration_branch: str = ""
    generation: int
    step: str
    attempt: int
    score: float | None = None
    summary: str = ""
    requested_at: datetime | None = None
    branch: str | None = None
    commit: str | None = None
    confidence: str | None = None
    checks: list[CheckResult] = Field(default_factory=list)
    criteria: list[CriterionResult] = Field(default_factory=list)


class ChainRecord(Model):
    generation: int
    reason: str = ""
    started_at: datetime | None = None
    plan_status: str = "planning"
    plan: dict[str, Any] | None = None
    errors: list[Any] = Field(default_factory=list)


class StepRecord(Model):
    name: str
    generation: int
    status: str
    attempts: int = 0
    score: float | None = None
    confidence: str | None = None
    depends_on: list[str] = Field(default_factory=list)
    description: str = ""
    summary: str = ""
    reason: str = ""
    workflow_id: str | None = None
    updated_at: datetime | None = None


class ApprovalRecord(Model):
    step: str
    generation: int
    attempt: int
    score: float | None = None
    summary: str = ""
    requested_at: datetime | None = None
    decided_at: datetime | None = None
    approved: bool | None = None
    decided_by: str | None = None
    comment: str = ""


class EvaluationRecord(Model):
    passed: bool
    score: float
    confidence: str
    summary: str = ""
    rework_instructions: str = ""
    evaluator: str = ""
    criteria: list[CriterionResult] = Field(default_factory=list)
    checks: list[CheckResult] = Field(default_factory=list)
    cost_usd: float = 0.0
    evaluated_at: datetime


class AttemptRecord(Model):
    attempt: int
    workflow_id: str | None = None
    rework: dict[str, Any] | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    success: bool | None = None
    exit_code: int | None = None
    branch: str | None = None
    commit: str | None = None
    summary: str = ""
    duration_seconds: float | None = None
    cost_usd: float = 0.0
    output_tail: str = ""  # the agent's last output (as much as history keeps)
    diff_stat: str = ""
    evaluation: EvaluationRecord | None = None


class EventRecord(Model):
    position: int
    directive_id: str
    source: str
    seq: int
    at: datetime
    type: str
    severity: str
    generation: int
    step: str | None = None
    attempt: int | None = None
    actor: str = ""
    message: str = ""
    data: dict[str, Any] = Field(default_factory=dict)


class DirectiveDetail(Model):
    directive: DirectiveSummary
    spec: dict[str, Any] | None = None
    chain: ChainRecord | None = None  # the current generation's
    steps: list[StepRecord] = Field(default_factory=list)  # the current generation's
    pending_approvals: list[ApprovalRecord] = Field(default_factory=list)


class StepDetail(Model):
    directive_id: str
    step: StepRecord
    attempts: list[AttemptRecord] = Field(default_factory=list)
    approvals: list[ApprovalRecord] = Field(default_factory=list)


class DirectiveState(Model):
    """The rows' view of a directive, shaped for comparing with its `status` query."""

    directive_id: str
    status: str
    generation: int
    steps: list[StepRecord] = Field(default_factory=list)
    events: list[EventRecord] = Field(default_factory=list)


# --------------------------------------------------------------------------- validation


def _check_directive_id(directive_id: object) -> str:
    if not isinstance(directive_id, str) or not directive_id.strip():
        raise InvalidFilter(f"directive id must be a non-empty string, got {directive_id!r}")
    return directive_id


def _check_limit(limit: object) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise InvalidFilter(f"limit must be an integer from 1 to {MAX_LIMIT}, got {limit!r}")
    return limit


def _check_statuses(status: str | DirectiveStatus | Iterable[str] | None) -> list[str] | None:
    if status is None:
        return None
    values = [status] if isinstance(status, str) else list(status)
    allowed = [s.value for s in DirectiveStatus]
    unknown = [v for v in values if v not in allowed]
    if unknown or not values:
        raise InvalidFilter(
            f"unknown directive status {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"allowed: {', '.join(allowed)}"
        )
    return [str(v) for v in values]


def _check_owner(owner: object) -> str | None:
    if owner is None:
        return None
    if not isinstance(owner, str) or not owner.strip():
        raise InvalidFilter(f"owner must be a non-empty string, got {owner!r}")
    return owner


def _j(value: Any) -> Any:
    # The pool decodes JSON itself; a bare connection hands back text.
    return json.loads(value) if isinstance(value, str) else value


# --------------------------------------------------------------------------- queries

_DIRECTIVE_COLUMNS = """id, title, owner, status, reason, generation, cost_usd, breaker,
    integration_branch, created_at, updated_at"""

_REPOSITORY_SQL = "COALESCE(d.spec->'repository'->>'path', d.spec->'repository'->>'url', '')"

# Waiting for a person: undecided, in a directive that is still running, on a step of
# the current generation that has not ended (a step cancelled while waiting leaves an
# undecided request behind), the newest such attempt of each step.
_WAITING_SQL = """
    SELECT DISTINCT ON (a.directive_id, a.step) a.*
    FROM approvals a
    JOIN directives d ON d.id = a.directive_id AND d.generation = a.generation
    LEFT JOIN steps s ON s.directive_id = a.directive_id
         AND s.generation = a.generation AND s.name = a.step
    WHERE a.decided_at IS NULL AND a.requested_at IS NOT NULL
      AND NOT d.status = ANY($1::text[])
      AND (s.status IS NULL OR NOT s.status = ANY($2::text[]))
    ORDER BY a.directive_id, a.step, a.attempt DESC
"""


async def list_directives(
    db: Database,
    *,
    status: str | Iterable[str] | None = None,
    owner: str | None = None,
    waiting: bool = False,
    search: str | None = None,
    limit: int = 50,
) -> list[DirectiveSummary]:
    """Directives newest first; `status` is one status or several; `waiting` keeps
    those with a step waiting for a person; `search` matches the title (any case)."""
    statuses = _check_statuses(status)
    owner = _check_owner(owner)
    limit = _check_limit(limit)
    pattern = None
    if search is not None and search.strip():
        escaped = search.strip().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern = f"%{escaped}%"
    columns = ", ".join("d." + c.strip() for c in _DIRECTIVE_COLUMNS.split(","))
    rows = await db.fetch(
        f"""WITH waiting AS (SELECT directive_id, count(*) AS n FROM ({_WAITING_SQL}) w
                             GROUP BY directive_id)
            SELECT {columns}, {_REPOSITORY_SQL} AS repository,
                   (d.spec->'budgets'->>'max_cost_usd')::float AS max_cost_usd,
                   COALESCE(w.n, 0) AS waiting,
                   (SELECT count(*) FROM steps s WHERE s.directive_id = d.id
                        AND s.generation = d.generation) AS steps_total,
                   (SELECT count(*) FROM steps s WHERE s.directive_id = d.id
                        AND s.generation = d.generation AND s.status = 'passed') AS steps_passed
            FROM directives d LEFT JOIN waiting w ON w.directive_id = d.id
            WHERE ($3::text[] IS NULL OR d.status = ANY($3)) AND ($4::text IS NULL OR d.owner = $4)
              AND (NOT $5::bool OR w.n > 0)
              AND ($6::text IS NULL OR d.title ILIKE $6)
            ORDER BY d.created_at DESC NULLS LAST, d.id
            LIMIT $7""",
        _FINAL_DIRECTIVE, _FINAL_STEP, statuses, owner, waiting, pattern, limit,
    )
    return [DirectiveSummary(**dict(r)) for r in rows]


async def inbox(db: Database, *, directive_id: str | None = None) -> list[InboxItem]:
    """Every step waiting for a person, oldest request first (or one directive's)."""
    rows = await db.fetch(
        f"""SELECT w.directive_id, d.title, d.owner, {_REPOSITORY_SQL} AS repository,
                   COALESCE(d.spec->'approvers', '[]'::jsonb) AS approvers,
                   d.integration_branch, w.generation, w.step, w.attempt, w.score, w.summary,
                   w.requested_at, t.branch, t.commit, e.confidence,
                   COALESCE(e.checks, '[]'::jsonb) AS checks,
                   COALESCE(e.criteria, '[]'::jsonb) AS criteria
            FROM ({_WAITING_SQL}) w
            JOIN directives d ON d.id = w.directive_id
            LEFT JOIN attempts t ON t.directive_id = w.directive_id
                 AND t.generation = w.generation AND t.step = w.step AND t.attempt = w.attempt
            LEFT JOIN evaluations e ON e.directive_id = w.directive_id
                 AND e.generation = w.generation AND e.step = w.step AND e.attempt = w.attempt
            WHERE $3::text IS NULL OR w.directive_id = $3
            ORDER BY w.requested_at, w.directive_id, w.step""",
        _FINAL_DIRECTIVE, _FINAL_STEP, directive_id,
    )
    return [InboxItem(**{**dict(r), "approvers": _j(r["approvers"]) or [],
                         "checks": _j(r["checks"]) or [],
                         "criteria": _j(r["criteria"]) or []}) for r in rows]


async def paused_by_breakers(db: Database) -> list[DirectiveSummary]:
    """Paused directives whose budget tripped, oldest pause first."""
    rows = await db.fetch(
        f"""SELECT {_DIRECTIVE_COLUMNS} FROM directives
            WHERE status = 'paused' AND breaker IS NOT NULL
            ORDER BY updated_at NULLS LAST, id LIMIT {MAX_LIMIT}""")
    return [DirectiveSummary(**dict(r)) for r in rows]


async def _directive_row(db: Database, directive_id: str) -> asyncpg.Record:
    row = await db.fetchrow(
        f"SELECT {_DIRECTIVE_COLUMNS}, spec FROM directives WHERE id = $1", directive_id
    )
    if row is None:
        raise NotFound(f"no directive with id {directive_id!r}")
    return row


def _step(row: asyncpg.Record) -> StepRecord:
    data = dict(row)
    data["depends_on"] = _j(data["depends_on"]) or []
    return StepRecord(**data)


_STEP_COLUMNS = """name, generation, status, attempts, score, confidence, depends_on, description,
    summary, reason, workflow_id, updated_at"""
_APPROVAL_COLUMNS = """step, generation, attempt, score, summary, requested_at, decided_at,
    approved, decided_by, comment"""
_FINAL_STEP = [s.value for s in StepStatus if s.is_final]
_FINAL_DIRECTIVE = [s.value for s in DirectiveStatus if s.is_final]


async def _steps(db: Database, directive_id: str, generation: int) -> list[StepRecord]:
    rows = await db.fetch(
        f"""SELECT {_STEP_COLUMNS} FROM steps WHERE directive_id = $1 AND generation = $2
            ORDER BY name""",
        directive_id, generation,
    )
    return [_step(r) for r in rows]


async def get_directive(db: Database, directive_id: str) -> DirectiveDetail:
    directive_id = _check_directive_id(directive_id)
    row = await _directive_row(db, directive_id)
    data = dict(row)
    spec = _j(data.pop("spec"))
    summary = DirectiveSummary(**data)
    chain_row = await db.fetchrow(
        """SELECT generation, reason, started_at, plan_status, plan, errors FROM chains
           WHERE directive_id = $1 AND generation = $2""",
        directive_id, summary.generation,
    )
    chain = None
    if chain_row is not None:
        chain = ChainRecord(**{**dict(chain_row), "plan": _j(chain_row["plan"]),
                               "errors": _j(chain_row["errors"]) or []})
    # Pending: undecided, in a directive that is still running, on a step that has
    # not ended (a step cancelled while waiting leaves an undecided request behind).
    approvals = []
    if summary.status not in _FINAL_DIRECTIVE:
        approvals = await db.fetch(
            f"""SELECT {', '.join('a.' + c.strip() for c in _APPROVAL_COLUMNS.split(','))}
                FROM approvals a
                LEFT JOIN steps s ON s.directive_id = a.directive_id
                     AND s.generation = a.generation AND s.name = a.step
                WHERE a.directive_id = $1 AND a.decided_at IS NULL AND a.requested_at IS NOT NULL
                  AND (s.status IS NULL OR NOT s.status = ANY($2::text[]))
                ORDER BY a.requested_at""",
            directive_id, _FINAL_STEP,
        )
    return DirectiveDetail(
        directive=summary,
        spec=spec,
        chain=chain,
        steps=await _steps(db, directive_id, summary.generation),
        pending_approvals=[ApprovalRecord(**dict(a)) for a in approvals],
    )


async def get_step(
    db: Database, directive_id: str, step: str, *, generation: int | None = None
) -> StepDetail:
    """A step of the directive's current generation (or of `generation`) with its
    attempts, each with its evaluation, oldest first."""
    directive_id = _check_directive_id(directive_id)
    if not isinstance(step, str) or not step.strip():
        raise InvalidFilter(f"step name must be a non-empty string, got {step!r}")
    if generation is not None and (isinstance(generation, bool) or not isinstance(generation, int) or generation < 1):
        raise InvalidFilter(f"generation must be a positive integer, got {generation!r}")
    directive = await _directive_row(db, directive_id)
    generation = generation or directive["generation"]
    row = await db.fetchrow(
        f"""SELECT {_STEP_COLUMNS} FROM steps
            WHERE directive_id = $1 AND generation = $2 AND name = $3""",
        directive_id, generation, step,
    )
    if row is None:
        known = [s.name for s in await _steps(db, directive_id, generation)]
        raise NotFound(
            f"directive {directive_id!r} has no step {step!r} in generation {generation}"
            + (f"; its steps: {', '.join(known)}" if known else "")
        )
    attempts = await db.fetch(
        """SELECT a.attempt, a.workflow_id, a.rework, a.started_at, a.finished_at, a.success,
                  a.exit_code, a.branch, a.commit, a.summary, a.duration_seconds, a.cost_usd,
                  a.execution->>'output_tail' AS output_tail,
                  a.execution->>'diff_stat' AS diff_stat, e.passed, e.score, e.confidence, e.summary AS e_summary,
                  e.rework_instructions, e.evaluator, e.criteria, e.checks,
                  e.cost_usd AS e_cost_usd, e.evaluated_at
           FROM attempts a
           FULL JOIN evaluations e ON e.directive_id = a.directive_id
                AND e.generation = a.generation AND e.step = a.step AND e.attempt = a.attempt
           WHERE COALESCE(a.directive_id, e.directive_id) = $1
             AND COALESCE(a.generation, e.generation) = $2
             AND COALESCE(a.step, e.step) = $3
           ORDER BY COALESCE(a.attempt, e.attempt)""",
        directive_id, generation, step,
    )
    approvals = await db.fetch(
        f"""SELECT {_APPROVAL_COLUMNS} FROM approvals
            WHERE directive_id = $1 AND generation = $2 AND step = $3 ORDER BY attempt""",
        directive_id, generation, step,
    )
    return StepDetail(
        directive_id=directive_id,
        step=_step(row),
        attempts=[_attempt(a) for a in attempts],
        approvals=[ApprovalRecord(**dict(a)) for a in approvals],
    )


def _attempt(row: asyncpg.Record) -> AttemptRecord:
    evaluation = None
    if row["evaluated_at"] is not None:
        evaluation = EvaluationRecord(
            passed=row["passed"], score=row["score"], confidence=row["confidence"],
            summary=row["e_summary"], rework_instructions=row["rework_instructions"],
            evaluator=row["evaluator"], criteria=_j(row["criteria"]) or [],
            checks=_j(row["checks"]) or [], cost_usd=row["e_cost_usd"],
            evaluated_at=row["evaluated_at"],
        )
    # An evaluation recorded before its attempt_started still shows under its attempt.
    attempt = row["attempt"]
    return AttemptRecord(
        attempt=attempt if attempt is not None else 0,
        workflow_id=row["workflow_id"], rework=_j(row["rework"]),
        started_at=row["started_at"], finished_at=row["finished_at"], success=row["success"],
        exit_code=row["exit_code"], branch=row["branch"], commit=row["commit"],
        summary=row["summary"] or "", duration_seconds=row["duration_seconds"],
        cost_usd=row["cost_usd"] or 0.0, output_tail=row["output_tail"] or "",
        diff_stat=row["diff_stat"] or "", evaluation=evaluation,
    )


_EVENT_COLUMNS = """position, directive_id, source, seq, at, type, severity, generation, step,
    attempt, actor, message, data"""


def _event(row: asyncpg.Record) -> EventRecord:
    return EventRecord(**{**dict(row), "data": _j(row["data"]) or {}})


async def events_after(
    db: Database, directive_id: str, after: int = 0, limit: int = MAX_LIMIT
) -> list[EventRecord]:
    """Events with position > `after`, oldest first (what `watch` pages through)."""
    rows = await db.fetch(
        f"""SELECT {_EVENT_COLUMNS} FROM events
            WHERE directive_id = $1 AND position > $2 ORDER BY position LIMIT $3""",
        directive_id, after, limit,
    )
    return [_event(r) for r in rows]


async def event_tail(
    db: Database, directive_id: str, *, limit: int = 50, after: int | None = None
) -> list[EventRecord]:
    """The last `limit` events oldest first, or, with `after`, the first `limit`
    events past that position."""
    directive_id = _check_directive_id(directive_id)
    limit = _check_limit(limit)
    await _directive_row(db, directive_id)
    if after is not None:
        if isinstance(after, bool) or not isinstance(after, int) or after < 0:
            raise InvalidFilter(f"after must be a position (an integer >= 0), got {after!r}")
        return await events_after(db, directive_id, after, limit)
    rows = await db.fetch(
        f"""SELECT * FROM (SELECT {_EVENT_COLUMNS} FROM events WHERE directive_id = $1
                           ORDER BY position DESC LIMIT $2) tail ORDER BY position""",
        directive_id, limit,
    )
    return [_event(r) for r in rows]


async def directive_state(db: Database, directive_id: str) -> DirectiveState:
    """Status, current generation's steps (status / attempts / score) and every event."""
    directive_id = _check_directive_id(directive_id)
    row = await _directive_row(db, directive_id)
    rows = await db.fetch(
        f"SELECT {_EVENT_COLUMNS} FROM events WHERE directive_id = $1 ORDER BY position",
        directive_id,
    )
    return DirectiveState(
        directive_id=directive_id,
        status=row["status"],
        generation=row["generation"],
        steps=await _steps(db, directive_id, row["generation"]),
        events=[_event(r) for r in rows],
    )


def snapshot_differences(state: DirectiveState, snapshot: DirectiveSnapshot) -> list[str]:
    """Where the rows disagree with the workflow's `status` snapshot (empty: they
    agree) on status, generation, and each step's status, attempts and score."""
    problems: list[str] = []
    if state.status != snapshot.status.value:
        problems.append(f"status: rows {state.status!r}, workflow {snapshot.status.value!r}")
    if state.generation != snapshot.generation:
        problems.append(f"generation: rows {state.generation}, workflow {snapshot.generation}")
    rows = {s.name: s for s in state.steps}
    for step in snapshot.steps:
        row = rows.pop(step.name, None)
        if row is None:
            problems.append(f"step {step.name!r}: no row")
            continue
        for field, ours, theirs in (
            ("status", row.status, step.status.value),
            ("attempts", row.attempts, step.attempts),
            ("score", row.score, step.score),
        ):
            if ours != theirs:
                problems.append(f"step {step.name!r} {field}: rows {ours!r}, workflow {theirs!r}")
    problems.extend(f"step {name!r}: row without a step in the workflow" for name in rows)
    return problems


async def generations(db: Database, directive_id: str) -> list[ChainRecord]:
    """Every generation of a directive, first first, each with why it was planned."""
    directive_id = _check_directive_id(directive_id)
    rows = await db.fetch(
        """SELECT generation, reason, started_at, plan_status, plan, errors FROM chains
           WHERE directive_id = $1 ORDER BY generation""", directive_id)
    return [ChainRecord(**{**dict(r), "plan": _j(r["plan"]), "errors": _j(r["errors"]) or []})
            for r in rows]


async def merge_commits(db: Database, directive_id: str) -> dict[tuple[int, str], str]:
    """(generation, step) -> the integration branch's head right after that step merged."""
    rows = await db.fetch(
        """SELECT generation, step, data->>'commit' AS commit FROM events
           WHERE directive_id = $1 AND type = 'merged' AND step IS NOT NULL
           ORDER BY position""", directive_id)
    return {(r["generation"], r["step"]): r["commit"] for r in rows if r["commit"]}
