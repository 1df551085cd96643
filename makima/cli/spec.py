"""Loading a directive spec for `makima start`: the file (YAML or JSON), the
command-line overrides, then every problem at once: the model's validation
errors, the supplied plan's DAG problems, and the repository's (the folder
exists, is a git repository, has the base branch), and what would fail a second
after the start (an LLM role without credentials, a shell step without a
command). Nothing is started for a
spec with a problem; `SpecError.problems` lists them all.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from makima.dag import validate_plan
from makima.errors import SpecError
from makima.models import DirectiveSpec, EvaluatorKind, ExecutorKind, Plan, PlannerKind


def read_document(path: Path) -> Any:
    """A YAML or JSON file's content (JSON is read as JSON for its clearer errors)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except UnicodeDecodeError as error:
        raise SpecError(f"{path}: not UTF-8 text (byte {error.start} cannot be decoded); "
                        "save the spec as UTF-8") from None
    except OSError as error:
        raise SpecError(f"{path}: cannot be read ({error.strerror})") from None
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise SpecError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                        f"{error}") from None


def _location(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(spec)"


def pydantic_problems(error: ValidationError, prefix: str = "") -> list[str]:
    problems = []
    for item in error.errors():
        where = _location(tuple(item["loc"]))
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{prefix}{where}: {message}")
    return problems


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          check=False)


def repository_problems(raw: Any) -> list[str]:
    """Problems of a local repository (a `url` repository is checked by the worker)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("path"), str) or not raw["path"]:
        return []
    path = Path(raw["path"])
    base = raw.get("base_branch") or "main"
    if not path.exists():
        return [f"repository.path: {path} does not exist"]
    if not path.is_dir():
        return [f"repository.path: {path} is not a folder"]
    if _git(path, "rev-parse", "--git-dir").returncode != 0:
        return [f"repository.path: {path} is not a git repository"]
    if not isinstance(base, str):
        return []
    if _git(path, "rev-parse", "--verify", "--quiet", f"refs/heads/{base}").returncode != 0:
        branches = _git(path, "branch", "--format=%(refname:short)").stdout.split()
        return [f"repository.base_branch: branch {base!r} does not exist in {path}"
                + (f" (branches: {', '.join(branches)})" if branches else " (it has no commits)")]
    return []


def _plan_problems(raw_plan: Any) -> list[str]:
    try:
        plan = Plan.model_validate(raw_plan)
    except ValidationError:
        return []  # already reported by the spec's own validation
    return [f"plan: {problem}" for problem in validate_plan(plan)]


#: Where the CLI looks for model credentials before it starts anything. The worker
#: reads its own environment; a client without them is taken as a sign that the
#: deployment has none (MAKIMA_PREFLIGHT=0 skips this for split deployments).
CREDENTIAL_VARIABLES = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN")


def runnable_problems(spec: DirectiveSpec, env: Mapping[str, str]) -> list[str]:
    """Why a valid spec still cannot run: an LLM role with no credentials, or a
    shell step with nothing to run."""
    problems: list[str] = []
    if spec.executor is ExecutorKind.SHELL and spec.plan is not None:
        problems += [f"plan.steps.{s.name}: the shell executor runs a step's `command`, "
                     "and this step has none" for s in spec.plan.steps if not s.command]
    if env.get("MAKIMA_PREFLIGHT", "1").strip() == "0" or \
            any((env.get(name) or "").strip() for name in CREDENTIAL_VARIABLES):
        return problems
    needs = []
    if spec.effective_planner is PlannerKind.LLM:
        needs.append("planner: no plan is supplied, so an LLM plans it")
    if spec.evaluator is EvaluatorKind.LLM:
        needs.append("evaluator: llm")
    if spec.executor in (ExecutorKind.ANTHROPIC, ExecutorKind.CLAUDE_CODE):
        needs.append(f"executor: {spec.executor.value}")
    problems += [f"{need} needs model credentials, and ANTHROPIC_API_KEY is not set "
                 "(set it, supply a plan, or use executor: shell)" for need in needs]
    return problems


def load_spec(
    path: Path | None,
    *,
    title: str | None = None,
    goal: str | None = None,
    repo: str | None = None,
    plan: Path | None = None,
    base: Path | None = None,
) -> DirectiveSpec:
    """The spec in `path` (or built from the flags alone) with the overrides
    applied, its repository path made absolute (relative to `base`, default the
    current folder). Raises SpecError listing every problem."""
    raw: Any = read_document(path) if path is not None else {}
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: the spec must be a mapping of fields, got {type(raw).__name__}")
    if title is not None:
        raw["title"] = title
    if goal is not None:
        raw["goal"] = goal
    if repo is not None:
        repository = raw.get("repository") if isinstance(raw.get("repository"), dict) else {}
        raw["repository"] = {**repository, "path": repo}
        raw["repository"].pop("url", None)
    if plan is not None:
        raw["plan"] = read_document(plan)
    repository = raw.get("repository")
    if isinstance(repository, dict) and isinstance(repository.get("path"), str):
        location = Path(repository["path"]).expanduser()
        if not location.is_absolute():
            location = (base or Path.cwd()) / location
        repository["path"] = str(location.resolve())

    problems: list[str] = []
    spec: DirectiveSpec | None = None
    try:
        spec = DirectiveSpec.model_validate(raw)
    except ValidationError as error:
        problems += pydantic_problems(error)
    if raw.get("carry") is not None:
        problems.append("carry: set by makima itself; remove it from the spec")
    if raw.get("plan") is not None:
        problems += _plan_problems(raw["plan"])
    problems += repository_problems(repository)
    if spec is not None:
        problems += runnable_problems(spec, os.environ)
    if problems or spec is None:
        raise SpecError(problems or ["the spec is invalid"])
    return spec
