"""Composite evaluation of a step attempt: the programmatic checks (the step's
`verify` commands and the repository's own test commands, detected from its
files), run in the attempt's worktree, and the rule that combines them with the
LLM judge's score into one score and confidence.

The rule (`composite_score`):

- With an LLM judge: the score is the judge's score. The judge sees every check's
  command, exit code and output, so it already weighs them; on top of that, a
  failing *required* check caps the score just below the yellow threshold
  (`yellow - REQUIRED_FAILURE_MARGIN`), so an attempt whose tests fail is always
  red and goes back for rework, whatever the judge thought.
- Programmatic only (no ANTHROPIC_API_KEY with `evaluator: auto`, or
  `evaluator: programmatic`): the score is the fraction of checks that passed,
  with the same cap when a required check failed.
- No checks and no judge: nothing verified the attempt, so it is neither passed
  automatically nor sent back with nothing to fix. The score is exactly the
  yellow threshold: under `guarded` autonomy a person approves or denies it;
  under `full_auto` it passes as yellow. Add `verify` commands to a step to
  get a real verdict without an LLM.

Confidence then follows `makima.policy.confidence_for` (green ≥ green
threshold, yellow ≥ yellow threshold, else red); `passed` means green.

Auto-detected checks (each only when the repository has it and the tool is
installed on the worker): pytest (test files `test_*.py` / `*_test.py`),
`npm test` (a package.json with a real `test` script), `cargo test`
(Cargo.toml), `go test ./...` (go.mod), `make test` (a Makefile with a `test`
target). All checks are required. MAKIMA_AUTO_CHECKS=0 turns detection off;
MAKIMA_CHECK_TIMEOUT sets the seconds each check may run (default 600).

Commands run through `/bin/sh -c` in the worktree inside the sandbox
(makima.sandbox: the worktree and nothing else, no network unless the
directive's `sandbox.network`), with the allow-listed environment of
makima.process.agent_environment (CI=1 included), in their own process group,
killed on timeout or cancellation, their output bounded and scrubbed of the
worker's secrets.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import stat
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from makima.git import git
from makima.models import CheckResult, CriterionResult, SandboxSettings, Thresholds
from makima.process import agent_environment, run_confined, truncate_tail
from makima.sandbox import Confinement

#: How much of a check's output an Evaluation keeps (the end, where failures are).
OUTPUT_TAIL_CHARS = 4000
DEFAULT_CHECK_TIMEOUT_SECONDS = 600.0
#: A failing required check scores at most this far below the yellow threshold.
REQUIRED_FAILURE_MARGIN = 0.01
#: How much of the diff the judge sees.
MAX_DIFF_CHARS = 60_000
_NPM_PLACEHOLDER_TEST = 'echo "Error: no test specified" && exit 1'
_SKIP_DIRS = {".git", "node_modules", ".venv", "venv", "target", "dist", "build", "__pycache__"}


class JudgeVerdict(BaseModel):
    """What the LLM judge answers (the input schema of its tool)."""

    model_config = ConfigDict(extra="forbid")

    score: float = Field(ge=0.0, le=1.0, description="0.0 (not done) to 1.0 (fully done)")
    summary: str = Field(description="what the attempt achieved and what is missing, briefly")
    criteria: list[CriterionResult] = Field(
        default_factory=list, description="one result per criterion or task-plan demand checked"
    )
    rework_instructions: str = Field(
        "", description="when not complete: exactly what the agent must change next"
    )


# --------------------------------------------------------------------------- detection


def _files(root: Path, limit: int = 20_000) -> Iterator[Path]:
    """Files under root, skipping vendored and build folders, at most `limit`."""
    count = 0
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
        for name in names:
            count += 1
            if count > limit:
                return
            yield Path(folder) / name


def _pytest_command() -> str | None:
    # The worker's own Python first: a `pytest` found on PATH may be a version
    # manager's shim that fails for reasons unrelated to the repository.
    if importlib.util.find_spec("pytest") is not None:
        return f"{shlex.quote(sys.executable)} -m pytest -q"
    if shutil.which("pytest"):
        return "pytest -q"
    return None


#: Largest file read to detect a repository's checks (a Makefile, package.json).
MAX_DETECTION_BYTES = 1024 * 1024


def _read_small(path: Path) -> str | None:
    """`path`'s text when it is a regular file of at most MAX_DETECTION_BYTES, else
    None: an agent's worktree may hold a FIFO (reading it blocks) or a sparse 50 GB
    file (reading it exhausts the worker)."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_DETECTION_BYTES:
            return None
        with path.open("rb") as handle:
            return handle.read(MAX_DETECTION_BYTES).decode("utf-8", "replace")
    except OSError:
        return None


def _has_make_test_target(makefile: Path) -> bool:
    text = _read_small(makefile)
    return text is not None and re.search(r"^test\s*:", text, re.MULTILINE) is not None


def detect_checks(worktree: Path) -> list[str]:
    """The repository's own test commands, each only when the repository has it
    and its tool is installed here. Blocking (it walks the tree): call it from a
    thread."""
    commands: list[str] = []
    if any(re.fullmatch(r"test_.*\.py|.*_test\.py", p.name) for p in _files(worktree)):
        pytest_command = _pytest_command()
        if pytest_command:
            commands.append(pytest_command)
    package = worktree / "package.json"
    if package.is_file() and shutil.which("npm"):
        try:
            script = (json.loads(_read_small(package) or "{}").get("scripts") or {}).get("test")
        except (json.JSONDecodeError, AttributeError):
            script = None
        if script and script.strip() != _NPM_PLACEHOLDER_TEST:
            commands.append("npm test")
    if (worktree / "Cargo.toml").is_file() and shutil.which("cargo"):
        commands.append("cargo test")
    if (worktree / "go.mod").is_file() and shutil.which("go"):
        commands.append("go test ./...")
    makefile = next((worktree / n for n in ("GNUmakefile", "makefile", "Makefile")
                     if (worktree / n).is_file()), None)
    if makefile is not None and shutil.which("make") and _has_make_test_target(makefile):
        commands.append("make test")
    return commands


def checks_for(verify: list[str], worktree: Path, *, auto_detect: bool = True) -> list[str]:
    """The step's verify commands, then detected ones not already among them."""
    commands = [c for c in verify if c.strip()]
    if auto_detect:
        commands += [c for c in detect_checks(worktree) if c not in commands]
    return commands


# --------------------------------------------------------------------------- running


async def run_check(command: str, cwd: Path, *, timeout_seconds: float,
                    required: bool = True,
                    sandbox: SandboxSettings | None = None) -> CheckResult:
    """Run one check, confined; a timeout or a failure to start gives exit_code None."""
    sandbox = sandbox or SandboxSettings()
    started = time.monotonic()
    try:
        result = await run_confined(["/bin/sh", "-c", command],
                                    Confinement(cwd, network=sandbox.network),
                                    env=agent_environment(declared=sandbox.env),
                                    timeout_seconds=timeout_seconds)
    except OSError as exc:
        return CheckResult(command=command, exit_code=None, required=required,
                           duration_seconds=round(time.monotonic() - started, 3),
                           output_tail=f"could not start: {exc}")
    return CheckResult(command=command, exit_code=result.exit_code, required=required,
                       duration_seconds=round(result.duration_seconds, 3),
                       output_tail=truncate_tail(result.output, OUTPUT_TAIL_CHARS))


async def run_checks(
    commands: list[str],
    cwd: Path,
    *,
    timeout_seconds: float = DEFAULT_CHECK_TIMEOUT_SECONDS,
    on_progress: Callable[[str], None] | None = None,
    sandbox: SandboxSettings | None = None,
) -> list[CheckResult]:
    """Run the checks one after another (test suites often share files or ports)."""
    results = []
    for index, command in enumerate(commands, 1):
        if on_progress:
            on_progress(f"check {index}/{len(commands)}: {command}")
        results.append(await run_check(command, cwd, timeout_seconds=timeout_seconds,
                                       sandbox=sandbox))
    return results


async def diff_against(worktree: Path, base: str, *, limit: int = MAX_DIFF_CHARS) -> str:
    """`git diff <base>...HEAD` in the worktree (what the attempt changed since it
    branched off), truncated; an explanation instead when git cannot say."""
    result = await git("diff", "--no-color", "--no-ext-diff", f"{base}...HEAD", cwd=worktree,
                       check=False)
    if result.code != 0:
        return f"(git diff {base}...HEAD failed: {result.stderr.strip()})"
    text = result.stdout
    if len(text) > limit:
        return text[:limit] + f"\n[... diff truncated: {len(text) - limit} more characters]"
    return text


# --------------------------------------------------------------------------- scoring


def required_failures(checks: list[CheckResult]) -> list[CheckResult]:
    return [c for c in checks if c.required and not c.passed]


def composite_score(checks: list[CheckResult], judge_score: float | None,
                    thresholds: Thresholds) -> float:
    """One score from the checks and the judge (the rule in the module docstring)."""
    if judge_score is not None:
        score = judge_score
    elif checks:
        score = sum(c.passed for c in checks) / len(checks)
    else:
        score = thresholds.yellow
    if required_failures(checks):
        score = min(score, max(thresholds.yellow - REQUIRED_FAILURE_MARGIN, 0.0))
    return round(min(max(score, 0.0), 1.0), 4)


def check_summary(checks: list[CheckResult]) -> str:
    if not checks:
        return "no checks ran"
    passed = sum(c.passed for c in checks)
    return f"{passed}/{len(checks)} checks passed"


def failing_checks_instructions(checks: list[CheckResult], tail: int = 1500) -> str:
    """Rework instructions naming each failed required check and its output's end."""
    parts = []
    for check in required_failures(checks):
        state = ("did not finish" if check.exit_code is None
                 else f"exited with code {check.exit_code}")
        parts.append(f"Make `{check.command}` pass (it {state}). End of its output:\n"
                     f"{check.output_tail[-tail:].strip()}")
    return "\n\n".join(parts)
