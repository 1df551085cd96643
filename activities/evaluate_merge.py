"""One activity for an attempt that passes without a person: evaluate it and, when
the policy passes it (green, or yellow under full autonomy), merge it at once, on
the worker that holds its worktree. Between the two there is then no workflow
task and no second activity to schedule: what a level of a DAG waits for is
shorter by both.

A cancel (a stop, or the step cancelled from outside) ends the activity while it
evaluates, and nothing merges. Once the merge has begun it runs to its end and
its result is returned: a merge is never cut off half-way, and the step's
workflow, which waits for this activity's outcome, reports it (the directive
answers a stop only once its steps have ended, so nothing merges after that).

What does not live here: the evaluation (activities/evaluation.py) and the merge
(activities/execution.py) themselves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from temporalio import activity

from activities.billing import detail_in, usage_detail
from activities.errors import application_error, translated_errors
from activities.evaluation import EvaluationActivities
from activities.execution import ExecutionActivities
from activities.heartbeat import Heartbeat
from makima.contracts import (
    MERGING,
    ActivityName,
    EvaluateMergeInput,
    EvaluateMergeOutput,
    MergeOutput,
)
from makima.errors import MakimaError
from makima.models import Evaluation
from makima.policy import passes_without_a_person


class EvaluateMergeActivities:
    def __init__(self, evaluation: EvaluationActivities, execution: ExecutionActivities) -> None:
        self.evaluation = evaluation
        self.execution = execution

    def activities(self) -> list[Callable[..., Any]]:
        return [self.evaluate_and_merge_step]

    @activity.defn(name=ActivityName.EVALUATE_AND_MERGE_STEP.value)
    async def evaluate_and_merge_step(self, input: EvaluateMergeInput) -> EvaluateMergeOutput:
        # A try after one that failed while merging (git refused, the worker died)
        # takes that try's evaluation, which passed: evaluating again would run the
        # checks and bill the judge again for nothing. Otherwise the evaluation has
        # its own heartbeats, and counts what earlier tries were billed.
        evaluation = (evaluated_before(activity.info().heartbeat_details)
                      or await self.evaluation.evaluate_step(input.evaluate))
        spec = input.evaluate.spec
        if not passes_without_a_person(evaluation.score, spec.thresholds, spec.autonomy):
            return EvaluateMergeOutput(evaluation=evaluation)
        # a retry starts from what the evaluation was billed, and from the evaluation
        async with Heartbeat(lambda: [MERGING, usage_detail(evaluation.usage),
                                      {"evaluation": evaluation.model_dump(mode="json")}],
                             self.execution.heartbeat_interval):
            merge = await merge_evaluated(self.execution.merge(input.merge), evaluation)
        return EvaluateMergeOutput(evaluation=evaluation, merge=merge)


def evaluated_before(details: Sequence[Any] | None) -> Evaluation | None:
    """The evaluation an earlier try of this activity made before it failed while
    merging (its last heartbeat's details), or None."""
    if not details or details[0] != MERGING:
        return None
    return detail_in(details, "evaluation", Evaluation)


async def merge_evaluated(merge: Awaitable[MergeOutput], evaluation: Evaluation) -> MergeOutput:
    """The merge of an attempt that passed its evaluation, run to its end. Its failure
    says it was the merge (the `stage` detail; the step's reason then names the merge
    and git's message, not the evaluation) and carries what the evaluation was billed,
    which the step's spend still counts."""
    with translated_errors():
        try:
            return await to_its_end(merge)
        except MakimaError as exc:
            exc.usage = evaluation.usage
            raise application_error(exc, stage=MERGING) from exc


async def to_its_end(merge: Awaitable[MergeOutput]) -> MergeOutput:
    """Await the merge through any cancel: a cancel that arrives now is answered
    with the merge's outcome."""
    merging: asyncio.Future[MergeOutput] = asyncio.ensure_future(merge)
    while True:
        try:
            return await asyncio.shield(merging)
        except asyncio.CancelledError:
            if merging.done():
                return merging.result()
            activity.logger.info("cancelled while merging: the merge runs to its end first")
