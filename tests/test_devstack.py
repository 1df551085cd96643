# ruff: noqa: F811  (fixtures imported from tests/devstack_fixture.py)
"""`makima dev` and `makima demo` for real: the session's stack (started by
tests/devstack_fixture.py through `starter.py dev`) answers where its ready line
says, with the UI, the database and the search attributes; a second stack stops
every process it started on SIGTERM; and the demo's whole scenario (what
`make demo` runs) completes against the running stack.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from makima.devstack import DevStack, free_port
from makima.store.embedded import _pid_alive, running_embedded, stop_embedded
from tests.devstack_fixture import (  # noqa: F401
    ROOT,
    STARTER,
    RunningDev,
    dev_env,
    dev_stack,
    git,
    reported_pids,
    start_dev,
    stop_dev,
)


def test_dev_is_ready_where_it_says(dev_stack: RunningDev) -> None:
    assert re.fullmatch(r"makima dev: ready temporal=127\.0\.0\.1:\d+ ui=http://127\.0\.0\.1:\d+ "
                        r"database=postgresql://\S+ console=http://127\.0\.0\.1:\d+",
                        dev_stack.ready_line)
    with urllib.request.urlopen(dev_stack.ui_url, timeout=10) as page:
        assert page.status == 200
    attributes = dev_stack.temporal("operator", "search-attribute", "list")
    for name, kind in (("MakimaStatus", "Keyword"), ("MakimaOwner", "Keyword"),
                       ("MakimaGeneration", "Int")):
        assert re.search(rf"{name}\s+{kind}", attributes)
    assert (dev_stack.home / "temporal.db").exists(), "directives must survive a restart"
    assert set(dev_stack.pids) == {"worker", "temporal", "postgres"}
    assert all(_pid_alive(pid) for pid in dev_stack.pids.values())


def test_dev_stops_everything_on_sigterm() -> None:
    home = Path(tempfile.mkdtemp(prefix="mk-stop-"))
    process, lines = start_dev(home, dev_env(home))
    try:
        pids = reported_pids(lines)
        assert set(pids) == {"worker", "temporal", "postgres"}
    finally:
        code = stop_dev(process, lines)  # SIGTERM; raises if dev left anything running
    try:
        assert code == 0, "\n".join(lines)
        assert "makima dev: stopped" in lines
        deadline = time.monotonic() + 10
        while any(_pid_alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_pid_alive(pid) for pid in pids.values())
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_dev_names_the_cause_when_the_temporal_server_cannot_bind() -> None:
    """A taken port stops the dev server; `dev` says so and names the port."""
    home = Path(tempfile.mkdtemp(prefix="mk-bind-"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port()))
        taken.listen(1)
        ui_port = taken.getsockname()[1]
        try:
            done = subprocess.run(
                [sys.executable, str(STARTER), "dev", "--port", str(free_port()),
                 "--ui-port", str(ui_port), "--console-port", str(free_port())],
                env=dev_env(home), cwd=ROOT, capture_output=True, text=True, timeout=120)
            left = running_embedded(home)
        finally:
            if (pid := running_embedded(home)) is not None:
                stop_embedded(pid)
            shutil.rmtree(home, ignore_errors=True)
    said = done.stdout + done.stderr
    assert done.returncode != 0, said
    assert "the Temporal dev server exited" in said, said
    assert re.search(rf"{ui_port}: bind: address already in use", said), said
    assert left is None, "the Postgres it started for this stack was left running"


def test_a_dev_server_panic_is_reported_from_its_cause(tmp_path: Path) -> None:
    """When a port is taken only after the CLI checked it (a race with any other
    process), the dev server panics; the error shows the panic's first line, which
    names the cause, not the last lines of its Go stack."""
    log = tmp_path / "temporal.log"
    log.write_text("panic: an earlier start's panic\n")
    stack = DevStack(home=tmp_path)
    with log.open("a") as out:
        stack._log_start = out.tell()
        out.write("time=... level=INFO msg=starting\n"
                  "panic: listen tcp 127.0.0.1:41234: bind: address already in use\n\n"
                  + "goroutine 1 [running]:\n\tserver.go:130 +0x1b9\n" * 200)
    said = stack._temporal_log_tail()
    assert said.startswith("panic: listen tcp 127.0.0.1:41234: bind: address already in use")
    assert len(said) <= 1500


def test_demo_completes_with_a_rework_and_an_approval(dev_stack: RunningDev,
                                                      tmp_path: Path) -> None:
    started = time.monotonic()
    done = dev_stack.cli("demo", "--workdir", str(tmp_path), timeout=120)
    took = time.monotonic() - started
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert f"demo: using the Temporal server at {dev_stack.address}" in out
    assert ("step 'changelog' landed yellow" in out
            and "approves it now through the approve_step update" in out)
    assert "demo: approve_step answered: step 'changelog' approved by demo" in out
    assert "reworked: greeting; approved by the demo: changelog" in out
    directive_id = re.search(r"demo: started (\S+)", out).group(1)
    assert f"demo: Temporal UI: {dev_stack.ui_url}/namespaces/default/workflows/{directive_id}" in out
    repo = tmp_path / "sample-repo"
    branch = f"makima/{directive_id}"
    assert f"demo: integration branch {branch}" in out
    assert git(repo, "show", f"{branch}:bundle.txt").startswith("hello, world\n# Changelog")
    assert git(repo, "rev-parse", "--abbrev-ref", "HEAD").strip() == "main"
    print(f"demo against the running stack took {took:.1f}s")
    assert os.path.exists(repo / ".git")
