"""What a failed call was billed, and why it failed, read back in workflow code.

activities/errors.py puts the usage of a billed error into the first detail of
its ApplicationError (`{"usage": {...}, ...}`); a failed activity or child
workflow reaches the workflow wrapped in ActivityError / ChildWorkflowError with
that ApplicationError somewhere in its chain of causes.
"""

from __future__ import annotations

from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    from makima.models import Usage


#: Counting the usage of failed calls changes what a replayed run spends.
COUNT_FAILED_TRIES_PATCH = "count-failed-tries"


def billed_usage(err: BaseException) -> Usage:
    """The usage carried by `err` or any of its causes; nothing billed is Usage()."""
    current: BaseException | None = err
    while current is not None:
        if isinstance(current, ApplicationError) and current.details:
            first = current.details[0]
            if isinstance(first, dict) and isinstance(first.get("usage"), dict):
                try:
                    return Usage.model_validate(first["usage"])
                except ValidationError:  # not ours: count nothing rather than fail the task
                    workflow.logger.warning("unreadable usage detail: %s", first["usage"])
                    return Usage()
        current = current.__cause__
    return Usage()


def cause_of(err: BaseException) -> str:
    """The innermost cause's message: what a person reads about a failed call."""
    while err.__cause__ is not None:
        err = err.__cause__
    return str(err) or type(err).__name__
