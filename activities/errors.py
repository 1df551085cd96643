"""The one translation of makima's errors into Temporal's `ApplicationError`.

`type` is the exception's class name; `non_retryable` where a retry cannot help;
a retryable LLM error's retry-after becomes the next retry delay. An error that
was billed carries what it cost (`exc.usage`) and, for an answer that never
validated, the model's raw text, as the first detail
(`{"usage": {...}, "raw_text": ...}`), so the workflow's cost breaker counts
every try, the failed ones included. An activity that does two things says in
which one it failed there too (`"stage"`, e.g. evaluate_and_merge_step's merge).

Every such failure is one makima expected (no credentials, a bad spec, a model
that refused, a database that is down): the worker logs it as one line, and the
error is BENIGN to the SDK, which then logs it without a traceback (at DEBUG).
Tracebacks are left for what nobody expected: a bug.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from makima.constants import MAX_TEXT_IN_HISTORY
from makima.errors import Cancelled, LLMRetryableError, MakimaError


def error_details(exc: MakimaError) -> dict[str, Any]:
    details: dict[str, Any] = {}
    usage = getattr(exc, "usage", None)
    if usage is not None:
        details["usage"] = usage.model_dump(mode="json")
    raw_text = getattr(exc, "raw_text", None)
    if raw_text:
        details["raw_text"] = raw_text[:MAX_TEXT_IN_HISTORY]
    return details


def expected_failure(message: str, *details: Any, type: str, non_retryable: bool = False,
                     next_retry_delay: timedelta | None = None) -> ApplicationError:
    """The ApplicationError for a failure makima expects, logged here as one line."""
    if activity.in_activity():
        info = activity.info()
        activity.logger.warning(
            "%s failed (try %d, %s): %s: %s", info.activity_type, info.attempt,
            "final" if non_retryable else "Temporal retries it", type, message)
    return ApplicationError(message, *details, type=type, non_retryable=non_retryable,
                            next_retry_delay=next_retry_delay,
                            category=ApplicationErrorCategory.BENIGN)


def application_error(exc: MakimaError, *, stage: str | None = None) -> ApplicationError:
    """`stage`: what an activity that does two things was doing (a `stage` detail)."""
    delay = None
    if isinstance(exc, LLMRetryableError) and exc.retry_after is not None:
        delay = timedelta(seconds=exc.retry_after)
    details = error_details(exc)
    if stage is not None:
        details["stage"] = stage
    return expected_failure(str(exc), *([details] if details else []), type=type(exc).__name__,
                            non_retryable=exc.non_retryable, next_retry_delay=delay)


def cancel_asked() -> bool:
    """The workflow asked the running activity to stop (a stop, its step cancelled):
    not a worker shutting down, nor a workflow that is gone."""
    why = activity.cancellation_details() if activity.in_activity() else None
    return why is not None and why.cancel_requested


@contextlib.contextmanager
def translated_errors() -> Iterator[None]:
    """Makima's errors as ApplicationError; and a cancellation that no one asked
    for, because the workflow that wanted the work has already ended (a step
    stopped mid-run: the server no longer knows the activity), as one line too.

    A `Cancelled` (the work stopped after it was billed) goes to the workflow that
    asked for the cancel as an ApplicationError carrying that usage; on any other
    cancel (a worker shutting down) it is a plain cancel again, and the next try
    starts from the usage in the last heartbeat (activities/billing.py)."""
    try:
        yield
    except Cancelled as exc:
        if cancel_asked():
            raise application_error(exc) from exc
        raise (_abandoned() or asyncio.CancelledError(str(exc))) from exc
    except MakimaError as exc:
        raise application_error(exc) from exc
    except asyncio.CancelledError:
        abandoned = _abandoned()
        if abandoned is None:
            raise  # asked for (a cancel, a worker shutting down): the SDK reports it
        raise abandoned from None


def _abandoned() -> ApplicationError | None:
    """The failure for a cancel because the workflow that wanted the work has ended or
    moved on; None for any other cancel."""
    why = activity.cancellation_details() if activity.in_activity() else None
    if why is None or not (why.not_found or why.timed_out):
        return None
    return expected_failure(
        "cancelled: the workflow that asked for this has ended or moved on "
        f"({'it is gone' if why.not_found else 'it timed out'})",
        type="ActivityAbandoned", non_retryable=True)
