"""`watch`: the backlog then live events, in order, none missed, none repeated,
while several writers append concurrently."""

from __future__ import annotations

import asyncio
import random

import asyncpg
import pytest

from makima.contracts import EventType
from makima.store.errors import NotFound
from makima.store.watch import watch_events
from makima.store.writes import record_events, write_events
from tests.postgres_fixture import (  # noqa: F401
    Emitter,
    directive_status,
    pg_pool,
    postgres,
    started,
    unique_id,
)


async def test_reader_gets_backlog_then_live_events_in_order_while_writers_append(
    pg_pool: asyncpg.Pool,  # noqa: F811
) -> None:
    d = unique_id()
    parent = Emitter(d)
    backlog = [started(parent)] + [parent(EventType.MERGED, {"n": i}) for i in range(4)]
    await record_events(pg_pool, backlog)

    writers = [Emitter(d, f"{d}/g1/s{i}") for i in range(3)]
    per_writer, batch = 20, 2
    expected = len(backlog) + len(writers) * per_writer
    seen = []
    first_batch_seen = asyncio.Event()

    async def read() -> None:
        # A long poll interval: only NOTIFY can deliver the live events in time.
        async for event in watch_events(pg_pool, d, poll_interval=60):
            seen.append(event)
            if len(seen) == len(backlog):
                first_batch_seen.set()
            if len(seen) == expected:
                return

    async def write(emit: Emitter, seed: int) -> None:
        await first_batch_seen.wait()  # the reader is past its backlog: these arrive live
        rng = random.Random(seed)
        for _ in range(per_writer // batch):
            events = [emit(EventType.MERGED, {"n": emit.seq}) for _ in range(batch)]
            # Retries and duplicates on the way must not show up twice.
            await record_events(pg_pool, events + events[:1])
            await asyncio.sleep(rng.random() / 200)

    await asyncio.wait_for(
        asyncio.gather(read(), *(write(w, i) for i, w in enumerate(writers))), timeout=30
    )

    assert [e.position for e in seen] == list(range(1, expected + 1))
    assert len({(e.source, e.seq) for e in seen}) == expected
    for w in writers:  # each writer's events in the order it wrote them
        assert [e.seq for e in seen if e.source == w.source] == list(range(1, per_writer + 1))


async def test_reader_resumes_after_a_position_and_stops_when_the_directive_ends(
    pg_pool: asyncpg.Pool,  # noqa: F811
) -> None:
    d = unique_id()
    emit = Emitter(d)
    await record_events(pg_pool, [started(emit), directive_status(emit, "active"),
                                  emit(EventType.MERGED, {})])

    async def finish_later() -> None:
        await asyncio.sleep(0.2)
        await record_events(pg_pool, [directive_status(emit, "completed"),
                                      emit(EventType.MERGED, {"after": "the end"})])

    writer = asyncio.create_task(finish_later())
    seen = [e async for e in watch_events(pg_pool, d, after=2, until_final=True, poll_interval=60)]
    await writer
    assert [(e.position, e.type) for e in seen] == [(3, "merged"), (4, "directive_status")]


async def test_watching_an_unknown_directive_is_an_error(pg_pool: asyncpg.Pool) -> None:  # noqa: F811
    with pytest.raises(NotFound, match="no directive with id"):
        async for _ in watch_events(pg_pool, unique_id("directive-missing")):
            pass


async def test_an_uncommitted_batch_holds_back_later_writers_so_no_position_is_skipped(
    pg_pool: asyncpg.Pool,  # noqa: F811
) -> None:
    """The classic gap: writer A takes positions, writer B takes later ones and
    commits first, a reader sees B's and moves past A's forever. Here B cannot
    get a position until A commits, so the reader sees A's events, then B's."""

    d = unique_id()
    await record_events(pg_pool, [started(Emitter(d))])
    a, b = Emitter(d, f"{d}/g1/a"), Emitter(d, f"{d}/g1/b")
    seen = []

    async def read() -> None:
        async for event in watch_events(pg_pool, d, poll_interval=60):
            seen.append(event)
            if len(seen) == 5:
                return

    reader = asyncio.create_task(read())
    async with pg_pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await write_events(conn, [a(EventType.MERGED, {}), a(EventType.MERGED, {})])
        late = asyncio.create_task(record_events(pg_pool, [b(EventType.MERGED, {}),
                                                           b(EventType.MERGED, {})]))
        await asyncio.sleep(0.3)
        assert not late.done()  # waiting on A's lock, not committed around it
        assert [e.source for e in seen] == [d]
        await tx.commit()
    await asyncio.wait_for(late, timeout=10)
    await asyncio.wait_for(reader, timeout=10)
    assert [(e.position, e.source) for e in seen] == [
        (1, d), (2, a.source), (3, a.source), (4, b.source), (5, b.source)
    ]


async def test_watchers_sharing_a_listener_all_hear_and_survive_a_lost_connection(
    pg_pool: asyncpg.Pool,  # noqa: F811
) -> None:
    from makima.store.watch import SharedListener

    d = unique_id()
    emit = Emitter(d)
    await record_events(pg_pool, [started(emit)])
    listener = SharedListener(pg_pool)
    seen: dict[int, list[int]] = {i: [] for i in range(5)}
    heard = asyncio.Event()

    async def read(i: int, until: int) -> None:
        async for event in watch_events(pg_pool, d, after=1, poll_interval=60,
                                        listener=listener):
            seen[i].append(event.position)
            if all(len(s) >= 1 for s in seen.values()):
                heard.set()
            if len(seen[i]) == until:
                return

    readers = [asyncio.create_task(read(i, 2)) for i in range(5)]
    try:
        await asyncio.sleep(0.3)
        assert listener.channels == 1  # five watchers, one LISTEN
        await record_events(pg_pool, [emit(EventType.MERGED, {})])
        await asyncio.wait_for(heard.wait(), 10)
        # the shared connection dies: the watchers re-read and a new one LISTENs
        async with pg_pool.acquire() as conn:
            ended = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()")
        assert ended == 1
        await asyncio.sleep(0.5)
        await record_events(pg_pool, [emit(EventType.MERGED, {})])
        await asyncio.wait_for(asyncio.gather(*readers), 10)  # poll_interval is 60 s
        assert all(s == [2, 3] for s in seen.values()), seen
        # a watcher that leaves (a closed tab is a cancelled one) stops listening
        leaving = asyncio.create_task(read(0, 99))
        await asyncio.sleep(0.3)
        assert listener.channels == 1
        leaving.cancel()
        await asyncio.gather(leaving, return_exceptions=True)
        await asyncio.sleep(0.1)
        assert listener.channels == 0
    finally:
        for task in readers:
            task.cancel()
        await listener.close()
