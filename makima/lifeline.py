"""Agents die with their worker.

Every agent command, check and Claude Code process runs in its own process
group (makima.process). A worker that is killed (`kill -9`, OOM, a lost host)
runs no cleanup, so without help that group lives on and keeps writing into a
worktree that a retry may merge. Two guards, both needed:

- The group's leader is a small watchdog (`python watchdog.py <argv>`, see
  makima/watchdog.py) started with `PR_SET_PDEATHSIG`: the kernel signals it
  the moment the worker dies, and it SIGKILLs its whole group, children that
  left it no faster than they can fork. It passes every other signal's effect
  through: SIGTERM to the group (makima's own cancel) reaches the agent, and
  the watchdog waits for it and exits with its status.
  In the sandbox (makima.sandbox) bubblewrap leads the group instead: its
  `--die-with-parent` is the same `PR_SET_PDEATHSIG`, SIGKILL for bubblewrap and
  the sandbox's first process, and every process the agent starts lives in the
  sandbox's own PID namespace, which the kernel empties when that first process
  dies; none can leave it. So no watchdog starts there (`run_confined`).
- Each group is recorded in `$MAKIMA_HOME/agents/` with the worker's pid; a
  worker starting on that home reaps the groups whose worker is gone (a
  watchdog that was itself SIGKILLed, a host that froze rather than died).

`PR_SET_PDEATHSIG` fires when the *thread* that forked the child ends; makima
starts agents from the worker's event-loop thread, which lives as long as the
worker. Linux only; elsewhere the watchdog still reaps on a lost parent by
polling `getppid()`.

Not here: how a command is run and its output read (makima.process).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

_WATCHDOG = Path(__file__).resolve().with_name("watchdog.py")


def guarded(argv: Sequence[str], parent: int | str | None = None) -> list[str]:
    """`argv` led by the watchdog, to be started by process `parent` (default: this
    one) with `start_new_session=True`."""
    # -I -S: no site-packages or user paths, so the watchdog starts in ~20 ms
    return [sys.executable, "-I", "-S", str(_WATCHDOG), str(parent or os.getpid()), *argv]


# --------------------------------------------------------------------------- records


def records_folder(home: Path) -> Path:
    return home / "agents"


def _started_at(pid: int) -> str | None:
    """The kernel's start time of `pid` (field 22 of /proc/pid/stat), so a record
    never matches a later process that reused the pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


@contextlib.contextmanager
def recorded(pgid: int, home: Path | None = None) -> Iterator[None]:
    """Record the running group `pgid` under `home` (MAKIMA_HOME) until the block
    ends."""
    if home is None:
        from makima.git import makima_home  # not at the top: this file also runs bare

        home = makima_home()
    folder = records_folder(home)
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / f"{pgid}.json"
    record.write_text(json.dumps({
        "pgid": pgid, "leader_started": _started_at(pgid),
        "worker": os.getpid(), "worker_started": _started_at(os.getpid())}))
    try:
        yield
    finally:
        record.unlink(missing_ok=True)


def reap_orphans(home: Path) -> list[int]:
    """Kill every recorded group whose worker is gone; return their ids.

    Groups of a worker that is still running (another worker sharing this home)
    are left alone."""
    reaped: list[int] = []
    folder = records_folder(home)
    if not folder.is_dir():
        return reaped
    for record in folder.glob("*.json"):
        try:
            data = json.loads(record.read_text())
            pgid, worker = int(data["pgid"]), int(data["worker"])
        except (OSError, ValueError, KeyError, TypeError):
            record.unlink(missing_ok=True)  # unreadable: a write cut short by the crash
            continue
        worker_alive = (_started_at(worker) is not None
                        and _started_at(worker) == data.get("worker_started"))
        if worker_alive:
            continue
        # The kernel never hands out a pid equal to a live group's id: a leader with
        # another start time means the group is empty and its number reused.
        leader = _started_at(pgid)
        if leader is None or leader == data.get("leader_started"):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
                reaped.append(pgid)
        record.unlink(missing_ok=True)
    return reaped
