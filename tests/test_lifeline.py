"""Agents die with their worker: a worker process killed with SIGKILL takes its
agent's whole process group with it, and a starting worker reaps the groups an
earlier worker on its MAKIMA_HOME recorded and left behind. Real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from makima import lifeline
from makima.process import run_process
from tests.stack_fixture import ROOT


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for every purpose here
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(predicate: object, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return bool(predicate())  # type: ignore[operator]


def read_pids(path: Path) -> list[int]:
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.fixture
def worker_like(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A process that runs an agent command through makima.process, as a worker does."""
    started: list[subprocess.Popen[bytes]] = []

    def start(command: str, home: Path) -> subprocess.Popen[bytes]:
        script = textwrap.dedent(f"""
            import asyncio
            from makima.process import run_process
            asyncio.run(run_process(["bash", "-c", {command!r}], cwd={str(tmp_path)!r}))
        """)
        process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT,
                                   env={**os.environ, "MAKIMA_HOME": str(home)})
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_killed_worker_takes_the_agents_whole_group_with_it(
        tmp_path: Path, worker_like) -> None:  # type: ignore[no-untyped-def]
    pids = tmp_path / "pids"
    # bash, a background sleep that would outlive bash, and a grandchild in a subshell
    command = (f"echo $$ >> {pids}; sleep 300 & echo $! >> {pids}; "
               f"(sleep 301 & echo $! >> {pids}; wait) & wait")
    worker = worker_like(command, tmp_path / "home")
    assert wait_until(lambda: len(read_pids(pids)) == 3, 20), "the agent did not start"
    agent = read_pids(pids)
    assert all(alive(pid) for pid in agent)
    records = lifeline.records_folder(tmp_path / "home")
    assert wait_until(lambda: len(list(records.glob("*.json"))) == 1, 5)

    worker.send_signal(signal.SIGKILL)
    worker.wait()

    assert wait_until(lambda: not any(alive(pid) for pid in agent), 10), (
        f"agent processes outlived their worker by 10 s: "
        f"{[pid for pid in agent if alive(pid)]}")


def test_a_starting_worker_reaps_groups_a_dead_worker_left(tmp_path: Path) -> None:
    home = tmp_path / "home"
    folder = lifeline.records_folder(home)
    folder.mkdir(parents=True)
    dead_worker = subprocess.Popen(["true"])
    dead_worker.wait()
    # an orphan group (as if its watchdog had been SIGKILLed with the worker) ...
    orphan = subprocess.Popen(["sleep", "300"], start_new_session=True)
    # ... and a group of a worker that still runs (another worker on this home)
    living = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        for group, worker in ((orphan.pid, dead_worker.pid), (living.pid, os.getpid())):
            (folder / f"{group}.json").write_text(json.dumps({
                "pgid": group, "leader_started": lifeline._started_at(group),
                "worker": worker, "worker_started": lifeline._started_at(worker)}))
        (folder / "garbage.json").write_text("{cut short")

        assert lifeline.reap_orphans(home) == [orphan.pid]

        assert orphan.wait(5) == -signal.SIGKILL
        assert living.poll() is None, "a living worker's agent was killed"
        assert sorted(p.name for p in folder.iterdir()) == [f"{living.pid}.json"]
    finally:
        for process in (orphan, living):
            if process.poll() is None:
                process.kill()
                process.wait()


async def test_the_agent_exit_status_and_output_come_through_the_watchdog(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAKIMA_HOME", str(tmp_path / "home"))
    result = await run_process(["bash", "-c", "echo out; echo err >&2; exit 7"], cwd=tmp_path)
    assert (result.exit_code, result.output.split()) == (7, ["out", "err"])
    killed = await run_process(["bash", "-c", "kill -9 $$"], cwd=tmp_path)
    assert killed.exit_code == 128 + signal.SIGKILL
    missing = await run_process(["no-such-program-here"], cwd=tmp_path)
    assert missing.exit_code == 127 and "no-such-program-here" in missing.output
    # nothing stays recorded once the command is over
    assert list(lifeline.records_folder(tmp_path / "home").glob("*.json")) == []


async def test_the_agent_starts_with_no_signal_ignored_or_blocked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the watchdog ignores SIGTERM/SIGINT and Python ignores SIGPIPE; none of that
    # may reach the agent (a `yes | head` would never see its broken pipe)
    monkeypatch.setenv("MAKIMA_HOME", str(tmp_path / "home"))
    result = await run_process(["bash", "-c", "grep -E '^Sig(Ign|Blk)' /proc/$$/status"],
                               cwd=tmp_path)
    masks = {name: int(mask, 16) for name, mask in
             (line.split(":") for line in result.output.split("\n") if line)}
    ignored = {sig.name for sig in signal.Signals if masks["SigIgn"] & 1 << (sig - 1)}
    blocked = {sig.name for sig in signal.Signals if masks["SigBlk"] & 1 << (sig - 1)}
    # (whatever the test runner itself ignores is passed on, as it always was)
    assert not ignored & {"SIGTERM", "SIGINT", "SIGPIPE", "SIGXFSZ", "SIGUSR1"}, ignored
    assert "SIGCHLD" not in blocked, blocked
