"""Faults a user would otherwise pay for: crashes, outages, a misbehaving LLM
endpoint, a flood of bad signals, runaway agent commands. Everything real: a
Temporal dev server (file-backed), an embedded Postgres, makima worker
PROCESSES (`python worker.py`) killed with SIGKILL, the `shell` executor in
real git worktrees, the real `anthropic` client against the loopback Messages
API.

Each test proves that the directive still ends as it should and that nothing
was lost or written twice (the rows in Postgres agree with the workflow's
final `status`, event sequences have no gaps). They are slow (a killed agent
is noticed only after AGENT_HEARTBEAT_TIMEOUT, 60 s), so they carry the
`faults` marker and run with `make test-faults`, not `make test`.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from temporalio.api.enums.v1 import EventType as HistoryEventType
from temporalio.api.enums.v1 import WorkflowTaskFailedCause
from temporalio.client import (
    Client,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.exceptions import ApplicationError

from makima.connection import connect_temporal
from makima.constants import PLAN_RETRY_POLICY
from makima.contracts import EventType
from makima.models import ApprovalDecision, DirectiveSnapshot, DirectiveSpec, DirectiveStatus
from makima.store.embedded import EmbeddedPostgres, start_embedded, stop_embedded
from makima.store.pool import create_pool
from makima.store.reads import directive_state, snapshot_differences
from tests.fakes.repos import IDENTITY, make_repo, set_identity
from tests.messages_server import MessagesServer, ReceivedRequest, Reply, error_reply, tool_reply
from tests.stack_fixture import (
    DevServer,
    WorkerProcess,
    ephemeral_port,
    free_port,
)
from workflows.directive import DirectiveWorkflow

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

MAX_PAYLOAD_BYTES = 256 * 1024


# --------------------------------------------------------------------------- the stack


@dataclass
class Stack:
    server: DevServer
    home: Path
    postgres: EmbeddedPostgres
    client: Client
    pool: asyncpg.Pool

    async def restart_postgres(self, down_seconds: float) -> None:
        stop_embedded(self.postgres.pid)
        await asyncio.sleep(down_seconds)
        self.postgres = await start_embedded(self.home)


@pytest.fixture(scope="module")
async def stack() -> AsyncIterator[Stack]:
    # short paths: the Postgres socket lives in its data folder (about 100 bytes max)
    home = Path(tempfile.mkdtemp(prefix="mk-faults-"))
    server = DevServer(home / "temporal")
    postgres: EmbeddedPostgres | None = None
    pool: asyncpg.Pool | None = None
    try:
        server.start()
        postgres = await start_embedded(home)
        conn = await asyncpg.connect(postgres.url)
        try:  # a throwaway database: durability only costs time here
            await conn.execute("ALTER SYSTEM SET fsync = off")
            await conn.execute("ALTER SYSTEM SET synchronous_commit = off")
            await conn.execute("SELECT pg_reload_conf()")
        finally:
            await conn.close()
        pool = await create_pool(postgres.url, min_size=1, max_size=4)
        client = await connect_temporal(server.address)
        stack = Stack(server, home, postgres, client, pool)
        yield stack
        postgres = stack.postgres
    finally:
        if pool is not None:
            await pool.close()
        server.stop()
        if postgres is not None:
            with contextlib.suppress(Exception):
                stop_embedded(postgres.pid)
        from makima.store.embedded import running_embedded

        leftover = running_embedded(home)
        if leftover is not None:
            stop_embedded(leftover)
        shutil.rmtree(home, ignore_errors=True)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                          text=True).stdout


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    set_identity(monkeypatch)
    return make_repo(tmp_path / "repo", {"README.md": "demo\n"})


class Workers:
    """Worker processes of one test, all on its own task queue; stopped at the end."""

    def __init__(self, stack: Stack, folder: Path, **env: str) -> None:
        self.queue = f"faults-{uuid.uuid4().hex[:8]}"
        self.folder = folder
        self.env = {
            "TEMPORAL_ADDRESS": stack.server.address,
            "MAKIMA_TASK_QUEUE": self.queue,
            "DATABASE_URL": stack.postgres.url,
            "MAKIMA_HOME": str(folder / "home"),
            "MAKIMA_AUTO_CHECKS": "0",
            "ANTHROPIC_API_KEY": "",
            # These tests steer and count agent commands through files outside the
            # worktree and by pid, which the sandbox forbids (tests/test_sandbox.py
            # proves that); they test crashes, so they run unconfined. A root worker
            # then needs a permission mode Claude Code accepts for root.
            "MAKIMA_SANDBOX": "off",
            "MAKIMA_CLAUDE_PERMISSION_MODE": "acceptEdits",
            **IDENTITY,
            **env,
        }
        self.started: list[WorkerProcess] = []

    def start(self, wrapper: Sequence[str] = (), **env: str) -> WorkerProcess:
        """One more worker: the group's environment with `env` on top, its command
        behind `wrapper` (see WorkerProcess)."""
        worker = WorkerProcess(self.folder / f"worker-{len(self.started)}.log",
                               {**self.env, **env}, wrapper).start()
        self.started.append(worker)
        return worker

    def stop_all(self) -> None:
        for worker in self.started:
            worker.stop()

    def logs(self) -> str:
        return "\n".join(w.log()[-3000:] for w in self.started)


@pytest.fixture
def workers_of(tmp_path: Path) -> Iterator[Any]:
    made: list[Workers] = []

    def make(stack: Stack, **env: str) -> Workers:
        group = Workers(stack, tmp_path, **env)
        made.append(group)
        return group

    try:
        yield make
    finally:
        for group in made:
            group.stop_all()


# --------------------------------------------------------------------------- helpers


def gated_command(count: Path, go: Path, output: str = "out.txt") -> str:
    """Appends its pid (one line per execution) and waits for the test's go file."""
    return (f'echo $$ >> {count}; while [ ! -f {go} ]; do sleep 0.1; done; '
            f'echo done > {output}')


def spec_with(repo: Path, steps: list[dict[str, Any]], **extra: Any) -> DirectiveSpec:
    return DirectiveSpec.model_validate({
        "title": "fault", "goal": "survive faults", "executor": "shell",
        "autonomy": "full_auto", "repository": {"path": str(repo)},
        "plan": {"steps": steps}, **extra})


async def start(stack: Stack, queue: str, spec: DirectiveSpec) -> WorkflowHandle[Any, Any]:
    return await stack.client.start_workflow(
        DirectiveWorkflow.run, spec, id=f"directive-fault-{uuid.uuid4().hex[:8]}",
        task_queue=queue, execution_timeout=timedelta(minutes=30))


async def wait_for(predicate: Any, timeout: float, what: str, logs: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached in {timeout} s\n{logs() if logs else ''}")
        await asyncio.sleep(0.1)


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


async def result_of(handle: WorkflowHandle[Any, Any], timeout: float,
                    workers: Workers) -> DirectiveSnapshot:
    try:
        return await asyncio.wait_for(handle.result(), timeout)
    except TimeoutError:
        raise AssertionError(f"directive did not finish in {timeout} s\n{workers.logs()}") from None


async def histories(client: Client, handle: WorkflowHandle[Any, Any]) -> dict[str, Any]:
    """The directive's history and every step child's, by workflow id."""
    out = {handle.id: await handle.fetch_history()}
    for event in out[handle.id].events:
        if event.HasField("child_workflow_execution_started_event_attributes"):
            child = event.child_workflow_execution_started_event_attributes.workflow_execution
            out[child.workflow_id] = await client.get_workflow_handle(
                child.workflow_id, run_id=child.run_id).fetch_history()
    return out


def started_attempts(history: Any, activity_type: str) -> list[int]:
    """The attempt number each run of an activity of this type ended on."""
    names = {e.event_id: e.activity_task_scheduled_event_attributes.activity_type.name
             for e in history.events if e.HasField("activity_task_scheduled_event_attributes")}
    return [e.activity_task_started_event_attributes.attempt for e in history.events
            if e.HasField("activity_task_started_event_attributes")
            and names[e.activity_task_started_event_attributes.scheduled_event_id]
            == activity_type]


def largest_event_bytes(all_histories: dict[str, Any]) -> int:
    """The largest single history event: an upper bound on any payload in it."""
    return max(e.ByteSize() for h in all_histories.values() for e in h.events)


async def assert_rows_complete(pool: asyncpg.Pool, snapshot: DirectiveSnapshot) -> None:
    """The read model agrees with the final status, and every workflow's events are
    there exactly once, numbered 1..n without a gap."""
    state = await directive_state(pool, snapshot.directive_id)
    assert snapshot_differences(state, snapshot) == []
    rows = await pool.fetch(
        "SELECT source, array_agg(seq ORDER BY seq) AS seqs FROM events "
        "WHERE directive_id = $1 GROUP BY source", snapshot.directive_id)
    assert rows, "no events were recorded"
    for row in rows:
        assert row["seqs"] == list(range(1, len(row["seqs"]) + 1)), f"gap in {row['source']}"


async def wait_for_child_completed(client: Client, handle: WorkflowHandle[Any, Any],
                                   child_id: str, timeout: float) -> None:
    """Poll the directive's history (no worker needed) until `child_id` completed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        history = await handle.fetch_history()
        if any(e.HasField("child_workflow_execution_completed_event_attributes")
               and e.child_workflow_execution_completed_event_attributes.workflow_execution
               .workflow_id == child_id for e in history.events):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{child_id} did not complete in {timeout} s")


def process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# --------------------------------------------------------------------------- 1, 2: worker crashes


async def test_worker_killed_during_an_agent_command_retries_the_attempt_once(
        stack: Stack, repo: Path, tmp_path: Path, workers_of: Any) -> None:
    workers = workers_of(stack)
    count, go = tmp_path / "count", tmp_path / "go"
    first = workers.start()
    spec = spec_with(repo, [
        {"name": "slow", "command": gated_command(count, go), "verify": ["test -f out.txt"]},
        {"name": "after", "depends_on": ["slow"], "command": "cp out.txt copy.txt"},
    ])
    handle = await start(stack, workers.queue, spec)
    await wait_for(lambda: len(lines(count)) == 1, 60, "the agent command started", workers.logs)

    agent = int(lines(count)[0])
    first.kill()
    # the agent dies with its worker (nobody else kills it): no orphan writes into
    # a worktree that a retry could merge
    await wait_for(lambda: not process_alive(agent), 10,
                   "the killed worker's agent still runs 10 s later", workers.logs)
    workers.start()
    # the retry comes after AGENT_HEARTBEAT_TIMEOUT (60 s) plus the retry interval
    await wait_for(lambda: len(lines(count)) == 2, 150, "the attempt was retried", workers.logs)
    go.touch()
    result = await result_of(handle, 90, workers)

    assert result.status is DirectiveStatus.COMPLETED
    assert len(lines(count)) == 2, "the agent command ran once more, not more"
    assert [(s.name, s.status.value, s.attempts) for s in result.steps] == [
        ("slow", "passed", 1), ("after", "passed", 1)]
    assert git(repo, "show", f"{result.integration_branch}:copy.txt") == "done\n"
    # the same attempt, run by Temporal a second time: one row per attempt and evaluation
    for table in ("attempts", "evaluations"):
        rows = await stack.pool.fetch(
            f"SELECT step, attempt FROM {table} WHERE directive_id = $1 ORDER BY step",
            handle.id)
        assert [(r["step"], r["attempt"]) for r in rows] == [("after", 1), ("slow", 1)], table
    started = await stack.pool.fetchval(
        "SELECT count(*) FROM events WHERE directive_id = $1 AND type = $2 AND step = 'slow'",
        handle.id, EventType.ATTEMPT_STARTED.value)
    assert started == 1
    await assert_rows_complete(stack.pool, result)
    # Temporal's own record: execute_step of `slow` completed on its second attempt
    step_history = (await histories(stack.client, handle))[f"{handle.id}/g1/slow"]
    assert started_attempts(step_history, "execute_step") == [2]


async def test_sigterm_cancels_running_agents_within_the_graceful_time_and_says_so(
        stack: Stack, repo: Path, tmp_path: Path, workers_of: Any) -> None:
    workers = workers_of(stack)
    count, go = tmp_path / "count", tmp_path / "go"
    worker = workers.start()
    await start(stack, workers.queue, spec_with(repo, [
        {"name": "slow", "command": gated_command(count, go)}]))
    await wait_for(lambda: len(lines(count)) == 1, 60, "the agent command started", workers.logs)
    agent = int(lines(count)[0])

    stopped_at = time.monotonic()
    worker.stop()  # SIGTERM; the worker was started with --graceful-seconds 2

    assert not process_alive(agent), "the agent outlived its stopped worker"
    assert time.monotonic() - stopped_at < 2 + 10
    log = worker.log()
    assert "stopping; running activities may finish for 2 s" in log
    assert "graceful time (2 s) is over; cancelling running agents" in log


async def test_worker_killed_between_steps_starts_no_child_twice(
        stack: Stack, repo: Path, tmp_path: Path, workers_of: Any) -> None:
    workers = workers_of(stack)
    names = ["one", "two", "three", "four"]
    steps = [{"name": name, "command": f"echo {name} >> {tmp_path / 'ran'}; echo {name} > {name}.txt",
              "depends_on": [names[i - 1]] if i else []} for i, name in enumerate(names)]
    worker = workers.start()
    handle = await start(stack, workers.queue, spec_with(repo, steps))
    for name in names[:-1]:
        # the moment a step's child workflow returns, the directive's next workflow task
        # decides and starts the next one: kill the worker right there (no activity of
        # the step runs any more; a kill during merge_step, which has no heartbeat, would
        # stall until its 10-minute GIT_TIMEOUT)
        await wait_for_child_completed(stack.client, handle, f"{handle.id}/g1/{name}", 120)
        worker.kill()
        worker = workers.start()
    result = await result_of(handle, 240, workers)

    assert result.status is DirectiveStatus.COMPLETED
    assert [s.status.value for s in result.steps] == ["passed"] * 4
    directive_history = (await histories(stack.client, handle))[handle.id]
    initiated = [e.start_child_workflow_execution_initiated_event_attributes.workflow_id
                 for e in directive_history.events
                 if e.HasField("start_child_workflow_execution_initiated_event_attributes")]
    assert sorted(initiated) == sorted(f"{handle.id}/g1/{n}" for n in names)
    started = [e for e in directive_history.events
               if e.HasField("child_workflow_execution_started_event_attributes")]
    assert len(started) == len(names)
    await assert_rows_complete(stack.pool, result)


# --------------------------------------------------------------------------- starting order


async def test_a_worker_started_before_its_temporal_server_waits_for_it(
        stack: Stack, repo: Path, tmp_path: Path, workers_of: Any) -> None:
    # its port: nobody listens there yet (and outside the range the worker's own
    # connection attempts take source ports from)
    server = DevServer(tmp_path / "late-temporal", port=free_port())
    workers = workers_of(stack, TEMPORAL_ADDRESS=server.address)
    worker = workers.start()
    try:
        await wait_for(lambda: "is not ready" in worker.log(), 60,
                       "the worker said it waits for Temporal", workers.logs)
        assert worker.alive(), worker.log()
        await asyncio.to_thread(server.start)
        client = await connect_temporal(server.address)
        handle = await client.start_workflow(
            DirectiveWorkflow.run, spec_with(repo, [{"name": "hello", "command": "echo hi > hi.txt"}]),
            id=f"directive-late-{uuid.uuid4().hex[:8]}", task_queue=workers.queue,
            execution_timeout=timedelta(minutes=5))
        result = await result_of(handle, 120, workers)
    finally:
        worker.stop()
        await asyncio.to_thread(server.stop)

    assert result.status is DirectiveStatus.COMPLETED
    waiting = [line for line in worker.log().splitlines() if "is not ready" in line]
    assert f"Temporal at {server.address} is not ready" in waiting[0]
    assert "retrying for up to" in waiting[0]


async def test_a_worker_gives_up_on_a_temporal_server_that_never_answers(
        stack: Stack, workers_of: Any) -> None:
    address = f"127.0.0.1:{ephemeral_port()}"
    workers = workers_of(stack, TEMPORAL_ADDRESS=address, MAKIMA_TEMPORAL_WAIT_SECONDS="3")
    worker = workers.start()
    assert worker.process is not None
    code = await asyncio.to_thread(worker.process.wait, 60)

    assert code == 2
    assert (f"makima worker: cannot start: Temporal at {address} did not answer within 3 s "
            "(MAKIMA_TEMPORAL_WAIT_SECONDS)") in worker.log()


# --------------------------------------------------------------------------- 3, 4: outages


async def test_temporal_server_restart_mid_directive_completes(
        stack: Stack, repo: Path, tmp_path: Path, workers_of: Any) -> None:
    workers = workers_of(stack)
    count, go = tmp_path / "count", tmp_path / "go"
    workers.start()
    handle = await start(stack, workers.queue, spec_with(repo, [
        {"name": "slow", "command": gated_command(count, go)},
        {"name": "after", "depends_on": ["slow"], "command": "echo after > after.txt"},
    ]))
    await wait_for(lambda: len(lines(count)) == 1, 60, "the agent command started", workers.logs)

    stack.server.stop()
    await asyncio.sleep(3)
    go.touch()  # the agent finishes while Temporal is down
    await asyncio.sleep(2)
    stack.server.start()
    result = await result_of(handle, 180, workers)

    assert result.status is DirectiveStatus.COMPLETED
    assert [s.status.value for s in result.steps] == ["passed", "passed"]
    assert git(repo, "show", f"{result.integration_branch}:after.txt") == "after\n"
    # the agent finished while the server was down: a lost report is adopted, not redone
    assert len(lines(count)) == 1, "the finished agent ran again"
    await assert_rows_complete(stack.pool, result)


async def test_postgres_outage_mid_directive_loses_no_event(
        stack: Stack, repo: Path, tmp_path: Path, workers_of: Any) -> None:
    workers = workers_of(stack)
    count, go = tmp_path / "count", tmp_path / "go"
    workers.start()
    handle = await start(stack, workers.queue, spec_with(repo, [
        {"name": "slow", "command": gated_command(count, go)},
        {"name": "after", "depends_on": ["slow"], "command": "echo after > after.txt"},
    ]))
    await wait_for(lambda: len(lines(count)) == 1, 60, "the agent command started", workers.logs)

    stop_embedded(stack.postgres.pid)
    try:
        go.touch()
        # the agent finishes while the database is down: a step returns only once its
        # events are written, so the directive waits (record_events retries) and resumes
        await asyncio.sleep(30)
        description = await handle.describe()
        assert description.status is not None and description.status.name == "RUNNING"
    finally:
        stack.postgres = await start_embedded(stack.home)
    result = await result_of(handle, 90, workers)

    assert result.status is DirectiveStatus.COMPLETED
    await assert_rows_complete(stack.pool, result)
    all_histories = await histories(stack.client, handle)
    record_attempts = [
        e.activity_task_started_event_attributes.attempt
        for h in all_histories.values() for e in h.events
        if e.HasField("activity_task_started_event_attributes")
        and e.activity_task_started_event_attributes.attempt > 1]
    assert record_attempts, "some record_events activity had to be retried"


# --------------------------------------------------------------------------- 5: the LLM endpoint


def timed(reply: Reply, at: list[float]) -> Any:
    def respond(_: ReceivedRequest) -> Reply:
        at.append(time.monotonic())
        return reply
    return respond


PLAN = tool_reply("submit_plan", {"summary": "one step", "steps": [
    {"name": "hello", "description": "say hello", "task_plan": "write hello.txt",
     "command": "echo hello > hello.txt", "depends_on": []}]})


async def test_llm_rate_limits_and_overload_are_retried_within_the_policy(
        stack: Stack, repo: Path, workers_of: Any) -> None:
    at: list[float] = []
    with MessagesServer() as llm:
        llm.script(timed(error_reply(429, "slow down", headers={"retry-after": "3"}), at),
                   timed(error_reply(529, "overloaded"), at),
                   timed(error_reply(500, "boom"), at),
                   timed(PLAN, at))
        workers = workers_of(stack, ANTHROPIC_API_KEY="test-key",
                             ANTHROPIC_BASE_URL=llm.base_url)
        workers.start()
        handle = await start(stack, workers.queue, DirectiveSpec.model_validate({
            "title": "llm faults", "goal": "write hello.txt", "executor": "shell",
            "evaluator": "programmatic", "autonomy": "full_auto",
            "repository": {"path": str(repo)}}))
        result = await result_of(handle, 120, workers)

    assert result.status is DirectiveStatus.COMPLETED
    assert len(llm.requests) == 4 <= PLAN_RETRY_POLICY.maximum_attempts
    assert at[1] - at[0] >= 3.0, "the attempt after a 429 waits for its retry-after"
    assert started_attempts(await handle.fetch_history(), "plan_directive") == [4]


async def test_llm_bad_request_is_one_call_and_fails_with_its_message(
        stack: Stack, repo: Path, workers_of: Any) -> None:
    with MessagesServer() as llm:
        llm.script(error_reply(400, "prompt is too long: 999999 tokens > 200000 maximum"),
                   PLAN, PLAN)
        workers = workers_of(stack, ANTHROPIC_API_KEY="test-key",
                             ANTHROPIC_BASE_URL=llm.base_url)
        workers.start()
        handle = await start(stack, workers.queue, DirectiveSpec.model_validate({
            "title": "llm 400", "goal": "write hello.txt", "executor": "shell",
            "repository": {"path": str(repo)}}))
        with pytest.raises(WorkflowFailureError) as failure:
            await asyncio.wait_for(handle.result(), 60)

    assert len(llm.requests) == 1
    cause = failure.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "DirectiveFailed"
    assert "planning failed" in cause.message and "prompt is too long" in cause.message
    history = await handle.fetch_history()
    failed = [e.activity_task_failed_event_attributes.failure for e in history.events
              if e.HasField("activity_task_failed_event_attributes")]
    assert len(failed) == 1 and failed[0].application_failure_info.non_retryable


# --------------------------------------------------------------------------- 6: a flood of signals


async def test_a_thousand_bad_approvals_change_nothing(
        stack: Stack, repo: Path, tmp_path: Path, workers_of: Any) -> None:
    workers = workers_of(stack)
    count, go = tmp_path / "count", tmp_path / "go"
    workers.start()
    handle = await start(stack, workers.queue, spec_with(repo, [
        {"name": "done", "command": "echo done > done.txt"},
        {"name": "gate", "depends_on": ["done"], "command": gated_command(count, go)},
    ]))
    await wait_for(lambda: len(lines(count)) == 1, 60, "the gated step started", workers.logs)
    before = await handle.query(DirectiveWorkflow.status)

    started = time.monotonic()
    decisions = [ApprovalDecision(step="ghost" if i % 2 else "done", by=f"u{i}")
                 for i in range(1000)]
    for chunk in range(0, 1000, 100):
        await asyncio.gather(*(handle.signal(DirectiveWorkflow.approve, d)
                               for d in decisions[chunk:chunk + 100]))
    sent_in = time.monotonic() - started
    assert sent_in < 10, f"1000 signals took {sent_in:.1f} s to send"
    rejections = []
    for decision in decisions[:20]:
        with pytest.raises(WorkflowUpdateFailedError) as rejected:
            await handle.execute_update(DirectiveWorkflow.approve_step, decision)
        rejections.append(rejected.value.cause)
    after = await handle.query(DirectiveWorkflow.status)
    go.touch()
    result = await result_of(handle, 60, workers)

    assert all(isinstance(r, ApplicationError) and r.type == "Rejected" for r in rejections)
    assert "unknown step 'ghost'" in rejections[1].message
    assert "nothing is pending approval" in rejections[0].message
    assert [(s.name, s.status) for s in after.steps] == [(s.name, s.status) for s in before.steps]
    assert after.pending_approvals == []
    assert result.status is DirectiveStatus.COMPLETED
    history = await handle.fetch_history()
    approvals = [e for e in history.events
                 if e.HasField("workflow_execution_signaled_event_attributes")
                 and e.workflow_execution_signaled_event_attributes.signal_name == "approve"]
    assert len(approvals) == 1000
    # Under a flood the server itself may close a workflow task to flush the signals
    # it buffered meanwhile (FORCE_CLOSE_COMMAND, past its buffered-events limit of
    # 100) or turn a completion down because new signals arrived (UNHANDLED_COMMAND);
    # either way it hands out a new task at once. Neither is workflow code failing,
    # which would show as WORKFLOW_WORKER_UNHANDLED_FAILURE with a message.
    task_failures = [
        (WorkflowTaskFailedCause.Name(e.workflow_task_failed_event_attributes.cause),
         e.workflow_task_failed_event_attributes.failure.message)
        for e in history.events
        if e.event_type == HistoryEventType.EVENT_TYPE_WORKFLOW_TASK_FAILED]
    assert {cause for cause, _ in task_failures} <= {
        "WORKFLOW_TASK_FAILED_CAUSE_UNHANDLED_COMMAND",
        "WORKFLOW_TASK_FAILED_CAUSE_FORCE_CLOSE_COMMAND"}, task_failures
    decided = await stack.pool.fetchval(
        "SELECT count(*) FROM events WHERE directive_id = $1 AND type = $2",
        handle.id, EventType.APPROVAL_DECIDED.value)
    assert decided == 0
    await assert_rows_complete(stack.pool, result)


# --------------------------------------------------------------------------- 7: runaway commands


async def test_runaway_commands_are_bounded_and_no_big_payload_reaches_temporal(
        stack: Stack, repo: Path, tmp_path: Path, workers_of: Any) -> None:
    workers = workers_of(stack, MAKIMA_STEP_TIMEOUT_SECONDS="6")
    workers.start()
    loud = spec_with(repo, [
        {"name": "loud", "command": "head -c 52428800 /dev/zero | tr '\\0' x; echo; echo ok > loud.txt"},
        {"name": "forever", "command": "sleep 100000"},
    ], budgets={"max_rework_cycles": 0})
    loud_handle = await start(stack, workers.queue, loud)
    pids = tmp_path / "pids"
    forker = spec_with(repo, [{"name": "forker", "command": (
        f"for i in 1 2 3; do sleep 1000 & echo $! >> {pids}; done; wait")}])
    forker_handle = await start(stack, workers.queue, forker)
    await wait_for(lambda: len(lines(pids)) == 3, 60, "the children were forked", workers.logs)
    children = [int(p) for p in lines(pids)]
    await forker_handle.execute_update(DirectiveWorkflow.stop_directive)
    stopped = await result_of(forker_handle, 60, workers)

    def all_gone() -> bool:
        return not any(Path(f"/proc/{pid}").exists() and "sleep" in _cmdline(pid)
                       for pid in children)
    await wait_for(all_gone, 15, "every forked child was killed")
    assert stopped.status is DirectiveStatus.STOPPED

    with pytest.raises(WorkflowFailureError) as failure:
        await asyncio.wait_for(loud_handle.result(), 120)
    assert isinstance(failure.value.cause, ApplicationError)
    assert "forever" in failure.value.cause.message
    snapshot = await loud_handle.query(DirectiveWorkflow.status)
    by_name = {s.name: s for s in snapshot.steps}
    assert by_name["loud"].status.value == "passed"
    assert by_name["forever"].status.value == "blocked"
    attempt = await stack.pool.fetchrow(
        "SELECT * FROM attempts WHERE directive_id = $1 AND step = 'forever'", loud_handle.id)
    assert attempt is not None and "timed out after 6 s" in str(dict(attempt))

    largest = 0
    for handle in (loud_handle, forker_handle):
        largest = max(largest, largest_event_bytes(await histories(stack.client, handle)))
    assert largest < MAX_PAYLOAD_BYTES, f"a history event of {largest} bytes"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return ""
