"""The test session's embedded stack, started ONCE through the real command
(`python starter.py dev` on free ports, in a fresh MAKIMA_HOME) and shared by the
CLI, demo and browser tests; stopped at the end with SIGTERM, and every process
it reported (Temporal dev server, Postgres) killed by pid if still alive.

    from tests.devstack_fixture import dev_stack, cli  # noqa: F401
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from makima.devstack import free_port
from makima.store.embedded import _pid_alive, running_embedded, stop_embedded
from tests.fakes.repos import install_fake

ROOT = Path(__file__).resolve().parents[1]
STARTER = ROOT / "starter.py"
READY_TIMEOUT = 90.0


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                          text=True).stdout


@dataclass
class RunningDev:
    process: subprocess.Popen[str]
    home: Path
    address: str
    ui_url: str
    ready_line: str
    console_url: str = ""
    before_ready: list[str] = field(default_factory=list)  # what it printed before `ready`
    output: list[str] = field(default_factory=list)  # everything it printed, growing
    pids: dict[str, int] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """`python starter.py ARGS` in a real subprocess against this stack."""
        return subprocess.run([sys.executable, str(STARTER), *args], env=self.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout, check=False)

    def temporal(self, *args: str) -> str:
        """The plain `temporal` CLI against this stack."""
        return subprocess.run([str(Path(sys.executable).parent / "temporal"), *args,
                               "--address", self.address], capture_output=True, text=True,
                              check=True, timeout=30).stdout


def start_dev(home: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], list[str]]:
    """`starter.py dev` on free ports; the process and its first output lines once ready.
    The dev server also binds ports of its own choosing from the ephemeral range, where
    a connection may have taken one first: it then exits with "address already in
    use", and this tries again on new ports (`dev` itself leaves the choice to you)."""
    for _ in range(2):
        process, lines = _start_dev_once(home, env)
        if process.poll() is None or not any("address already in use" in x for x in lines):
            break
    if process.poll() is not None:
        stop_dev(process, lines)
        raise RuntimeError("makima dev did not get ready:\n" + "\n".join(lines))
    return process, lines


def _start_dev_once(home: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], list[str]]:
    port, ui_port, console_port = free_port(), free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, str(STARTER), "dev", "--port", str(port), "--ui-port", str(ui_port),
         "--console-port", str(console_port)],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    lines: list[str] = []
    deadline = time.monotonic() + READY_TIMEOUT
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break  # it exited
        lines.append(line.rstrip("\n"))
        if line.startswith("makima dev: pids"):
            # keep reading what it logs, so a full pipe never blocks it
            threading.Thread(target=lambda: [lines.append(x.rstrip("\n")) for x in
                                             process.stdout], daemon=True).start()
            return process, lines
    try:  # not ready in time, or exited: either way it has ended now
        stop_dev(process, lines)
    except AssertionError as err:  # start_dev reports it with everything dev printed
        lines.append(str(err))
    return process, lines


def reported_pids(lines: list[str]) -> dict[str, int]:
    for line in lines:
        if line.startswith("makima dev: pids"):
            return {k: int(v) for k, v in (p.split("=") for p in line.split()[3:])}
    return {}


def stop_dev(process: subprocess.Popen[str], lines: list[str], home: Path | None = None) -> int:
    """SIGTERM the dev process and wait; then kill by pid whatever it reported and left
    running, and raise: `dev` must stop everything it started on SIGTERM, and a test
    that only checked "all gone" after a quiet kill here would hide a leak."""
    problems = []
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            problems.append("did not exit within 30 s of SIGTERM (killed)")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
    pids = reported_pids(lines)
    deadline = time.monotonic() + 10
    while any(_pid_alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = {name: pid for name, pid in pids.items() if _pid_alive(pid)}
    if home is not None and "postgres" not in pids and running_embedded(home):
        left["postgres"] = running_embedded(home)
    if left:
        problems.append(f"left {left} running (now killed by pid)")
    if "temporal" in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(left["temporal"], signal.SIGKILL)
    if "postgres" in left:
        stop_embedded(left["postgres"])
    if problems:
        raise AssertionError(f"makima dev (exit {process.returncode}) " + "; ".join(problems))
    return process.returncode


def dev_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "DATABASE_URL",
                        "TEMPORAL_ADDRESS", "MAKIMA_TASK_QUEUE", "MAKIMA_UI_URL")}
    env.update({"MAKIMA_HOME": str(home), "MAKIMA_AUTO_CHECKS": "0",
                "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"})
    return env


_SHARED: list[RunningDev] = []


@pytest.fixture(scope="session")
def dev_stack() -> Iterator[RunningDev]:
    # Imported by several test modules, pytest makes one session fixture per module;
    # the first starts the stack and owns it, the others share it.
    if _SHARED:
        yield _SHARED[0]
        return
    # short path: the embedded Postgres keeps its unix socket in there
    home = Path(tempfile.mkdtemp(prefix="mk-dev-"))
    env = dev_env(home)
    # `completion: pr` runs the stand-in GitHub CLI, which logs its calls to gh.log
    install_fake("gh", home / "bin")
    env.update(PATH=f"{home / 'bin'}{os.pathsep}{env.get('PATH', os.defpath)}",
               FAKE_GH_LOG=str(home / "gh.log"))
    process, lines = start_dev(home, env)
    try:
        ready = next(line for line in lines if line.startswith("makima dev: ready"))
        fields = dict(part.split("=", 1) for part in ready.split()[3:])
        env = {**env, "TEMPORAL_ADDRESS": fields["temporal"], "MAKIMA_UI_URL": fields["ui"]}
        _SHARED.append(RunningDev(process=process, home=home, address=fields["temporal"],
                                  ui_url=fields["ui"], ready_line=ready,
                                  console_url=fields.get("console", ""),
                                  before_ready=lines[:lines.index(ready)], output=lines,
                                  pids=reported_pids(lines), env=env))
        yield _SHARED[0]
    finally:
        _SHARED.clear()
        stop_dev(process, lines, home)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def cli(dev_stack: RunningDev, monkeypatch: pytest.MonkeyPatch):
    """`main(argv)` in this process against the stack; returns (exit code, stdout, stderr)."""
    from starter import main

    for key in ("TEMPORAL_ADDRESS", "MAKIMA_UI_URL", "MAKIMA_HOME"):
        monkeypatch.setenv(key, dev_stack.env[key])
    for key in ("DATABASE_URL", "MAKIMA_TASK_QUEUE", "TEMPORAL_NAMESPACE"):
        monkeypatch.delenv(key, raising=False)

    def run(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def sample_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    env_git = ["-c", "user.name=t", "-c", "user.email=t@t"]
    git(repo, "init", "-q", "-b", "main")
    (repo / "README.md").write_text("sample\n")
    git(repo, "add", ".")
    git(repo, *env_git, "commit", "-q", "-m", "initial")
    return repo
