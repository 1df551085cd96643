"""What a failed call was billed, and why it failed, read back in workflow code.

activities/errors.py puts the usage of a billed error into the first detail of
its ApplicationError (`{"usage": {...}, ...}`); a failed activity or child
workflow reaches the workflow wrapped in ActivityError / ChildWorkflowError with
that ApplicationError somewhere in its chain of causes. An activity whose last
try timed out (its worker died) left what all its tries were billed in that
try's last heartbeat (activities/billing.py), which the TimeoutError carries. An
activity the workflow cancelled (a stop) ends with a `Cancelled` ApplicationError
carrying what it was billed until then. One cancelled between two tries carries
nothing (the server records "ACTIVITY_ID_NOT_STARTED", not the last heartbeat):
the step asks what its tries were billed before it cancels it (workflows/step.py).
"""

from __future__ import annotations

from temporalio import workflow
from temporalio.exceptions import ApplicationError, TimeoutError

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    from makima.models import Usage


#: Counting the usage of failed calls changes what a replayed run spends.
COUNT_FAILED_TRIES_PATCH = "count-failed-tries"
#: So does counting what a timed-out try's last heartbeat says was billed.
COUNT_TIMED_OUT_TRIES_PATCH = "count-timed-out-tries"
#: And waiting for a cancelled billing activity's end, which says what it was billed.
COUNT_CANCELLED_CALLS_PATCH = "count-cancelled-calls"
#: And asking, before the cancel, what the tries of an activity waiting for a retry were
#: billed (an activity: a new command).
COUNT_TRIES_BEFORE_A_CANCEL_PATCH = "count-tries-before-a-cancel"


def _usage(value: object) -> Usage:
    try:
        return Usage.model_validate(value)
    except ValidationError:  # not ours: count nothing rather than fail the task
        workflow.logger.warning("unreadable usage detail: %s", value)
        return Usage()


def billed_usage(err: BaseException) -> Usage:
    """The usage carried by `err` or any of its causes; nothing billed is Usage()."""
    current: BaseException | None = err
    while current is not None:
        if isinstance(current, ApplicationError) and current.details:
            first = current.details[0]
            if isinstance(first, dict) and isinstance(first.get("usage"), dict):
                return _usage(first["usage"])
        if isinstance(current, TimeoutError) and current.last_heartbeat_details:
            carried = [d["usage"] for d in current.last_heartbeat_details
                       if isinstance(d, dict) and isinstance(d.get("usage"), dict)]
            if carried and workflow.patched(COUNT_TIMED_OUT_TRIES_PATCH):
                return _usage(carried[-1])
        current = current.__cause__
    return Usage()


def failed_while(err: BaseException, stage: str) -> bool:
    """Whether the activity behind `err` failed in `stage` (makima.contracts.MERGING):
    its error's `stage` detail says so, or, for a try that timed out, the first
    detail of its last heartbeat."""
    current: BaseException | None = err
    while current is not None:
        if isinstance(current, ApplicationError) and current.details:
            first = current.details[0]
            return isinstance(first, dict) and first.get("stage") == stage
        if isinstance(current, TimeoutError) and current.last_heartbeat_details:
            return current.last_heartbeat_details[0] == stage
        current = current.__cause__
    return False


def cause_of(err: BaseException) -> str:
    """The innermost cause's message: what a person reads about a failed call."""
    while err.__cause__ is not None:
        err = err.__cause__
    return str(err) or type(err).__name__
