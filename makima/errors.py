"""makima's exceptions, one short tree (like httpx's `_exceptions.py`):

    MakimaError
    ├── SpecError          the directive spec is invalid (bad input; never retried)
    ├── PlanError          a plan is invalid (carries one message per problem)
    ├── LLMError           talking to the model failed
    │   ├── LLMRetryableError   rate limit, overload, 5xx, connection: try again
    │   └── LLMFatalError       bad request, authentication, never-valid output
    ├── GitError           a git command failed
    │   └── MergeConflict       carries the conflicting files
    ├── ExecutorError      the agent could not be run at all
    ├── StoreError         the read model could not be read or written
    └── Cancelled          the workflow cancelled the work (a stop); carries what it was billed

Activities translate these into `ApplicationError` in one place
(`activities/errors.py`): `type` set to the class name, `non_retryable` where a
retry cannot help, and the error's `usage` (what the failed try was billed) as a
detail, so the cost breaker counts failed tries too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from makima.models import Usage


class MakimaError(Exception):
    """Base of every error makima raises on purpose."""

    non_retryable: bool = False
    #: What this failed try was billed (a `makima.models.Usage`), when it spent money.
    usage = None


class SpecError(MakimaError):
    non_retryable = True

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class PlanError(MakimaError):
    non_retryable = True

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class LLMError(MakimaError):
    pass


class LLMRetryableError(LLMError):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class LLMFatalError(LLMError):
    non_retryable = True


class GitError(MakimaError):
    pass


class MergeConflict(GitError):
    non_retryable = True

    def __init__(self, files: list[str], message: str = "") -> None:
        self.files = files
        super().__init__(message or f"merge conflict in {', '.join(files)}")


class ExecutorError(MakimaError):
    pass


class StoreError(MakimaError):
    pass


class Cancelled(MakimaError):
    """The workflow asked the work to stop (a stop, its step cancelled) after it was
    billed: raised instead of asyncio's CancelledError so that `usage` (what it was
    billed until then, the call that was in flight included) reaches the workflow.
    Temporal's SDK reports a cancelled activity without details (temporalio 1.35
    sends `CancelledError("Cancelled")`), so a plain cancel would lose it."""

    non_retryable = True

    def __init__(self, message: str, usage: Usage) -> None:
        super().__init__(message)
        self.usage = usage
