"""What every try of a billing activity was billed, carried across Temporal's retries.

Temporal retries a failed activity and shows the workflow only the last try's
result or failure, so what an earlier try was billed (an agent's turns before a
529, an invalid answer before a failed correction) would be lost. It hands a
try's last heartbeat details to the next try, though. So a billing activity
(plan, execute, evaluate):

- starts from `billed_before()`: what its earlier tries were billed;
- keeps the running total in its heartbeats as a `{"usage": {...}}` detail
  (`usage_detail`), so a try that dies still passes on what came before it;
- reports the total over all its tries: in its result's `usage` when it
  succeeds, in its error's `usage` (and so in the `ApplicationError`'s details,
  activities/errors.py) when it fails; a try that failed with a heartbeat or
  start-to-close timeout leaves it in the timeout's last heartbeat details,
  which workflows/usage.py reads;
- when the workflow cancels it (a stop), reports the total too: a call in flight
  answers first (makima/llm/client.py), and the activity ends with `Cancelled`
  carrying the total instead of a plain cancel, whose details the SDK drops
  (`cancelled_after`). The workflow waits for that end (workflows/step.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from pydantic import ValidationError
from temporalio import activity

from activities.errors import cancel_asked
from activities.heartbeat import Heartbeat
from makima.errors import Cancelled, MakimaError
from makima.models import Usage


def usage_in(details: Sequence[Any] | None) -> Usage | None:
    """The usage of the last `{"usage": ...}` detail among heartbeat details."""
    for item in reversed(list(details or [])):
        if isinstance(item, dict) and isinstance(item.get("usage"), dict):
            try:
                return Usage.model_validate(item["usage"])
            except ValidationError:
                return None
    return None


def billed_before() -> Usage:
    """What the earlier tries of the running activity were billed (Usage() on a first try)."""
    if not activity.in_activity():
        return Usage()
    return usage_in(activity.info().heartbeat_details) or Usage()


def usage_detail(total: Usage) -> dict[str, Any]:
    return {"usage": total.model_dump(mode="json")}


@contextlib.contextmanager
def every_try_billed() -> Iterator[Usage]:
    """For an activity whose billing all happens inside the block: yields what the
    earlier tries were billed (the caller adds it to its result's usage). A
    MakimaError leaving the block carries the total, and any failure records the
    total as the try's last heartbeat, so the next try starts from it."""
    earlier = billed_before()
    try:
        yield earlier
    except BaseException as exc:
        total = earlier
        if isinstance(exc, MakimaError):
            total = exc.usage = earlier + (exc.usage or Usage())
        if total != Usage():
            Heartbeat(lambda: [usage_detail(total)]).beat()
        if isinstance(exc, asyncio.CancelledError):
            stopped = cancelled_after(total)
            if stopped is not None:
                raise stopped from None
        raise


def cancelled_after(billed: Usage | None) -> Cancelled | None:
    """What a billing activity raises instead of a plain cancel when the workflow
    asked it to stop after it was billed `billed`; None when nothing was billed
    (a plain cancel says it all) or the cancel is not the workflow's (a worker
    shutting down: the next try starts from the last heartbeat)."""
    if not billed or billed == Usage() or not cancel_asked():
        return None
    return Cancelled("cancelled by its workflow (a stop, or its step cancelled)", billed)
