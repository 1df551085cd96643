# ruff: noqa: F811  (fixtures imported from tests/devstack_fixture.py)
"""The review desk on the command line, run as a subprocess against the real
embedded stack (tests/devstack_fixture.py): `inbox` says what waits and why with
the exact commands, `show` prints the attempt's diff, `list --waiting` finds it,
a decision's default `--by` is the OS user and names the attempt, specs that
cannot run are refused before anything starts, and a closed pipe is no traceback.
"""

from __future__ import annotations

import getpass
import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import yaml

from makima.models import CheckResult, CriterionResult
from makima.review import NOTHING_VERIFIED, why_waiting
from tests.devstack_fixture import ROOT, STARTER, RunningDev, dev_stack, sample_repo  # noqa: F401


def write_spec(folder: Path, repo: Path, steps: list[dict], **extra) -> Path:
    spec = {"title": "review desk", "goal": "exercise the review desk", "executor": "shell",
            "repository": {"path": str(repo), "base_branch": "main"},
            "plan": {"steps": steps}, **extra}
    path = folder / f"spec-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def wait_until(dev: RunningDev, what, timeout: float = 40.0):
    deadline = time.monotonic() + timeout
    while True:
        found = what()
        if found:
            return found
        assert time.monotonic() < deadline, "not reached"
        time.sleep(0.3)


def inbox_entries(dev: RunningDev, directive_id: str) -> list[dict]:
    done = dev.cli("inbox", "--json")
    assert done.returncode == 0, done.stderr
    return [i for i in json.loads(done.stdout) if i["directive_id"] == directive_id]


def on_terminal(dev: RunningDev, *args: str) -> str:
    """`makima ARGS` on a pseudo-terminal, as a person runs it: everything it wrote."""
    import os
    import pty

    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, str(STARTER), *args],
                               env={**dev.env, "COLUMNS": "200"}, cwd=ROOT, stdin=follower,
                               stdout=follower, stderr=follower)
    os.close(follower)
    output = read_terminal(leader)
    assert process.wait(60) == 0, output
    return output


def read_terminal(leader: int) -> str:
    """What a pseudo-terminal shows until the program on it ends (then closes it)."""
    import os

    output = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: the command ended
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    return output.decode(errors="replace")


def without_colour(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text).replace("\r\n", "\n")


def test_inbox_show_list_and_a_decision_by_the_os_user(dev_stack: RunningDev,
                                                       sample_repo: Path,
                                                       tmp_path: Path) -> None:
    spec = write_spec(tmp_path, sample_repo, [
        {"name": "greeting", "command": "printf 'hello, reviewer\\n' > greeting.txt"}])
    directive_id = f"directive-desk-{uuid.uuid4().hex[:8]}"
    following = subprocess.Popen([sys.executable, str(STARTER), "start", str(spec), "--id",
                                  directive_id, "--wait"], env=dev_stack.env, cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    [item] = wait_until(dev_stack, lambda: inbox_entries(dev_stack, directive_id))
    # Ctrl-C stops following, not the directive, and says how to follow it again
    following.send_signal(signal.SIGINT)
    out, err = following.communicate(timeout=30)
    assert out.startswith(f"started {directive_id}")
    assert following.returncode == 130 and "Traceback" not in err, err
    assert f"stopped following; directive {directive_id} keeps running." in err
    assert f"makima events {directive_id} --follow" in err and f"makima stop {directive_id}" in err
    snapshot = json.loads(dev_stack.cli("status", directive_id, "--json").stdout)
    assert snapshot["status"] == "active"
    [pending] = snapshot["pending_approvals"]  # which says where its work is
    assert (pending["branch"], pending["commit"]) == (item["branch"], item["commit"])

    assert item["step"] == "greeting" and item["attempt"] == 1
    assert item["why"] == [NOTHING_VERIFIED]
    assert item["branch"] == f"makima/{directive_id}--steps/greeting"
    assert len(item["commit"]) == 40
    assert item["repository"] == str(sample_repo)

    text = dev_stack.cli("inbox").stdout
    block = text.split(directive_id + "  greeting", 1)[1].split("\n\n", 1)[0]
    assert "attempt 1  waiting " in block
    assert f"why:        {NOTHING_VERIFIED}" in block
    assert f"branch:     makima/{directive_id}--steps/greeting @ {item['commit'][:12]}" in block
    assert f"makima approve {directive_id} greeting --attempt 1 --comment" in block
    assert f"makima show {directive_id} greeting --attempt 1 --diff" in block

    shown = dev_stack.cli("show", directive_id, "greeting", "--attempt", "1", "--diff")
    assert shown.returncode == 0, shown.stderr
    assert "greeting.txt | 1 +" in shown.stdout
    assert "+hello, reviewer" in shown.stdout
    assert f"diff of attempt 1 against makima/{directive_id}:" in shown.stdout
    assert f"makima approve {directive_id} greeting --attempt 1" in shown.stdout
    missing = dev_stack.cli("show", directive_id, "greeting", "--attempt", "7")
    assert missing.returncode == 2 and "has no attempt 7; its attempts: 1" in missing.stderr
    unknown = dev_stack.cli("show", directive_id, "nosuch")
    assert unknown.returncode == 2 and "no step 'nosuch'" in unknown.stderr

    # on a terminal the same views are drawn in colour, the list with progress bars
    drawn = on_terminal(dev_stack, "inbox")
    assert "\x1b[" in drawn
    assert f"makima approve {directive_id} greeting --attempt 1" in without_colour(drawn)
    drawn = on_terminal(dev_stack, "list", "--waiting")
    assert "\x1b[" in drawn and "━" in drawn and directive_id in without_colour(drawn)
    drawn = on_terminal(dev_stack, "show", directive_id, "greeting", "--diff")
    assert "\x1b[" in drawn and "nothing verified this" in without_colour(drawn)
    assert "hello, reviewer" in without_colour(drawn)

    listed = dev_stack.cli("list", "--waiting").stdout
    row = next(line for line in listed.splitlines() if line.startswith(directive_id))
    assert "active (1 waiting)" in row and "0/1" in row and str(sample_repo) in row
    assert "REPOSITORY" in listed and "AGE" in listed
    assert directive_id in dev_stack.cli("list", "--search", "REVIEW DESK").stdout
    assert directive_id not in dev_stack.cli("list", "--search", "no such title").stdout

    approved = dev_stack.cli("approve", directive_id, "greeting", "--attempt", "1",
                             "--comment", "ok")
    assert approved.returncode == 0, approved.stderr
    assert f"approved by {getpass.getuser()}" in approved.stdout
    wait_until(dev_stack, lambda: not inbox_entries(dev_stack, directive_id))
    events = dev_stack.cli("events", directive_id, "--follow").stdout
    assert "all 1 steps passed" in events or "completed" in events
    assert dev_stack.cli("show", directive_id, "greeting").stdout.count(
        f"approved by {getpass.getuser()}") == 1


def test_specs_that_cannot_run_are_refused_before_anything_starts(
        dev_stack: RunningDev, sample_repo: Path, tmp_path: Path) -> None:
    no_command = write_spec(tmp_path, sample_repo, [{"name": "empty"}])
    done = dev_stack.cli("start", str(no_command))
    assert done.returncode == 2
    assert "plan.steps.empty: the shell executor runs a step's `command`, and this step has " \
           "none" in done.stderr

    planned_by_llm = tmp_path / "llm.yaml"
    planned_by_llm.write_text(yaml.safe_dump({
        "title": "needs a planner", "goal": "g", "repository": {"path": str(sample_repo)},
        "executor": "anthropic"}))
    directive_id = f"directive-never-{uuid.uuid4().hex[:6]}"
    done = dev_stack.cli("start", str(planned_by_llm), "--id", directive_id)
    assert done.returncode == 2
    problems = [line for line in done.stderr.splitlines() if line.startswith("  - ")]
    assert problems == [
        "  - planner: no plan is supplied, so an LLM plans it needs model credentials, and "
        "ANTHROPIC_API_KEY is not set (set it, supply a plan, or use executor: shell)",
        "  - executor: anthropic needs model credentials, and ANTHROPIC_API_KEY is not set "
        "(set it, supply a plan, or use executor: shell)"]
    assert dev_stack.cli("status", directive_id).returncode == 2  # nothing was started


def test_a_closed_pipe_is_not_a_traceback(dev_stack: RunningDev) -> None:
    # like `makima inbox | head -0`: the reader is gone before the first line
    process = subprocess.Popen([sys.executable, str(STARTER), "list", "--limit", "1000"],
                               env=dev_stack.env, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    process.stdout.close()
    _, err = process.communicate(timeout=60)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert process.returncode == 141


def test_why_an_attempt_waits_names_checks_and_criteria() -> None:
    checks = [CheckResult(command="pytest -q", exit_code=1, required=False),
              CheckResult(command="ruff check .", exit_code=0)]
    criteria = [CriterionResult(criterion="greets by name", passed=False, score=0.4,
                                evidence="prints a fixed string"),
                CriterionResult(criterion="has a test", passed=True, score=0.9)]
    assert why_waiting(checks, criteria, 0.6) == [
        "check failed: `pytest -q` exited 1",
        "criterion not met: greets by name (0.40) — prints a fixed string"]
    assert why_waiting([], [], 0.5) == [NOTHING_VERIFIED]
    assert why_waiting(checks[1:], criteria[1:], 0.7, "mostly there") == [
        "every check passed, but the score 0.70 is below green: mostly there"]


def test_clean_removes_what_ended_directives_left_but_not_their_work(
        dev_stack: RunningDev, sample_repo: Path, tmp_path: Path) -> None:
    completed = f"directive-clean-{uuid.uuid4().hex[:8]}"
    spec = write_spec(tmp_path, sample_repo, [
        {"name": "write", "command": "echo w > w.txt", "verify": ["test -f w.txt"]}])
    assert dev_stack.cli("start", str(spec), "--id", completed, "--wait").returncode == 0
    denied = f"directive-clean-{uuid.uuid4().hex[:8]}"
    spec = write_spec(tmp_path, sample_repo, [{"name": "unchecked", "command": "echo x > x.txt"}])
    assert dev_stack.cli("start", str(spec), "--id", denied).returncode == 0
    wait_until(dev_stack, lambda: inbox_entries(dev_stack, denied))
    assert dev_stack.cli("deny", denied, "unchecked", "--attempt", "1").returncode == 0
    wait_until(dev_stack, lambda: "failed" in dev_stack.cli("status", denied).stdout)

    def branches() -> set[str]:
        out = subprocess.run(["git", "branch", "--format=%(refname:short)"], cwd=sample_repo,
                             capture_output=True, text=True, check=True).stdout
        return {b for b in out.split() if completed in b or denied in b}

    assert branches() == {f"makima/{completed}", f"makima/{completed}--steps/write",
                          f"makima/{denied}", f"makima/{denied}--steps/unchecked"}
    recent = dev_stack.cli("clean")  # default: ended at least 7 days ago
    assert recent.returncode == 0 and denied not in recent.stdout
    dry = dev_stack.cli("clean", "--older-than", "0", "--dry-run")
    assert f"{denied}: would remove branch makima/{denied}--steps/unchecked" in dry.stdout
    assert f"{denied}: would remove branch makima/{denied}\n" in dry.stdout
    assert f"{completed}: kept branch makima/{completed} (the completed work" in dry.stdout
    assert len(branches()) == 4

    done = dev_stack.cli("clean", "--older-than", "0")
    assert done.returncode == 0, done.stderr
    assert branches() == {f"makima/{completed}"}
    assert subprocess.run(["git", "show", f"makima/{completed}:w.txt"], cwd=sample_repo,
                          capture_output=True, text=True).stdout == "w\n"
    bad = dev_stack.cli("clean", "--older-than", "a week")
    assert bad.returncode == 2 and "is not an age like 7d" in bad.stderr


def test_demo_uses_only_the_server_it_was_told(dev_stack: RunningDev, tmp_path: Path) -> None:
    env = {**dev_stack.env, "TEMPORAL_ADDRESS": "127.0.0.1:1"}
    done = subprocess.run([sys.executable, str(STARTER), "demo", "--workdir", str(tmp_path)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "TEMPORAL_ADDRESS=127.0.0.1:1 does not answer" in done.stderr
    assert "unset TEMPORAL_ADDRESS for the demo's own stack" in done.stderr


def test_elapsed_is_computed_when_read_and_wait_draws_live_on_a_terminal(
        dev_stack: RunningDev, sample_repo: Path, tmp_path: Path) -> None:
    import os
    import pty

    spec = write_spec(tmp_path, sample_repo, [
        {"name": "idle", "command": "echo i > i.txt"},
        {"name": "then", "depends_on": ["idle"], "command": "echo t > t.txt",
         "verify": ["test -f t.txt"]}])
    directive_id = f"directive-tty-{uuid.uuid4().hex[:8]}"
    # `start --wait` on a pseudo-terminal, as a person runs it
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, str(STARTER), "start", str(spec), "--id",
                                directive_id, "--wait"], env={**dev_stack.env, "COLUMNS": "160"},
                               cwd=ROOT, stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    wait_until(dev_stack, lambda: inbox_entries(dev_stack, directive_id))
    # the directive idles while it waits: no workflow task, yet the clock moves
    first = json.loads(dev_stack.cli("status", directive_id, "--json").stdout)
    time.sleep(2.0)
    second = json.loads(dev_stack.cli("status", directive_id, "--json").stdout)
    assert second["elapsed_seconds"] - first["elapsed_seconds"] >= 1.5, (first, second)
    assert "elapsed:    " in dev_stack.cli("status", directive_id).stdout

    assert dev_stack.cli("approve", directive_id, "idle", "--attempt", "1").returncode == 0
    text = read_terminal(leader)
    assert process.wait(30) == 0
    assert "\x1b[" in text  # colour and redrawing in place
    assert "━" in text and "2/2 steps passed" in text  # the progress bar of steps
    assert "waiting for you: idle (attempt 1" in text
    assert "\x07" in text  # the bell rang when it started waiting
    assert f"branch: makima/{directive_id}" in text
    assert f"diff main...makima/{directive_id} --stat" in text

