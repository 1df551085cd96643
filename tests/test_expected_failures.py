# ruff: noqa: F811  (fixtures imported from tests/devstack_fixture.py)
"""Expected cases are one line, not a traceback, in the worker's log and on the
command line: a model with no credentials, a step cancelled by a stop, a step a
person denied, a command the workflow refuses. Run against the session's real
stack (`makima dev`), whose whole output the fixture keeps.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import yaml

from tests.devstack_fixture import ROOT, STARTER, RunningDev, dev_stack, sample_repo  # noqa: F401


def spec_file(folder: Path, body: dict) -> Path:
    path = folder / f"spec-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def start_shell(dev: RunningDev, folder: Path, repo: Path, directive_id: str, step: dict) -> None:
    spec = spec_file(folder, {"title": directive_id, "goal": "g", "executor": "shell",
                              "repository": {"path": str(repo)}, "plan": {"steps": [step]}})
    assert dev.cli("start", str(spec), "--id", directive_id).returncode == 0


def wait_for(what, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (found := what()):
        assert time.monotonic() < deadline, "not reached"
        time.sleep(0.3)
    return found


def status(dev: RunningDev, directive_id: str) -> dict:
    return json.loads(dev.cli("status", directive_id, "--json").stdout)


def test_expected_failures_are_one_line_in_the_worker_log_and_the_cli(
        dev_stack: RunningDev, sample_repo: Path, tmp_path: Path) -> None:
    log_start = len(dev_stack.output)

    # no credentials: the client's check is off (only the workers hold keys, say),
    # so the planner on the worker is the one to find out
    unplanned = f"directive-nokey-{uuid.uuid4().hex[:6]}"
    done = subprocess.run([sys.executable, str(STARTER), "start", str(spec_file(tmp_path, {
        "title": "needs a planner", "goal": "g", "repository": {"path": str(sample_repo)},
        "executor": "shell"})), "--id", unplanned, "--wait"],
        env={**dev_stack.env, "MAKIMA_PREFLIGHT": "0"}, cwd=ROOT, capture_output=True,
        text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert "reason: planning failed: LLMNotConfigured: planning needs an LLM but " \
           "ANTHROPIC_API_KEY is not set on the worker" in done.stdout
    assert "review: git" not in done.stdout  # nothing was done, so nothing to review
    # a step cancelled by a stop
    stopped = f"directive-stop-{uuid.uuid4().hex[:6]}"
    start_shell(dev_stack, tmp_path, sample_repo, stopped, {"name": "slow", "command": "sleep 60"})
    wait_for(lambda: any(s["status"] == "running" for s in status(dev_stack, stopped)["steps"]))
    assert dev_stack.cli("stop", stopped, "--reason", "enough").returncode == 0
    wait_for(lambda: status(dev_stack, stopped)["status"] == "stopped")
    # a step a person denied, and a command the workflow refuses
    denied = f"directive-deny-{uuid.uuid4().hex[:6]}"
    start_shell(dev_stack, tmp_path, sample_repo, denied,
                {"name": "unchecked", "command": "echo x > x.txt"})
    wait_for(lambda: status(dev_stack, denied)["pending_approvals"])
    refused = dev_stack.cli("approve", denied, "nosuch")
    assert refused.returncode == 1
    assert refused.stdout == "" and refused.stderr.startswith("rejected: unknown step 'nosuch'")
    assert len(refused.stderr.strip().splitlines()) == 1
    assert dev_stack.cli("deny", denied, "unchecked", "--comment", "no").returncode == 0
    wait_for(lambda: status(dev_stack, denied)["status"] == "failed")
    time.sleep(1.0)  # what the worker logs on the way out

    log = dev_stack.output[log_start:]
    assert not [line for line in log if "Traceback" in line], "\n".join(log)
    said = [line for line in log if "plan_directive failed" in line]
    assert len(said) == 1, said  # (and one state-change line of the directive failing)
    assert "plan_directive failed (try 1, final): LLMNotConfigured: planning needs an LLM " \
           "but ANTHROPIC_API_KEY is not set on the worker" in said[0]
    abandoned = [line for line in log if "execute_step failed" in line]
    assert len(abandoned) <= 1, abandoned  # the stopped step's agent, if it outlived it
