"""The record activity: write a batch of workflow events into the read model
(`makima.store.writes`). Idempotent by the events' `(source, seq)`, so Temporal
may retry it, and workflows may send a batch twice, without duplicating a row.

Errors: a database that is down or busy is retried (RECORD_RETRY_POLICY retries
without a cap); data Postgres refuses can never succeed on a retry, so it is a
non-retryable `StoreError`.

New events that deserve a notification (MAKIMA_NOTIFY_URL) start their
NotifyWorkflow inside the same transaction (activities/notify.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.errors import expected_failure
from activities.notify import start_notifications
from makima.contracts import ActivityName, RecordInput, RecordOutput
from makima.store.writes import record_events

# Errors in the data itself (a value out of range, a constraint broken): retrying
# the same batch gives the same answer.
_DATA_ERRORS = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)


class RecordActivities:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    def activities(self) -> list[Callable[..., Any]]:
        return [self.record_events]

    @activity.defn(name=ActivityName.RECORD_EVENTS.value)
    async def record_events(self, batch: RecordInput) -> RecordOutput:
        try:
            written = await record_events(self.pool, batch.events, on_new=start_notifications)
        except _DATA_ERRORS as error:
            raise ApplicationError(
                f"Postgres refused the event batch: {error}", type="StoreError", non_retryable=True
            ) from error
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            # Postgres down or restarting: expected, and Temporal retries until it is back
            raise expected_failure(f"could not record events: {error}",
                                   type="StoreError") from error
        return RecordOutput(written=written)
