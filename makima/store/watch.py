"""Live events of one directive: the backlog, then new events as they commit,
with no gaps and no duplicates (what the CLI's `watch` prints).

Why it cannot miss or repeat an event: the writer gives each event a
per-directive position under the directive row's lock, so positions commit in
increasing order with no holes (`writes.py`). The reader LISTENs on the
directive's channel *before* reading the backlog, then after every
notification reads `position > last seen`. A notification is only a wake-up;
the rows are the truth, so a lost or coalesced notification costs nothing but
latency (a periodic re-read covers even that, and a dropped connection).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

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


async def watch_events(
    pool: asyncpg.Pool,
    directive_id: str,
    *,
    after: int = 0,
    until_final: bool = False,
    must_exist: bool = True,
    poll_interval: float = POLL_INTERVAL,
) -> AsyncIterator[EventRecord]:
    """Yield the directive's events with position > `after` in order, then keep
    yielding new ones as they are recorded. With `until_final`, stop after the
    event that ends the directive (completed, failed, stopped). Raises NotFound
    for an unknown directive unless `must_exist` is False (a directive just
    started may not have its first event recorded yet). Holds one pooled
    connection while iterating."""
    if must_exist:
        await _directive_row(pool, directive_id)
    wake = asyncio.Event()

    def on_notify(*_: object) -> None:
        wake.set()

    channel = channel_for(directive_id)
    async with pool.acquire() as listener:
        await listener.add_listener(channel, on_notify)
        try:
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
        finally:
            with contextlib.suppress(Exception):
                await listener.remove_listener(channel, on_notify)
