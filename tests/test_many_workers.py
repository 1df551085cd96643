"""Three workers as three machines: three `python worker.py` processes share one
Temporal dev server and one Postgres, and nothing else. Each has its own
MAKIMA_HOME and runs under `unshare -m` with an empty tmpfs over the other
two homes, so it cannot see their worktrees or clones, as on separate
machines (folders that are merely separate would hide the defects: another
worker would still find a worktree by its path). The repository is given by
`url`: a bare repository in a temporary folder, the only thing they share.

A directive of 12 shell steps in 4 levels runs on them; the worker running
the one long step is killed with SIGKILL mid-command and not started again.
Slow (a dead worker is noticed after AGENT_HEARTBEAT_TIMEOUT, 60 s), so it is
a `faults` test (`make test-faults`).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from makima.contracts import EventType
from makima.models import DirectiveSpec, DirectiveStatus
from tests import test_faults
from tests.fakes.repos import make_repo, set_identity, sh
from tests.test_faults import (
    Stack,
    assert_rows_complete,
    lines,
    process_alive,
    result_of,
    start,
    wait_for,
)

pytestmark = [pytest.mark.faults, pytest.mark.timeout(480)]

# the fault suite's stack (a dev server and Postgres for this module) and workers
stack = test_faults.stack
workers_of = test_faults.workers_of

LEVELS = [["a1", "a2", "a3"], ["b1", "b2", "b3", "long"], ["c1", "c2", "c3", "c4"], ["d"]]


def hidden_homes(others: list[Path]) -> list[str]:
    """The wrapper that starts a worker in a mount namespace of its own where each
    of `others` is an empty tmpfs (then `exec`s it: the pid stays the worker's)."""
    mounts = " && ".join(f"mount -t tmpfs -o size=1m,mode=0700 elsewhere {shlex.quote(str(p))}"
                         for p in others)
    unshare = ["unshare", "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        unshare.append("--map-root-user")
    return [*unshare, "sh", "-c", f'{mounts} && exec "$@"', "sh"]


def process_group(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])


def members_of(pgid: int) -> list[int]:
    """Live processes of process group `pgid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def step_command(name: str, ran: Path) -> str:
    return f'echo "$$ $(pwd)" >> {ran}; echo {name} > {name}.txt'


def long_command(started: Path, go: Path) -> str:
    """Writes a line tagged with its pid every 0.1 s (and starts a child that would
    outlive it) until the test's go file appears."""
    return (f'echo "$$ $(pwd)" >> {started}; sleep 1000 >/dev/null 2>&1 & '
            f'while [ ! -f {go} ]; do echo "$$ working" >> long.txt; sleep 0.1; done; '
            'echo "$$ done" >> long.txt')


async def test_three_workers_on_separate_homes_survive_a_kill_mid_command(
        stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        workers_of: Any) -> None:
    set_identity(monkeypatch)
    remote = tmp_path / "remote.git"
    seed = make_repo(tmp_path / "seed", {"README.md": "many workers\n"})
    sh("git", "clone", "--bare", "--quiet", str(seed), str(remote), cwd=tmp_path)
    homes = [tmp_path / f"home-{i}" for i in range(3)]
    for home in homes:
        (home / "mine").mkdir(parents=True)
    # the wrapper really hides the other homes (else the test proves nothing)
    probe = (await asyncio.to_thread(
        subprocess.run, [*hidden_homes(homes[1:]), "ls", "-A", *map(str, homes)],
        capture_output=True, text=True, check=True)).stdout
    assert probe.count("mine") == 1, probe

    workers = workers_of(stack)
    started = [workers.start(hidden_homes([h for h in homes if h != home]),
                             MAKIMA_HOME=str(home)) for home in homes]
    ran, long_started, go = tmp_path / "ran", tmp_path / "long-started", tmp_path / "go"
    steps = []
    for level, names in enumerate(LEVELS):
        for name in names:
            steps.append({
                "name": name,
                "command": (long_command(long_started, go) if name == "long"
                            else step_command(name, ran)),
                "verify": [f"test -f {'long' if name == 'long' else name}.txt"],
                "depends_on": LEVELS[level - 1] if level else []})
    spec = DirectiveSpec.model_validate({
        "title": "many workers", "goal": "survive a lost machine", "executor": "shell",
        "autonomy": "full_auto", "repository": {"url": str(remote)},
        "plan": {"steps": steps}})
    handle = await start(stack, workers.queue, spec)

    await wait_for(lambda: len(lines(long_started)) >= 2, 120, "the long step started",
                   workers.logs)
    dead_pid, dead_worktree = lines(long_started)[:2]
    dead_pgid = process_group(int(dead_pid))
    victim = next(w for w, home in zip(started, homes, strict=True)
                  if dead_worktree.startswith(f"{home}/"))
    victim_queue = _own_queue(victim.log())
    await asyncio.sleep(0.5)  # a few lines written by the attempt that is about to die
    victim.kill()
    killed_at = time.monotonic()
    await wait_for(lambda: not members_of(dead_pgid), 10,
                   "the killed worker's agent (its whole process group) still runs 10 s later",
                   workers.logs)
    assert time.monotonic() - killed_at <= 10
    assert not process_alive(int(dead_pid))

    # the retry runs on one of the two workers left, in its own home
    await wait_for(lambda: len(lines(long_started)) >= 4, 180,
                   "the long step was retried on another worker", workers.logs)
    live_pid, live_worktree = lines(long_started)[2:4]
    assert not live_worktree.startswith(f"{dead_worktree.split('/worktrees/')[0]}/")
    go.touch()
    result = await result_of(handle, 240, workers)

    assert result.status is DirectiveStatus.COMPLETED, result.reason
    assert {s.name: (s.status.value, s.attempts) for s in result.steps} == {
        name: ("passed", 1) for names in LEVELS for name in names}
    # the steps were spread over the workers, each in its own home
    where = {line.split()[1].split("/worktrees/")[0] for line in ran.read_text().splitlines()}
    assert len(where) >= 2, where
    # the remote's integration branch holds every file
    branch = result.integration_branch
    for names in LEVELS:
        for name in names:
            if name != "long":
                assert sh("git", "show", f"{branch}:{name}.txt", cwd=remote) == name
    # no line written by the dead attempt reached it; the live one's did, to its end
    written = sh("git", "show", f"{branch}:long.txt", cwd=remote).splitlines()
    assert written and {line.split()[0] for line in written} == {live_pid}, written[:5]
    assert written[-1] == f"{live_pid} done"
    # no live attempt lost its worktree: every evaluation found its worktree where
    # execute left it, except those of the dead worker, checked out elsewhere
    failures = await stack.pool.fetch(
        "SELECT step, message, data FROM events WHERE directive_id = $1 AND type = $2",
        handle.id, EventType.ACTIVITY_FAILED.value)
    for row in failures:
        assert "worktree is gone" in row["message"] and victim_queue in str(row["data"]), dict(row)
    await assert_rows_complete(stack.pool, result)


def _own_queue(log: str) -> str:
    marker = "(own queue "
    assert marker in log, log[-2000:]
    return log.split(marker, 1)[1].split(")", 1)[0]

