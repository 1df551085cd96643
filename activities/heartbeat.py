"""The one heartbeat helper of makima's activities.

    async with Heartbeat(lambda: [{"elapsed_seconds": ...}]) as heartbeat:
        ...              # a heartbeat went out on entering, then one every interval
        heartbeat.beat() # and one whenever the activity has news

Entered on an activity's first line, it heartbeats before the first clone, lock
wait, fetch or worktree: a worker that dies there is noticed within the
heartbeat timeout, and a cancel reaches the activity (Temporal delivers it with
a heartbeat's answer). The SDK throttles what reaches the server
(`max_heartbeat_throttle_interval`), so beating often is cheap. Outside an
activity (unit tests calling the method directly) it does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

from temporalio import activity

#: Seconds between two heartbeats of a running activity; with the worker's
#: throttle (makima.constants.HEARTBEAT_THROTTLE) this bounds how fast a cancel is seen.
HEARTBEAT_INTERVAL_SECONDS = 2.0


class Heartbeat:
    """Heartbeats carrying the details `details()` returns (a list, maybe empty)
    from the moment the block is entered, every `interval` seconds, and at
    `beat()`."""

    def __init__(self, details: Callable[[], Sequence[Any]] = tuple,
                 interval: float | None = None) -> None:
        self.details = details
        self.interval = HEARTBEAT_INTERVAL_SECONDS if interval is None else interval
        self._task: asyncio.Task[None] | None = None

    def beat(self) -> None:
        if activity.in_activity():
            activity.heartbeat(*self.details())

    async def _every_interval(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.beat()

    async def __aenter__(self) -> Heartbeat:
        if activity.in_activity():
            self.beat()  # now, not after the first interval
            self._task = asyncio.create_task(self._every_interval())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
