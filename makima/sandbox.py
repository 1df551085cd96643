"""The bubblewrap sandbox every agent-controlled process runs in: the anthropic
agent's commands, shell steps, the whole Claude Code process (and so every
command its Bash tool runs) and every check.

Inside the sandbox a process sees:

- the attempt's worktree, read-write, at its own path (its `.git` pointer file
  and its admin folder's `commondir` and `gitdir` read-only, so it cannot point
  makima's own git, which runs outside, at a repository or config it made);
- the git data the worktree needs: the attempt's own admin folder and the
  object store read-write, everything else of the repository (refs, config,
  hooks, and a `path` repository's checkout) read-only, so an agent's commits
  stay in its attempt and only makima moves branches;
- the system read-only: /usr, /bin, /sbin, /lib*, /etc, /opt, the worker's
  Python installation and the folders on PATH;
- a private, empty `/tmp` and `HOME` (`/tmp/home`), a private `/dev`, and a new
  PID namespace, so the worker's `/proc` is invisible;
- nothing else: not `MAKIMA_HOME` (other worktrees, logs, clones), not the
  worker's home or project folder;
- no network (not even the worker's loopback, where Temporal and Postgres
  listen) unless `network=True` (a directive's `sandbox.network`). Claude Code
  reaches the model API through makima.executors.model_proxy instead.

The process runs as an unprivileged uid inside a user namespace (SANDBOX_UID),
whatever uid the worker has: a root worker's agent is not root.

`MAKIMA_SANDBOX=off` turns confinement off (an explicit, logged opt-out for
machines that cannot run bubblewrap); `require_sandbox()` at worker start
checks that bubblewrap works and says how to install it when it does not.
The environment a sandboxed process gets is built by makima.process.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from makima.errors import MakimaError

logger = logging.getLogger(__name__)

#: The uid and gid an agent runs as inside the sandbox.
SANDBOX_UID = 1000
#: The private home every sandboxed process gets (inside its private /tmp).
SANDBOX_HOME = "/tmp/home"
INSTALL_HINT = ("install bubblewrap on the worker (Debian/Ubuntu: `apt-get install bubblewrap`; "
                "Fedora: `dnf install bubblewrap`), or set MAKIMA_SANDBOX=off to run agent "
                "commands and checks unconfined (not recommended)")
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt")
#: Under /etc, what only root may read: hidden, because the agent's uid maps to the
#: worker's outside the sandbox (a root worker's agent could read them otherwise).
_MASKED = ("/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-", "/etc/sudoers",
           "/etc/sudoers.d", "/etc/ssh", "/etc/ssl/private")


class SandboxUnavailable(MakimaError):
    """bubblewrap is missing or cannot create a sandbox here."""

    non_retryable = True


def sandbox_enabled() -> bool:
    """False only when MAKIMA_SANDBOX=off (or 0/false/no)."""
    value = (os.environ.get("MAKIMA_SANDBOX") or "on").strip().lower()
    return value not in {"off", "0", "false", "no"}


@dataclass(frozen=True)
class Confinement:
    """What one sandboxed process may touch: its worktree, the network or not, a
    folder kept as its HOME across runs (else HOME is empty and private), and
    extra folders it may read."""

    worktree: Path
    network: bool = False
    home: Path | None = None
    readonly: tuple[Path, ...] = ()


def _git_data(worktree: Path) -> tuple[Path | None, Path | None]:
    """(the worktree's own git admin folder, the repository's common git folder)."""
    pointer = worktree / ".git"
    if not pointer.is_file():
        return None, (pointer if pointer.is_dir() else None)
    with pointer.open("rb") as file:  # a pointer is one short line; never read more
        text = file.read(4096).decode(errors="replace").strip()
    if not text.startswith("gitdir:"):
        return None, None
    admin = (worktree / text.removeprefix("gitdir:").strip()).resolve()
    common_file = admin / "commondir"
    if common_file.is_file():
        common = (admin / common_file.read_text().strip()).resolve()
    else:
        common = admin
    return admin, common


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _readonly_roots() -> list[Path]:
    roots = [Path(d) for d in _SYSTEM_DIRS]
    roots += [Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable).parent]
    for entry in (os.environ.get("PATH") or "").split(os.pathsep):
        if entry.startswith("/"):
            roots.append(Path(entry))
    return roots


@functools.lru_cache(maxsize=8)
def _system_binds(path_variable: str) -> tuple[tuple[Path, Path], ...]:
    """(the folder, where it resolves to) of every read-only root that exists, for
    this PATH. Resolving them took about 10 ms of the worker's CPU before every
    sandboxed command (on the path from one step's agent to the next); they are
    the system's folders, so a worker resolves them once."""
    del path_variable  # the cache key: _readonly_roots reads PATH itself
    binds: dict[Path, Path] = {}
    for root in _readonly_roots():
        if root not in binds and root.exists():
            binds[root] = root.resolve()
    return tuple(binds.items())


def bwrap_command(argv: list[str], confinement: Confinement) -> list[str]:
    """`argv` wrapped in bubblewrap as the module docstring describes.

    Mounts are ordered parents first, so the worktree's read-write bind lands on
    top of the read-only repository or the empty MAKIMA_HOME above it."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable(f"bubblewrap (bwrap) is not installed: {INSTALL_HINT}")
    worktree = confinement.worktree.resolve()
    admin, common = _git_data(worktree)
    mounts: list[tuple[Path, list[str]]] = []
    system = _system_binds(os.environ.get("PATH") or "")
    for root, resolved in system:
        mounts.append((root, ["--ro-bind", str(resolved), str(root)]))
    mounts.append((Path("/tmp"), ["--tmpfs", "/tmp"]))
    for masked in map(Path, _MASKED):
        if masked.is_dir():
            mounts.append((masked, ["--tmpfs", str(masked)]))
        elif masked.exists():
            mounts.append((masked, ["--ro-bind", "/dev/null", str(masked)]))
    # Whatever of makima's own folder and the worker's home a bind above reaches
    # is covered again: the sandbox sees neither.
    private = [Path(os.environ.get("MAKIMA_HOME") or ".makima").expanduser().resolve(),
               Path.home().resolve()]
    for folder in private:
        if any(_inside(folder, resolved) for _, resolved in system) and folder.exists():
            mounts.append((folder, ["--tmpfs", str(folder)]))
    if common is not None:
        repository = common.parent if common.name == ".git" else common
        mounts.append((repository, ["--ro-bind", str(repository), str(repository)]))
        objects = common / "objects"
        mounts.append((objects, ["--bind", str(objects), str(objects)]))
    if admin is not None:
        mounts.append((admin, ["--bind", str(admin), str(admin)]))
        # Where git finds the repository and the worktree: an agent that could
        # rewrite these would point makima's own git (run outside the sandbox) at a
        # config of its making (core.fsmonitor runs commands).
        for name in ("commondir", "gitdir"):
            if (admin / name).is_file():
                mounts.append((admin / name, ["--ro-bind", str(admin / name), str(admin / name)]))
    mounts.append((worktree, ["--bind", str(worktree), str(worktree)]))
    if (worktree / ".git").is_file():
        pointer = worktree / ".git"
        mounts.append((pointer, ["--ro-bind", str(pointer), str(pointer)]))
    for folder in confinement.readonly:
        mounts.append((folder, ["--ro-bind", str(folder), str(folder)]))
    if confinement.home is not None:
        mounts.append((Path(SANDBOX_HOME), ["--bind", str(confinement.home), SANDBOX_HOME]))
    else:
        mounts.append((Path(SANDBOX_HOME), ["--dir", SANDBOX_HOME]))
    mounts.sort(key=lambda item: len(item[0].parts))  # stable: parents first
    command = [bwrap, "--die-with-parent", "--unshare-all", "--unshare-user",
               "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)]
    if confinement.network:
        command.append("--share-net")
    command += ["--proc", "/proc", "--dev", "/dev"]
    for _, args in mounts:
        command += args
    command += ["--chdir", str(worktree), "--", *argv]
    return command


def confine(argv: list[str], confinement: Confinement) -> list[str]:
    """`argv` as it must be started: inside bubblewrap, or unchanged when the
    sandbox is turned off."""
    if not sandbox_enabled():
        return list(argv)
    return bwrap_command(argv, confinement)


def require_sandbox() -> str:
    """At worker start: prove that bubblewrap can build the sandbox here (a real
    run of `true` inside it) and describe the result; SandboxUnavailable with the
    fix otherwise. MAKIMA_SANDBOX=off is logged as the opt-out it is."""
    if not sandbox_enabled():
        message = ("MAKIMA_SANDBOX=off: agent commands, shell steps, Claude Code and checks run WITHOUT "
                   "confinement, with the worker's file-system access and network")
        logger.warning(message)
        return message
    with tempfile.TemporaryDirectory(prefix="makima-sandbox-probe-") as folder:
        command = bwrap_command(["/bin/sh", "-c", "test -w ."],
                                Confinement(Path(folder)))
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=30,
                                  env={"PATH": "/usr/bin:/bin"}, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SandboxUnavailable(f"bubblewrap could not start: {exc}; {INSTALL_HINT}") from exc
    if done.returncode != 0:
        raise SandboxUnavailable(
            f"bubblewrap cannot create a sandbox here (exit {done.returncode}: "
            f"{done.stderr.strip()[-500:]}); it needs unprivileged user namespaces "
            f"(sysctl kernel.unprivileged_userns_clone=1) or: {INSTALL_HINT}")
    message = "sandbox: bubblewrap works; agent commands, shell steps, Claude Code and checks are confined"
    logger.info(message)
    return message
