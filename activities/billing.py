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
  (`cancelled_after`). The workflow waits for that end (workflows/step.py);
- a cancel that meets the activity between two tries (a retry's backoff) finds no
  try to report, and the server ends it with "ACTIVITY_ID_NOT_STARTED" instead of
  the last heartbeat; so the step asks first (`billed_so_far`, an activity) what
  the tries so far were billed, from the pending activity's last failure or
  heartbeat, and counts that when no try reports.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from temporalio import activity

from activities.errors import cancel_asked
from activities.heartbeat import Heartbeat
from makima.contracts import ActivityName, BilledSoFarInput
from makima.errors import Cancelled, MakimaError
from makima.models import Usage

M = TypeVar("M", bound=BaseModel)


def detail_in(details: Sequence[Any] | None, key: str, model: type[M]) -> M | None:
    """The `model` of the last `{key: {...}}` item among an activity's (heartbeat or
    failure) details; None when there is none or it does not decode."""
    for item in reversed(list(details or [])):
        if isinstance(item, dict) and isinstance(item.get(key), dict):
            try:
                return model.model_validate(item[key])
            except ValidationError:
                return None
    return None


def usage_in(details: Sequence[Any] | None) -> Usage | None:
    """The usage of the last `{"usage": ...}` detail among heartbeat details."""
    return detail_in(details, "usage", Usage)


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


class BillingActivities:
    """`billed_so_far`, which needs only the worker's own Temporal client."""

    def activities(self) -> list[Callable[..., Any]]:
        return [self.billed_so_far]

    @activity.defn(name=ActivityName.BILLED_SO_FAR.value)
    async def billed_so_far(self, input: BilledSoFarInput) -> Usage:
        """What the tries of the workflow's pending `activity_type` were billed so far:
        its last failure's usage detail when it waits for a retry, else its last
        heartbeat's; Usage() when none is pending or says."""
        client = activity.client()
        description = await client.get_workflow_handle(
            input.workflow_id, run_id=input.run_id).describe()
        for pending in description.raw_description.pending_activities:
            if pending.activity_type.name != input.activity_type:
                continue
            failure = pending.last_failure.application_failure_info.details.payloads
            beats = pending.heartbeat_details.payloads
            for payloads in (failure, beats):
                if payloads:
                    found = usage_in(await client.data_converter.decode(payloads))
                    if found is not None:
                        return found
        return Usage()
