"""The workflows' side of the audit trail: number events, batch them, and hand
them to the `record_events` activity without making the orchestration wait.

Events added between two awaits go out together in one activity (one round
trip to Postgres); the workflow only waits for them before it returns or
continues as new. A step does not even wait then: it hands what is not yet
written to its directive (`hand_over`, `forward`), which records it with its own
next batch, after the dependants started; so recording never sits on the path
from one step to the next. Writes are idempotent by `(source, seq)`: a batch
written twice (an abandoned activity that ran after all) is written once.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from makima.constants import RECENT_EVENTS, RECORD_RETRY_POLICY, RECORD_TIMEOUT
    from makima.contracts import ActivityName, Event, EventType, RecordInput, RecordOutput, Severity
    from makima.models import EventSummary
    from workflows.history_gauge import ACTIVITY, HistoryGauge


class EventLog:
    def __init__(self, directive_id: str, source: str, last_seq: int = 0,
                 gauge: HistoryGauge | None = None, keeps_batches: bool = False) -> None:
        self.directive_id = directive_id
        self.gauge = gauge  # counts the batches sent into the workflow's history
        # a cancel of the workflow while `drain` waits leaves the batches being written
        # (a later drain waits for them); without, it cancelled them and they were lost
        self.keeps_batches = keeps_batches
        self.source = source
        self.seq = last_seq
        self.recent: deque[EventSummary] = deque(maxlen=RECENT_EVENTS)
        self._buffer: list[Event] = []
        self._in_flight: list[tuple[asyncio.Future[RecordOutput], list[Event]]] = []

    def add(
        self,
        type: EventType,
        message: str = "",
        *,
        generation: int,
        step: str | None = None,
        attempt: int | None = None,
        data: dict[str, Any] | None = None,
        severity: Severity = Severity.INFO,
        actor: str = "makima",
    ) -> None:
        self.seq += 1
        event = Event(
            directive_id=self.directive_id,
            source=self.source,
            seq=self.seq,
            at=workflow.now(),
            type=type,
            severity=severity,
            generation=generation,
            step=step,
            attempt=attempt,
            actor=actor,
            message=message,
            data=data or {},
        )
        self._buffer.append(event)
        self.recent.append(
            EventSummary(seq=event.seq, at=event.at, type=type.value, step=step, message=message)
        )

    @property
    def idle(self) -> bool:
        """Nothing buffered and nothing being written."""
        return not self._buffer and all(f.done() for f, _ in self._in_flight)

    def forward(self, events: list[Event]) -> None:
        """Record another workflow's events (a finished step's `hand_over`) with the
        next batch; they keep their source and seq."""
        self._buffer.extend(events)

    def hand_over(self) -> list[Event]:
        """Every event not known to be written, for another workflow to record:
        the buffer and the batches still in flight (a workflow that returns
        abandons its activities). Afterwards this log has nothing to wait for."""
        events = [e for future, batch in self._in_flight if not _written(future)
                  for e in batch] + self._buffer
        self._in_flight, self._buffer = [], []
        return events

    def flush(self) -> None:
        """Send what is buffered, without waiting for it to be written."""
        self._in_flight = [(f, b) for f, b in self._in_flight if not f.done()]
        if not self._buffer:
            return
        batch, self._buffer = self._buffer, []
        first, last = batch[0], batch[-1]
        record = RecordInput(events=batch)
        if self.gauge is not None:
            self.gauge.add(ACTIVITY, record)
        self._in_flight.append((
            workflow.start_activity(
                ActivityName.RECORD_EVENTS.value,
                record,
                result_type=RecordOutput,
                start_to_close_timeout=RECORD_TIMEOUT,
                retry_policy=RECORD_RETRY_POLICY,
                summary=f"events {first.seq}-{last.seq}: {first.type.value}"[:200],
            ), batch))

    async def drain(self) -> None:
        """Send what is buffered and wait until every batch is written."""
        self.flush()
        if self.keeps_batches:
            await workflow.wait_condition(lambda: all(f.done() for f, _ in self._in_flight))
        pending, self._in_flight = self._in_flight, []
        for future, _ in pending:
            try:
                await future
            except ActivityError as err:  # only on cancellation: retries are unlimited
                workflow.logger.warning("recording events did not finish: %s", err)


def _written(future: asyncio.Future[RecordOutput]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None
