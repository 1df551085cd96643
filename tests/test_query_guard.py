"""The worker's query guard (makima/query_guard.py): a workflow task that comes after
a query ran new history events is failed, so that it runs from the whole history;
nothing else is. The activations here are Core's protos, fed to the guard around a
recording stand-in for the SDK's workflow instance. The race itself, on a real dev
server with a restarted worker, is tests/test_restart_queries.py (faults suite).
"""

from __future__ import annotations

from typing import Any

from temporalio.bridge.proto.workflow_activation import WorkflowActivation
from temporalio.bridge.proto.workflow_completion import WorkflowActivationCompletion

from makima.query_guard import TASK_RETRY_MESSAGE, _Guarded


class Recorder:
    """Answers each activation with the commands it is told to."""

    def __init__(self) -> None:
        self.seen: list[int] = []
        self.commands: list[str | tuple[str, int]] = []
        self.rejects = False

    def activate(self, act: WorkflowActivation) -> WorkflowActivationCompletion:
        self.seen.append(act.history_length)
        completion = WorkflowActivationCompletion(run_id=act.run_id)
        completion.successful.SetInParent()
        for kind in self.commands:  # a name, or (name, seq)
            kind, seq = kind if isinstance(kind, tuple) else (kind, None)
            command = getattr(completion.successful.commands.add(), kind)
            command.SetInParent()
            if seq is not None:
                command.seq = seq
        if self.rejects:
            completion.successful.commands.add().update_response.rejected.message = "no"
        return completion

    def get_info(self) -> Any:
        class Info:
            workflow_id = "directive-1"
        return Info()


def activation(length: int, *jobs: str, replaying: bool = False, size: int = 0,
               time: int = 0) -> WorkflowActivation:
    """Sizes and times as the dev server records them; 0 (none) by default, as the
    time-skipping test server does."""
    act = WorkflowActivation(run_id="run", history_length=length, is_replaying=replaying,
                             history_size_bytes=size)
    act.timestamp.FromNanoseconds(time or length * 10**9)
    for job in jobs or ("resolve_activity",):
        getattr(act.jobs.add(), job).SetInParent()
    return act


def run(guard: _Guarded, act: WorkflowActivation) -> WorkflowActivationCompletion:
    return guard.activate(act)


def failed(completion: WorkflowActivationCompletion) -> bool:
    return completion.HasField("failed") and completion.failed.failure.message == TASK_RETRY_MESSAGE


def test_tasks_that_follow_each_other_run() -> None:
    inner = Recorder()
    guard = _Guarded(inner)
    inner.commands = ["schedule_activity"]
    assert not failed(run(guard, activation(3, "initialize_workflow")))
    # completed (4), activity scheduled (5), its result (6..7), scheduled (8), started (9)
    inner.commands = []
    assert not failed(run(guard, activation(9)))
    # a second activation of the same task, then a query: both run
    assert not failed(run(guard, activation(9, "fire_timer")))
    assert not failed(run(guard, activation(9, "query_workflow")))
    # completed (10), scheduled (11), started (12): nothing was commanded
    assert not failed(run(guard, activation(12, "signal_workflow")))
    assert inner.seen == [3, 9, 9, 9, 12]


def test_the_task_after_a_query_that_ran_new_events_is_failed_before_the_workflow_sees_it() -> None:
    # the fuzz canary: right after a restart the workflow replays up to its task at 4
    # for a query whose history also holds an activity's result (20) and the next task,
    # scheduled (21): that activation repeats task 4's time and size; it runs, and
    # its command is never recorded; the real task starts at 22 with an update
    inner = Recorder()
    guard = _Guarded(inner)
    inner.commands = ["set_patch_marker", "schedule_activity"]
    run(guard, activation(4, "initialize_workflow", replaying=True, size=1108, time=7))
    inner.commands = ["schedule_activity"]
    assert not failed(run(guard, activation(21, size=1108, time=7)))
    run(guard, activation(21, "query_workflow", size=1108, time=7))
    assert failed(run(guard, activation(22, "do_update", size=4214, time=8)))
    assert inner.seen == [4, 21, 21]
    # after Core evicted it, the task's next attempt runs from the whole history
    guard = _Guarded(inner)
    run(guard, activation(4, "initialize_workflow", replaying=True, size=1108, time=7))
    assert not failed(run(guard, activation(25, "do_update", size=4400, time=9)))


def test_a_query_that_read_a_started_task_is_caught_too() -> None:
    # the query's history ended with the real task's WorkflowTaskStarted (22): the
    # task then timed out or failed (23, 24, started 25) with the query's commands kept
    inner = Recorder()
    guard = _Guarded(inner)
    run(guard, activation(4, "initialize_workflow", replaying=True))
    inner.commands = ["schedule_activity"]
    run(guard, activation(22))
    assert failed(run(guard, activation(25, "do_update")))


def test_replay_never_fails_and_an_update_rejected_in_a_vanished_task_is_no_sign() -> None:
    inner = Recorder()
    guard = _Guarded(inner)
    run(guard, activation(3, "initialize_workflow", replaying=True))
    assert not failed(run(guard, activation(4, replaying=True)))
    # a speculative task for an update that is rejected leaves no events: the next
    # real task may start at the same number, or right after the events that came
    inner.rejects = True
    assert not failed(run(guard, activation(9, "do_update")))
    inner.rejects = False
    assert not failed(run(guard, activation(10)))


def test_a_timer_started_and_cancelled_in_one_task_is_not_counted() -> None:
    # the directive's main loop at two turns in one activation, after its wall-time
    # timer (1) fired: cancel 1 (fired: nothing recorded), schedule an activity, start
    # timer 2, cancel it (never sent), start timer 3: two events, not five. The next
    # task then starts at 64 + completed + 2 + scheduled + started = 69 (fuzz seed
    # 904481: this task was failed, its update refused once, for nothing)
    inner = Recorder()
    guard = _Guarded(inner)
    inner.commands = [("cancel_timer", 1), ("schedule_activity", 7), ("start_timer", 2),
                      ("cancel_timer", 2), ("start_timer", 3)]
    run(guard, activation(64, "signal_workflow", "fire_timer"))
    inner.commands = []
    assert not failed(run(guard, activation(69, "do_update")))
    # one event fewer is still a task whose commands were not all recorded
    guard = _Guarded(inner)
    inner.commands = [("schedule_activity", 7), ("start_timer", 3)]
    run(guard, activation(64, "signal_workflow"))
    assert failed(run(guard, activation(68, "do_update")))


def test_a_task_after_a_replayed_one_is_not_counted_against_it() -> None:
    # a restarted worker replays the workflow up to its task at 46 (nothing scheduled,
    # all of it in the history), and the next task, an update's, reports 48: fewer
    # events than a task after a live one could follow, but no command of a replayed
    # task can be lost (fuzz seed 232483: the pause was refused once, for nothing)
    inner = Recorder()
    guard = _Guarded(inner)
    run(guard, activation(3, "initialize_workflow", replaying=True))
    run(guard, activation(46, replaying=True))
    assert not failed(run(guard, activation(48, "do_update")))
