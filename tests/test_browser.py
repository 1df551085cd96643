# ruff: noqa: F811  (fixtures imported from tests/devstack_fixture.py)
"""The Temporal UI of `makima dev` in a real browser: Debian's chromium,
headless, opens a directive's workflow page (the User Metadata tab, where the
UI shows the static summary and the current-details markdown) after a step
that waited for approval was approved from the CLI; the screenshot is saved under tests/artifacts/.

chromium is installed with apt-get when missing; the test skips (with the
reason) only when that is impossible.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.devstack_fixture import RunningDev, dev_stack, sample_repo  # noqa: F401

ARTIFACTS = Path(__file__).parent / "artifacts"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1400,1000", "--virtual-time-budget=8000"]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip("chromium is missing and cannot be installed here (needs apt-get as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"],
                    ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900,
                              check=False)
        if done.returncode != 0:
            pytest.skip(f"chromium could not be installed: {' '.join(command)} said "
                        f"{done.stderr.strip()[-300:]}")
    found = shutil.which("chromium")
    if not found:
        pytest.skip("apt-get installed chromium but no chromium binary is on PATH")
    return found


def browse(browser: str, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    profile = tempfile.mkdtemp(prefix="mk-chromium-")
    try:
        return subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", *extra, url],
                              capture_output=True, text=True, timeout=90, check=False)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.timeout(1200)
def test_ui_shows_the_directive_and_its_current_details(dev_stack: RunningDev,
                                                        sample_repo: Path,
                                                        tmp_path: Path) -> None:
    browser = chromium()
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "title": "browser check", "goal": "show the directive in the UI", "executor": "shell",
        "repository": {"path": str(sample_repo)},
        "plan": {"steps": [{"name": "unchecked", "command": "echo x > x.txt"}]}}))
    directive_id = f"directive-ui-{uuid.uuid4().hex[:8]}"
    assert dev_stack.cli("start", str(spec), "--id", directive_id).returncode == 0
    deadline = time.monotonic() + 30
    while True:
        snapshot = json.loads(dev_stack.cli("status", directive_id, "--json").stdout)
        if snapshot["pending_approvals"]:
            break
        assert time.monotonic() < deadline, snapshot
        time.sleep(0.3)
    # A running workflow's page keeps polling, so headless chromium's virtual time
    # never settles; approve (the way a user would) and photograph the finished page.
    assert dev_stack.cli("approve", directive_id, "unchecked").returncode == 0
    deadline = time.monotonic() + 30
    while json.loads(dev_stack.cli("status", directive_id, "--json").stdout)["status"] \
            != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.3)
    run_id = dev_stack.temporal("workflow", "describe", "--workflow-id", directive_id,
                                "-o", "json")
    run_id = json.loads(run_id)["workflowExecutionInfo"]["execution"]["runId"]
    page = (f"{dev_stack.ui_url}/namespaces/default/workflows/{directive_id}/{run_id}"
            "/user-metadata")
    try:
        dom = browse(browser, page, "--dump-dom")
        assert dom.returncode == 0, dom.stderr[-2000:]
        assert directive_id in dom.stdout
        # the summary and the details markdown render inside a sandboxed frame: see the screenshot
        assert "Current Details" in dom.stdout and "Summary" in dom.stdout
        assert "COMPLETED" in dom.stdout.upper()

        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "ui-workflow-page.png"
        shot.unlink(missing_ok=True)
        done = browse(browser, page, f"--screenshot={shot}")
        assert done.returncode == 0, done.stderr[-2000:]
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert shot.stat().st_size > 20_000, "a blank page would be much smaller"
    finally:
        dev_stack.cli("stop", directive_id, "--reason", "browser test done")  # if still running
