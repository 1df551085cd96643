"""The one translation of makima's errors into Temporal's `ApplicationError`.

`type` is the exception's class name; `non_retryable` where a retry cannot help;
a retryable LLM error's retry-after becomes the next retry delay. An error that
was billed carries what it cost (`exc.usage`) and, for an answer that never
validated, the model's raw text, as the first detail
(`{"usage": {...}, "raw_text": ...}`), so the workflow's cost breaker counts
every try, the failed ones included.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from temporalio.exceptions import ApplicationError

from makima.constants import MAX_TEXT_IN_HISTORY
from makima.errors import LLMRetryableError, MakimaError


def error_details(exc: MakimaError) -> dict[str, Any]:
    details: dict[str, Any] = {}
    usage = getattr(exc, "usage", None)
    if usage is not None:
        details["usage"] = usage.model_dump(mode="json")
    raw_text = getattr(exc, "raw_text", None)
    if raw_text:
        details["raw_text"] = raw_text[:MAX_TEXT_IN_HISTORY]
    return details


def application_error(exc: MakimaError) -> ApplicationError:
    delay = None
    if isinstance(exc, LLMRetryableError) and exc.retry_after is not None:
        delay = timedelta(seconds=exc.retry_after)
    details = error_details(exc)
    return ApplicationError(str(exc), *([details] if details else []), type=type(exc).__name__,
                            non_retryable=exc.non_retryable, next_retry_delay=delay)


@contextlib.contextmanager
def translated_errors() -> Iterator[None]:
    try:
        yield
    except MakimaError as exc:
        raise application_error(exc) from exc
