# ruff: noqa: F811  (fixtures imported from tests/devstack_fixture.py)
"""The review desk in a real browser: Debian's chromium driven by Playwright,
against `makima console` (a real subprocess, with two users) on the session's
embedded stack (tests/devstack_fixture.py).

A person sees a yellow step in the inbox with its reason, opens its diff and
sees the changed line, is refused as a user outside `approvers`, approves with
a comment and watches the directive complete live on its page without a
reload, and denies another step and sees it blocked. Screenshots land in
tests/artifacts/console-*.png.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.devstack_fixture import (  # noqa: F401
    ROOT,
    STARTER,
    RunningDev,
    dev_stack,
    free_port,
    sample_repo,
)
from tests.test_browser import chromium

ARTIFACTS = Path(__file__).parent / "artifacts"
USERS = {"ana": "tok-ana-1", "bob": "tok-bob-2"}


@pytest.fixture
def console(dev_stack: RunningDev) -> Iterator[str]:
    """`makima console` with users ana and bob; stopped by pid when the test ends."""
    port = free_port()
    env = {**dev_stack.env,
           "MAKIMA_CONSOLE_USERS": ",".join(f"{k}:{v}" for k, v in USERS.items())}
    process = subprocess.Popen([sys.executable, str(STARTER), "console", "--port", str(port)],
                               env=env, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("makima console: ready http://127.0.0.1:"), line
        yield line.split()[-1]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


def start(dev: RunningDev, folder: Path, repo: Path, steps: list[dict]) -> str:
    spec = folder / f"spec-{uuid.uuid4().hex[:6]}.yaml"
    spec.write_text(yaml.safe_dump({
        "title": f"browser desk {uuid.uuid4().hex[:4]}", "goal": "greet the reviewer",
        "executor": "shell", "approvers": ["ana"],
        "repository": {"path": str(repo)}, "plan": {"steps": steps}}))
    directive_id = f"directive-desk-{uuid.uuid4().hex[:8]}"
    done = dev.cli("start", str(spec), "--id", directive_id)
    assert done.returncode == 0, done.stderr
    return directive_id


def wait_waiting(dev: RunningDev, directive_id: str) -> None:
    deadline = time.monotonic() + 40
    while True:
        listed = json.loads(dev.cli("inbox", "--json").stdout)
        if any(i["directive_id"] == directive_id for i in listed):
            return
        assert time.monotonic() < deadline, "the step never waited for a person"
        time.sleep(0.3)


def shoot(page, name: str) -> None:  # noqa: ANN001
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"console-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000


@pytest.mark.timeout(600)
def test_a_person_reviews_and_decides_in_the_browser(dev_stack: RunningDev, console: str,
                                                     sample_repo: Path,
                                                     tmp_path: Path) -> None:
    browser_path = chromium()
    from playwright.sync_api import expect, sync_playwright

    approve_me = start(dev_stack, tmp_path, sample_repo, [
        {"name": "greeting", "command": "printf 'hello, reviewer\\n' > greeting.txt"},
        {"name": "farewell", "depends_on": ["greeting"], "command": "echo bye > bye.txt",
         "verify": ["test -f bye.txt"]}])
    deny_me = start(dev_stack, tmp_path, sample_repo, [
        {"name": "risky", "command": "echo 'rm -rf /' > risky.sh"}])
    wait_waiting(dev_stack, approve_me)
    wait_waiting(dev_stack, deny_me)
    # users are configured: nobody gets in without a name and token
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(console + "/", timeout=10)
    assert refused.value.code == 401
    assert refused.value.headers["WWW-Authenticate"] == 'Basic realm="makima"'

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path,
                                             args=["--no-sandbox", "--disable-gpu"])
        try:
            ana = browser.new_context(http_credentials={"username": "ana",
                                                        "password": USERS["ana"]},
                                      viewport={"width": 1280, "height": 900})
            bob = browser.new_context(http_credentials={"username": "bob",
                                                        "password": USERS["bob"]},
                                      viewport={"width": 1280, "height": 900})
            page = ana.new_page()
            page.goto(console + "/")
            card = page.locator(f"#wait-{approve_me}-greeting")
            expect(card).to_contain_text("greeting attempt 1")
            expect(card).to_contain_text("nothing verified this")
            expect(card).to_contain_text("waiting")
            expect(page.locator(f"#wait-{deny_me}-risky")).to_be_visible()
            card.locator("details.diff summary").click()
            expect(card.locator(".diff-body")).to_contain_text("+hello, reviewer")
            expect(card.locator(".diff-body")).to_contain_text("greeting.txt")
            shoot(page, "inbox-with-diff")

            # bob is not among the approvers: the console says so, nothing is sent
            intruder = bob.new_page()
            intruder.goto(f"{console}/directives/{approve_me}")
            step = intruder.locator("#step-greeting")
            step.locator("textarea[name=comment]").fill("let me in")
            step.locator("button.approve").click()
            expect(step.locator(".answer")).to_have_text(
                "bob may not decide here: this directive's approvers are ana")
            shoot(intruder, "refused")

            # ana approves on the directive's page and watches it complete, no reload
            page.goto(f"{console}/directives/{approve_me}")
            page.evaluate("window.__notReloaded = true")
            expect(page.locator("#directive-status")).to_have_text("active")
            actions = page.locator("#actions")
            expect(actions.locator("button")).to_have_text(["Pause", "Stop", "Raise budget",
                                                            "Update goal"])
            step = page.locator("#step-greeting")
            step.locator("textarea[name=comment]").fill("reads well")
            step.locator("button.approve").click()
            expect(page.locator(".answer.ok").first).to_contain_text(
                "accepted: step 'greeting' approved by ana")
            expect(page.locator("#directive-status")).to_have_text("completed", timeout=40_000)
            expect(page.locator("#progress")).to_have_text("2/2 steps passed")
            expect(page.locator("#step-node-farewell")).to_contain_text("passed")
            expect(page.locator("#events")).to_contain_text("all 2 steps passed")
            expect(page.locator("#step-greeting")).to_contain_text('approved by ana: “reads well”')
            # nothing can change an ended directive: its actions are gone, live too
            expect(actions.locator("button")).to_have_count(0)
            expect(page.locator("#ended")).to_contain_text(
                f"This directive has ended (completed); nothing can be changed any more. "
                f"Its work is on makima/{approve_me}.")
            expect(page.locator("ol.generations")).to_contain_text("generation 1 · completed")
            assert page.evaluate("window.__notReloaded") is True
            shoot(page, "completed-live")

            # deny the other one from the inbox: the step is blocked, the directive fails
            page.goto(console + "/")
            card = page.locator(f"#wait-{deny_me}-risky")
            card.locator("textarea[name=comment]").fill("never delete the root")
            card.locator("button.deny").click()
            expect(card.locator(".answer")).to_contain_text("accepted: step 'risky' denied by ana")
            page.goto(f"{console}/directives/{deny_me}")
            expect(page.locator("#step-risky .badge").first).to_have_text("blocked",
                                                                         timeout=40_000)
            expect(page.locator("#step-risky")).to_contain_text(
                "denied by ana: “never delete the root”")
            expect(page.locator("#directive-status")).to_have_text("failed", timeout=40_000)
            expect(page.locator(".headline .reason")).to_contain_text("step 'risky' blocked")
            expect(page.locator("#actions button")).to_have_count(0)
            shoot(page, "denied")
        finally:
            browser.close()
