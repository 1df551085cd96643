"""Live events of one directive: the backlog, then new events as they commit,
with no gaps and no duplicates (what the CLI's `watch` prints).

Why it cannot miss or repeat an event: the writer gives each event a
per-directive position under the directive row's lock, so positions commit in
increasing order with no holes (`writes.py`). The reader LISTENs on the
directive's channel *before* reading the backlog, then after every
notification reads `position > last seen`. A notification is only a wake-up;
the rows are the truth, so a lost or coalesced notification costs nothing but
latency (a periodic re-read covers even that, and a dropped connection).

A process with many watchers at once (the console: one per open page) shares
one LISTEN connection through a `SharedListener`, so a hundred open tabs hold
one pooled connection, not a hundred; without one, each watcher LISTENs on a
connection of its own (the CLI's `events --follow`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from makima.models import DirectiveStatus
from makima.store.reads import EventRecord, _directive_row, events_after
from makima.store.writes import channel_for

#: Re-read even without a notification this often (seconds).
POLL_INTERVAL = 5.0
PAGE = 500


def _ends_directive(event: EventRecord) -> bool:
    if event.type != "directive_status":
        return False
    status = event.data.get("status")
    return status in {s.value for s in DirectiveStatus if s.is_final}


def _usable(connection: Any) -> bool:
    """Whether a pooled connection still works (a lost one is detached from its
    pool proxy, which then refuses every call)."""
    try:
        return connection is not None and not connection.is_closed()
    except asyncpg.InterfaceError:
        return False


class SharedListener:
    """One LISTEN connection, taken from `pool` on first use and held until
    `close()`, that wakes every watcher of a channel. A lost connection wakes
    them all (they re-read) and is replaced on the next subscribe or wait."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._connection: Any = None
        self._lock = asyncio.Lock()
        self._wakes: dict[str, set[asyncio.Event]] = {}
        self._cleanups: set[asyncio.Task[None]] = set()

    def _notified(self, _connection: object, _pid: int, channel: str, _payload: str) -> None:
        for wake in self._wakes.get(channel, ()):
            wake.set()

    def _lost(self, _connection: object) -> None:
        for wakes in self._wakes.values():
            for wake in wakes:
                wake.set()

    async def _ready(self) -> Any:
        """The live connection, LISTENing on every channel someone watches (under the lock)."""
        if _usable(self._connection):
            return self._connection
        if self._connection is not None:
            lost, self._connection = self._connection, None
            await self._pool.release(lost)  # a no-op for one the pool took back already
        connection = await self._pool.acquire()
        try:
            connection.add_termination_listener(self._lost)
            for channel in self._wakes:
                await connection.add_listener(channel, self._notified)
        except BaseException:
            await self._pool.release(connection)
            raise
        self._connection = connection
        return connection

    async def ensure(self) -> None:
        """Reconnect if the connection was lost (watchers call it between reads)."""
        if not _usable(self._connection):
            async with self._lock:
                await self._ready()

    @contextlib.asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[asyncio.Event]:
        """An event set whenever `channel` is notified (clear it before reading)."""
        wake = asyncio.Event()
        async with self._lock:
            connection = await self._ready()
            first = channel not in self._wakes
            self._wakes.setdefault(channel, set()).add(wake)
            if first:
                try:
                    await connection.add_listener(channel, self._notified)
                except BaseException:
                    self._forget(channel, wake)
                    raise
        try:
            yield wake
        finally:
            # Synchronous: a watcher is often leaving because it was cancelled (a
            # closed browser tab), and then it must not wait for anything here.
            self._forget(channel, wake)

    def _forget(self, channel: str, wake: asyncio.Event) -> None:
        wakes = self._wakes.get(channel)
        if wakes is None:
            return
        wakes.discard(wake)
        if not wakes:
            del self._wakes[channel]
            task = asyncio.get_running_loop().create_task(self._unlisten(channel))
            self._cleanups.add(task)
            task.add_done_callback(self._cleanups.discard)

    async def _unlisten(self, channel: str) -> None:
        async with self._lock:
            if channel in self._wakes or not _usable(self._connection):
                return  # watched again meanwhile, or nothing to undo
            # a failure here leaves a LISTEN nobody hears; the connection is still
            # good for the others
            with contextlib.suppress(asyncpg.PostgresError, OSError):
                await self._connection.remove_listener(channel, self._notified)

    @property
    def channels(self) -> int:
        return len(self._wakes)

    async def close(self) -> None:
        for task in list(self._cleanups):
            with contextlib.suppress(BaseException):
                await task
        async with self._lock:
            if self._connection is not None:
                connection, self._connection = self._connection, None
                if _usable(connection):
                    connection.remove_termination_listener(self._lost)
                await self._pool.release(connection)


@contextlib.asynccontextmanager
async def _own_listener(pool: asyncpg.Pool, channel: str) -> AsyncIterator[asyncio.Event]:
    wake = asyncio.Event()

    def on_notify(*_: object) -> None:
        wake.set()

    async with pool.acquire() as listener:
        await listener.add_listener(channel, on_notify)
        try:
            yield wake
        finally:
            with contextlib.suppress(Exception):
                await listener.remove_listener(channel, on_notify)


async def watch_events(
    pool: asyncpg.Pool,
    directive_id: str,
    *,
    after: int = 0,
    until_final: bool = False,
    must_exist: bool = True,
    poll_interval: float = POLL_INTERVAL,
    listener: SharedListener | None = None,
) -> AsyncIterator[EventRecord]:
    """Yield the directive's events with position > `after` in order, then keep
    yielding new ones as they are recorded. With `until_final`, stop after the
    event that ends the directive (completed, failed, stopped). Raises NotFound
    for an unknown directive unless `must_exist` is False (a directive just
    started may not have its first event recorded yet). Woken by `listener`
    when given, else holds one pooled connection of its own while iterating;
    reads borrow a pooled connection only for each read."""
    if must_exist:
        await _directive_row(pool, directive_id)
    channel = channel_for(directive_id)
    woken = listener.subscribe(channel) if listener is not None else _own_listener(pool, channel)
    async with woken as wake:
        last = after
        while True:
            wake.clear()
            # Drain: page until nothing is past `last` (LISTEN is already on, so
            # anything committed after this read wakes us).
            while True:
                batch = await events_after(pool, directive_id, last, PAGE)
                for event in batch:
                    last = event.position
                    yield event
                    if until_final and _ends_directive(event):
                        return
                if len(batch) < PAGE:
                    break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=poll_interval)
            if listener is not None:
                await listener.ensure()
