"""The evaluation activity: run the attempt's programmatic checks in its worktree,
ask the LLM judge when one is configured and chosen, and combine both into an
`Evaluation` by the rule in makima.evaluation.

The workflow calls it only for attempts whose execution succeeded; a failed
execution is judged red by the workflow itself.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.billing import billed_before, every_try_billed, usage_detail
from activities.errors import translated_errors
from activities.heartbeat import Heartbeat
from activities.planning import llm_not_configured
from makima import evaluation as ev
from makima.contracts import ActivityName, EvaluateInput
from makima.llm.client import LLMClient
from makima.llm.structured import structured_call
from makima.models import CheckResult, Confidence, Evaluation, EvaluatorKind, Usage
from makima.policy import confidence_for
from makima.prompts.context import cached_context_block
from makima.prompts.evaluation import (
    VERDICT_TOOL,
    VERDICT_TOOL_DESCRIPTION,
    evaluation_request,
    evaluation_system,
)

JUDGE_MAX_TOKENS = 8_000


class _EvaluationProgress:
    """What a running evaluation heartbeats: which check or judge call runs, and
    what its earlier tries were billed (activities/billing.py)."""

    def __init__(self, carried: Usage) -> None:
        self.progress = "starting"
        self.carried = carried

    def details(self) -> list[Any]:
        if self.carried == Usage():
            return [self.progress]
        return [self.progress, usage_detail(self.carried)]


class EvaluationActivities:
    """`llm` is None when no API key is configured: evaluation is then
    programmatic (and a spec that insists on `evaluator: llm` fails clearly).

    `check_timeout` (seconds per check) and `auto_checks` default to
    MAKIMA_CHECK_TIMEOUT / MAKIMA_AUTO_CHECKS from the environment.
    """

    def __init__(
        self,
        llm: LLMClient | None,
        *,
        check_timeout: float | None = None,
        auto_checks: bool | None = None,
    ) -> None:
        self.llm = llm
        if check_timeout is None:
            check_timeout = float(os.environ.get("MAKIMA_CHECK_TIMEOUT")
                                  or ev.DEFAULT_CHECK_TIMEOUT_SECONDS)
        if auto_checks is None:
            auto_checks = os.environ.get("MAKIMA_AUTO_CHECKS", "1").strip().lower() not in (
                "0", "false", "no", "off")
        self.check_timeout = check_timeout
        self.auto_checks = auto_checks

    def activities(self) -> list[Callable[..., Any]]:
        return [self.evaluate_step]

    def _judge(self, kind: EvaluatorKind) -> LLMClient | None:
        if kind is EvaluatorKind.PROGRAMMATIC:
            return None
        if kind is EvaluatorKind.LLM and self.llm is None:
            raise llm_not_configured("evaluation with `evaluator: llm`")
        return self.llm

    @activity.defn(name=ActivityName.EVALUATE_STEP.value)
    async def evaluate_step(self, request: EvaluateInput) -> Evaluation:
        state = _EvaluationProgress(billed_before())
        async with Heartbeat(state.details) as heartbeat:

            def report(progress: str) -> None:
                state.progress = progress
                heartbeat.beat()

            spec, step, execution = request.spec, request.step, request.execution
            worktree = Path(execution.worktree) if execution.worktree else None
            if worktree is None or not await asyncio.to_thread(worktree.is_dir):
                raise ApplicationError(
                    f"the worktree of step {step.name!r} attempt {request.attempt} does not "
                    f"exist: {execution.worktree or '(no path given)'}",
                    type="WorktreeMissing",
                    non_retryable=True,
                )
            judge = self._judge(spec.evaluator)
            # a retried try also reports what the tries before it were billed
            with translated_errors(), every_try_billed() as earlier:
                evaluation = await self._evaluate(request, worktree, judge, report)
            return evaluation.model_copy(update={"usage": earlier + evaluation.usage})

    async def _evaluate(self, request: EvaluateInput, worktree: Path, judge: LLMClient | None,
                        report: Callable[[str], None]) -> Evaluation:
        spec, step, execution = request.spec, request.step, request.execution
        # off the event loop: walking a big worktree must not stall this worker's heartbeats
        commands = await asyncio.to_thread(ev.checks_for, step.verify, worktree,
                                           auto_detect=self.auto_checks)
        checks = await ev.run_checks(commands, worktree, timeout_seconds=self.check_timeout,
                                     on_progress=report, sandbox=spec.sandbox)

        verdict: ev.JudgeVerdict | None = None
        usage = Usage()
        evaluator = "programmatic"
        if judge is not None:
            model = spec.models.evaluator or judge.evaluator_model
            report(f"judging with {model}")
            diff = await ev.diff_against(worktree, request.integration_branch)
            result = await structured_call(
                judge,
                output_type=ev.JudgeVerdict,
                tool_name=VERDICT_TOOL,
                tool_description=VERDICT_TOOL_DESCRIPTION,
                model=model,
                system=[
                    {"type": "text", "text": evaluation_system()},
                    cached_context_block(spec),
                ],
                messages=[{"role": "user", "content": evaluation_request(
                    step=step,
                    attempt=request.attempt,
                    thresholds=spec.thresholds,
                    changed_files=execution.changed_files,
                    diff_stat=execution.diff_stat,
                    diff=diff,
                    agent_output=execution.output_tail,
                    checks=checks,
                )}],
                max_tokens=JUDGE_MAX_TOKENS,
            )
            verdict, usage = result.value, result.usage
            evaluator = f"llm:{model}+checks" if checks else f"llm:{model}"

        score = ev.composite_score(checks, verdict.score if verdict else None, spec.thresholds)
        confidence = confidence_for(score, spec.thresholds)
        passed = confidence is Confidence.GREEN
        return Evaluation(
            passed=passed,
            score=score,
            confidence=confidence,
            criteria=verdict.criteria if verdict else [],
            checks=checks,
            summary=_summary(verdict, checks),
            rework_instructions="" if passed else _rework(verdict, checks),
            evaluator=evaluator,
            usage=usage,
        )


def _summary(verdict: ev.JudgeVerdict | None, checks: list[CheckResult]) -> str:
    checks_text = ev.check_summary(checks)
    if verdict is not None:
        return f"{verdict.summary.strip()} ({checks_text})"
    if not checks:
        return ("no checks ran and no LLM judge is configured: nothing verified this attempt, "
                "so it scores at the yellow threshold and a person decides")
    return checks_text


def _rework(verdict: ev.JudgeVerdict | None, checks: list[CheckResult]) -> str:
    parts = []
    if verdict is not None and verdict.rework_instructions.strip():
        parts.append(verdict.rework_instructions.strip())
    failing = ev.failing_checks_instructions(checks)
    if failing:
        parts.append(failing)
    if not parts and verdict is not None:
        parts.append(f"The reviewer was not convinced the step is complete: "
                     f"{verdict.summary.strip()}")
    if not parts and not checks:
        parts.append("Nothing verified this attempt: add `verify` commands to the step or "
                     "configure an LLM judge (ANTHROPIC_API_KEY).")
    return "\n\n".join(parts)
