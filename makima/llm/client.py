"""The one place that talks to the Anthropic Messages API: `LLMClient` built from
the worker's environment, and the classification of every failure into
makima's `LLMRetryableError` (try again later) or `LLMFatalError` (a person has
to fix something; the message says what).

Configuration (read by the worker, never from workflow input):

    ANTHROPIC_API_KEY       required for LLM planning and judging
    ANTHROPIC_BASE_URL      optional: a proxy or gateway (tests: a loopback server)
    MAKIMA_PLANNER_MODEL    default DEFAULT_PLANNER_MODEL
    MAKIMA_EVALUATOR_MODEL  default DEFAULT_EVALUATOR_MODEL
    MAKIMA_LLM_TIMEOUT      seconds per request, default 300

The SDK is built with `max_retries=0`: Temporal retries the activity, with the
server's `retry-after` passed on as the next retry delay, so one retry policy
governs every attempt and each attempt is visible in the workflow history.

A call that is in flight when its work is cancelled (a stop) is not cut off: the
API goes on generating its answer and bills it whether or not anyone reads it. So
`create_message` waits up to CANCEL_GRACE_SECONDS for that answer and raises
`Cancelled` carrying what it was billed. A call still out after that is abandoned;
what the API bills for it is not known here, and not counted (README, known limits).
Prompts, schemas and parsing live elsewhere (makima/prompts, makima/llm/structured).
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import time
from collections.abc import Mapping
from typing import Any

import anthropic
from anthropic import AsyncAnthropic
from anthropic.types import Message

from makima.errors import Cancelled, LLMError, LLMFatalError, LLMRetryableError
from makima.llm.pricing import usage_from_api
from makima.models import Usage

DEFAULT_PLANNER_MODEL = "claude-opus-5-5"
DEFAULT_EVALUATOR_MODEL = "claude-sonnet-5-5"
DEFAULT_TIMEOUT_SECONDS = 300.0
#: A server asking for a longer pause than this is waited for this long; the
#: activity's retry policy still bounds the number of attempts.
MAX_RETRY_AFTER_SECONDS = 600.0
#: How long a call in flight when its work is cancelled may still take to answer
#: (what it was billed is then known); a stop's answer waits for it.
CANCEL_GRACE_SECONDS = 30.0


class LLMClient:
    """The Anthropic async client plus the models the worker uses by default.

    Built once in worker.py (`llm_from_env()`) and handed to the planning and
    evaluation activity classes; tests build it against tests/messages_server.py.
    """

    def __init__(
        self,
        anthropic_client: AsyncAnthropic,
        *,
        planner_model: str = DEFAULT_PLANNER_MODEL,
        evaluator_model: str = DEFAULT_EVALUATOR_MODEL,
    ) -> None:
        self.anthropic = anthropic_client
        self.planner_model = planner_model
        self.evaluator_model = evaluator_model

    @property
    def base_url(self) -> str:
        return str(self.anthropic.base_url)

    async def create_message(self, **params: Any) -> Message:
        """`messages.create(**params)` (see `create_message`)."""
        return await create_message(self.anthropic, **params)

    async def close(self) -> None:
        await self.anthropic.close()


async def create_message(client: AsyncAnthropic, *, role: str | None = None,
                         **params: Any) -> Message:
    """`client.messages.create(**params)`, with every failure turned into an LLMError
    (`role` as in `classify_error`). A cancel while the call is out raises `Cancelled`
    carrying what its answer was billed, once it came (see the module's docstring)."""
    call = asyncio.ensure_future(client.messages.create(**params))
    try:
        return await asyncio.shield(call)
    except asyncio.CancelledError:
        raise await _cancelled_call(call, str(params.get("model") or "")) from None
    except anthropic.AnthropicError as exc:
        raise classify_error(exc, model=params.get("model"), base_url=str(client.base_url),
                             role=role) from exc


async def _cancelled_call(call: asyncio.Future[Message], model: str) -> Cancelled:
    """What a call that was in flight at a cancel was billed, as a `Cancelled`."""
    await asyncio.wait([call], timeout=CANCEL_GRACE_SECONDS)
    if not call.done():
        call.cancel()
        return Cancelled(f"cancelled while a call to {model} was in flight; it had not "
                         f"answered {CANCEL_GRACE_SECONDS:.0f} s later and was abandoned, "
                         "so what it is billed is not counted", Usage())
    if call.exception() is not None:  # an error answer is not billed
        return Cancelled(f"cancelled while a call to {model} was in flight; it failed: "
                         f"{call.exception()}", Usage())
    return Cancelled(f"cancelled while a call to {model} was in flight; its answer was "
                     "billed and is counted", usage_from_api(model, call.result().usage))


def llm_from_env(env: Mapping[str, str] | None = None) -> LLMClient | None:
    """An LLMClient configured from the environment, or None when no
    ANTHROPIC_API_KEY is set (planning then needs a plan in the spec and
    evaluation is programmatic)."""
    env = os.environ if env is None else env
    client = anthropic_from_env(env)
    if client is None:
        return None
    return LLMClient(
        client,
        planner_model=(env.get("MAKIMA_PLANNER_MODEL") or "").strip() or DEFAULT_PLANNER_MODEL,
        evaluator_model=(env.get("MAKIMA_EVALUATOR_MODEL") or "").strip()
        or DEFAULT_EVALUATOR_MODEL,
    )


def anthropic_from_env(env: Mapping[str, str] | None = None) -> AsyncAnthropic | None:
    """The one way makima builds the SDK client (planner, judge and the anthropic
    agent): ANTHROPIC_API_KEY (None without it), ANTHROPIC_BASE_URL,
    MAKIMA_LLM_TIMEOUT, and max_retries=0 (Temporal owns retries)."""
    env = os.environ if env is None else env
    api_key = (env.get("ANTHROPIC_API_KEY") or "").strip()
    if not api_key:
        return None
    timeout_text = (env.get("MAKIMA_LLM_TIMEOUT") or "").strip()
    try:
        timeout = float(timeout_text) if timeout_text else DEFAULT_TIMEOUT_SECONDS
    except ValueError:
        timeout = -1.0
    if timeout <= 0:
        raise LLMFatalError(
            f"MAKIMA_LLM_TIMEOUT must be a positive number of seconds, got {timeout_text!r}")
    return AsyncAnthropic(
        api_key=api_key,
        base_url=(env.get("ANTHROPIC_BASE_URL") or "").strip() or None,
        max_retries=0,  # Temporal owns retries
        timeout=timeout,
    )


# --------------------------------------------------------------------------- errors

#: Where a model is configured, per role: named in errors about a model.
_MODEL_SETTINGS = {
    None: "MAKIMA_PLANNER_MODEL / MAKIMA_EVALUATOR_MODEL or the directive's "
          "models.planner / models.evaluator",
    "planner": "MAKIMA_PLANNER_MODEL or the directive's models.planner",
    "evaluator": "MAKIMA_EVALUATOR_MODEL or the directive's models.evaluator",
    "executor": "MAKIMA_EXECUTOR_MODEL or the directive's models.executor",
}


def classify_error(exc: BaseException, *, model: str | None = None,
                   base_url: str = "", role: str | None = None) -> LLMError:
    """Retryable: rate limit (429), overload (529), other 5xx, 408/409, timeouts
    and connection failures. Fatal: everything a retry cannot fix (400, 401,
    402, 403, 404, 413, 422 ...), with a message saying what to change; `role`
    (planner, evaluator, executor) picks the setting an error about the model names."""
    model_text = f"model {model!r}" if model else "the model"
    setting = _MODEL_SETTINGS.get(role, _MODEL_SETTINGS[None])
    if isinstance(exc, anthropic.APITimeoutError):
        return LLMRetryableError(f"the Anthropic API did not answer in time ({base_url})")
    if isinstance(exc, anthropic.APIConnectionError):
        return LLMRetryableError(
            f"could not reach the Anthropic API at {base_url}: {exc}; check the network "
            "and ANTHROPIC_BASE_URL"
        )
    if not isinstance(exc, anthropic.APIStatusError):
        return LLMFatalError(f"the Anthropic client failed before sending a request: {exc}")

    status = exc.status_code
    detail = _api_message(exc)
    retry_after = retry_after_seconds(exc.response.headers)
    if status == 429:
        return LLMRetryableError(f"rate limited by the Anthropic API (429): {detail}", retry_after)
    if status == 529:
        return LLMRetryableError(f"the Anthropic API is overloaded (529): {detail}", retry_after)
    if status >= 500 or status in (408, 409):
        return LLMRetryableError(f"the Anthropic API failed ({status}): {detail}", retry_after)
    if status == 401:
        return LLMFatalError(
            f"ANTHROPIC_API_KEY is missing or invalid: the Anthropic API rejected it (401: "
            f"{detail}). Set a valid key in the worker's environment and restart it."
        )
    if status == 403:
        return LLMFatalError(
            f"the API key is not allowed to use {model_text} (403: {detail}). Use a key with "
            f"access, or choose another model ({setting})."
        )
    if status == 404:
        return LLMFatalError(
            f"{model_text} or the endpoint was not found (404: {detail}). Check the model name "
            f"({setting}) and ANTHROPIC_BASE_URL ({base_url})."
        )
    if status == 402:
        return LLMFatalError(
            f"the Anthropic account cannot pay for this request (402: {detail}). Check billing."
        )
    if status == 413:
        return LLMFatalError(
            f"the request is too large for the Anthropic API (413: {detail}). Shorten the "
            "directive (goal, requirements) or the step's task plan."
        )
    return LLMFatalError(
        f"the Anthropic API rejected the request for {model_text} ({status}: {detail}). "
        "Check the model name and the directive's content."
    )


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """The pause a 429/529 asks for: `retry-after-ms`, else `retry-after` in
    seconds or as an HTTP date; None when absent or unreadable."""
    lowered = {key.lower(): value for key, value in headers.items()}
    seconds: float | None = None
    if "retry-after-ms" in lowered:
        try:
            seconds = float(lowered["retry-after-ms"]) / 1000
        except ValueError:
            seconds = None
    if seconds is None and "retry-after" in lowered:
        text = lowered["retry-after"].strip()
        try:
            seconds = float(text)
        except ValueError:
            parsed = email.utils.parsedate_tz(text)
            if parsed is not None:
                seconds = email.utils.mktime_tz(parsed) - time.time()
    if seconds is None:
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


def _api_message(exc: anthropic.APIStatusError) -> str:
    message = getattr(exc, "api_message", None)
    if not message and isinstance(exc.body, dict):
        error = exc.body.get("error")
        if isinstance(error, dict):
            message = error.get("message")
    return str(message or exc.message)
