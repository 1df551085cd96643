"""The read API: filters, unknown ids, and the comparison with a status snapshot."""

from __future__ import annotations

import asyncpg
import pytest

from makima.contracts import EventType
from makima.errors import StoreError
from makima.models import DirectiveSnapshot, DirectiveStatus, StepState, StepStatus
from makima.store import reads
from makima.store.errors import InvalidFilter, NotFound
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


async def _directive(pool: asyncpg.Pool, owner: str, status: str) -> str:
    d = unique_id()
    emit = Emitter(d)
    await record_events(pool, [started(emit, owner=owner), directive_status(emit, status),
                               step_status(emit, "build", "passed", attempts=2, score=0.85)])
    return d


async def test_list_filters_by_status_and_owner(pg_pool: asyncpg.Pool) -> None:  # noqa: F811
    owner = unique_id("owner")
    done = await _directive(pg_pool, owner, "completed")
    running = await _directive(pg_pool, owner, "active")
    someone_elses = await _directive(pg_pool, unique_id("owner"), "active")

    mine = {d.id for d in await reads.list_directives(pg_pool, owner=owner)}
    assert mine == {done, running}
    active_mine = await reads.list_directives(pg_pool, owner=owner, status="active")
    assert [d.id for d in active_mine] == [running]
    several = await reads.list_directives(pg_pool, owner=owner, status=["active", DirectiveStatus.COMPLETED])
    assert {d.id for d in several} == {done, running}
    assert someone_elses in {d.id for d in await reads.list_directives(pg_pool, status="active", limit=1000)}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"status": "runing"}, "unknown directive status 'runing'; allowed: planning, active, paused, completed, failed, stopped"),
        ({"status": ["active", "done"]}, "'done'"),
        ({"status": []}, "allowed: planning"),
        ({"owner": "  "}, "owner must be a non-empty string"),
        ({"limit": 0}, "limit must be an integer from 1 to 1000"),
        ({"limit": "10"}, "limit must be an integer"),
    ],
)
async def test_malformed_filters_are_refused_with_the_allowed_values(
    pg_pool: asyncpg.Pool, kwargs: dict, message: str  # noqa: F811
) -> None:
    with pytest.raises(InvalidFilter) as raised:
        await reads.list_directives(pg_pool, **kwargs)
    assert message in str(raised.value)
    assert isinstance(raised.value, StoreError)


async def test_unknown_directive_is_not_found_everywhere(pg_pool: asyncpg.Pool) -> None:  # noqa: F811
    missing = unique_id("directive-missing")
    for read in (reads.get_directive, reads.event_tail, reads.directive_state):
        with pytest.raises(NotFound, match=f"no directive with id '{missing}'"):
            await read(pg_pool, missing)
    with pytest.raises(NotFound, match=f"no directive with id '{missing}'"):
        await reads.get_step(pg_pool, missing, "build")
    with pytest.raises(InvalidFilter, match="directive id must be a non-empty string"):
        await reads.get_directive(pg_pool, "")


async def test_unknown_step_names_the_steps_there_are(pg_pool: asyncpg.Pool) -> None:  # noqa: F811
    d = await _directive(pg_pool, "ana", "active")
    with pytest.raises(NotFound, match="has no step 'deploy' in generation 1; its steps: build"):
        await reads.get_step(pg_pool, d, "deploy")


async def test_event_tail_is_the_newest_events_oldest_first(pg_pool: asyncpg.Pool) -> None:  # noqa: F811
    d = unique_id()
    emit = Emitter(d)
    await record_events(pg_pool, [started(emit)] + [
        emit(EventType.MERGED, {"merged": True}, message=f"merge {i}") for i in range(10)
    ])
    tail = await reads.event_tail(pg_pool, d, limit=3)
    assert [e.message for e in tail] == ["merge 7", "merge 8", "merge 9"]
    assert [e.position for e in tail] == [9, 10, 11]
    after = await reads.event_tail(pg_pool, d, after=1, limit=2)
    assert [e.message for e in after] == ["merge 0", "merge 1"]


async def test_directive_state_agrees_or_names_each_difference(pg_pool: asyncpg.Pool) -> None:  # noqa: F811
    d = await _directive(pg_pool, "ana", "completed")
    state = await reads.directive_state(pg_pool, d)
    assert [e.type for e in state.events] == ["directive_started", "directive_status", "step_status"]
    snapshot = DirectiveSnapshot(
        directive_id=d, title="Add a greeting", status=DirectiveStatus.COMPLETED, generation=1,
        steps=[StepState(name="build", status=StepStatus.PASSED, attempts=2, score=0.85)],
    )
    assert reads.snapshot_differences(state, snapshot) == []

    wrong = snapshot.model_copy(update={
        "status": DirectiveStatus.FAILED,
        "steps": [StepState(name="build", status=StepStatus.PASSED, attempts=3, score=0.85),
                  StepState(name="test")],
    })
    assert reads.snapshot_differences(state, wrong) == [
        "status: rows 'completed', workflow 'failed'",
        "step 'build' attempts: rows 2, workflow 3",
        "step 'test': no row",
    ]
