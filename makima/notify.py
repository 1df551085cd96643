"""Notifications: a JSON POST to each `MAKIMA_NOTIFY_URL` (several: separated by
commas or spaces) when a step starts waiting for a person, a breaker pauses a
directive, or a directive fails or completes.

How each is sent exactly once: the record activity, inside the transaction that
writes the events, starts one `NotifyWorkflow` per (new event, url) with the
workflow id `notify-<hash of event key and url>`. An event is "new" only the
first time it is inserted, and a workflow id is started only once (a second
start is refused), so activity retries and replayed batches never notify twice;
a transaction that fails after the start is retried and finds the workflow
already there. The workflow's one activity posts with Temporal's retries
(NOTIFY_RETRY_POLICY) while the receiver is down. A receiver that answered but
whose answer got lost may see a payload again: `id` is the same then.

The payload: `id`, `kind` (approval_requested | breaker_tripped |
directive_failed | directive_completed), `directive_id`, `title`, `step`,
`attempt`, `message`, `reasons`, `link` (the console page; MAKIMA_CONSOLE_URL,
default http://127.0.0.1:8234), `at`, and `text`, a one-line summary with the
link that Slack-compatible webhooks show as the message.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from makima.contracts import Event, EventType
from makima.models import CheckResult, CriterionResult
from makima.review import why_waiting

DEFAULT_CONSOLE_URL = "http://127.0.0.1:8234"
POST_TIMEOUT_SECONDS = 10.0


class DeliveryFailed(Exception):
    """The receiver did not take the notification (retried by Temporal)."""


def notify_urls(env: Mapping[str, str]) -> list[str]:
    return [u for u in re.split(r"[,\s]+", env.get("MAKIMA_NOTIFY_URL", "")) if u]


def console_url(env: Mapping[str, str]) -> str:
    return (env.get("MAKIMA_CONSOLE_URL") or DEFAULT_CONSOLE_URL).rstrip("/")


def notification_kind(event: Event) -> str | None:
    if event.type is EventType.APPROVAL_REQUESTED:
        return "approval_requested"
    if event.type is EventType.BREAKER_TRIPPED:
        return "breaker_tripped"
    if event.type is EventType.DIRECTIVE_STATUS and event.source == event.directive_id:
        status = event.data.get("status")
        if status in ("failed", "completed"):
            return f"directive_{status}"
    return None


def notification_id(event: Event) -> str:
    return f"{event.source}:{event.seq}"


def receiver_key(url: str) -> str:
    """How history names a receiver: its URL is a secret of the workers."""
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def workflow_id_for(notification: str, url: str) -> str:
    """The NotifyWorkflow id of a notification (`notification_id`) for one receiver."""
    digest = hashlib.sha256(f"{notification}\n{url}".encode()).hexdigest()[:32]
    return f"notify-{digest}"


def payload_for(event: Event, *, kind: str, title: str, link_base: str,
                checks: Sequence[CheckResult] = (),
                criteria: Sequence[CriterionResult] = ()) -> dict[str, Any]:
    link = f"{link_base}/directives/{event.directive_id}"
    reasons: list[str] = []
    if kind == "approval_requested":
        link += f"#step-{event.step}"
        reasons = why_waiting(list(checks), list(criteria), event.data.get("score"),
                              str(event.data.get("summary") or ""))
        headline = (f"makima: step {event.step} (attempt {event.attempt}) of \"{title}\" "
                    f"waits for your decision: {'; '.join(reasons)}")
    elif kind == "breaker_tripped":
        reasons = [event.message]
        headline = f"makima: \"{title}\" is paused by a budget: {event.message}"
    elif kind == "directive_failed":
        reasons = [str(event.data.get("reason") or event.message)]
        headline = f"makima: \"{title}\" failed: {reasons[0]}"
    else:
        headline = f"makima: \"{title}\" completed: {event.message}"
    return {
        "id": notification_id(event), "kind": kind, "directive_id": event.directive_id,
        "title": title, "step": event.step, "attempt": event.attempt,
        "message": event.message, "reasons": reasons, "link": link,
        "at": event.at.isoformat(), "text": f"{headline} <{link}>",
    }


def _post(url: str, payload: dict[str, Any]) -> int:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "makima"})
    try:
        with urllib.request.urlopen(request, timeout=POST_TIMEOUT_SECONDS) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        raise DeliveryFailed(f"{_safe(url)} answered {error.code}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise DeliveryFailed(f"{_safe(url)} could not be reached: {reason}") from None


def _safe(url: str) -> str:
    """The URL's scheme, host and port only: webhook URLs carry their secret in the
    path or the user part, and this text lands in Temporal's history."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname or '?'}{port}"


async def post_notification(url: str, payload: dict[str, Any]) -> int:
    return await asyncio.to_thread(_post, url, payload)


def configured(env: Mapping[str, str] | None = None) -> bool:
    return bool(notify_urls(os.environ if env is None else env))
