"""Agents die with their worker: a worker process killed with SIGKILL takes its
agent's whole process group with it (led by the watchdog, or in the sandbox by
bubblewrap), and a starting worker reaps the groups an earlier worker on its
MAKIMA_HOME recorded and left behind. Real processes, real bubblewrap."""

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

    def start(command: str, home: Path, *, confined: bool = False) -> subprocess.Popen[bytes]:
        if confined:  # as the executors and checks run it: in the sandbox
            run = (f"run_confined(['bash', '-c', {command!r}], "
                   f"Confinement(Path({str(tmp_path)!r})), env=agent_environment())")
        else:
            run = f"run_process(['bash', '-c', {command!r}], cwd={str(tmp_path)!r})"
        script = textwrap.dedent(f"""
            import asyncio
            from pathlib import Path
            from makima.process import agent_environment, run_confined, run_process
            from makima.sandbox import Confinement
            asyncio.run({run})
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


def sleeps_with(marker: str) -> list[int]:
    """Pids of the `sleep <marker>` processes (those of a sandbox too, whose own pids
    mean nothing outside it)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[:2] == [b"sleep", marker.encode()] and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def test_killed_worker_takes_its_sandboxed_agent_with_it(
        tmp_path: Path, worker_like) -> None:  # type: ignore[no-untyped-def]
    # no watchdog leads a sandboxed group: bubblewrap's --die-with-parent and the
    # sandbox's PID namespace are what must take the agent, its background child, a
    # grandchild and a process that left the group (setsid) with the worker
    marker = f"{3000 + os.getpid() % 1000}.{time.monotonic_ns() % 10**6}"
    command = (f"sleep {marker} & (sleep {marker} & wait) & setsid sleep {marker} & "
               f"sleep {marker}")
    worker = worker_like(command, tmp_path / "home", confined=True)
    assert wait_until(lambda: len(sleeps_with(marker)) == 4, 20), "the agent did not start"
    agent = sleeps_with(marker)

    worker.send_signal(signal.SIGKILL)
    worker.wait()

    assert wait_until(lambda: not any(alive(pid) for pid in agent), 10), (
        f"sandboxed agent processes outlived their worker by 10 s: "
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
