"""The watchdog that leads every agent's process group (makima.lifeline says why):

    python -I -S watchdog.py <worker pid> <command> [args...]

It starts before every agent command, shell step, check and Claude Code
process, so its start-up sits on the path from one step's agent to the next
one's. It therefore imports only os, signal, sys and ctypes, and starts the
agent with fork and exec rather than subprocess: about half the start-up of
a script that loads subprocess, json and pathlib (`python -m bench --only chain`
shows the effect in its breakdown).
"""

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
#: The signal the kernel sends the watchdog when its worker dies.
PARENT_DIED_SIGNAL = signal.SIGUSR1
#: How often the watchdog checks its parent where PR_SET_PDEATHSIG is missing.
_PARENT_POLL_SECONDS = 0.1
#: Signals the agent gets back at their defaults: what the watchdog itself ignores
#: or handles, and what Python ignores at start-up (as subprocess's restore_signals).
_RESTORED = (signal.SIGTERM, signal.SIGINT, PARENT_DIED_SIGNAL, signal.SIGPIPE, signal.SIGXFSZ)


def _set_parent_death_signal(sig: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _kill_group(*_: object) -> None:
    os.killpg(0, signal.SIGKILL)  # the watchdog too: it is the group's leader


def _start(argv: list[str]) -> int:
    """Fork and exec `argv` with default signal handling; in the child, a program
    that cannot be started prints why and exits 127 (as a shell does)."""
    pid = os.fork()
    if pid:
        return pid
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCHLD])
        for sig in _RESTORED:
            signal.signal(sig, signal.SIG_DFL)
        os.execvp(argv[0], argv)
    except OSError as err:
        os.write(2, f"makima: cannot start {argv[0]!r}: {err}\n".encode())
    os._exit(127)


def _wait(pid: int, parent: int, armed: bool) -> int:
    """The agent's exit status (128 + N when signal N ended it)."""
    while True:
        done, status = os.waitpid(pid, 0 if armed else os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            return code if code >= 0 else 128 - code
        if os.getppid() != parent:
            _kill_group()
        signal.sigtimedwait([signal.SIGCHLD], _PARENT_POLL_SECONDS)


def watch(parent: int, argv: list[str]) -> int:
    signal.signal(PARENT_DIED_SIGNAL, _kill_group)
    armed = _set_parent_death_signal(PARENT_DIED_SIGNAL)
    if os.getppid() != parent:  # the worker died before the signal was armed
        _kill_group()
    # makima's own SIGTERM goes to the whole group: the agent gets it; the watchdog
    # stays to report the agent's exit
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not armed:  # sigtimedwait wakes on SIGCHLD only while it is blocked
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])
    return _wait(_start(argv), parent, armed)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: watchdog.py <worker pid> <command> [args...]")
    sys.exit(watch(int(sys.argv[1]), sys.argv[2:]))
