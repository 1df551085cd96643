"""The evaluation activity in a real git repository (a worktree on a step branch
made from an integration branch, as the executor leaves it): programmatic
checks that pass, fail and time out, auto-detected test commands, the LLM
judge's scores turned into green / yellow / red by the composite rule, and the
errors a user must act on."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.evaluation import EvaluationActivities
from makima.contracts import EvaluateInput, ExecuteOutput
from makima.evaluation import REQUIRED_FAILURE_MARGIN
from makima.llm.client import LLMClient, llm_from_env
from makima.llm.pricing import PRICES
from makima.models import Confidence, DirectiveSpec, EvaluatorKind, PlannedStep, Repository
from tests.messages_server import MessagesServer, tool_reply, usage

EVALUATOR_MODEL = "claude-haiku-4-5"
INTEGRATION = "makima/directive-greeting-abc"


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout


@pytest.fixture
def worktree(tmp_path: Path) -> Path:
    """A repository with an integration branch and, in a worktree, a step branch
    whose one commit adds hello.txt."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "test@example.com")
    git(repo, "config", "user.name", "test")
    (repo / "README.md").write_text("greeting project\n")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "initial")
    git(repo, "branch", INTEGRATION)
    wt = tmp_path / "wt-greet"
    git(repo, "worktree", "add", "-q", "-b", "steps/greet", str(wt), INTEGRATION)
    (wt / "hello.txt").write_text("hello, world\n")
    git(wt, "add", ".")
    git(wt, "commit", "-q", "-m", "greet")
    return wt


def make_request(worktree: Path, *, verify: list[str], evaluator=EvaluatorKind.AUTO,
                 **spec_fields) -> EvaluateInput:
    spec = DirectiveSpec(title="Greeting", goal="Greet the world in hello.txt",
                         acceptance_criteria=["hello.txt says hello"],
                         repository=Repository(path=str(worktree)), evaluator=evaluator,
                         **spec_fields)
    step = PlannedStep(name="greet", description="write the greeting",
                       task_plan="Create hello.txt containing 'hello, world'.", verify=verify)
    return EvaluateInput(
        directive_id="directive-greeting-abc", generation=1, spec=spec, step=step, attempt=1,
        integration_branch=INTEGRATION,
        execution=ExecuteOutput(success=True, exit_code=0, branch="steps/greet",
                                worktree=str(worktree), changed_files=["hello.txt"],
                                diff_stat=" hello.txt | 1 +", output_tail="wrote hello.txt"),
    )


@pytest.fixture
def llm(messages_server: MessagesServer, monkeypatch: pytest.MonkeyPatch) -> LLMClient:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", messages_server.base_url)
    monkeypatch.setenv("MAKIMA_EVALUATOR_MODEL", EVALUATOR_MODEL)
    client = llm_from_env()
    assert client is not None
    return client


def verdict(score: float, *, instructions: str = "", summary: str = "looked at it") -> dict:
    return {"score": score, "summary": summary, "rework_instructions": instructions,
            "criteria": [{"criterion": "hello.txt says hello", "passed": score >= 0.8,
                          "score": score, "evidence": "hello.txt: hello, world"}]}


# --------------------------------------------------------------------------- programmatic


async def test_programmatic_all_checks_pass_is_green(worktree: Path) -> None:
    activities = EvaluationActivities(None, auto_checks=False)

    evaluation = await activities.evaluate_step(make_request(
        worktree, verify=["test -f hello.txt", "grep -q 'hello, world' hello.txt"]))

    assert evaluation.score == 1.0
    assert evaluation.confidence is Confidence.GREEN
    assert evaluation.passed
    assert evaluation.evaluator == "programmatic"
    assert [c.command for c in evaluation.checks] == ["test -f hello.txt",
                                                      "grep -q 'hello, world' hello.txt"]
    assert all(c.exit_code == 0 for c in evaluation.checks)
    assert evaluation.usage.cost_usd == 0
    assert evaluation.rework_instructions == ""


async def test_programmatic_failing_check_is_red_with_its_output(worktree: Path) -> None:
    activities = EvaluationActivities(None, auto_checks=False)
    failing = "echo 'expected goodbye, found hello'; exit 3"

    evaluation = await activities.evaluate_step(make_request(
        worktree, verify=["test -f hello.txt", failing]))

    assert evaluation.confidence is Confidence.RED
    assert not evaluation.passed
    # half the checks passed, but a failing required check caps the score below yellow
    assert evaluation.score == pytest.approx(0.5 - REQUIRED_FAILURE_MARGIN)
    bad = evaluation.checks[1]
    assert (bad.command, bad.exit_code) == (failing, 3)
    assert "expected goodbye, found hello" in bad.output_tail
    assert bad.duration_seconds >= 0
    assert failing in evaluation.rework_instructions
    assert "expected goodbye, found hello" in evaluation.rework_instructions
    assert "1/2 checks passed" in evaluation.summary


async def test_check_that_runs_too_long_is_killed_and_fails(worktree: Path) -> None:
    activities = EvaluationActivities(None, auto_checks=False, check_timeout=0.5)

    evaluation = await activities.evaluate_step(make_request(worktree, verify=["sleep 30"]))

    check = evaluation.checks[0]
    assert check.exit_code is None
    assert "timed out" in check.output_tail
    assert evaluation.confidence is Confidence.RED


async def test_output_tail_keeps_the_end_of_long_output(worktree: Path) -> None:
    activities = EvaluationActivities(None, auto_checks=False)

    evaluation = await activities.evaluate_step(make_request(
        worktree, verify=["seq 1 20000; echo LAST-LINE"]))

    tail = evaluation.checks[0].output_tail
    assert tail.rstrip().endswith("LAST-LINE")
    assert len(tail) < 4200


async def test_repository_tests_are_detected_and_run(worktree: Path) -> None:
    (worktree / "test_greeting.py").write_text(
        "from pathlib import Path\n\n"
        "def test_greeting():\n"
        "    assert Path('hello.txt').read_text().startswith('goodbye')\n")
    (worktree / "Makefile").write_text("test:\n\tgrep -q hello hello.txt\n")
    activities = EvaluationActivities(None, auto_checks=True)

    evaluation = await activities.evaluate_step(make_request(worktree, verify=[]))

    commands = [c.command for c in evaluation.checks]
    assert any("pytest" in c for c in commands)
    assert "make test" in commands
    by_kind = {("pytest" if "pytest" in c.command else c.command): c for c in evaluation.checks}
    assert by_kind["pytest"].exit_code == 1  # the repository's own test fails
    assert "test_greeting" in by_kind["pytest"].output_tail
    assert by_kind["make test"].exit_code == 0
    assert evaluation.confidence is Confidence.RED


async def test_no_checks_and_no_llm_scores_at_the_yellow_threshold(worktree: Path) -> None:
    activities = EvaluationActivities(None, auto_checks=False)

    evaluation = await activities.evaluate_step(make_request(worktree, verify=[]))

    assert evaluation.score == 0.5
    assert evaluation.confidence is Confidence.YELLOW
    assert not evaluation.passed
    assert "nothing verified" in evaluation.summary


async def test_heartbeats_report_which_check_runs(worktree: Path) -> None:
    beats: list[str] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *details: beats.extend(details)
    activities = EvaluationActivities(None, auto_checks=False)

    await env.run(activities.evaluate_step,
                  make_request(worktree, verify=["true", "test -f hello.txt"]))

    assert beats == ["starting", "check 1/2: true", "check 2/2: test -f hello.txt"]


async def test_a_long_check_keeps_heartbeating(
    worktree: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A test suite running for minutes must not look like a dead worker.
    monkeypatch.setattr("activities.heartbeat.HEARTBEAT_INTERVAL_SECONDS", 0.02)
    beats: list[str] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *details: beats.extend(details)
    activities = EvaluationActivities(None, auto_checks=False)

    await env.run(activities.evaluate_step, make_request(worktree, verify=["sleep 0.5"]))

    assert beats.count("check 1/1: sleep 0.5") >= 2


# --------------------------------------------------------------------------- LLM judge


@pytest.mark.parametrize(("judge_score", "confidence"), [
    (0.95, Confidence.GREEN), (0.6, Confidence.YELLOW), (0.2, Confidence.RED)])
async def test_judge_score_sets_confidence(
    worktree: Path, llm: LLMClient, messages_server: MessagesServer,
    judge_score: float, confidence: Confidence,
) -> None:
    messages_server.script(tool_reply(
        "submit_evaluation",
        verdict(judge_score, instructions="" if judge_score > 0.8 else
                "Add a trailing exclamation mark to hello.txt"),
        used=usage(2000, 400, cache_read=1500)))

    evaluation = await EvaluationActivities(llm, auto_checks=False).evaluate_step(
        make_request(worktree, verify=["test -f hello.txt"]))

    assert evaluation.score == pytest.approx(judge_score)
    assert evaluation.confidence is confidence
    assert evaluation.passed is (confidence is Confidence.GREEN)
    assert evaluation.evaluator == f"llm:{EVALUATOR_MODEL}+checks"
    assert evaluation.criteria[0].criterion == "hello.txt says hello"
    assert evaluation.checks[0].exit_code == 0
    price = PRICES[EVALUATOR_MODEL]
    assert evaluation.usage.cost_usd == pytest.approx(
        (2000 * price.input + 400 * price.output + 1500 * price.cache_read) / 1e6)
    if confidence is Confidence.GREEN:
        assert evaluation.rework_instructions == ""
    else:
        assert "trailing exclamation mark" in evaluation.rework_instructions


async def test_judge_sees_diff_checks_and_task_with_cached_directive_prefix(
    worktree: Path, llm: LLMClient, messages_server: MessagesServer,
) -> None:
    messages_server.script(tool_reply("submit_evaluation", verdict(0.9)))

    await EvaluationActivities(llm, auto_checks=False).evaluate_step(
        make_request(worktree, verify=["test -f hello.txt"]))

    body = messages_server.requests[0].body
    assert body["model"] == EVALUATOR_MODEL
    assert body["tools"][0]["name"] == "submit_evaluation"
    cached = [b for b in body["system"] if "cache_control" in b]
    assert len(cached) == 1 and "Greet the world in hello.txt" in cached[0]["text"]
    prompt = body["messages"][0]["content"]
    assert "+hello, world" in prompt  # the real `git diff integration...HEAD`
    assert "$ test -f hello.txt" in prompt
    assert "Create hello.txt containing 'hello, world'." in prompt
    assert "0.80" in prompt and "0.50" in prompt  # the thresholds
    assert "Greet the world" not in prompt  # the directive lives in the cached prefix only


async def test_failing_required_check_caps_a_confident_judge(
    worktree: Path, llm: LLMClient, messages_server: MessagesServer,
) -> None:
    messages_server.script(tool_reply("submit_evaluation", verdict(0.97)))

    evaluation = await EvaluationActivities(llm, auto_checks=False).evaluate_step(
        make_request(worktree, verify=["grep -q goodbye hello.txt"]))

    assert evaluation.score == pytest.approx(0.5 - REQUIRED_FAILURE_MARGIN)
    assert evaluation.confidence is Confidence.RED
    assert "grep -q goodbye hello.txt" in evaluation.rework_instructions


async def test_programmatic_evaluator_never_calls_the_llm(
    worktree: Path, llm: LLMClient, messages_server: MessagesServer,
) -> None:
    evaluation = await EvaluationActivities(llm, auto_checks=False).evaluate_step(
        make_request(worktree, verify=["true"], evaluator=EvaluatorKind.PROGRAMMATIC))

    assert evaluation.evaluator == "programmatic"
    assert evaluation.confidence is Confidence.GREEN
    assert messages_server.requests == []


# --------------------------------------------------------------------------- errors


async def test_llm_evaluator_without_api_key_is_a_clear_non_retryable_error(
    worktree: Path,
) -> None:
    with pytest.raises(ApplicationError) as caught:
        await EvaluationActivities(None, auto_checks=False).evaluate_step(
            make_request(worktree, verify=["true"], evaluator=EvaluatorKind.LLM))

    assert caught.value.non_retryable
    assert "ANTHROPIC_API_KEY" in caught.value.message


async def test_missing_worktree_is_named(tmp_path: Path) -> None:
    gone = tmp_path / "no-such-worktree"

    with pytest.raises(ApplicationError) as caught:
        await EvaluationActivities(None, auto_checks=False).evaluate_step(
            make_request(gone, verify=["true"]))

    assert caught.value.non_retryable
    assert str(gone) in caught.value.message


async def test_judge_rate_limit_is_retryable(
    worktree: Path, llm: LLMClient, messages_server: MessagesServer,
) -> None:
    from tests.messages_server import error_reply

    messages_server.script(error_reply(429, headers={"retry-after": "3"}))

    with pytest.raises(ApplicationError) as caught:
        await EvaluationActivities(llm, auto_checks=False).evaluate_step(
            make_request(worktree, verify=["true"]))

    assert not caught.value.non_retryable
    assert caught.value.next_retry_delay is not None
    assert caught.value.next_retry_delay.total_seconds() == 3


async def test_a_huge_file_or_a_fifo_in_the_worktree_does_not_hang_or_exhaust_the_worker(
        worktree: Path) -> None:
    """An agent left a sparse 50 GB Makefile and a FIFO as package.json: detecting the
    repository's checks neither reads 50 GB nor blocks on the FIFO, and the evaluation
    ends with the step's own check."""
    with (worktree / "Makefile").open("w") as makefile:
        makefile.write("test:\n\ttrue\n")
        makefile.truncate(50 * 1024 ** 3)
    os.mkfifo(worktree / "package.json")
    heartbeats: list[object] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *details: heartbeats.append(details)
    activities = EvaluationActivities(None, auto_checks=True)

    evaluation = await asyncio.wait_for(env.run(
        activities.evaluate_step, make_request(worktree, verify=["test -f hello.txt"],
                                               evaluator=EvaluatorKind.PROGRAMMATIC)), 60)

    assert [c.command for c in evaluation.checks] == ["test -f hello.txt"]
    assert evaluation.passed and heartbeats
