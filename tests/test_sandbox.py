"""Escape tests: whatever an agent or a plan runs (the anthropic agent's
`run_command`, a shell step, a check) tries to read the worker's secrets
(`/proc/1/environ`, every `/proc/*/environ`, its own environment), files
outside its worktree (`../..`, an absolute path, another attempt's worktree,
MAKIMA_HOME), to write outside the worktree or move a branch of the user's
repository, and to reach a TCP port the test opens on loopback. Every attempt
fails, the worktree stays usable, and no secret value reaches what makima keeps
(the activity's result: history and Postgres rows are made from it), the
model's prompt, or a log line.

Real bubblewrap (installed by `make test`), real git, the real activities.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from temporalio.testing import ActivityEnvironment

from activities.evaluation import EvaluationActivities
from activities.execution import ExecutionActivities
from makima.contracts import EvaluateInput, ExecuteInput, PrepareInput
from makima.models import (
    DirectiveSpec,
    EvaluatorKind,
    ExecutorKind,
    PlannedStep,
    Repository,
    SandboxSettings,
)
from makima.process import scrub_secrets
from makima.sandbox import SandboxUnavailable, require_sandbox
from tests.fakes.repos import make_repo, set_identity, sh
from tests.messages_server import MessagesServer, text_reply, tool_reply

DIRECTIVE = "directive-escape-0001"
SECRET_NAMES = ("MAKIMA_TEST_SECRET", "DATABASE_URL")


@dataclass
class Listener:
    """A TCP port on loopback that counts who connects (Temporal and Postgres
    listen on loopback too)."""

    sock: socket.socket = field(default_factory=socket.socket)
    connections: int = 0

    def start(self) -> int:
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        threading.Thread(target=self._accept, daemon=True).start()
        return self.sock.getsockname()[1]

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()


@dataclass
class Target:
    """What the probe attacks, laid out as on a worker."""

    tmp: Path
    home: Path
    repo: Path
    secrets: list[str]
    listener: Listener
    port: int

    @property
    def outside(self) -> Path:
        return self.tmp / "outside.txt"

    @property
    def other_worktree(self) -> Path:
        return self.home / "worktrees" / DIRECTIVE / "other-a1"

    def probe(self) -> str:
        """A bash script that prints `blocked: <what>` or `ESCAPED: <what>` per attempt,
        and `allowed: worktree` when its own worktree works."""
        # a secret by its name, or an Anthropic key by its shape (Claude Code holds a
        # placeholder under the same name)
        found = "^(" + "|".join(SECRET_NAMES) + ")=|sk-ant-"
        marker = '"OUTSIDE""-MARKER"'  # not spelled out in the script itself
        attempts = {
            "proc-1-environ": f"tr '\\0' '\\n' < /proc/1/environ | grep -Eq '{found}'",
            "ppid-environ": f"tr '\\0' '\\n' < /proc/$P/environ | grep -Eq '{found}'",
            "any-environ": f"cat /proc/[0-9]*/environ | tr '\\0' '\\n' | grep -Eq '{found}'",
            "own-env": f"env | grep -Eq '{found}'",
            "dotdot": f"grep -rqs {marker} ../../../../",
            "absolute-read": f"grep -qs {marker} {self.outside}",
            "other-worktree": f"cat {self.other_worktree}/notes.txt",
            "makima-home": f"cat {self.home}/dev.log",
            "etc-shadow": "grep -q : /etc/shadow",
            "write-repo": f"touch {self.repo}/escaped.txt",
            "move-branch": "git update-ref refs/heads/evil HEAD",
            "new-branch": "git branch evil2",
            "redirect-git": 'echo "$PWD" > "$(git rev-parse --git-dir)/commondir"',
            "replace-git-pointer": "echo 'gitdir: /tmp' > .git",
            "repo-config": "git config core.fsmonitor 'touch /tmp/pwned'",
            "loopback-tcp": f"exec 3<>/dev/tcp/127.0.0.1/{self.port}",
        }
        lines = ["P=$PPID",
                 "try() { if bash -c \"$2\" >/dev/null 2>&1; then echo \"ESCAPED: $1\"; "
                 "else echo \"blocked: $1\"; fi; }"]
        lines += [f"try {name} {_quote(command)}" for name, command in attempts.items()]
        # Writes into the sandbox's private /tmp succeed there and vanish with it: the
        # test checks the worker's file system instead.
        lines += [f"touch {self.tmp}/escaped.txt 2>/dev/null",
                  "touch ../escaped-dotdot.txt 2>/dev/null"]
        lines.append("echo made > made.txt && git status --short >/dev/null "
                     "&& echo 'allowed: worktree'")
        return "\n".join(lines)

    def assert_contained(self, output: str) -> None:
        assert "ESCAPED" not in output, output
        for name in ("proc-1-environ", "ppid-environ", "any-environ", "own-env", "dotdot",
                     "absolute-read", "other-worktree", "makima-home", "etc-shadow",
                     "write-repo",
                     "move-branch", "new-branch", "redirect-git", "replace-git-pointer",
                     "repo-config",
                     "loopback-tcp"):
            assert f"blocked: {name}" in output, f"{name} did not run:\n{output}"
        assert "allowed: worktree" in output, output
        assert not (self.tmp / "escaped.txt").exists()
        assert not (self.repo / "escaped.txt").exists()
        assert not list(self.home.rglob("escaped-dotdot.txt"))
        branches = sh("git", "branch", "--list", "evil*", cwd=self.repo)
        assert branches == "", branches
        assert self.listener.connections == 0

    def assert_nothing_leaks(self, *kept: Any) -> None:
        text = json.dumps([_plain(item) for item in kept], default=str)
        for secret in self.secrets:
            assert secret not in text


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def _plain(item: Any) -> Any:
    return item.model_dump(mode="json") if hasattr(item, "model_dump") else item


@pytest.fixture
def target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Target]:
    set_identity(monkeypatch)
    secret = f"s3cret-{uuid.uuid4().hex}"
    password = f"pw-{uuid.uuid4().hex}"
    monkeypatch.setenv("MAKIMA_TEST_SECRET", secret)
    monkeypatch.setenv("DATABASE_URL", f"postgresql://makima:{password}@127.0.0.1:1/makima")
    home = tmp_path / "home"
    monkeypatch.setenv("MAKIMA_HOME", str(home))
    home.mkdir()
    (home / "dev.log").write_text(f"makima dev: ready database=postgresql://u:{password}@x\n")
    (tmp_path / "outside.txt").write_text("OUTSIDE-MARKER\n")
    repo = make_repo(tmp_path / "repo")
    listener = Listener()
    port = listener.start()
    found = Target(tmp_path, home, repo, [secret, password], listener, port)
    found.other_worktree.mkdir(parents=True)
    (found.other_worktree / "notes.txt").write_text("another attempt's work\n")
    try:
        yield found
    finally:
        listener.sock.close()


def spec(target: Target, executor: ExecutorKind, **changes: Any) -> DirectiveSpec:
    return DirectiveSpec(title="Escape", goal="Try to get out", repository=Repository(
        path=str(target.repo)), executor=executor, **changes)


async def execute(target: Target, step: PlannedStep, directive: DirectiveSpec) -> Any:
    acts = ExecutionActivities(target.home, heartbeat_interval=0.5)
    prepared = await acts.prepare_repository(PrepareInput(directive_id=DIRECTIVE,
                                                          repository=directive.repository))
    return await ActivityEnvironment().run(acts.execute_step, ExecuteInput(
        directive_id=DIRECTIVE, generation=1, spec=directive, step=step,
        integration_branch=prepared.integration_branch))


async def test_an_anthropic_agent_command_cannot_escape(
        target: Target, monkeypatch: pytest.MonkeyPatch, messages_server: MessagesServer,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    key = f"sk-ant-{uuid.uuid4().hex}"
    target.secrets.append(key)
    monkeypatch.setenv("ANTHROPIC_API_KEY", key)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", messages_server.base_url)
    messages_server.script(tool_reply("run_command", {"command": target.probe()}),
                           text_reply("tried everything"))
    out = await execute(target, PlannedStep(name="agent", task_plan="escape"),
                        spec(target, ExecutorKind.ANTHROPIC))
    result = messages_server.requests[1].body["messages"][-1]["content"][0]["content"]
    target.assert_contained(result)
    assert "made.txt" in out.changed_files
    target.assert_nothing_leaks(out, [r.body for r in messages_server.requests], caplog.text)


async def test_a_shell_step_cannot_escape(target: Target,
                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    out = await execute(target, PlannedStep(name="shell", command=target.probe()),
                        spec(target, ExecutorKind.SHELL))
    target.assert_contained(out.output_tail)
    assert out.success and "made.txt" in out.changed_files
    target.assert_nothing_leaks(out, caplog.text)


async def test_a_check_cannot_escape(target: Target, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    directive = spec(target, ExecutorKind.SHELL, evaluator=EvaluatorKind.PROGRAMMATIC)
    out = await execute(target, PlannedStep(name="checked", command="echo work > work.txt",
                                            verify=[target.probe()]), directive)
    evaluation = await ActivityEnvironment().run(
        EvaluationActivities(None, auto_checks=False).evaluate_step, EvaluateInput(
            directive_id=DIRECTIVE, generation=1, spec=directive,
            step=PlannedStep(name="checked", verify=[target.probe()]), attempt=1,
            integration_branch=f"makima/{DIRECTIVE}", execution=out))
    target.assert_contained(evaluation.checks[0].output_tail)
    target.assert_nothing_leaks(out, evaluation, caplog.text)


async def test_a_directive_may_give_its_checks_the_network_and_named_variables(
        target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAKIMA_TEST_FLAVOUR", "vanilla")
    directive = spec(target, ExecutorKind.SHELL, evaluator=EvaluatorKind.PROGRAMMATIC,
                     sandbox=SandboxSettings(network=True, env=["MAKIMA_TEST_FLAVOUR"]))
    command = (f"exec 3<>/dev/tcp/127.0.0.1/{target.port} && echo reached "
               "&& echo flavour=$MAKIMA_TEST_FLAVOUR")
    out = await execute(target, PlannedStep(name="net", command=command), directive)
    assert "reached" in out.output_tail and "flavour=vanilla" in out.output_tail
    assert target.listener.connections == 1


async def test_a_secret_the_worker_passes_on_is_scrubbed_from_what_makima_keeps(
        target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAKIMA_AGENT_ENV_PASSTHROUGH", "MAKIMA_TEST_SECRET")
    out = await execute(target, PlannedStep(name="leak", command='echo "token=$MAKIMA_TEST_SECRET"'),
                        spec(target, ExecutorKind.SHELL))
    assert "token=[secret MAKIMA_TEST_SECRET]" in out.output_tail
    target.assert_nothing_leaks(out)


def test_the_scrubber_knows_named_secrets_and_url_passwords() -> None:
    environ = {"GITHUB_TOKEN": "ghp_abcdef123456", "DATABASE_URL": "postgresql://u:hunter22@h/db",
               "PLAIN": "ghp_abcdef123456x", "MAKIMA_SECRET_NAMES": "PLAIN", "PATH": "/usr/bin"}
    text = "a ghp_abcdef123456x b postgresql://u:hunter22@h/db c /usr/bin"
    scrubbed = scrub_secrets(text, environ)
    assert "ghp_" not in scrubbed and "hunter22" not in scrubbed
    assert "[secret PLAIN]" in scrubbed and "/usr/bin" in scrubbed


def test_a_worker_without_bubblewrap_refuses_to_start_and_says_how_to_fix_it(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap") as refused:
        require_sandbox()
    assert "MAKIMA_SANDBOX=off" in str(refused.value)
    monkeypatch.setenv("MAKIMA_SANDBOX", "off")
    with caplog.at_level(logging.WARNING):
        require_sandbox()
    assert "WITHOUT confinement" in caplog.text


def test_bubblewrap_works_here() -> None:
    """`make test` installs bubblewrap; every other test here depends on it."""
    assert "bubblewrap works" in require_sandbox()
    assert os.environ.get("MAKIMA_SANDBOX", "on") != "off"
