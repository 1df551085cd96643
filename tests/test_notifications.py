"""Notifications against receivers on loopback: a whole directive (real
activities, the Temporal test server, the embedded Postgres, real git) posts
"approval requested" and "completed" to two receivers, one of them down for its
first two requests; each receiver takes each notification exactly once. A
record batch delivered twice (an activity retry) notifies once; a failed
directive and a tripped breaker say why. Webhook URLs never reach history.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import asyncpg
import pytest
from temporalio.client import Client
from temporalio.testing import ActivityEnvironment

from activities.evaluation import EvaluationActivities
from activities.execution import ExecutionActivities
from activities.notify import NotifyActivities
from activities.planning import PlanningActivities
from activities.record import RecordActivities
from makima.contracts import EventType, RecordInput
from makima.models import ApprovalDecision, DirectiveSpec, DirectiveStatus, UpdateAnswer
from makima.notify import workflow_id_for
from makima.review import NOTHING_VERIFIED
from tests.fakes.repos import make_repo, set_identity
from tests.postgres_fixture import (  # noqa: F401 (fixtures)
    Emitter,
    directive_status,
    pg_pool,
    postgres,
    started,
)
from tests.standins import start
from worker import build_worker


class Receiver:
    """An HTTP server on loopback that records every POST; `down[path]` requests
    to that path are answered 503 first."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, int, dict]] = []  # (path, status answered, body)
        self.down: dict[str, int] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status = 200
                if receiver.down.get(self.path, 0) > 0:
                    receiver.down[self.path] -= 1
                    status = 503
                receiver.requests.append((self.path, status, body))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def taken(self, path: str) -> list[dict]:
        return [body for p, status, body in self.requests if p == path and status == 200]

    async def wait_for(self, path: str, kind: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            found = [b for b in self.taken(path) if b["kind"] == kind]
            if found:
                return found[0]
            assert time.monotonic() < deadline, f"no {kind} at {path}: {self.requests}"
            await asyncio.sleep(0.1)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def notify_env(receiver: Receiver, task_queue: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAKIMA_NOTIFY_URL", f"{receiver.url}/hook-a?token=s3cret "
                                            f"{receiver.url}/hook-b")
    monkeypatch.setenv("MAKIMA_CONSOLE_URL", "http://console.example")
    monkeypatch.setenv("MAKIMA_TASK_QUEUE", task_queue)


def activities(pool: asyncpg.Pool) -> list:
    return [*PlanningActivities(None).activities(), *EvaluationActivities(None).activities(),
            *ExecutionActivities().activities(), *RecordActivities(pool).activities(),
            *NotifyActivities().activities()]


async def test_a_directive_notifies_each_receiver_once_and_retries_one_that_is_down(
        client: Client, task_queue: str, receiver: Receiver, notify_env: None,
        pg_pool: asyncpg.Pool, tmp_path: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("MAKIMA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MAKIMA_AUTO_CHECKS", "0")
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    set_identity(monkeypatch)
    repo = make_repo(tmp_path / "repo")
    receiver.down["/hook-a?token=s3cret"] = 2
    spec = DirectiveSpec.model_validate({
        "title": "notify me", "goal": "greet", "executor": "shell",
        "repository": {"path": str(repo)},
        "plan": {"steps": [{"name": "greeting", "command": "echo hi > hi.txt"},
                           {"name": "after", "depends_on": ["greeting"],
                            "command": "echo b > b.txt", "verify": ["test -f b.txt"]}]}})
    async with build_worker(client, task_queue, activities(pg_pool)):
        handle = await start(client, task_queue, spec)
        waiting = await receiver.wait_for("/hook-b", "approval_requested")
        assert waiting["directive_id"] == handle.id and waiting["title"] == "notify me"
        assert (waiting["step"], waiting["attempt"]) == ("greeting", 1)
        assert waiting["reasons"] == [NOTHING_VERIFIED]
        assert waiting["link"] == f"http://console.example/directives/{handle.id}#step-greeting"
        assert waiting["text"].startswith('makima: step greeting (attempt 1) of "notify me" '
                                          "waits for your decision: nothing verified this")
        assert waiting["text"].endswith(f"<{waiting['link']}>")
        # the receiver that was down gets it after Temporal's retries
        assert await receiver.wait_for("/hook-a?token=s3cret", "approval_requested") == waiting

        answer = await handle.execute_update("approve_step", ApprovalDecision(
            step="greeting", by="ana", attempt=1), result_type=UpdateAnswer)
        assert answer.accepted
        result = await handle.result()
        assert result.status is DirectiveStatus.COMPLETED
        for path in ("/hook-a?token=s3cret", "/hook-b"):
            done = await receiver.wait_for(path, "directive_completed")
            assert done["text"] == (f'makima: "notify me" completed: all 2 steps passed '
                                    f"<http://console.example/directives/{handle.id}>")
        await asyncio.sleep(1.0)  # anything extra would arrive now

    for path in ("/hook-a?token=s3cret", "/hook-b"):
        kinds = [b["kind"] for b in receiver.taken(path) if b["directive_id"] == handle.id]
        assert kinds == ["approval_requested", "directive_completed"], path
    refused = [p for p, status, _ in receiver.requests if status == 503]
    assert refused == ["/hook-a?token=s3cret"] * 2
    # a receiver that is down is an expected case: one line per try, no traceback
    said = [r for r in caplog.records if r.levelno >= logging.WARNING
            and "deliver_notification" in r.getMessage()]
    lines = [r.getMessage() for r in said]
    assert len([m for m in lines if "not delivered" in m]) == 2, lines
    assert all(r.exc_info is None for r in said), lines
    assert all("s3cret" not in m for m in lines)
    # the receivers are named by a hash in history, never by their URL
    async for event in client.get_workflow_handle(handle.id).fetch_history_events():
        assert "s3cret" not in str(event)
    for body in receiver.taken("/hook-a?token=s3cret"):
        notify = workflow_id_for(body["id"], f"{receiver.url}/hook-a?token=s3cret")
        history = await client.get_workflow_handle(notify).fetch_history()
        inputs = b"".join(
            payload.data for event in history.events for payload in
            [*event.workflow_execution_started_event_attributes.input.payloads,
             *event.activity_task_scheduled_event_attributes.input.payloads]).decode()
        assert body["id"] in inputs and f'"kind":"{body["kind"]}"' in inputs.replace(" ", "")
        assert "s3cret" not in inputs and "hook-a" not in inputs


async def test_a_batch_recorded_twice_notifies_once(
        client: Client, task_queue: str, receiver: Receiver, notify_env: None,
        pg_pool: asyncpg.Pool) -> None:  # noqa: F811
    directive_id = f"directive-notify-{uuid.uuid4().hex[:8]}"
    emit = Emitter(directive_id)
    batch = RecordInput(events=[
        started(emit, title="doomed"),
        emit(EventType.BREAKER_TRIPPED, {"breaker": "cost $2.10 reached the budget of $2.00",
                                         "kind": "cost"},
             message="cost $2.10 reached the budget of $2.00"),
        directive_status(emit, "failed", reason="step 'a' blocked: denied by ana"),
    ])
    record = RecordActivities(pg_pool)
    environment = ActivityEnvironment(client=client)
    async with build_worker(client, task_queue, [*NotifyActivities().activities()]):
        assert (await environment.run(record.record_events, batch)).written == 3
        assert (await environment.run(record.record_events, batch)).written == 0  # a retry
        failed = await receiver.wait_for("/hook-b", "directive_failed")
        tripped = await receiver.wait_for("/hook-b", "breaker_tripped")
        await receiver.wait_for("/hook-a?token=s3cret", "directive_failed")
        await asyncio.sleep(1.0)
    assert failed["reasons"] == ["step 'a' blocked: denied by ana"]
    assert failed["text"].startswith('makima: "doomed" failed: step \'a\' blocked')
    assert tripped["text"].startswith('makima: "doomed" is paused by a budget: cost $2.10')
    for path in ("/hook-a?token=s3cret", "/hook-b"):
        assert sorted(b["kind"] for b in receiver.taken(path)) == [
            "breaker_tripped", "directive_failed"]
