"""Projecting workflow events into the read model, idempotently.

The workflows emit `makima.contracts.Event` records in batches that may arrive
out of order and more than once (activity retries, concurrent activities). One
batch is one transaction:

1. lock the row of each directive in the batch (creating it if needed); all
   event inserts of a directive serialise on that lock, so the per-directive
   `position` they get is gap-free and commits in increasing order;
2. insert the events not already recorded (natural key `(source, seq)`), with
   their positions, in one statement;
3. project only those new events into the tables: a replayed event is never
   counted twice, and mutable rows (directive status, step status, plan state)
   take an event only if its seq is newer than the one that last set them;
4. advance each directive's position counter and NOTIFY its channel (delivered
   at commit, when the rows are visible).

What does not live here: reading (`reads.py`), listening (`watch.py`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
from pydantic_core import to_json

from makima.contracts import Event, EventType

CHANNEL_PREFIX = "makima_events_"


def channel_for(directive_id: str) -> str:
    """The NOTIFY channel of a directive. Hashed: channel names are identifiers
    (at most 63 bytes) and directive ids can be longer. Mirrors `_CHANNEL_SQL`."""
    return CHANNEL_PREFIX + hashlib.md5(directive_id.encode()).hexdigest()[:24]


_CHANNEL_SQL = f"'{CHANNEL_PREFIX}' || left(md5(id), 24)"


def _json(value: Any) -> str:
    return to_json(value).decode()


def _utc(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _is_directive_source(event: Event) -> bool:
    return event.source == event.directive_id


def _newest(events: Iterable[Event], key) -> list[Event]:
    """Per key, the event with the highest seq (the only one worth applying)."""
    newest: dict[Any, Event] = {}
    for event in events:
        k = key(event)
        if k not in newest or newest[k].seq < event.seq:
            newest[k] = event
    return list(newest.values())


# --------------------------------------------------------------------------- the batch


_LOCK_DIRECTIVES = """
INSERT INTO directives (id)
SELECT id FROM unnest($1::text[]) AS t(id) ORDER BY id
ON CONFLICT (id) DO UPDATE SET last_position = directives.last_position
RETURNING id, last_position
"""

_INSERT_EVENTS = """
INSERT INTO events (source, seq, directive_id, position, generation, step, attempt,
                    type, severity, actor, message, data, at)
SELECT i.source, i.seq, i.directive_id,
       d.last_position + row_number() OVER (PARTITION BY i.directive_id ORDER BY i.ord),
       i.generation, i.step, i.attempt, i.type, i.severity, i.actor, i.message,
       i.data::jsonb, i.at
FROM unnest($1::text[], $2::bigint[], $3::text[], $4::int[], $5::text[], $6::int[],
            $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::timestamptz[])
     WITH ORDINALITY AS i(source, seq, directive_id, generation, step, attempt,
                          type, severity, actor, message, data, at, ord)
JOIN directives d ON d.id = i.directive_id
WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.source = i.source AND e.seq = i.seq)
ON CONFLICT (source, seq) DO NOTHING
RETURNING source, seq, directive_id, position
"""

_ADVANCE_AND_NOTIFY = f"""
WITH advanced AS (
    UPDATE directives d SET last_position = n.last_position
    FROM unnest($1::text[], $2::bigint[]) AS n(id, last_position)
    WHERE d.id = n.id
    RETURNING d.id, d.last_position
)
SELECT pg_notify({_CHANNEL_SQL}, last_position::text) FROM advanced
"""


#: Called inside the transaction with the events that were new in it (after their
#: projection); raising rolls the whole batch back.
OnNewEvents = Callable[[asyncpg.Connection, list[Event]], Awaitable[None]]


async def record_events(pool: asyncpg.Pool, events: Sequence[Event],
                        on_new: OnNewEvents | None = None) -> int:
    """Write a batch of events and their projections in one transaction.
    Returns how many events were new (0 when the whole batch was seen before)."""
    if not events:
        return 0
    async with pool.acquire() as conn, conn.transaction():
        return await write_events(conn, events, on_new)


async def write_events(conn: asyncpg.Connection, events: Sequence[Event],
                       on_new: OnNewEvents | None = None) -> int:
    """`record_events` on a connection whose transaction the caller owns."""
    unique: dict[tuple[str, int], Event] = {}
    for event in events:
        unique.setdefault((event.source, event.seq), event)
    batch = list(unique.values())
    if not batch:
        return 0

    directive_ids = sorted({e.directive_id for e in batch})
    await conn.fetch(_LOCK_DIRECTIVES, directive_ids)

    inserted = await conn.fetch(
        _INSERT_EVENTS,
        [e.source for e in batch],
        [e.seq for e in batch],
        [e.directive_id for e in batch],
        [e.generation for e in batch],
        [e.step for e in batch],
        [e.attempt for e in batch],
        [e.type.value for e in batch],
        [e.severity.value for e in batch],
        [e.actor for e in batch],
        [e.message for e in batch],
        [_json(e.data) for e in batch],
        [_utc(e.at) for e in batch],
    )
    if not inserted:
        return 0

    new_keys = {(row["source"], row["seq"]) for row in inserted}
    new = [e for e in batch if (e.source, e.seq) in new_keys]
    await _project(conn, new)
    if on_new is not None:
        await on_new(conn, new)

    last: dict[str, int] = {}
    for row in inserted:
        last[row["directive_id"]] = max(last.get(row["directive_id"], 0), row["position"])
    await conn.fetch(_ADVANCE_AND_NOTIFY, list(last), list(last.values()))
    return len(inserted)


# --------------------------------------------------------------------------- projections


async def _project(conn: asyncpg.Connection, events: list[Event]) -> None:
    by_type: dict[EventType, list[Event]] = {}
    for event in events:
        by_type.setdefault(event.type, []).append(event)

    def of(*types: EventType) -> list[Event]:
        return [e for t in types for e in by_type.get(t, [])]

    await _directive_started(conn, of(EventType.DIRECTIVE_STARTED))
    await _generations(conn, of(EventType.GENERATION_STARTED))
    await _directive_status(conn, [e for e in of(EventType.DIRECTIVE_STATUS) if _is_directive_source(e)])
    await _plans(conn, [e for e in of(EventType.PLAN_READY, EventType.PLAN_INVALID, EventType.PLAN_FAILED)])
    await _step_status(conn, [e for e in of(EventType.STEP_STATUS) if _is_directive_source(e) and e.step])
    with_attempt = lambda *types: [e for e in of(*types) if e.step and e.attempt is not None]  # noqa: E731
    await _attempts_started(conn, with_attempt(EventType.ATTEMPT_STARTED))
    await _attempts_finished(conn, with_attempt(EventType.ATTEMPT_FINISHED))
    await _evaluations(conn, with_attempt(EventType.EVALUATION))
    await _approvals_requested(conn, with_attempt(EventType.APPROVAL_REQUESTED))
    await _approvals_decided(conn, with_attempt(EventType.APPROVAL_DECIDED))


async def _directive_started(conn: asyncpg.Connection, events: list[Event]) -> None:
    if not events:
        return
    rows = []
    for e in events:
        spec = e.data.get("spec") or {}
        rows.append((
            e.directive_id,
            str(e.data.get("title") or spec.get("title") or ""),
            str(e.data.get("owner") or spec.get("owner") or ""),
            str(e.data.get("integration_branch") or ""),
            _json(spec) if spec else None,
            _utc(e.at),
        ))
    await conn.executemany(
        """UPDATE directives SET title = $2, owner = $3,
               integration_branch = COALESCE(NULLIF($4, ''), integration_branch),
               spec = COALESCE($5::text::jsonb, spec),
               created_at = LEAST(created_at, $6)  -- LEAST skips NULL: a first start sets it
           WHERE id = $1""",
        rows,
    )


async def _generations(conn: asyncpg.Connection, events: list[Event]) -> None:
    if not events:
        return
    rows = [
        (e.directive_id, int(e.data.get("generation") or e.generation), str(e.data.get("reason") or ""), _utc(e.at))
        for e in events
    ]
    await conn.executemany(
        """INSERT INTO chains (directive_id, generation, reason, started_at) VALUES ($1, $2, $3, $4)
           ON CONFLICT (directive_id, generation)
           DO UPDATE SET reason = excluded.reason, started_at = excluded.started_at""",
        rows,
    )
    await conn.executemany(
        "UPDATE directives SET generation = GREATEST(generation, $2) WHERE id = $1",
        [(r[0], r[1]) for r in rows],
    )


async def _directive_status(conn: asyncpg.Connection, events: list[Event]) -> None:
    newest = _newest(events, key=lambda e: e.directive_id)
    if not newest:
        return
    await conn.executemany(
        """UPDATE directives SET status = $2, reason = $3, generation = GREATEST(generation, $4),
               cost_usd = $5, breaker = $6, updated_at = $7, status_seq = $8
           WHERE id = $1 AND status_seq < $8""",
        [
            (
                e.directive_id,
                str(e.data.get("status") or "planning"),
                str(e.data.get("reason") or ""),
                int(e.data.get("generation") or e.generation),
                float(e.data.get("cost_usd") or 0.0),
                e.data.get("breaker"),
                _utc(e.at),
                e.seq,
            )
            for e in newest
        ],
    )


_PLAN_STATUS = {
    EventType.PLAN_READY: "ready",
    EventType.PLAN_INVALID: "invalid",
    EventType.PLAN_FAILED: "failed",
}


async def _plans(conn: asyncpg.Connection, events: list[Event]) -> None:
    newest = _newest(events, key=lambda e: (e.directive_id, e.generation))
    if not newest:
        return
    rows = []
    for e in newest:
        errors = e.data.get("errors") or ([e.data["error"]] if e.data.get("error") else [])
        plan = e.data.get("plan")
        rows.append((
            e.directive_id, e.generation, _PLAN_STATUS[e.type],
            _json(plan) if plan is not None else None, _json(errors), e.seq,
        ))
    await conn.executemany(
        """INSERT INTO chains (directive_id, generation, plan_status, plan, errors, plan_seq)
           VALUES ($1, $2, $3, $4::text::jsonb, $5::text::jsonb, $6)
           ON CONFLICT (directive_id, generation) DO UPDATE SET
               plan_status = excluded.plan_status,
               plan = COALESCE(excluded.plan, chains.plan),
               errors = excluded.errors,
               plan_seq = excluded.plan_seq
           WHERE chains.plan_seq < excluded.plan_seq""",
        rows,
    )


async def _step_status(conn: asyncpg.Connection, events: list[Event]) -> None:
    newest = _newest(events, key=lambda e: (e.directive_id, e.generation, e.step))
    if not newest:
        return
    rows = []
    for e in newest:
        d = e.data
        depends_on = d.get("depends_on")
        score = d.get("score")
        rows.append((
            e.directive_id, e.generation, e.step,
            str(d.get("status") or "pending"),
            int(d.get("attempts") or 0),
            float(score) if score is not None else None,
            d.get("confidence"),
            _json(depends_on) if depends_on is not None else None,
            d.get("description"),
            str(d.get("summary") or ""),
            str(d.get("reason") or ""),
            d.get("workflow_id"),
            _utc(e.at),
            e.seq,
        ))
    # Missing descriptive fields (depends_on, description, workflow_id) keep what the row has.
    await conn.executemany(
        """INSERT INTO steps (directive_id, generation, name, status, attempts, score, confidence,
                              depends_on, description, summary, reason, workflow_id,
                              updated_at, status_seq)
           VALUES ($1, $2, $3, $4, $5, $6, $7, COALESCE($8::text::jsonb, '[]'), COALESCE($9, ''),
                   $10, $11, $12, $13, $14)
           ON CONFLICT (directive_id, generation, name) DO UPDATE SET
               status = excluded.status, attempts = excluded.attempts, score = excluded.score,
               confidence = excluded.confidence,
               depends_on = COALESCE($8::text::jsonb, steps.depends_on),
               description = COALESCE($9, steps.description),
               summary = excluded.summary, reason = excluded.reason,
               workflow_id = COALESCE(excluded.workflow_id, steps.workflow_id),
               updated_at = excluded.updated_at, status_seq = excluded.status_seq
           WHERE steps.status_seq < excluded.status_seq""",
        rows,
    )


def _attempt_key(e: Event) -> tuple[str, int, str, int]:
    return (e.directive_id, e.generation, e.step or "", int(e.attempt or 0))


async def _attempts_started(conn: asyncpg.Connection, events: list[Event]) -> None:
    if not events:
        return
    await conn.executemany(
        """INSERT INTO attempts (directive_id, generation, step, attempt, workflow_id, rework, started_at)
           VALUES ($1, $2, $3, $4, $5, $6::text::jsonb, $7)
           ON CONFLICT (directive_id, generation, step, attempt) DO UPDATE SET
               workflow_id = excluded.workflow_id, rework = excluded.rework,
               started_at = excluded.started_at""",
        [
            (
                *_attempt_key(e),
                e.data.get("workflow_id") or e.source,
                _json(e.data["rework"]) if e.data.get("rework") is not None else None,
                _utc(e.at),
            )
            for e in events
        ],
    )


async def _attempts_finished(conn: asyncpg.Connection, events: list[Event]) -> None:
    if not events:
        return
    rows = []
    for e in events:
        d = e.data
        rows.append((
            *_attempt_key(e),
            _utc(e.at),
            d.get("success"),
            d.get("exit_code"),
            d.get("branch") or None,
            d.get("commit"),
            str(d.get("summary") or ""),
            d.get("duration_seconds"),
            float((d.get("usage") or {}).get("cost_usd") or 0.0),
            _json(d),
        ))
    await conn.executemany(
        """INSERT INTO attempts (directive_id, generation, step, attempt, finished_at, success,
                                 exit_code, branch, commit, summary, duration_seconds, cost_usd,
                                 execution)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13::text::jsonb)
           ON CONFLICT (directive_id, generation, step, attempt) DO UPDATE SET
               finished_at = excluded.finished_at, success = excluded.success,
               exit_code = excluded.exit_code, branch = excluded.branch,
               commit = excluded.commit, summary = excluded.summary,
               duration_seconds = excluded.duration_seconds, cost_usd = excluded.cost_usd,
               execution = excluded.execution""",
        rows,
    )


async def _evaluations(conn: asyncpg.Connection, events: list[Event]) -> None:
    if not events:
        return
    rows = []
    for e in events:
        d = e.data
        rows.append((
            *_attempt_key(e),
            bool(d.get("passed")),
            float(d.get("score") or 0.0),
            str(d.get("confidence") or "red"),
            str(d.get("summary") or ""),
            str(d.get("rework_instructions") or ""),
            str(d.get("evaluator") or ""),
            _json(d.get("criteria") or []),
            _json(d.get("checks") or []),
            float((d.get("usage") or {}).get("cost_usd") or 0.0),
            _utc(e.at),
        ))
    # A re-evaluation of the same attempt replaces the older verdict, never the reverse.
    await conn.executemany(
        """INSERT INTO evaluations (directive_id, generation, step, attempt, passed, score,
                                    confidence, summary, rework_instructions, evaluator,
                                    criteria, checks, cost_usd, evaluated_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::text::jsonb, $12::text::jsonb, $13, $14)
           ON CONFLICT (directive_id, generation, step, attempt) DO UPDATE SET
               passed = excluded.passed, score = excluded.score,
               confidence = excluded.confidence, summary = excluded.summary,
               rework_instructions = excluded.rework_instructions,
               evaluator = excluded.evaluator, criteria = excluded.criteria,
               checks = excluded.checks, cost_usd = excluded.cost_usd,
               evaluated_at = excluded.evaluated_at
           WHERE evaluations.evaluated_at <= excluded.evaluated_at""",
        rows,
    )


async def _approvals_requested(conn: asyncpg.Connection, events: list[Event]) -> None:
    if not events:
        return
    await conn.executemany(
        """INSERT INTO approvals (directive_id, generation, step, attempt, score, summary, requested_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7)
           ON CONFLICT (directive_id, generation, step, attempt) DO UPDATE SET
               score = excluded.score, summary = excluded.summary,
               requested_at = excluded.requested_at""",
        [
            (
                *_attempt_key(e),
                float(e.data["score"]) if e.data.get("score") is not None else None,
                str(e.data.get("summary") or ""),
                _utc(e.at),
            )
            for e in events
        ],
    )


async def _approvals_decided(conn: asyncpg.Connection, events: list[Event]) -> None:
    if not events:
        return
    await conn.executemany(
        """INSERT INTO approvals (directive_id, generation, step, attempt, decided_at, approved,
                                  decided_by, comment)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
           ON CONFLICT (directive_id, generation, step, attempt) DO UPDATE SET
               decided_at = excluded.decided_at, approved = excluded.approved,
               decided_by = excluded.decided_by, comment = excluded.comment""",
        [
            (
                *_attempt_key(e),
                _utc(e.at),
                bool(e.data.get("approved")),
                str(e.data.get("by") or e.actor),
                str(e.data.get("comment") or ""),
            )
            for e in events
        ],
    )
