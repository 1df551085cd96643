"""Bad input, table-driven: malformed specs, workflow inputs, signal and update
payloads, and repositories that cannot be used. Each is refused with a message
that names the problem, and nothing is started or written: no step runs, no
child workflow starts, no state changes, nothing is created on disk.

Specs are checked by `DirectiveSpec` (what the CLI and the workflow decode);
workflow inputs, signals and updates go to a real DirectiveWorkflow on the
Temporal test server with stand-in activities; repositories go through the
real `prepare_repository` activity.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from temporalio.api.enums.v1 import EventType as HistoryEventType
from temporalio.client import Client, WorkflowFailureError, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.execution import ExecutionActivities
from makima.contracts import ActivityName, PrepareInput
from makima.models import DirectiveSpec, DirectiveStatus, Repository
from tests.standins import StandIns, spec_of, start, status, wait_until
from worker import build_worker

GOOD: dict[str, Any] = {"title": "t", "goal": "g", "executor": "shell",
                        "repository": {"path": "/tmp/repo"},
                        "plan": {"steps": [{"name": "a", "command": "true"}]}}


def good(**changes: Any) -> dict[str, Any]:
    spec = json.loads(json.dumps(GOOD))
    for key, value in changes.items():
        if value is _DROP:
            spec.pop(key)
        else:
            spec[key] = value
    return spec


_DROP = object()

# (case id, spec JSON or bytes, words the refusal must contain)
SPEC_CASES: list[tuple[str, dict[str, Any] | bytes, list[str]]] = [
    ("missing-title", good(title=_DROP), ["title", "Field required"]),
    ("missing-goal", good(goal=_DROP), ["goal", "Field required"]),
    ("missing-repository", good(repository=_DROP), ["repository", "Field required"]),
    ("title-wrong-type", good(title=5), ["title", "string"]),
    ("blank-goal", good(goal="   "), ["goal", "must not be blank"]),
    ("ten-megabyte-goal", good(goal="x" * 10_000_000), ["goal", "100000"]),
    ("requirements-too-long", good(requirements=["x" * 60_000], constraints=["y" * 50_000]),
     ["requirements, constraints hold 110,000 characters together", "at most 100,000"]),
    ("repository-path-and-url", good(repository={"path": "/r", "url": "https://x/r.git"}),
     ["exactly one of 'path' or 'url'"]),
    ("repository-neither", good(repository={"base_branch": "main"}),
     ["exactly one of 'path' or 'url'"]),
    ("negative-rework-budget", good(budgets={"max_rework_cycles": -1}),
     ["max_rework_cycles", "greater than or equal to 0"]),
    ("negative-cost-budget", good(budgets={"max_cost_usd": -5}),
     ["max_cost_usd", "greater than or equal to 0"]),
    ("zero-wall-time", good(budgets={"max_wall_time_minutes": 0}),
     ["max_wall_time_minutes", "greater than 0"]),
    ("budget-wrong-type", good(budgets={"max_rework_cycles": "lots"}),
     ["max_rework_cycles", "integer"]),
    ("thresholds-out-of-order", good(thresholds={"green": 0.4, "yellow": 0.7}),
     ["thresholds out of order", "yellow (0.7)", "green (0.4)"]),
    ("threshold-above-one", good(thresholds={"green": 1.5}), ["green", "less than or equal to 1"]),
    ("unknown-executor", good(executor="bash"), ["executor", "'claude_code', 'anthropic' or 'shell'"]),
    ("unknown-autonomy", good(autonomy="yolo"), ["autonomy", "'full_auto' or 'guarded'"]),
    ("zero-parallel-steps", good(max_parallel_steps=0), ["max_parallel_steps"]),
    ("unknown-field", good(budget={"max_cost_usd": 1}), ["budget", "Extra inputs are not permitted"]),
    ("steps-not-a-list", good(plan={"steps": "a,b"}), ["plan.steps", "list"]),
    ("step-without-name", good(plan={"steps": [{"command": "true"}]}), ["name", "Field required"]),
    ("non-utf8-bytes", b'{"title": "caf\xe9", "goal": "g", "repository": {"path": "/r"}}',
     ["invalid unicode code point", "column 15"]),
    ("not-json", b"title: t\ngoal: [", ["Invalid JSON"]),
]


@pytest.mark.parametrize(("payload", "words"), [c[1:] for c in SPEC_CASES],
                         ids=[c[0] for c in SPEC_CASES])
def test_malformed_spec_is_refused_naming_the_problem(payload: Any, words: list[str]) -> None:
    with pytest.raises(ValidationError) as refused:
        if isinstance(payload, bytes):
            DirectiveSpec.model_validate_json(payload)
        else:
            DirectiveSpec.model_validate(payload)
    message = str(refused.value)
    for word in words:
        assert word.lower() in message.lower(), message


# --------------------------------------------------------------------------- invalid plans


PLAN_CASES: list[tuple[str, list[dict[str, Any]], list[str]]] = [
    ("empty-plan", [], ["no steps"]),
    ("cyclic-plan", [{"name": "a", "command": "true", "depends_on": ["b"]},
                     {"name": "b", "command": "true", "depends_on": ["a"]}], ["cycle"]),
    ("unknown-dependency", [{"name": "a", "command": "true", "depends_on": ["ghost"]}],
     ["ghost"]),
    ("duplicate-step", [{"name": "a", "command": "true"}, {"name": "a", "command": "true"}],
     ["'a' is used more than once"]),
    ("bad-step-name", [{"name": "Not A Slug!", "command": "true"}], ["step name 'Not A Slug!'"]),
]


@pytest.mark.parametrize(("steps", "words"), [c[1:] for c in PLAN_CASES],
                         ids=[c[0] for c in PLAN_CASES])
async def test_invalid_supplied_plan_fails_the_directive_before_any_step(
        client: Client, task_queue: str, steps: list[dict[str, Any]], words: list[str]) -> None:
    fakes = StandIns()
    spec = DirectiveSpec.model_validate(good(plan={"steps": steps}))
    async with build_worker(client, task_queue, fakes.activities()):
        handle = await start(client, task_queue, spec)
        with pytest.raises(WorkflowFailureError) as failed:
            await handle.result()
    cause = failed.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "DirectiveFailed"
    assert "the supplied plan is invalid" in cause.message
    for word in words:
        assert word in cause.message, cause.message
    assert not fakes.called(ActivityName.EXECUTE_STEP)
    history = await handle.fetch_history()
    assert not any(e.HasField("start_child_workflow_execution_initiated_event_attributes")
                   for e in history.events)


# --------------------------------------------------------------------------- workflow input


WORKFLOW_INPUT_CASES: list[tuple[str, Any, list[str]]] = [
    ("input-wrong-types", {**GOOD, "title": 5, "max_parallel_steps": "many"},
     ["title", "max_parallel_steps"]),
    ("input-missing-fields", {"title": "t"}, ["goal", "repository"]),
    ("input-not-an-object", ["not", "a", "spec"], ["DirectiveSpec"]),
]


@pytest.mark.parametrize(("payload", "words"), [c[1:] for c in WORKFLOW_INPUT_CASES],
                         ids=[c[0] for c in WORKFLOW_INPUT_CASES])
async def test_malformed_workflow_input_fails_the_workflow_with_its_reason(
        client: Client, task_queue: str, payload: Any, words: list[str]) -> None:
    """As `temporal workflow start --input '...'` would send it: the workflow must
    fail with the validation message, not retry its task forever."""
    fakes = StandIns()
    async with build_worker(client, task_queue, fakes.activities()):
        handle = await client.start_workflow("DirectiveWorkflow", payload,
                                             id=f"directive-bad-{task_queue}",
                                             task_queue=task_queue)
        with pytest.raises(WorkflowFailureError) as failed:
            await handle.result()
    message = str(failed.value.cause)
    for word in words:
        assert word in message, message
    assert fakes.calls == []


# --------------------------------------------------------------------------- signals and updates


UPDATE_CASES: list[tuple[str, str, Any, list[str]]] = [
    ("approve-unknown-step", "approve_step", {"step": "ghost"}, ["unknown step 'ghost'"]),
    ("approve-running-step", "approve_step", {"step": "a"},
     ["step 'a' is running; nothing is pending approval"]),
    ("deny-unknown-step", "deny_step", {"step": "ghost", "by": "eve"}, ["unknown step 'ghost'"]),
    ("approve-missing-step", "approve_step", {"by": "alice"}, ["step", "Field required"]),
    ("approve-wrong-type", "approve_step", {"step": ["a"]}, ["step", "string"]),
    ("reevaluate-running-step", "reevaluate_step", {"step": "a"},
     ["only blocked, failed or awaiting_approval"]),
    ("raise-nothing", "raise_directive_budget", {}, ["name at least one budget"]),
    ("raise-negative-budget", "raise_directive_budget", {"max_cost_usd": -1},
     ["max_cost_usd", "greater than or equal to 0"]),
    ("resume-not-paused", "resume_directive", {}, ["not paused"]),
    ("goal-empty", "update_directive_goal", {"goal": ""}, ["goal", "at least 1"]),
    ("goal-with-huge-criteria", "update_directive_goal",
     {"goal": "g", "acceptance_criteria": ["z" * 100_001]},
     ["acceptance_criteria hold 100,001 characters", "at most 100,000"]),
    ("goal-without-plan", "update_directive_goal", {"goal": "new goal"}, ["no planner"]),
    ("goal-with-cyclic-plan", "update_directive_goal",
     {"goal": "new", "plan": {"steps": [{"name": "x", "depends_on": ["y"]},
                                        {"name": "y", "depends_on": ["x"]}]}},
     ["the supplied plan is invalid", "cycle"]),
    ("stop-wrong-type", "stop_directive", {"reason": {"why": 1}}, ["reason", "string"]),
]

BAD_SIGNALS: list[tuple[str, Any]] = [
    ("approve", {"step": "ghost"}),
    ("approve", {"step": "a"}),
    ("deny", {"step": 42}),
    ("approve", "not an object"),
    ("raise_budget", {"max_cost_usd": "free"}),
    ("update_goal", {"goal": ""}),
    ("resume", {}),
    ("step_progress", {"name": "ghost", "generation": 1, "status": "passed", "attempt": 1}),
]


async def test_bad_updates_are_rejected_and_bad_signals_change_nothing(
        client: Client, task_queue: str) -> None:
    """One running directive takes every bad update and signal; each update is
    rejected with a message naming the problem, and afterwards the directive is
    exactly as before, with no failed workflow task, and still completes."""
    fakes = StandIns()
    gate = fakes.gate("a")
    async with build_worker(client, task_queue, fakes.activities()):
        handle = await start(client, task_queue, spec_of(("a", []), ("b", ["a"])))
        await gate.reached.wait()
        before = await wait_until(handle, lambda s: s.steps[0].status.value == "running")
        answers: dict[str, str] = {}
        for case, name, payload, _ in UPDATE_CASES:
            with pytest.raises(WorkflowUpdateFailedError) as rejected:
                await handle.execute_update(name, payload)
            answers[case] = str(rejected.value.cause)
        for name, payload in BAD_SIGNALS:
            await handle.signal(name, payload)
        after = await status(handle)
        gate.opened.set()
        result = await handle.result()

    for case, _, _, words in UPDATE_CASES:
        for word in words:
            assert word in answers[case], f"{case}: {answers[case]}"
    assert after.model_dump(exclude={"elapsed_seconds", "recent_events"}) == \
        before.model_dump(exclude={"elapsed_seconds", "recent_events"})
    assert result.status is DirectiveStatus.COMPLETED
    assert [s.attempts for s in result.steps] == [1, 1]
    assert len(fakes.called(ActivityName.EXECUTE_STEP)) == 2
    history = await handle.fetch_history()
    assert not any(e.event_type == HistoryEventType.EVENT_TYPE_WORKFLOW_TASK_FAILED
                   for e in history.events)


# --------------------------------------------------------------------------- repositories


def _git(path: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=path, check=True, capture_output=True,
                          text=True).stdout


def _files(folder: Path) -> list[Path]:
    """Everything under `folder` except makima's own home."""
    return sorted(p.relative_to(folder) for p in folder.rglob("*")
                  if "home" not in p.relative_to(folder).parts)


@pytest.mark.parametrize(("case", "words"), [
    ("not-a-git-repository", ["not a git repository"]),
    ("missing-base-branch", ["release-9"]),
    ("missing-path", ["does not exist"]),
])
async def test_unusable_repository_is_refused_and_left_untouched(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, words: list[str]) -> None:
    for key in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
        monkeypatch.setenv(key, "t")
    for key in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        monkeypatch.setenv(key, "t@t")
    path = tmp_path / "target"
    base = "main"
    if case == "not-a-git-repository":
        path.mkdir()
        (path / "notes.txt").write_text("just a folder\n")
    elif case == "missing-base-branch":
        path.mkdir()
        _git(path, "init", "-q", "-b", "main")
        (path / "a.txt").write_text("a\n")
        _git(path, "add", ".")
        _git(path, "commit", "-q", "-m", "one")
        base = "release-9"
    before = _files(tmp_path)
    activities = ExecutionActivities(tmp_path / "home")
    with pytest.raises(ApplicationError) as refused:
        await ActivityEnvironment().run(
            activities.prepare_repository,
            PrepareInput(directive_id="directive-bad-1",
                         repository=Repository(path=str(path), base_branch=base)))
    for word in words:
        assert word in refused.value.message, refused.value.message
    assert refused.value.non_retryable, "a retry cannot fix a wrong repository"
    assert _files(tmp_path) == before, "nothing is written next to the repository"
    if case == "missing-base-branch":
        branches = _git(path, "branch", "--list")
        assert "makima/" not in branches, "no integration branch for a refused directive"


# --------------------------------------------------------------------------- the CLI


STARTER = Path(__file__).resolve().parent.parent / "starter.py"

# (case id, spec file text or bytes (None: no file), extra argv, words in the refusal)
CLI_CASES: list[tuple[str, str | bytes | None, list[str], list[str]]] = [
    ("cli-missing-spec-file", None, [], ["no such file"]),
    ("cli-invalid-yaml", "title: t\ngoal: [\n", [], ["not valid YAML"]),
    ("cli-negative-budget", "title: t\ngoal: g\nrepository: {path: REPO}\n"
     "budgets: {max_rework_cycles: -1}\n", [], ["budgets.max_rework_cycles"]),
    ("cli-thresholds-out-of-order", "title: t\ngoal: g\nrepository: {path: REPO}\n"
     "thresholds: {green: 0.3, yellow: 0.6}\n", [], ["thresholds out of order"]),
    ("cli-not-a-git-repository", "title: t\ngoal: g\nrepository: {path: PLAIN}\n", [],
     ["is not a git repository"]),
    ("cli-missing-base-branch", "title: t\ngoal: g\nrepository: {path: REPO, base_branch: "
     "release-9}\n", [], ["'release-9' does not exist"]),
    ("cli-cyclic-plan", "title: t\ngoal: g\nexecutor: shell\nrepository: {path: REPO}\n"
     "plan: {steps: [{name: a, command: 'true', depends_on: [b]}, "
     "{name: b, command: 'true', depends_on: [a]}]}\n", [], ["cycle"]),
    ("cli-non-utf8-spec", b"title: caf\xe9\ngoal: g\nrepository: {path: REPO}\n", [],
     ["not UTF-8"]),
    ("cli-approve-without-step", None, ["approve", "directive-x-1"], ["step"]),
    ("cli-unknown-command", None, ["frobnicate"], ["invalid choice"]),
]



@pytest.mark.parametrize(("case", "text", "argv", "words"), [
    pytest.param(*c, id=c[0]) for c in CLI_CASES])
def test_cli_refuses_bad_input_with_exit_code_2_and_starts_nothing(
        tmp_path: Path, case: str, text: str | bytes | None, argv: list[str],
        words: list[str]) -> None:
    repo, plain, home = tmp_path / "repo", tmp_path / "plain", tmp_path / "home"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty",
         "-m", "initial")
    plain.mkdir()
    spec = tmp_path / "spec.yaml"
    if isinstance(text, str):
        spec.write_text(text.replace("REPO", str(repo)).replace("PLAIN", str(plain)))
    elif isinstance(text, bytes):
        spec.write_bytes(text.replace(b"REPO", str(repo).encode()))
    command = argv or ["start", str(spec)]
    # a Temporal address where nothing listens: bad input must be refused before it
    env = {**os.environ, "TEMPORAL_ADDRESS": "127.0.0.1:9", "MAKIMA_HOME": str(home)}
    done = subprocess.run([sys.executable, str(STARTER), *command], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    for word in words:
        assert word in output, output
    assert "Traceback" not in output
    assert not home.exists(), "nothing is written for refused input"
    assert "makima/" not in _git(repo, "branch", "--list")
