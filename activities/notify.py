"""Notifications: the record activity's hook that starts a `NotifyWorkflow` per
new notable event and receiver (`start_notifications`), and the activity that
posts one (`NotifyActivities.deliver_notification`). makima/notify.py holds the
payloads and the exactly-once argument.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import asyncpg
from temporalio import activity
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError

from activities.errors import expected_failure
from makima.connection import task_queue
from makima.contracts import ActivityName, Event, NotifyInput, NotifyOutput
from makima.models import CheckResult, CriterionResult
from makima.notify import (
    DeliveryFailed,
    console_url,
    notification_kind,
    notify_urls,
    payload_for,
    post_notification,
    receiver_key,
    workflow_id_for,
)


async def start_notifications(conn: asyncpg.Connection, events: list[Event]) -> None:
    """Called inside the record transaction with the events that were new in it.
    Raising rolls the transaction back, and the record activity is retried."""
    urls = notify_urls(os.environ)
    if not urls:
        return
    notable = [(e, kind) for e in events if (kind := notification_kind(e))]
    if not notable:
        return
    client = activity.client()
    for event, kind in notable:
        title = await conn.fetchval("SELECT title FROM directives WHERE id = $1",
                                    event.directive_id) or event.directive_id
        checks: list[CheckResult] = []
        criteria: list[CriterionResult] = []
        if kind == "approval_requested":
            row = await conn.fetchrow(
                """SELECT checks, criteria FROM evaluations WHERE directive_id = $1
                   AND generation = $2 AND step = $3 AND attempt = $4""",
                event.directive_id, event.generation, event.step, event.attempt)
            if row is not None:
                checks = [CheckResult.model_validate(c) for c in _json(row["checks"])]
                criteria = [CriterionResult.model_validate(c) for c in _json(row["criteria"])]
        payload = payload_for(event, kind=kind, title=title, link_base=console_url(os.environ),
                              checks=checks, criteria=criteria)
        for url in urls:
            # Started before (a retried batch) means already on its way: once is enough.
            with contextlib.suppress(WorkflowAlreadyStartedError):
                await client.start_workflow(
                    "NotifyWorkflow", NotifyInput(receiver=receiver_key(url), payload=payload),
                    id=workflow_id_for(payload["id"], url), task_queue=task_queue(),
                    id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                    static_summary=f"{kind}: {event.directive_id}")


def _json(value: Any) -> list[Any]:
    import json

    return (json.loads(value) if isinstance(value, str) else value) or []


class NotifyActivities:
    def activities(self) -> list[Callable[..., Any]]:
        return [self.deliver_notification]

    @activity.defn(name=ActivityName.DELIVER_NOTIFICATION.value)
    async def deliver_notification(self, notification: NotifyInput) -> NotifyOutput:
        url = next((u for u in notify_urls(os.environ)
                    if receiver_key(u) == notification.receiver), None)
        if url is None:
            raise ApplicationError(
                f"no MAKIMA_NOTIFY_URL of this worker is receiver {notification.receiver}; "
                "was the setting changed?", type="NotifyReceiverGone", non_retryable=True)
        try:
            status = await post_notification(url, notification.payload)
        except DeliveryFailed as error:
            # Expected while a receiver is down: one line, no traceback, and Temporal
            # retries it (NOTIFY_RETRY_POLICY).
            raise expected_failure(
                f"notification {notification.payload.get('id')} not delivered: {error}",
                type="DeliveryFailed") from None
        return NotifyOutput(status=status)
