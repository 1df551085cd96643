"""The worker's workflow runner: the SDK's sandboxed runner, undoing history events
a query made the workflow run before their workflow task.

Why (issue 10; found by the fuzzer with worker restarts, reproduced by
tests/test_query_guard.py). Temporal answers a query that arrives while no workflow
task is in flight by sending it to a worker as a "legacy query" with the history as
it is then. The server may read that history just after an activity completed,
when the next workflow task is already scheduled but not started. A worker that
has the workflow cached from before (or none, right after a restart) then runs the
new events (the activity's result) in an activation of its own, for the query,
and keeps the commands the workflow produced. The real workflow task comes next,
carrying only what arrived with it, e.g. an update: the history records the
activity the workflow scheduled for the result *before* the update's acceptance.
Any replay delivers the result and the update together, runs the update first
(SDK Core's job order), and fails: "[TMPRL1100] Nondeterminism error: Update
machine does not handle this event: ActivityTaskScheduled" (the same holds for a
signal instead of the update). The workflow would be stuck at its next replay
(a cache eviction, a worker restart). temporalio 1.35, sdk-core's WFT chunking v1;
temporalio/sdk-python#1591 is the same class of bug (an update's activation
differs between a cold start and replay).

How it is told apart, and undone. An activation for a real workflow task carries
the task's start time and the history size recorded on its WorkflowTaskStarted
event, both new. An activation run for a legacy query that read the history
before the next task started repeats the previous task's time and size while the
history grew. It is let run (failing it evicts the workflow while Core may hold
the real task behind the query; Core then lost that task's completion in tests,
and it timed out after 10 s), and the workflow's next real task is failed before
the workflow sees it (TASK_RETRY_MESSAGE): Core evicts the workflow, dropping what
it kept, and the task's next attempt runs from the whole history, as every replay
will. A query may also read the history while the real task is started but not
completed; its activation then looks like the task's own, but Core may lose that
task's completion and keep the commands. So a second check: each task that
completed adds at least WorkflowTaskCompleted, one event per command that makes
one, WorkflowTaskScheduled and WorkflowTaskStarted before the next task's
activation; a task that comes sooner than that after one this worker ran live (a
replayed one's commands are in the history) follows commands that were never
recorded, and it is failed too. The cost: a failed workflow task in the history and a
replay; a query or update that meets the failed task is refused once (ask again).
What is not undone: when the real task has nothing new to run, Core completes it
with the commands the query's activation made, and that activation saw a history
length and time one task early. So the directive decides nothing on those: its
checkpoint on what it counted (workflows/history_gauge.py), its wall-time breaker
on a timer (tests/test_stale_activations.py).

One more difference between a first run and a replay is not a query's: Core (its
WFT chunking v1) runs a workflow task that completed without commands, after one
that also had none and followed at once by the next task's WorkflowTaskScheduled,
together with that next task when a worker without the workflow cached replays it
to answer the task; every later replay runs them apart. An update brings no event
of its own, so a pause after two such tasks on a restarted worker met, in one
activation, the result the task before had already run. Under the SDK's legacy
job order the workflow's main loop ran between the update and that result, and the
commands came out in another order than any replay makes them (fuzz seeds 123349,
232937; temporalio/sdk-rust#1146, #1606). So the runner turns on the SDK's
PROCESS_WORKFLOW_ACTIVATION_JOBS_AS_SINGLE_BATCH flag for new workflow tasks: every
job of an activation is applied before any coroutine runs, and the main loop runs
after the result in both ways. The flag is recorded in the workflow task that first
used it, so replays do the same from there, and older histories replay as they
were (tests/test_cold_worker_update.py).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from temporalio.bridge.proto.workflow_activation import WorkflowActivation
from temporalio.bridge.proto.workflow_completion import WorkflowActivationCompletion
from temporalio.worker import WorkflowInstance, WorkflowInstanceDetails, WorkflowRunner
from temporalio.worker._workflow_instance import _WorkflowLogicFlag
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

log = logging.getLogger("makima.worker")

#: Why a query, or the workflow task after it, failed (makima/query_guard.py).
TASK_RETRY_MESSAGE = ("a query met history events of this workflow that their workflow "
                      "task had not run yet; the workflow is run again from its whole "
                      "history (ask again)")


#: Commands that record one history event each when their workflow task completes
#: (a lower bound: a patch marker also upserts a search attribute, for instance).
#: `cancel_timer` is not among them: the timer it cancels may have fired in the same
#: activation, or been started in it, and then nothing is recorded.
_RECORDED = frozenset({
    "schedule_activity", "start_timer", "start_child_workflow_execution",
    "signal_external_workflow_execution", "request_cancel_external_workflow_execution",
    "upsert_workflow_search_attributes", "modify_workflow_properties", "set_patch_marker",
    "complete_workflow_execution", "fail_workflow_execution",
    "continue_as_new_workflow_execution", "cancel_workflow_execution",
})


def _undone(commands: Any) -> set[tuple[str, int]]:
    """Timers, activities and children the same completion starts and cancels: Core
    sends neither command, so neither is recorded (the directive's main loop starts a
    wall-time timer at each turn and cancels it at the next, often in one activation)."""
    undone = set()
    for command in commands:
        kind = command.WhichOneof("variant")
        if kind == "cancel_timer":
            undone.add(("start_timer", command.cancel_timer.seq))
        elif kind == "request_cancel_activity":
            undone.add(("schedule_activity", command.request_cancel_activity.seq))
        elif kind == "cancel_child_workflow_execution":
            undone.add(("start_child_workflow_execution",
                        command.cancel_child_workflow_execution.child_workflow_seq))
    return undone


def recorded_events(completion: WorkflowActivationCompletion) -> int:
    """A lower bound of the history events the completion's commands make."""
    if not completion.HasField("successful"):
        return 0
    commands = completion.successful.commands
    undone = _undone(commands)
    count = 0
    for command in commands:
        kind = command.WhichOneof("variant")
        if kind in _RECORDED:
            count += (kind, getattr(getattr(command, kind), "seq", None)) not in undone
        elif kind == "update_response":  # accepted / completed are events, rejected is not
            count += command.update_response.WhichOneof("response") != "rejected"
    return count


def _only_queries(act: WorkflowActivation) -> bool:
    return all(job.HasField("query_workflow") or job.HasField("remove_from_cache")
               for job in act.jobs)


class ForwardingInstance(WorkflowInstance):
    """A workflow instance that hands everything to `inner`; subclasses override
    `activate` to look at or change what passes."""

    def __init__(self, inner: WorkflowInstance) -> None:
        self._inner = inner

    def activate(self, act: WorkflowActivation) -> WorkflowActivationCompletion:
        return self._inner.activate(act)

    def get_serialization_context(self, command_info: Any) -> Any:
        return self._inner.get_serialization_context(command_info)

    def get_external_store_context(self, command_info: Any) -> Any:
        return self._inner.get_external_store_context(command_info)

    def get_info(self) -> Any:
        return self._inner.get_info()

    def get_thread_id(self) -> int | None:
        return self._inner.get_thread_id()


class WrappingRunner(WorkflowRunner):
    """A workflow runner (the SDK's sandboxed one unless given) whose instances are
    wrapped by `wrap`."""

    def __init__(self, inner: WorkflowRunner | None = None) -> None:
        self._inner = inner or SandboxedWorkflowRunner()

    def wrap(self, instance: WorkflowInstance) -> WorkflowInstance:
        return instance

    def prepare_workflow(self, defn: Any) -> None:
        self._inner.prepare_workflow(defn)

    def create_instance(self, det: WorkflowInstanceDetails) -> WorkflowInstance:
        return self.wrap(self._inner.create_instance(det))

    def set_worker_level_failure_exception_types(self, types: Any) -> None:
        self._inner.set_worker_level_failure_exception_types(types)


class _Guarded(ForwardingInstance):
    def __init__(self, inner: WorkflowInstance) -> None:
        super().__init__(inner)
        self._length = 0  # the history length of the last task the workflow ran
        self._size = 0  # its history size and start time, as the activation said
        self._time = 0
        self._recorded = 0  # events the completions of that task record, at least
        self._speculative = False  # that task may vanish (it only rejected an update)
        self._replayed = False  # that task was replayed: its commands are in the history
        self._ran_for_a_query = False  # new history events ran without their task

    def _earliest_next(self) -> int:
        if self._speculative:  # its WorkflowTaskScheduled/Started are not kept
            return self._length
        return self._length + 3 + self._recorded

    def _refused(self, act: WorkflowActivation) -> str:
        """Why `act` must not run (see the module's docstring), or ''."""
        if not self._length or act.is_replaying or act.history_length == self._length:
            return ""
        if (act.history_size_bytes and act.history_size_bytes == self._size
                and act.timestamp.ToNanoseconds() == self._time):
            self._ran_for_a_query = True  # it runs: failing it now makes Core lose a task
            return ""
        if self._ran_for_a_query:
            return "a query ran history events before this task"
        if not self._replayed and act.history_length < self._earliest_next():
            return "commands of the task before were not recorded"
        return ""

    def activate(self, act: WorkflowActivation) -> WorkflowActivationCompletion:
        if _only_queries(act):
            return self._inner.activate(act)
        refused = self._refused(act)
        if refused:
            log.warning("workflow %s: activation at history event %d refused (%s); the "
                        "workflow is run again from its whole history",
                        self._inner.get_info().workflow_id, act.history_length, refused)
            completion = WorkflowActivationCompletion(run_id=act.run_id)
            completion.failed.failure.message = TASK_RETRY_MESSAGE
            return completion
        if act.history_length != self._length:
            self._length, self._recorded, self._speculative = act.history_length, 0, True
            self._replayed = act.is_replaying
            if not self._ran_for_a_query:  # a query's activation repeats the task before
                self._size, self._time = act.history_size_bytes, act.timestamp.ToNanoseconds()
        completion = self._inner.activate(act)
        recorded = recorded_events(completion)
        self._recorded += recorded
        if recorded or not (completion.HasField("successful") and all(
                c.WhichOneof("variant") == "update_response"
                for c in completion.successful.commands) and completion.successful.commands):
            self._speculative = False
        return completion


#: The SDK's flags this runner turns on for new workflow tasks (see above); the SDK
#: leaves them off by default until its older releases, which cannot replay them, age.
LOGIC_FLAGS = frozenset({_WorkflowLogicFlag.PROCESS_WORKFLOW_ACTIVATION_JOBS_AS_SINGLE_BATCH})


class QueryGuardRunner(WrappingRunner):
    """SandboxedWorkflowRunner whose instances undo what a query ran and take an
    activation's jobs in one batch (see above)."""

    def create_instance(self, det: WorkflowInstanceDetails) -> WorkflowInstance:
        return super().create_instance(dataclasses.replace(
            det, default_workflow_logic_flags=det.default_workflow_logic_flags | LOGIC_FLAGS))

    def wrap(self, instance: WorkflowInstance) -> WorkflowInstance:
        return _Guarded(instance)
