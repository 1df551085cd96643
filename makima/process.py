"""Running a command the way an agent's work must be run: in its own process
group (so it and everything it starts can be killed together), with a timeout,
and with its output kept as a bounded tail (a command that prints 50 MB costs a
few kilobytes of memory, not 50 MB) and the worker's secrets scrubbed from it.

Also the one environment builder (an allow-list, never the worker's environment
minus something): `agent_environment` for agent-controlled processes and
`tool_environment` for makima's own tools (git); the one secret scrubber
(`scrub_secrets`)
and `run_confined`, which runs such a process inside the sandbox
(makima.sandbox).

Cancellation of the awaiting task (a Temporal activity cancel) kills the whole
group: SIGTERM, then SIGKILL after `KILL_GRACE_SECONDS`. Nothing here knows
about Temporal or git.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from makima import lifeline
from makima.sandbox import SANDBOX_HOME, Confinement, confine, sandbox_enabled

#: How long a group gets between SIGTERM and SIGKILL.
KILL_GRACE_SECONDS = 2.0
#: Bytes of output kept in memory per command (the end of it).
DEFAULT_TAIL_BYTES = 64 * 1024
_READ_CHUNK = 64 * 1024


class TailBuffer:
    """The last `limit` bytes written to it, and how many bytes were dropped."""

    def __init__(self, limit: int = DEFAULT_TAIL_BYTES) -> None:
        self.limit = limit
        self.total = 0
        self._data = bytearray()

    def write(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self._data += chunk
        if len(self._data) > self.limit:
            del self._data[: len(self._data) - self.limit]

    @property
    def dropped(self) -> int:
        return self.total - len(self._data)

    def text(self, max_chars: int | None = None) -> str:
        """The kept output as text; when anything was cut, a first line says how much."""
        text = self._data.decode("utf-8", "replace")
        dropped = self.dropped
        if max_chars is not None and len(text) > max_chars:
            dropped += len(text[:-max_chars].encode("utf-8", "replace"))
            text = text[-max_chars:]
        if dropped:
            return f"[… {dropped} bytes of earlier output truncated …]\n{text}"
        return text


def truncate_tail(text: str, max_chars: int) -> str:
    """The end of `text`, at most about `max_chars` characters, marked when cut."""
    if len(text) <= max_chars:
        return text
    return f"[… {len(text) - max_chars} characters truncated …]\n{text[-max_chars:]}"


@dataclass
class ProcessResult:
    exit_code: int | None  # None: killed by the timeout
    output: str  # the tail of stdout and stderr interleaved
    timed_out: bool
    duration_seconds: float
    pid: int


async def wait_for_exit(process: asyncio.subprocess.Process,
                        output_read: asyncio.Future[None] | None = None) -> int:
    """The exit code of `process` once it exits.

    Not `process.wait()` alone: asyncio's also waits until every holder of the
    output pipe has closed it, so a background child left running would block it.
    Once `output_read` (the task reading that pipe to its end) is done, it is
    exactly the exit, without the 50 ms poll: the usual case, on the path from
    one step's agent to the next."""
    while process.returncode is None:  # noqa: ASYNC110 (asyncio offers no exit-only event)
        if output_read is None:
            await asyncio.sleep(0.05)
        elif output_read.done():
            return await process.wait()
        else:
            await asyncio.wait({output_read}, timeout=0.05)
    return process.returncode


#: Variable names whose values are secrets, scrubbed from captured output.
_SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH|DATABASE_URL|DSN)",
                          re.I)
#: What every agent-controlled process gets from the worker's environment.
_ALLOWED = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TERM", "TZ")
#: Secrets shorter than this are not scrubbed (they would redact ordinary words).
_MIN_SECRET_CHARS = 6
_URL_PASSWORD = re.compile(r"^[a-z][a-z0-9+.-]*://[^:/@\s]*:([^@/\s]+)@", re.I)


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def agent_environment(extra: Mapping[str, str] | None = None, *,
                      declared: Sequence[str] = ()) -> dict[str, str]:
    """The environment of every process an agent or a plan chose (agent commands,
    shell steps, Claude Code, checks): an allow-list, not the worker's environment
    minus something. It holds PATH, LANG, LC_*, TERM, TZ, a private HOME and TMPDIR
    (the sandbox's), CI=1, the names the worker declares in
    MAKIMA_AGENT_ENV_PASSTHROUGH (comma-separated), the names a directive declares
    (`declared`, its `sandbox.env`), and `extra`."""
    env = {name: os.environ[name] for name in _ALLOWED if name in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.setdefault("LANG", "C.UTF-8")
    env.update(HOME=SANDBOX_HOME, TMPDIR="/tmp", CI="1")
    for name in [*_names(os.environ.get("MAKIMA_AGENT_ENV_PASSTHROUGH", "")), *declared]:
        if name in os.environ:
            env[name] = os.environ[name]
    env.update(extra or {})
    return env


#: What makima's own tools (git) get besides `_ALLOWED`: where git finds its
#: configuration and identity, the SSH agent, proxies, every GIT_* setting, and the
#: variables the credential helper (makima.git) reads. No API key, no DATABASE_URL.
_TOOL_ALLOWED = ("HOME", "USER", "LOGNAME", "XDG_CONFIG_HOME", "SSH_AUTH_SOCK", "TMPDIR",
                 "SSL_CERT_FILE", "SSL_CERT_DIR",
                 "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                 "NO_PROXY", "MAKIMA_GIT_USERNAME", "MAKIMA_GIT_PASSWORD")


def tool_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of the processes makima itself runs on the worker's behalf
    (git): trusted programs, but the same allow-list rule as `agent_environment`,
    so a hook, filter or alias they start never holds the worker's other secrets."""
    env = {name: value for name, value in os.environ.items()
           if name in _ALLOWED or name in _TOOL_ALLOWED or name.startswith("GIT_")}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.update(extra or {})
    return env


def secret_values(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The worker's known secrets, value -> variable name: every variable whose name
    says it is one (KEY, TOKEN, SECRET, PASSWORD, DATABASE_URL, ...), the names in
    MAKIMA_SECRET_NAMES, and the password of any URL-shaped value."""
    environ = os.environ if environ is None else environ
    named = set(_names(environ.get("MAKIMA_SECRET_NAMES", "")))
    found: dict[str, str] = {}
    for name, value in environ.items():
        if name in _ALLOWED:
            continue
        password = _URL_PASSWORD.match(value)
        if password and len(password.group(1)) >= _MIN_SECRET_CHARS // 2:
            found[password.group(1)] = f"{name} password"
        if (name in named or _SECRET_NAME.search(name)) and len(value) >= _MIN_SECRET_CHARS:
            found[value] = name
    return found


def scrub_secrets(text: str, environ: Mapping[str, str] | None = None) -> str:
    """`text` with every known secret value of the worker replaced by
    `[secret NAME]`: the one filter for anything captured from a process before it
    reaches history, Postgres, a prompt or a log."""
    if not text:
        return text
    for value, name in sorted(secret_values(environ).items(), key=lambda kv: -len(kv[0])):
        if value in text:
            text = text.replace(value, f"[secret {name}]")
    return text


def redact_url(url: str) -> str:
    """A URL as it may be shown: its password (user:password@) replaced by ***."""
    return re.sub(r"^([a-z][a-z0-9+.-]*://[^:/@\s]*):[^@/\s]*@", r"\1:***@", url, flags=re.I)


def kill_process_group(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal the process group led by `pid`; a group that is gone already is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


async def terminate_group(process: asyncio.subprocess.Process,
                          grace: float = KILL_GRACE_SECONDS) -> None:
    """SIGTERM the group, SIGKILL it after `grace` seconds, and reap the leader.

    The group, not only the leader: `bash -c 'sleep 600 & wait'` leaves the sleep
    behind when only bash is killed."""
    kill_process_group(process.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(wait_for_exit(process), grace)
    except TimeoutError:
        pass
    # Children may outlive a leader that obeyed SIGTERM; SIGKILL whatever is left.
    kill_process_group(process.pid, signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(wait_for_exit(process), grace)


async def run_process(
    argv: Sequence[str],
    *,
    cwd: Path | str,
    env: Mapping[str, str] | None = None,
    timeout_seconds: float | None = None,
    tail_bytes: int = DEFAULT_TAIL_BYTES,
    on_start: Callable[[int], None] | None = None,
    dies_with_worker: bool = False,
) -> ProcessResult:
    """Run `argv` in a new session (its own process group), stdin closed, stdout and
    stderr merged into one bounded tail. A timeout kills the group and returns
    `exit_code=None, timed_out=True`; cancellation kills the group and re-raises.

    The group dies with this worker: `argv` is led by the watchdog
    (makima.lifeline), unless `dies_with_worker` says `argv` sees to that itself."""
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        *(argv if dies_with_worker else lifeline.guarded(argv)),
        cwd=str(cwd),
        env=dict(env) if env is not None else None,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    if on_start is not None:
        on_start(process.pid)
    with lifeline.recorded(process.pid):
        return await _finish(process, started, timeout_seconds, tail_bytes)


async def _finish(process: asyncio.subprocess.Process, started: float,
                  timeout_seconds: float | None, tail_bytes: int) -> ProcessResult:
    tail = TailBuffer(tail_bytes)

    async def pump() -> None:
        assert process.stdout is not None
        while chunk := await process.stdout.read(_READ_CHUNK):
            tail.write(chunk)

    reader = asyncio.create_task(pump())
    timed_out = False
    exit_code: int | None
    try:
        exit_code = await asyncio.wait_for(wait_for_exit(process, reader), timeout_seconds)
    except TimeoutError:
        timed_out = True
        exit_code = None
        await terminate_group(process)
    except BaseException:
        # Cancelled (or anything unexpected): never leave the group running.
        await asyncio.shield(terminate_group(process))
        reader.cancel()
        raise
    # The leader is gone; whatever it left running in its group goes too (a stray
    # background child would otherwise hold the output pipe open forever).
    kill_process_group(process.pid, signal.SIGKILL)
    # a grandchild that left the group may still hold the pipe: then stop reading
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(reader, 5.0)
    output = scrub_secrets(tail.text())
    if timed_out:
        output += f"\n[killed: timed out after {timeout_seconds:g} s]"
    return ProcessResult(exit_code, output, timed_out, time.monotonic() - started, process.pid)


async def run_confined(
    argv: Sequence[str],
    confinement: Confinement,
    *,
    env: Mapping[str, str],
    timeout_seconds: float | None = None,
    tail_bytes: int = DEFAULT_TAIL_BYTES,
) -> ProcessResult:
    """`run_process` for anything an agent or a plan chose: inside the sandbox
    (makima.sandbox), in the worktree, with `env` (build it with
    `agent_environment`). With MAKIMA_SANDBOX=off the process still gets the
    allow-listed environment and a HOME of its own.

    In the sandbox no watchdog leads the group: bubblewrap's `--die-with-parent`
    has the kernel kill it when the worker dies, and everything the command starts
    lives in the sandbox's own PID namespace, which dies with it (makima.lifeline).
    That is one Python start-up fewer before every agent command and check."""
    if sandbox_enabled():
        return await run_process(confine(list(argv), confinement), cwd=confinement.worktree,
                                 env=env, timeout_seconds=timeout_seconds,
                                 tail_bytes=tail_bytes, dies_with_worker=True)
    with tempfile.TemporaryDirectory(prefix="makima-home-") as home:
        return await run_process(argv, cwd=confinement.worktree, env={**env, "HOME": home},
                                 timeout_seconds=timeout_seconds, tail_bytes=tail_bytes)
