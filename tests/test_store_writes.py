"""Idempotent projection of workflow events: repeats, reordering, concurrency."""

from __future__ import annotations

import asyncio
import random

import asyncpg

from makima.contracts import EventType
from makima.store import reads
from makima.store.writes import record_events
from tests.postgres_fixture import (  # noqa: F401
    Emitter,
    directive_status,
    pg_pool,
    postgres,
    started,
    step_status,
    unique_id,
)


async def _count(pool: asyncpg.Pool, table: str, directive_id: str) -> int:
    return await pool.fetchval(f"SELECT count(*) FROM {table} WHERE directive_id = $1", directive_id)


async def _positions(pool: asyncpg.Pool, directive_id: str) -> list[int]:
    rows = await pool.fetch(
        "SELECT position FROM events WHERE directive_id = $1 ORDER BY position", directive_id
    )
    return [r["position"] for r in rows]


async def test_the_same_batch_written_twice_leaves_one_row_each(pg_pool: asyncpg.Pool) -> None:  # noqa: F811
    d = unique_id()
    emit, step = Emitter(d), Emitter(d, f"{d}/g1/build")
    batch = [
        started(emit),
        directive_status(emit, "active"),
        step_status(emit, "build", "running", attempts=1),
        step(EventType.ATTEMPT_STARTED, {"workflow_id": step.source, "rework": None},
             step="build", attempt=1),
        step(EventType.ATTEMPT_FINISHED, {"success": True, "exit_code": 0, "commit": "abc",
                                           "usage": {"cost_usd": 0.25}}, step="build", attempt=1),
        step(EventType.EVALUATION, {"passed": True, "score": 0.9, "confidence": "green",
                                     "criteria": [{"criterion": "greets", "passed": True, "score": 0.9}],
                                     "checks": [{"command": "pytest", "exit_code": 0}]},
             step="build", attempt=1),
    ]
    assert await record_events(pg_pool, batch) == len(batch)
    assert await record_events(pg_pool, batch) == 0
    assert await record_events(pg_pool, batch[2:] + batch[:2]) == 0

    assert await _count(pg_pool, "events", d) == len(batch)
    assert await _positions(pg_pool, d) == list(range(1, len(batch) + 1))
    assert await _count(pg_pool, "attempts", d) == 1
    assert await _count(pg_pool, "evaluations", d) == 1
    kinds = await pg_pool.fetchrow(
        "SELECT jsonb_typeof(criteria) AS criteria, jsonb_typeof(checks) AS checks "
        "FROM evaluations WHERE directive_id = $1", d)
    assert dict(kinds) == {"criteria": "array", "checks": "array"}  # JSONB, not JSON text
    detail = await reads.get_step(pg_pool, d, "build")
    [attempt] = detail.attempts
    assert attempt.success is True and attempt.commit == "abc" and attempt.cost_usd == 0.25
    assert attempt.evaluation is not None
    assert attempt.evaluation.criteria[0].criterion == "greets"
    assert attempt.evaluation.checks[0].command == "pytest"


async def test_a_late_older_event_never_overwrites_a_newer_state(pg_pool: asyncpg.Pool) -> None:  # noqa: F811
    d = unique_id()
    emit = Emitter(d)
    first = [started(emit), directive_status(emit, "active"),
             step_status(emit, "build", "running", attempts=1)]
    later = [step_status(emit, "build", "passed", attempts=1, score=0.9),
             directive_status(emit, "completed")]
    # The later batch lands first (a retried activity, a concurrent one).
    await record_events(pg_pool, later)
    await record_events(pg_pool, first)

    detail = await reads.get_directive(pg_pool, d)
    assert detail.directive.status == "completed"
    assert detail.directive.title == "Add a greeting"
    [step] = detail.steps
    assert (step.status, step.attempts, step.score) == ("passed", 1, 0.9)


async def test_several_transitions_in_one_batch_end_at_the_newest(pg_pool: asyncpg.Pool) -> None:  # noqa: F811
    d = unique_id()
    emit = Emitter(d)
    batch = [started(emit), directive_status(emit, "active"),
             step_status(emit, "build", "running", attempts=1),
             step_status(emit, "build", "evaluating", attempts=1),
             step_status(emit, "build", "rework", attempts=1, score=0.3),
             directive_status(emit, "paused", breaker="cost")]
    random.Random(7).shuffle(batch)
    await record_events(pg_pool, batch)
    detail = await reads.get_directive(pg_pool, d)
    assert detail.directive.status == "paused"
    assert detail.directive.breaker == "cost"
    assert [(s.status, s.score) for s in detail.steps] == [("rework", 0.3)]


async def test_step_status_from_a_step_workflow_does_not_move_the_step(pg_pool: asyncpg.Pool) -> None:  # noqa: F811
    d = unique_id()
    emit, child = Emitter(d), Emitter(d, f"{d}/g1/build")
    await record_events(pg_pool, [started(emit), step_status(emit, "build", "running", attempts=1)])
    # A child's own seq numbers are unrelated to its parent's; only the parent sets status.
    child.seq = 100
    await record_events(pg_pool, [step_status(child, "build", "failed", attempts=1)])
    [step] = (await reads.get_directive(pg_pool, d)).steps
    assert step.status == "running"
    assert await _count(pg_pool, "events", d) == 3


async def test_the_same_events_from_two_concurrent_writers_give_one_row_each_and_no_gaps(
    pg_pool: asyncpg.Pool,  # noqa: F811
) -> None:
    d = unique_id()
    emit = Emitter(d)
    events = [started(emit), directive_status(emit, "active")]
    for i in range(40):
        events.append(step_status(emit, f"s{i % 5}", "running", attempts=i))
    rng = random.Random(3)

    async def writer(order_seed: int) -> None:
        mine = list(events)
        random.Random(order_seed).shuffle(mine)
        for start in range(0, len(mine), 4):
            await record_events(pg_pool, mine[start:start + 4])
            await asyncio.sleep(rng.random() / 500)

    await asyncio.gather(writer(1), writer(2), writer(3))

    assert await _count(pg_pool, "events", d) == len(events)
    assert await _positions(pg_pool, d) == list(range(1, len(events) + 1))
    rows = await pg_pool.fetch("SELECT source, seq FROM events WHERE directive_id = $1", d)
    assert {(r["source"], r["seq"]) for r in rows} == {(e.source, e.seq) for e in events}
    # Steps end at the newest status whatever order the batches landed in.
    steps = {s.name: s.attempts for s in (await reads.get_directive(pg_pool, d)).steps}
    assert steps == {f"s{k}": 35 + k for k in range(5)}


async def test_concurrent_sources_of_one_directive_get_gap_free_positions(
    pg_pool: asyncpg.Pool,  # noqa: F811
) -> None:
    d = unique_id()
    await record_events(pg_pool, [started(Emitter(d))])
    sources = [Emitter(d, f"{d}/g1/s{i}") for i in range(4)]

    async def writer(emit: Emitter) -> None:
        for _ in range(10):
            await record_events(pg_pool, [emit(EventType.MERGED, {"merged": True}) for _ in range(3)])

    await asyncio.gather(*(writer(e) for e in sources))
    assert await _positions(pg_pool, d) == list(range(1, 1 + 1 + 4 * 10 * 3))


async def test_approvals_pending_until_decided_with_who_and_comment(pg_pool: asyncpg.Pool) -> None:  # noqa: F811
    d = unique_id()
    emit, child = Emitter(d), Emitter(d, f"{d}/g1/build")
    await record_events(pg_pool, [
        started(emit), directive_status(emit, "active"),
        step_status(emit, "build", "awaiting_approval", attempts=1, score=0.6),
        child(EventType.APPROVAL_REQUESTED, {"score": 0.6, "summary": "looks fine"},
              step="build", attempt=1),
    ])
    [pending] = (await reads.get_directive(pg_pool, d)).pending_approvals
    assert (pending.step, pending.attempt, pending.score) == ("build", 1, 0.6)

    await record_events(pg_pool, [
        child(EventType.APPROVAL_DECIDED, {"approved": True, "by": "bo", "comment": "ship it"},
              step="build", attempt=1, actor="bo"),
    ])
    assert (await reads.get_directive(pg_pool, d)).pending_approvals == []
    [approval] = (await reads.get_step(pg_pool, d, "build")).approvals
    assert (approval.approved, approval.decided_by, approval.comment) == (True, "bo", "ship it")
    assert approval.decided_at is not None and approval.requested_at is not None


async def test_plans_and_generations_are_recorded(pg_pool: asyncpg.Pool) -> None:  # noqa: F811
    d = unique_id()
    emit = Emitter(d)
    plan = {"steps": [{"name": "build", "depends_on": []}], "summary": "one step"}
    await record_events(pg_pool, [
        started(emit),
        emit(EventType.GENERATION_STARTED, {"generation": 1, "reason": ""}),
        emit(EventType.PLAN_INVALID, {"errors": ["cycle: a -> a"]}),
        emit(EventType.PLAN_READY, {"plan": plan}),
        emit(EventType.GENERATION_STARTED, {"generation": 2, "reason": "build failed"}, generation=2),
    ])
    detail = await reads.get_directive(pg_pool, d)
    assert detail.directive.generation == 2
    assert detail.chain is not None and detail.chain.reason == "build failed"
    chain1 = await pg_pool.fetchrow(
        "SELECT plan_status, plan, errors FROM chains WHERE directive_id = $1 AND generation = 1", d
    )
    assert chain1["plan_status"] == "ready"
    assert chain1["plan"] == plan
    assert chain1["errors"] == []
