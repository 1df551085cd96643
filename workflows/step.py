"""StepWorkflow: one step of a directive's generation, attempt after attempt.

execute (agent) → evaluate (checks + judge) → decide with the pure policy:
green → merge and pass; yellow → pass under full autonomy, else wait for a
person's decision relayed by the parent; red → rework with the evaluator's
instructions while rework cycles remain, else blocked. A merge conflict is a
red result that names the files. Progress (status, attempt, score, spend) is
reported to the parent directive with a signal so its `status` query and cost
breaker stay current.

The activities of one attempt, on today's path: `execute_step` on any worker;
then, on the worker that holds its worktree, `evaluate_and_merge_step`, which
evaluates and, when the policy passes the attempt without a person, merges it
and removes the step's worktrees in the same activity (no workflow task between
evaluation and merge). `merge_step` runs on its own for an attempt a person
approved (on the worktree's worker, or on any when that one is gone);
`evaluate_step` only where no worker queue is known (older runs); `cleanup_step`
for worktrees no merge removed (a step that did not pass, or an earlier attempt
on another worker). Under a directive, the step returns without writing its last
events: its directive does (StepResult.unrecorded).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError, CancelledError, TimeoutError, TimeoutType

with workflow.unsafe.imports_passed_through():
    from makima import constants as c
    from makima.contracts import (
        MERGING,
        ActivityName,
        BilledSoFarInput,
        CheckoutInput,
        CleanupInput,
        CleanupOutput,
        EvaluateInput,
        EvaluateMergeInput,
        EvaluateMergeOutput,
        EvaluationSpec,
        EventType,
        ExecuteInput,
        ExecuteOutput,
        ExecutionSpec,
        MergeInput,
        MergeOutput,
        PauseState,
        ReworkContext,
        Severity,
        StepDecision,
        StepInput,
        StepProgress,
        StepResult,
    )
    from makima.models import (
        Confidence,
        Evaluation,
        PendingApproval,
        StepStatus,
        Thresholds,
        Usage,
    )
    from makima.policy import (
        Decision,
        confidence_for,
        decide,
        denial_reason,
        failed_execution_evaluation,
        merge_conflict_evaluation,
    )
    from workflows.event_log import EventLog
    from workflows.usage import (
        COUNT_CANCELLED_CALLS_PATCH,
        COUNT_FAILED_TRIES_PATCH,
        COUNT_TRIES_BEFORE_A_CANCEL_PATCH,
        billed_usage,
        failed_while,
    )

PROGRESS_SIGNAL = "step_progress"
#: A cancelled step reports what it spent since its last report: a cancelled workflow
#: carries no details, so its parent would not see that spend otherwise.
REPORT_SPEND_WHEN_CANCELLED = "report-spend-when-cancelled"
#: Evaluate and cleanup go to the worker that holds the attempt's worktree.
ROUTE_TO_WORKTREE = "route-to-worktree"
#: So does the merge, which then removes the step's worktrees there itself: no
#: cleanup activity between a passed step and its dependants.
MERGE_REMOVES_WORKTREES = "merge-removes-worktrees"
#: A cancel that arrives while the merge runs waits for the merge's outcome.
MERGE_RUNS_TO_ITS_END = "step-merge-runs-to-its-end"
#: A step returns without waiting for its last events to be written: its
#: directive records them (StepResult.unrecorded).
PARENT_RECORDS_LAST_EVENTS = "parent-records-last-events"
#: On the worker holding the worktree, one activity evaluates and, where the policy
#: passes the attempt without a person, merges it (activities/evaluate_merge.py).
EVALUATE_AND_MERGE = "step-evaluate-and-merge"
#: A pause or resume that reaches the step before its first workflow task holds: its
#: input's `paused` (what the directive knew when it started the step) no longer
#: overwrites it, so a step told "paused" before it began does not run its agent.
SIGNAL_BEFORE_RUN_HOLDS = "step-pause-before-run-holds"


def _reraise_if_cancelled(err: ActivityError) -> None:
    """An activity cancelled because this workflow was cancelled ends the workflow
    as cancelled, not as a failed step."""
    if isinstance(err.cause, CancelledError):
        raise asyncio.CancelledError(str(err.cause))


def _cancellation(waits: bool) -> workflow.ActivityCancellationType:
    """How a cancel of the step reaches a billing activity: WAIT_CANCELLATION_COMPLETED
    lets its end, which says what it was billed, reach the step (see `_billed`)."""
    return (workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED if waits
            else workflow.ActivityCancellationType.TRY_CANCEL)


def _worker_gone(err: ActivityError) -> bool:
    """The activity waited on a worker's own queue and no worker took it."""
    return (isinstance(err.cause, TimeoutError)
            and err.cause.type is TimeoutType.SCHEDULE_TO_START)


def _cause(err: BaseException) -> str:
    """The innermost message of an activity failure: what actually went wrong."""
    while err.__cause__ is not None:
        err = err.__cause__
    return str(err) or type(err).__name__


def _approved_work(approved: PendingApproval,
                   thresholds: Thresholds) -> tuple[ExecuteOutput, Evaluation]:
    """The attempt a person approved, as the merge and the step's result need it."""
    execution = ExecuteOutput(success=True, branch=approved.branch or "", commit=approved.commit)
    evaluation = Evaluation(passed=True, score=approved.score,
                            confidence=confidence_for(approved.score, thresholds),
                            summary=approved.summary)
    return execution, evaluation


def _trimmed(execution: ExecuteOutput) -> dict[str, Any]:
    data = execution.model_dump(mode="json")
    data["output_tail"] = execution.output_tail[-c.MAX_TEXT_IN_HISTORY :]
    data["diff_stat"] = execution.diff_stat[-c.MAX_TEXT_IN_HISTORY :]
    return data


@workflow.defn(name="StepWorkflow")
class StepWorkflow:
    def __init__(self) -> None:
        self._paused = False
        self._told_paused = False  # a set_paused signal came (it may come before run())
        self._decision: StepDecision | None = None
        self._reevaluate_requested = False
        self._status = StepStatus.PENDING
        self._reported_status = StepStatus.PENDING  # what the parent was last told
        self._attempt = 0
        self._progress_seq = 0
        self._reported = Usage()
        self._rework_count = 0
        self._usage = Usage()
        self._signals: list[Awaitable[None]] = []
        self._worktree_queues: list[str] = []
        self._removed_by_merge = False
        self._cancel_asked = False  # cancelled while a merge ran (see _merge)
        #: the merge the evaluation activity made already (see _evaluate_and_merge)
        self._merged_with_evaluation: MergeOutput | None = None

    # ------------------------------------------------------------------ messages from the parent

    @workflow.signal(name="set_paused", description="The directive paused or resumed.")
    def set_paused(self, state: PauseState) -> None:
        self._paused = state.paused
        self._told_paused = True

    # A decision and a re-evaluation exclude each other: the first to arrive holds
    # (the audit log must not say "approved" for a step that was evaluated again).

    @workflow.signal(name="decide", description="A person's decision, relayed by the directive.")
    def decide(self, decision: StepDecision) -> None:
        if self._status is StepStatus.AWAITING_APPROVAL and self._decision is None:
            if self._reevaluate_requested and workflow.patched("step-first-message-holds"):
                workflow.logger.warning("decision ignored: a re-evaluation was asked first")
                return
            self._decision = decision

    @workflow.signal(name="reevaluate", description="Evaluate the waiting attempt again.")
    def reevaluate(self) -> None:
        if self._status is StepStatus.AWAITING_APPROVAL:
            if self._decision is not None and workflow.patched("step-first-message-holds"):
                workflow.logger.warning("re-evaluation ignored: a decision was made first")
                return
            self._reevaluate_requested = True

    @workflow.query(name="status")
    def status(self) -> StepProgress:
        return StepProgress(
            name=self._input.step.name,
            generation=self._input.generation,
            status=self._status,
            attempt=self._attempt,
            usage=self._usage,
        )

    # ------------------------------------------------------------------ run

    @workflow.run
    async def run(self, input: StepInput) -> StepResult:
        self._input = input
        if not (self._told_paused and workflow.patched(SIGNAL_BEFORE_RUN_HOLDS)):
            self._paused = input.paused
        self._log = EventLog(input.directive_id, workflow.info().workflow_id)
        try:
            result = await self._attempts()
        except asyncio.CancelledError:
            # e.g. an attempt that finished while paused, or the call a stop cut off
            self._report_unreported_spend(REPORT_SPEND_WHEN_CANCELLED)
            self._status = StepStatus.CANCELLED
            await self._cleanup()
            await self._settle()
            raise
        try:
            await self._cleanup()
            if (workflow.info().parent is not None
                    and workflow.patched(PARENT_RECORDS_LAST_EVENTS)):
                await self._settle_reports()
                return result.model_copy(update={"unrecorded": self._log.hand_over()})
            await self._settle()
            return result
        except asyncio.CancelledError:
            # cancelled while it cleaned up after its last attempt: the result goes with
            # the cancel, what that attempt spent does not (fuzz seed 662319)
            self._report_unreported_spend(COUNT_CANCELLED_CALLS_PATCH)
            await self._settle_reports()
            raise

    async def _attempts(self) -> StepResult:
        spec = self._input.spec
        attempt = self._input.first_attempt
        self._rework_count = self._input.rework_count
        rework: ReworkContext | None = None
        checkout = self._input.reevaluate
        evaluation: Evaluation | None = None
        execution: ExecuteOutput | None = None
        approved = self._input.approved

        while True:
            self._attempt = attempt
            if approved is not None:
                # a person approved this attempt while no step workflow ran: merge it
                execution, evaluation = _approved_work(approved, spec.thresholds)
                approved = None
                decision = Decision.PASS
            else:
                outcome = await self._run_attempt(attempt, rework, checkout)
                if isinstance(outcome, StepResult):
                    return outcome
                execution, evaluation = outcome
                checkout = False
                decision = decide(evaluation.confidence, spec.autonomy, self._rework_count,
                                  spec.max_rework_cycles)
            if decision is Decision.AWAIT_APPROVAL:
                self._report(StepStatus.AWAITING_APPROVAL, evaluation, execution)
                if self._input.park_for_decision:
                    # the directive keeps the approval: nothing runs while a person decides
                    return self._result(StepStatus.AWAITING_APPROVAL, evaluation, execution)
                self._decision = None
                self._reevaluate_requested = False
                self._log.flush()
                await workflow.wait_condition(
                    lambda: self._decision is not None or self._reevaluate_requested
                )
                if self._reevaluate_requested:
                    attempt += 1
                    checkout = True
                    continue
                assert self._decision is not None
                if not self._decision.approved:
                    return self._result(StepStatus.BLOCKED, evaluation, execution, reason=(
                        denial_reason(self._decision.by, self._decision.comment)))
                decision = Decision.PASS

            if decision is Decision.PASS:
                merge, self._merged_with_evaluation = self._merged_with_evaluation, None
                if merge is None:
                    merge = await self._merge(attempt, execution)
                if self._cancel_asked and not (merge and merge.merged):
                    raise asyncio.CancelledError("cancelled while merging")
                if merge is None:
                    return self._failed("merging the step's branch failed", "merge_step", execution)
                if merge.merged:
                    self._event(EventType.MERGED, merge.message or "merged",
                                data=merge.model_dump(mode="json"))
                    return self._result(StepStatus.PASSED, evaluation, execution,
                                        commit=merge.commit or execution.commit)
                self._event(EventType.MERGE_CONFLICT, merge.message, severity=Severity.WARNING,
                            data=merge.model_dump(mode="json"))
                evaluation = merge_conflict_evaluation(merge.conflict_files, merge.message)
                decision = decide(Confidence.RED, spec.autonomy, self._rework_count,
                                  spec.max_rework_cycles)

            if decision is Decision.REWORK:
                self._rework_count += 1
                attempt += 1
                rework = ReworkContext(
                    attempt=attempt,
                    score=evaluation.score,
                    feedback=evaluation.summary[: c.MAX_TEXT_IN_HISTORY],
                    instructions=evaluation.rework_instructions[: c.MAX_TEXT_IN_HISTORY],
                )
                self._report(StepStatus.REWORK, evaluation)
                continue

            return self._result(StepStatus.BLOCKED, evaluation, execution, reason=(
                f"rework budget spent ({self._rework_count} of {spec.max_rework_cycles} cycles); "
                f"last evaluation: {evaluation.summary}"[: c.MAX_TEXT_IN_HISTORY]))

    async def _run_attempt(self, attempt: int, rework: ReworkContext | None,
                           checkout: bool) -> tuple[ExecuteOutput, Evaluation] | StepResult:
        """Execute (or check out) and evaluate one attempt; a StepResult when it failed."""
        spec = self._input.spec
        self._merged_with_evaluation = None
        await self._unpaused()
        self._event(EventType.ATTEMPT_STARTED, f"attempt {attempt}", data={
            "workflow_id": workflow.info().workflow_id,
            "rework": rework.model_dump(mode="json") if rework else None,
            "checkout": checkout,
        })
        if attempt > self._input.first_attempt:
            self._report(StepStatus.RUNNING)
        try:
            execution = await (self._checkout(attempt) if checkout else self._execute(attempt, rework))
        except ActivityError as err:
            _reraise_if_cancelled(err)
            self._count_failed_try(err)
            return self._failed(f"the agent could not run attempt {attempt}: {_cause(err)}",
                                "execute_step")
        self._usage += execution.usage
        if self._cancel_asked:  # it finished as the stop came: the stop holds
            raise asyncio.CancelledError("cancelled as the agent finished")
        self._event(EventType.ATTEMPT_FINISHED,
                    f"attempt {attempt} {'finished' if execution.success else 'failed'}",
                    data=_trimmed(execution))

        if execution.success:
            await self._unpaused()
            self._report(StepStatus.EVALUATING)
            try:
                evaluation = await self._evaluate(attempt, execution)
            except ActivityError as err:
                _reraise_if_cancelled(err)
                self._count_failed_try(err)
                if failed_while(err, MERGING):  # evaluated, passed, and the merge failed
                    return self._failed(
                        f"merging attempt {attempt} into {self._input.integration_branch} "
                        f"failed: {_cause(err)}", "merge_step", execution)
                # never pass a step whose evaluation could not be made
                return self._failed(f"evaluation of attempt {attempt} failed: {_cause(err)}",
                                    "evaluate_step", execution)
            self._usage += evaluation.usage
            merged = self._merged_with_evaluation
            if self._cancel_asked and not (merged and merged.merged):
                raise asyncio.CancelledError("cancelled as the evaluation finished")
        else:
            evaluation = failed_execution_evaluation(
                execution.exit_code, execution.output_tail, execution.summary
            )
        confidence = confidence_for(evaluation.score, spec.thresholds)
        evaluation = evaluation.model_copy(update={"confidence": confidence})
        self._event(EventType.EVALUATION, f"{confidence.value} {evaluation.score:.2f}",
                    data=evaluation.model_dump(mode="json"))
        return execution, evaluation

    # ------------------------------------------------------------------ activities

    async def _execute(self, attempt: int, rework: ReworkContext | None) -> ExecuteOutput:
        self._log.flush()
        i = self._input
        waits = workflow.patched(COUNT_CANCELLED_CALLS_PATCH)
        return await self._billed(ActivityName.EXECUTE_STEP, waits, workflow.start_activity(
            ActivityName.EXECUTE_STEP.value,
            ExecuteInput(directive_id=i.directive_id, generation=i.generation,
                         spec=ExecutionSpec.of(i.spec),
                         step=i.step, attempt=attempt, integration_branch=i.integration_branch,
                         rework=rework),
            result_type=ExecuteOutput,
            start_to_close_timeout=c.EXECUTE_TIMEOUT,
            heartbeat_timeout=c.AGENT_HEARTBEAT_TIMEOUT,
            retry_policy=c.EXECUTE_RETRY_POLICY,
            cancellation_type=_cancellation(waits),
            summary=f"{i.step.name}: attempt {attempt}",
        ))

    async def _checkout(self, attempt: int) -> ExecuteOutput:
        self._log.flush()
        i = self._input
        return await workflow.execute_activity(
            ActivityName.CHECKOUT_STEP.value,
            CheckoutInput(directive_id=i.directive_id, generation=i.generation,
                          repository=i.spec.repository,
                          step=i.step.name, attempt=attempt,
                          integration_branch=i.integration_branch),
            result_type=ExecuteOutput,
            start_to_close_timeout=c.GIT_TIMEOUT,
            heartbeat_timeout=c.GIT_HEARTBEAT_TIMEOUT,
            retry_policy=c.GIT_RETRY_POLICY,
            summary=f"{i.step.name}: check out for re-evaluation",
        )

    def _worktree_queue(self, execution: ExecuteOutput) -> str | None:
        """The task queue of the worker holding `execution`'s worktree, remembered for
        cleanup; None where any worker will do (no queue given, or older runs)."""
        if not execution.worker_queue or not workflow.patched(ROUTE_TO_WORKTREE):
            return None
        if execution.worker_queue not in self._worktree_queues:
            self._worktree_queues.append(execution.worker_queue)
        return execution.worker_queue

    async def _evaluate(self, attempt: int, execution: ExecuteOutput) -> Evaluation:
        self._log.flush()
        i = self._input
        while True:
            queue = self._worktree_queue(execution)
            try:
                if queue is not None and workflow.patched(EVALUATE_AND_MERGE):
                    return await self._evaluate_and_merge(queue, attempt, execution)
                waits = workflow.patched(COUNT_CANCELLED_CALLS_PATCH)
                return await self._billed(ActivityName.EVALUATE_STEP, waits,
                                          workflow.start_activity(
                    ActivityName.EVALUATE_STEP.value,
                    EvaluateInput(directive_id=i.directive_id, generation=i.generation,
                                  spec=EvaluationSpec.of(i.spec), step=i.step, attempt=attempt,
                                  integration_branch=i.integration_branch, execution=execution),
                    result_type=Evaluation,
                    task_queue=queue,
                    schedule_to_start_timeout=c.WORKTREE_SCHEDULE_TO_START if queue else None,
                    start_to_close_timeout=c.EVALUATE_TIMEOUT,
                    heartbeat_timeout=c.EVALUATE_HEARTBEAT_TIMEOUT,
                    retry_policy=c.EVALUATE_RETRY_POLICY,
                    cancellation_type=_cancellation(waits),
                    summary=f"{i.step.name}: evaluate attempt {attempt}",
                ))
            except ActivityError as err:
                if queue is None or not _worker_gone(err):
                    raise
            # The worker holding the worktree is gone; the attempt's commit was pushed to
            # the step branch before execute returned: check it out on another worker.
            self._event(EventType.ACTIVITY_FAILED, (
                f"the worker holding attempt {attempt}'s worktree is gone; checking its "
                "commit out on another worker"), severity=Severity.WARNING,
                data={"activity": "evaluate_step", "worker_queue": queue})
            self._worktree_queues.remove(queue)  # nothing left there to clean up
            moved = await self._checkout(attempt)
            execution = execution.model_copy(update={
                "worktree": moved.worktree, "worker_queue": moved.worker_queue})

    async def _evaluate_and_merge(self, queue: str, attempt: int,
                                  execution: ExecuteOutput) -> Evaluation:
        """Evaluate on the worker holding the worktree, and merge there at once when
        the policy passes the attempt without a person (kept for `_attempts`).

        A cancel (a stop) asks the activity to stop: while it evaluates, it ends and
        nothing merges; a merge under way runs to its end, and its outcome is the
        step's, as in `_merge_on`."""
        i = self._input
        merge = self._merge_input(attempt, execution, remove_worktrees=True)
        running = workflow.start_activity(
            ActivityName.EVALUATE_AND_MERGE_STEP.value,
            EvaluateMergeInput(
                evaluate=EvaluateInput(directive_id=i.directive_id, generation=i.generation,
                                       spec=EvaluationSpec.of(i.spec), step=i.step,
                                       attempt=attempt,
                                       integration_branch=i.integration_branch,
                                       execution=execution),
                merge=merge),
            result_type=EvaluateMergeOutput,
            task_queue=queue,
            schedule_to_start_timeout=c.WORKTREE_SCHEDULE_TO_START,
            start_to_close_timeout=c.EVALUATE_AND_MERGE_TIMEOUT,
            heartbeat_timeout=c.EVALUATE_HEARTBEAT_TIMEOUT,
            retry_policy=c.EVALUATE_RETRY_POLICY,
            cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
            summary=f"{i.step.name}: evaluate attempt {attempt}, merge if it passes",
        )
        counts = workflow.patched(COUNT_CANCELLED_CALLS_PATCH)
        done = await self._billed(ActivityName.EVALUATE_AND_MERGE_STEP, counts, running,
                                  waits=True)
        if done.merge is not None and done.merge.removed_worktrees:
            self._worktree_queues.remove(queue)
            self._removed_by_merge = True
        if self._cancel_asked and not (done.merge and done.merge.merged):
            if counts:  # evaluated, but not merged: its judge was billed all the same
                self._usage += done.evaluation.usage
            raise asyncio.CancelledError("cancelled while evaluating")
        self._merged_with_evaluation = done.merge
        return done.evaluation

    async def _billed(self, activity: ActivityName, counts: bool,
                      running: workflow.ActivityHandle[Any], *, waits: bool | None = None) -> Any:
        """The outcome of a billing activity (execute, evaluate, evaluate-and-merge)
        started with `_cancellation(waits)` (`waits` defaults to `counts`).

        A cancel of this step (a stop) asks the activity to stop and waits for its end:
        an outcome that arrived together with the cancel is returned, and the cancel
        holds after it (`_cancel_asked`, see `_run_attempt`). With `counts`, an end
        by the cancel adds what the activity was billed until then (its `Cancelled`
        failure carries it, the call that was in flight included: activities/billing.py)
        to the step's spend, and ends the step cancelled. A cancel that meets the
        activity between two tries ends it with no try to say so: what its tries were
        billed is asked for first (`_billed_so_far`) and counted then."""
        if not (counts if waits is None else waits):
            return await running
        try:
            return await asyncio.shield(running)
        except asyncio.CancelledError:
            self._cancel_asked = True
            # an outcome that arrived together with the cancel is taken, not cancelled
            await workflow.wait_condition(lambda: True)
            before = Usage()
            if not running.done():
                if counts and workflow.patched(COUNT_TRIES_BEFORE_A_CANCEL_PATCH):
                    before = await self._billed_so_far(activity)
                running.cancel()
            if not counts:
                return await running  # raises the activity's cancellation when it stopped
            try:
                return await running
            except ActivityError as err:
                billed = billed_usage(err)  # nothing when no try was running to say it
                self._usage += billed if billed != Usage() else before
                raise asyncio.CancelledError(f"cancelled: {_cause(err)}") from None

    async def _billed_so_far(self, activity: ActivityName) -> Usage:
        """What the tries of this step's pending `activity` were billed so far, as the
        server has it (activities/billing.py); Usage() when it cannot say."""
        info = workflow.info()
        try:
            # an ordinary activity: a local one must be registered on this very worker,
            # which may run workflows only (the SDK fails the task otherwise)
            return await workflow.execute_activity(
                ActivityName.BILLED_SO_FAR.value,
                BilledSoFarInput(workflow_id=info.workflow_id, run_id=info.run_id,
                                 activity_type=activity.value),
                result_type=Usage,
                schedule_to_close_timeout=c.BILLED_SO_FAR_TIMEOUT,
                retry_policy=c.BILLED_SO_FAR_RETRY_POLICY,
                summary=f"{self._input.step.name}: what {activity.value} was billed so far",
            )
        except ActivityError as err:
            workflow.logger.warning("what %s was billed so far is unknown: %s", activity.value,
                                    _cause(err))
            return Usage()

    async def _merge(self, attempt: int, execution: ExecuteOutput) -> MergeOutput | None:
        self._log.flush()
        queue = self._worktree_queue(execution)
        if queue is not None and workflow.patched(MERGE_REMOVES_WORKTREES):
            try:
                merge = await self._merge_on(queue, attempt, execution)
            except ActivityError as err:
                if not _worker_gone(err):
                    self._merge_failed(err)
                    return None
                # that worker is gone, and its folders with it: merge anywhere
                self._worktree_queues.remove(queue)
                if self._cancel_asked:
                    return None  # cancelled meanwhile: no new merge
            else:
                if merge.removed_worktrees:
                    self._worktree_queues.remove(queue)
                    self._removed_by_merge = True
                return merge
        try:
            return await self._merge_on(None, attempt, execution)
        except ActivityError as err:
            self._merge_failed(err)
            return None

    async def _merge_on(self, queue: str | None, attempt: int,
                        execution: ExecuteOutput) -> MergeOutput:
        """The merge, on the worker holding the attempt's worktree (`queue`, which
        removes them once merged) or on any worker (None)."""
        i = self._input
        runs_to_its_end = workflow.patched(MERGE_RUNS_TO_ITS_END)
        merging = workflow.start_activity(
            ActivityName.MERGE_STEP.value,
            self._merge_input(attempt, execution, remove_worktrees=queue is not None),
            result_type=MergeOutput,
            task_queue=queue,
            schedule_to_start_timeout=c.WORKTREE_SCHEDULE_TO_START if queue else None,
            start_to_close_timeout=c.GIT_TIMEOUT,
            heartbeat_timeout=c.GIT_HEARTBEAT_TIMEOUT,
            retry_policy=c.GIT_RETRY_POLICY,
            summary=f"{i.step.name}: merge",
        )
        if not runs_to_its_end:
            return await merging
        try:
            return await asyncio.shield(merging)
        except asyncio.CancelledError:
            # A stop (or a cancel from outside) while the merge runs: the merge is not
            # cut off half-way. Its outcome is the step's, and the cancel holds for
            # everything after it (the directive answers a stop once its steps ended).
            self._cancel_asked = True
            return await merging

    def _merge_input(self, attempt: int, execution: ExecuteOutput, *,
                     remove_worktrees: bool) -> MergeInput:
        i = self._input
        return MergeInput(directive_id=i.directive_id, repository=i.spec.repository,
                          integration_branch=i.integration_branch, step=i.step.name,
                          attempt=attempt, branch=execution.branch, commit=execution.commit,
                          remove_worktrees=remove_worktrees)

    def _merge_failed(self, err: ActivityError) -> None:
        self._event(EventType.ACTIVITY_FAILED, _cause(err), severity=Severity.ERROR,
                    data={"activity": "merge_step", "error": _cause(err)})

    async def _cleanup(self) -> None:
        self._log.flush()
        i = self._input
        # on every worker that held a worktree of this step (a worker that is gone
        # took its folders with it), else on any worker; none left when the merge
        # removed them
        if self._removed_by_merge and not self._worktree_queues:
            return
        queues: list[str | None] = list(self._worktree_queues) or [None]
        for queue in queues:
            try:
                await workflow.execute_activity(
                    ActivityName.CLEANUP_STEP.value,
                    CleanupInput(directive_id=i.directive_id, repository=i.spec.repository,
                                 step=i.step.name),
                    result_type=CleanupOutput,
                    task_queue=queue,
                    schedule_to_start_timeout=c.WORKTREE_SCHEDULE_TO_START if queue else None,
                    start_to_close_timeout=c.GIT_TIMEOUT,
                    heartbeat_timeout=c.GIT_HEARTBEAT_TIMEOUT,
                    retry_policy=c.GIT_RETRY_POLICY,
                    summary=f"{i.step.name}: remove worktrees",
                )
            except ActivityError as err:  # leftover worktrees cost disk, not correctness
                workflow.logger.warning("cleanup of %s failed: %s", i.step.name, _cause(err))

    # ------------------------------------------------------------------ helpers

    def _count_failed_try(self, err: ActivityError) -> None:
        """A call that failed after it was billed (a failed agent turn, an answer that
        never validated) costs what its error says; the directive's breaker counts it."""
        if workflow.patched(COUNT_FAILED_TRIES_PATCH):
            self._usage += billed_usage(err)

    async def _unpaused(self) -> None:
        self._log.flush()
        if self._paused:
            await workflow.wait_condition(lambda: not self._paused)

    def _event(self, type: EventType, message: str = "", *, data: dict[str, Any] | None = None,
               severity: Severity = Severity.INFO) -> None:
        self._log.add(type, message, generation=self._input.generation,
                      step=self._input.step.name, attempt=self._attempt or None, data=data,
                      severity=severity)

    def _report_unreported_spend(self, patch: str) -> None:
        """A cancelled step's run has no result to carry its spend: report what it spent
        since its last report, under the status the parent knows (a first attempt
        shows as running from its start: a pending step would be started)."""
        if self._usage.cost_usd != self._reported.cost_usd and workflow.patched(patch):
            known = self._reported_status
            self._report(StepStatus.RUNNING if known is StepStatus.PENDING else known)

    def _report(self, status: StepStatus, evaluation: Evaluation | None = None,
                execution: ExecuteOutput | None = None) -> None:
        """Tell the parent directive, without waiting (the signal is awaited before return)."""
        self._status = self._reported_status = status
        parent = workflow.info().parent
        if parent is None:
            return
        spent = Usage(cost_usd=round(self._usage.cost_usd - self._reported.cost_usd, 6))
        self._reported = self._usage
        self._progress_seq += 1
        progress = StepProgress(
            name=self._input.step.name,
            generation=self._input.generation,
            status=status,
            attempt=self._attempt,
            score=evaluation.score if evaluation else None,
            confidence=evaluation.confidence if evaluation else None,
            summary=(evaluation.summary if evaluation else "")[:2000],
            usage=spent,
            seq=self._progress_seq,
            at=workflow.now(),
            branch=execution.branch if execution else None,
            commit=execution.commit if execution else None,
        )
        handle = workflow.get_external_workflow_handle(parent.workflow_id)
        self._signals.append(asyncio.ensure_future(handle.signal(PROGRESS_SIGNAL, progress)))

    async def _settle(self) -> None:
        """Wait for reports and records in flight: nothing may be lost at return."""
        await self._settle_reports()
        await self._log.drain()

    async def _settle_reports(self) -> None:
        """Wait for the progress reports to the parent in flight."""
        for pending in self._signals:
            try:
                await pending
            except Exception as err:  # the parent may be gone (stopped, terminated)
                workflow.logger.warning("progress report not delivered: %s", err)
        self._signals.clear()

    def _result(self, status: StepStatus, evaluation: Evaluation | None,
                execution: ExecuteOutput | None, *, reason: str = "",
                commit: str | None = None) -> StepResult:
        self._status = status
        return StepResult(
            name=self._input.step.name,
            status=status,
            attempts=self._attempt,
            rework_count=self._rework_count,
            score=evaluation.score if evaluation else None,
            confidence=evaluation.confidence if evaluation else None,
            summary=(evaluation.summary if evaluation else "")[: c.MAX_TEXT_IN_HISTORY],
            reason=reason,
            branch=execution.branch if execution else "",
            commit=commit or (execution.commit if execution else None),
            usage=self._usage,
        )

    def _failed(self, reason: str, activity: str,
                execution: ExecuteOutput | None = None) -> StepResult:
        self._event(EventType.ACTIVITY_FAILED, reason, severity=Severity.ERROR,
                    data={"activity": activity, "error": reason})
        return self._result(StepStatus.FAILED, None, execution, reason=reason)

